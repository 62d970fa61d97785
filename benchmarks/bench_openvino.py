"""camcore on OpenVINO and onnxruntime, by precision, against plain inference and OpenVINO XAI (issue 21).

On the embedded EfficientNet-Lite0, random standard-normal inputs, CPU.  Goals, as ratios
measured in one run:

* on OpenVINO at its default precision (the model as deployed) and at f32: camcore CAM
  keeps >= 0.95 of plain OpenVINO's images/s at the same precision, Grad-CAM >= 0.85,
  at batch 1 and 16;
* on onnxruntime: Recipro-CAM at batch 16 keeps >= 0.5 of plain inference, and its cost
  per image at batch 16 is no more than at batch 1;
* against OpenVINO XAI's Recipro-CAM at the same precision, batch 1: camcore's is at
  least 1.3x faster (OVX's time / camcore's >= 1.3).

Part 1, interleaved runs (`camcore.benchmark.time_interleaved`): for each runtime
(onnxruntime; OpenVINO at its default; OpenVINO at f32) and batch (1, 16), plain
inference, ``explain(top_k=1, method=m)`` for CAM, Grad-CAM and Recipro-CAM (maps at
feature resolution), all in the same rounds, order rotating; one runtime after the other
(onnxruntime's spinning worker threads slow an OpenVINO call that follows one).  Plain inference and camcore
on OpenVINO are compiled by the ``openvino`` backend's adapter with the same settings.

Part 2, OpenVINO XAI: OVX 1.1 pins OpenVINO 2024.4 and numpy 1.x, so it runs in its own
environment (``--ovx-python``), through ``benchmarks/ovx_reciprocam.py``, which writes
JSON.  Blocks alternate: OVX at its default, OVX at f32 (each a fresh process: `repeat`
timed calls after `warmup`), then camcore's Recipro-CAM, batch 1, the same number of
calls timed the same way (``time.perf_counter`` around each call) on onnxruntime, OpenVINO
default and OpenVINO f32, each in a fresh process as OVX is (in one process, the runtime
timed just before left its threads competing for the 2 cores).  Figures are medians over all blocks' calls.

Run it from the repository root::

    python benchmarks/bench_openvino.py --ovx-python .venvs/ovx/bin/python

It prints the tables and writes ``benchmarks/openvino.json`` and its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from camcore import benchmark as bench  # noqa: E402
from camcore import default_model  # noqa: E402
from camcore.errors import CamError  # noqa: E402

RUNTIMES = ("onnxruntime", "openvino", "openvino:f32")
MODES = ("plain", "cam", "gradcam", "reciprocam")
BATCHES = (1, 16)
GOALS = {"cam/plain (OpenVINO)": 0.95, "gradcam/plain (OpenVINO)": 0.85,
         "reciprocam/plain (onnxruntime, batch 16)": 0.5, "OVX / camcore Recipro-CAM (batch 1)": 1.3}


def configurations(name: str, plain_path, fused_path):
    """`camcore.benchmark` configurations of one runtime name."""
    if name == "onnxruntime":
        return bench.Configurations(plain_path, fused_path, bench.provider_chain("cpu"), io_binding=False)
    _, device, precision = bench.parse_runtime(name)
    return bench.OpenVinoConfigurations(plain_path, fused_path, device, precision)


def run_ovx(python: str, model: Path, precision: str, repeat: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ovx.json"
        done = subprocess.run([python, str(HERE / "ovx_reciprocam.py"), str(model), "--precision", precision,
                               "--repeat", str(repeat), "--warmup", str(warmup), "--json", str(out)],
                              capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise CamError(f"ovx_reciprocam.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(out.read_text())


def run_camcore(name: str, plain_path, fused_path, repeat: int, warmup: int) -> list:
    """camcore's Recipro-CAM on runtime `name`, batch 1, timed in a fresh process (`time_calls`)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, str(plain_path),
                           str(fused_path), str(repeat), str(warmup)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise CamError(f"camcore child on {name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(name: str, plain_path: str, fused_path: str, repeat: str, warmup: str) -> int:
    setup = configurations(name, plain_path, fused_path)
    step = bench.method_step(setup.explainer, bench.random_feed(setup.specs, 1), "reciprocam")
    print(json.dumps(time_calls(step, int(repeat), int(warmup))))
    return 0


def time_calls(step, repeat: int, warmup: int) -> list:
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def pearson(a, b) -> float:
    a, b = np.ravel(a).astype(float), np.ravel(b).astype(float)
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="interleaved rounds kept (part 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ovx-python", help="python of an environment with openvino-xai==1.1.0 (part 2)")
    parser.add_argument("--ovx-blocks", type=int, default=3)
    parser.add_argument("--ovx-repeat", type=int, default=20, help="timed calls per block and configuration")
    parser.add_argument("--json", default=str(HERE / "openvino.json"))
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)

    model = default_model.path()
    result = {"model": str(model), "machine": bench.machine(), "batches": list(BATCHES), "modes": list(MODES),
              "repeat": args.repeat, "warmup": args.warmup, "runtimes": {}, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="bench-openvino-") as folder:
        import onnx

        plain_path, fused_path = bench.prepare_models(onnx.load(str(model)), folder)
        setups, steps = {}, {}
        for name in RUNTIMES:
            try:
                setup = configurations(name, plain_path, fused_path)
                setup.plain  # noqa: B018  (compiled here: its errors mean skipped)
                setup.explainer  # noqa: B018
            except CamError as exc:
                result["runtimes"][name] = {"status": "skipped", "reason": str(exc)}
                print(f"{name}: skipped ({exc})")
                continue
            setups[name] = setup
            result["runtimes"][name] = {"status": "ok", "precision": setup.precision,
                                        "explainer_precision": getattr(setup.explainer.backend, "precision",
                                                                       setup.precision)}
            for mode in MODES:
                for b in BATCHES:
                    steps[f"{name}|{mode}", b] = setup.step(mode, b)
        # Each runtime's configurations are interleaved among themselves, and the runtimes timed one
        # after the other: onnxruntime's worker threads spin for a while after each run, and on a
        # 2-core machine an OpenVINO call right after one ran up to 2x slower.  Goals compare
        # configurations of one runtime.
        times = {}
        for name in setups:
            own = {key: step for key, step in steps.items() if key[0].split("|")[0] == name}
            times.update(bench.time_interleaved(own, repeat=args.repeat, warmup=args.warmup))
        for (key, b), seconds in times.items():
            name, mode = key.split("|")
            runs = result["runtimes"][name].setdefault("runs", {}).setdefault(str(b), {})
            runs[mode] = {"images_per_s": bench.median_throughput(b, seconds), "seconds": seconds}

        # Part 2: OVX against camcore's Recipro-CAM, batch 1, alternating blocks.
        ovx = {}
        if args.ovx_python:
            calls = {f"camcore {name}": [] for name in setups}
            for _ in range(args.ovx_blocks):
                for precision in ("default", "f32"):
                    got = run_ovx(args.ovx_python, model, precision, args.ovx_repeat, 5)
                    entry = ovx.setdefault(precision, {**{k: v for k, v in got.items() if k != "seconds"},
                                                       "seconds": []})
                    entry["seconds"] += got["seconds"]
                for name in setups:  # each in a fresh process too, as OVX: no other runtime's threads about
                    calls[f"camcore {name}"] += run_camcore(name, plain_path, fused_path, args.ovx_repeat, 5)
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            for name, setup in setups.items():
                out = setup.explainer.explain(x, top_k=1, method="reciprocam")
                for precision, entry in ovx.items():
                    if int(out.classes[0, 0]) == entry["class"]:
                        entry.setdefault("pearson_with", {})[name] = pearson(out.maps[0, 0], entry["map"])
            result["ovx"] = {"ovx": ovx, "camcore_seconds": calls}
    print(report(result))
    Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        from bench_runtimes import write_section

        write_section("openvino", report(result, markdown=True))
    return 0


def _ms(figures, batch) -> float:  # noqa: ARG001  (per image: images_per_s counts images)
    return 1000 / figures["images_per_s"]


def report(result: dict, markdown: bool = False) -> str:
    """The runtime-by-precision table, the goals, and the OVX comparison."""
    lines = []
    ok = {n: r for n, r in result["runtimes"].items() if r["status"] == "ok"}
    columns = [(n, b) for n in ok for b in result["batches"]]
    header = ["ms per image"] + [f"{n} ({ok[n]['precision']}) b{b}" for n, b in columns]
    rows = []
    for mode in result["modes"]:
        cells = [mode]
        for n, b in columns:
            run = ok[n]["runs"][str(b)]
            ms = _ms(run[mode], b)
            ratio = run[mode]["images_per_s"] / run["plain"]["images_per_s"]
            cells.append(f"{ms:.2f}" if mode == "plain" else f"{ms:.2f} ({ratio:.2f})")
        rows.append(cells)
    lines += _table(header, rows, markdown)
    lines.append("(in brackets: images/s over plain inference on the same runtime, precision and batch)")
    lines.append("")
    goal_rows = []
    for n in ok:
        runs = ok[n]["runs"]
        ratio = {(m, b): runs[str(b)][m]["images_per_s"] / runs[str(b)]["plain"]["images_per_s"]
                 for m in result["modes"] for b in result["batches"]}
        if n.startswith("openvino"):
            for b in result["batches"]:
                for m, goal in (("cam", 0.95), ("gradcam", 0.85)):
                    goal_rows.append([f"{m}/plain, {n} ({ok[n]['precision']}), batch {b}", f"{ratio[m, b]:.3f}",
                                      f">= {goal}", "met" if ratio[m, b] >= goal else "MISSED"])
        else:
            r = ratio["reciprocam", 16]
            goal_rows.append([f"reciprocam/plain, {n}, batch 16", f"{r:.3f}", ">= 0.5", "met" if r >= 0.5 else "MISSED"])
            b1, b16 = (_ms(runs[str(b)]["reciprocam"], b) for b in (1, 16))
            goal_rows.append([f"reciprocam ms/image batch 16 / batch 1, {n}", f"{b16 / b1:.3f}", "<= 1",
                              "met" if b16 <= b1 else "MISSED"])
    skipped = [f"{n}: skipped ({r['reason']})" for n, r in result["runtimes"].items() if r["status"] != "ok"]
    ovx = result.get("ovx")
    ovx_rows = []
    if ovx:
        camcore = {k: 1000 * statistics.median(v) for k, v in ovx["camcore_seconds"].items()}
        for precision, entry in ovx["ovx"].items():
            ms = 1000 * statistics.median(entry["seconds"])
            ovx_rows.append([f"OVX Recipro-CAM, {precision} ({entry['precision']})", f"{ms:.2f}", "", "", ""])
            for name, theirs in camcore.items():
                runtime = name.removeprefix("camcore ")
                ran = ok[runtime]["precision"]
                if ran != entry["precision"]:
                    continue
                speedup = ms / theirs
                corr = entry.get("pearson_with", {}).get(runtime)
                ovx_rows.append([f"camcore Recipro-CAM, {runtime} ({ran})", f"{theirs:.2f}", f"{speedup:.2f}x",
                                 "met" if speedup >= 1.3 else "MISSED", "" if corr is None else f"{corr:.4f}"])
                goal_rows.append([f"OVX / camcore Recipro-CAM, {runtime} ({ran}), batch 1", f"{speedup:.2f}",
                                  ">= 1.3", "met" if speedup >= 1.3 else "MISSED"])
    lines += _table(["goal", "measured", "target", ""], goal_rows, markdown)
    if ovx_rows:
        lines.append("")
        lines += _table(["batch 1, ms per image (median of every block's calls)", "ms", "OVX / camcore", "goal 1.3x",
                         "Pearson with OVX's map"], ovx_rows, markdown)
    m = result["machine"]
    lines.append("")
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, "
                 f"openvino {m.get('openvino')}; part 1: median of {result['repeat']} interleaved rounds after "
                 f"{result['warmup']} warm-up rounds")
    lines += skipped
    return "\n".join(lines)


def _table(header, rows, markdown: bool) -> list:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|",
                *("| " + " | ".join(cells) + " |" for cells in rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(fmt(r) for r in rows)]


if __name__ == "__main__":
    raise SystemExit(main())
