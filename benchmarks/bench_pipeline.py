"""From files to overlays: camcore's image pipeline against Pillow + plain onnxruntime (issue 13).

Targets, as ratios of throughputs measured in one run on the same photos (200 JPEGs of
300-800 px made from scikit-image's sample photos with a fixed seed, embedded
EfficientNet-Lite0, batch 16):

* ``explain_images(paths)`` >= 0.8 of the floor: Pillow decode + resize, then plain
  onnxruntime on the unmodified model, one after the other, no CAM;
* ``camcore explain DIR --out OUT --quiet`` (overlays and results.json, wall time of the
  command, start-up included) >= 0.5 of the floor;
* batch-1 latency of ``Explainer.explain`` against plain inference, paired (goal: plain's
  speed / explain's speed >= 0.95).

With ``--openvino`` the rounds also run ``explain_images(paths)`` and the CLI on the
``openvino`` backend at its default precision (``camcore.load(backend="openvino")``,
``camcore explain --backend openvino``), and the report gives both against onnxruntime
(issue 21).

Every measurement runs in a fresh subprocess (same interpreter), and the rounds
interleave the paths in a rotating order, so a busy machine slows them alike; figures
are medians over rounds.  The model-analysis cache (``CAMCORE_CACHE_DIR``) is a
folder of this run, filled once before the rounds: the CLI rounds time a model
analysed before, as every run after a user's first; the start-up table also gives
the first run on an empty cache.  ``--before DIR`` also times a checkout of an older camcore
(its ``explain_images``, its CLI and its start-up) for the before/after table.

Run it from the repository root::

    python benchmarks/bench_pipeline.py --rounds 3 --before /tmp/camcore-before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLOT = HERE / "pipeline.png"
BATCH = 16
COUNT = 200
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
TARGETS = {"explain_images/floor": 0.8, "cli/floor": 0.5, "batch1 explain/plain": 0.95}
# Paths timed in every round (a child process each); the "before" ones run on --before.
PATHS = ("floor", "explain_images", "cli")
OPENVINO_PATHS = ("explain_images_openvino", "cli_openvino")  # with --openvino
CONTEXT = ("pillow_decode_resize", "camcore_read_preprocess", "skimage_decode_resize", "explain_arrays",
           "plain_arrays")
LABELS = {
    "floor": "floor: Pillow decode + resize, then plain onnxruntime (sequential, no CAM)",
    "explain_images": "`explainer.explain_images(paths)`",
    "cli": "`camcore explain DIR --out OUT --quiet` (overlays + results.json, start-up included)",
    "pillow_decode_resize": "decode + resize with Pillow (one thread)",
    "camcore_read_preprocess": "camcore `read_image` + `Preprocess` (one thread)",
    "skimage_decode_resize": "decode + resize with scikit-image, as the old `Preprocess` (one thread)",
    "explain_arrays": "`explain()` on ready arrays, batch 16",
    "plain_arrays": "plain onnxruntime on ready arrays, batch 16",
    "explain_images_openvino": "`explainer.explain_images(paths)`, `backend=\"openvino\"` (its default precision)",
    "cli_openvino": "`camcore explain DIR --out OUT --quiet --backend openvino`",
}


# --------------------------------------------------------------------------- photos

def make_photos(folder: Path, count: int = COUNT, seed: int = 0) -> list:
    """`count` JPEGs, random crops of the sample photos rescaled to a longer side of 300-800 px."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [getattr(data, name)() for name in SOURCES]
    paths = []
    for i in range(count):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        side = rng.integers(300, 801)
        scale = side / max(ch, cw)
        picture = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(
            (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
        path = folder / f"{i:03d}.jpg"
        picture.save(path, quality=90)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- children

def _pillow_load(path, size=(224, 224)):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR))


def _plain_session():
    from backends.onnx_graph import load_model
    from backends.ort_session import make_session
    from camcore import default_model

    session = make_session(load_model(default_model.path())[0])
    return session, session.get_inputs()[0].name


def _to_input(batch, preprocess):
    x = np.stack(batch).astype(np.float32) * np.float32(preprocess.scale)
    x = (x - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def child(path_name: str, folder: Path, workers) -> dict:  # noqa: C901
    """Time one path over every photo in `folder`; imports and model loading are not timed."""
    import camcore
    from camcore import default_model

    paths = sorted(folder.glob("*.jpg"))
    preprocess = default_model.preprocess()
    result = {"path": path_name, "count": len(paths), "camcore": camcore.__file__}
    if path_name == "floor":
        session, name = _plain_session()
        session.run(None, {name: _to_input([_pillow_load(p) for p in paths[:BATCH]], preprocess)})  # warm-up
        start = time.perf_counter()
        for i in range(0, len(paths), BATCH):
            session.run(None, {name: _to_input([_pillow_load(p) for p in paths[i:i + BATCH]], preprocess)})
    elif path_name in ("explain_images", "explain_images_openvino"):
        chosen = {"backend": "openvino"} if path_name.endswith("_openvino") else {}
        explainer = camcore.load(batch_size=BATCH, **chosen)
        result["precision"] = getattr(explainer.backend, "precision", "f32")
        options = {} if workers is None else {"workers": workers}
        explainer.explain_images(paths[:BATCH], **options)  # warm-up
        start = time.perf_counter()
        explainer.explain_images(paths, **options)
    elif path_name in ("pillow_decode_resize", "camcore_read_preprocess", "skimage_decode_resize"):
        if path_name == "camcore_read_preprocess":
            from camcore.preprocess import read_image

            def load(p):
                return preprocess(read_image(p))
        elif path_name == "skimage_decode_resize":
            from skimage import io
            from skimage.transform import resize

            def load(p):
                image = io.imread(p).astype(np.float32) / 255
                return resize(image, (224, 224), order=1, mode="edge", anti_aliasing=True, preserve_range=True)
        else:
            load = _pillow_load
        load(paths[0])
        start = time.perf_counter()
        for p in paths:
            load(p)
    elif path_name in ("explain_arrays", "plain_arrays"):
        x = _to_input([_pillow_load(p) for p in paths[:BATCH]], preprocess)
        if path_name == "plain_arrays":
            session, name = _plain_session()
            step = lambda: session.run(None, {name: x})  # noqa: E731
        else:
            explainer = camcore.load(batch_size=BATCH)
            step = lambda: explainer.explain(x)  # noqa: E731
        step()
        start = time.perf_counter()
        for _ in range(0, len(paths), BATCH):
            step()
    elif path_name == "batch1":
        return batch1(paths, preprocess)
    else:
        raise SystemExit(f"unknown path {path_name}")
    result["seconds"] = time.perf_counter() - start
    return result


def batch1(paths, preprocess, repeat: int = 5) -> dict:
    """Paired batch-1 latency: per photo, plain and explain `repeat` times each, alternating which goes first.

    A single 6 ms run on a shared machine is noisy: each photo's ratio is that of its own
    median plain and median explain latencies, and the figure is the median over photos.
    """
    import camcore

    session, name = _plain_session()
    explainer = camcore.load(batch_size=1)
    inputs = [_to_input([_pillow_load(p)], preprocess) for p in paths]
    for x in inputs[:5]:  # warm-up
        session.run(None, {name: x})
        explainer.explain(x)
    runs = {"plain": lambda x: session.run(None, {name: x}), "explain": explainer.explain}
    plain, explain, ratios = [], [], []
    for i, x in enumerate(inputs):
        times = {"plain": [], "explain": []}
        for r in range(repeat):
            for kind in (("plain", "explain") if (i + r) % 2 == 0 else ("explain", "plain")):
                start = time.perf_counter()
                runs[kind](x)
                times[kind].append(time.perf_counter() - start)
        p, e = statistics.median(times["plain"]), statistics.median(times["explain"])
        plain.append(p)
        explain.append(e)
        ratios.append(p / e)
    return {"path": "batch1", "count": len(inputs), "repeat": repeat, "plain_ms": 1e3 * statistics.median(plain),
            "explain_ms": 1e3 * statistics.median(explain), "paired_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(plain) / statistics.median(explain)}


# --------------------------------------------------------------------------- parent

def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree))


def run_child(path_name: str, folder: Path, tree: Path, workers=None) -> dict:
    env = _env(tree)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", path_name, "--photos", str(folder)]
    if workers is not None:
        command += ["--workers", str(workers)]
    out = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(folder: Path, tree: Path, out: Path, count: int, extra=()) -> dict:
    env = _env(tree)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "camcore.cli", "explain", str(folder), "--out", str(out), "--quiet",
                    *extra], env=env, cwd=tree, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    if len(list(out.glob("*.cam.*"))) != count or not (out / "results.json").is_file():
        raise SystemExit(f"the CLI in {tree} did not write {count} overlays and results.json")
    return {"path": "cli", "count": count, "seconds": seconds}


def startup(tree: Path, photo: Path, out: Path, repeat: int) -> dict:
    """Wall seconds of `import camcore`, `camcore --help` and a one-image `camcore explain`.

    The one-image command runs first on a fresh, empty analysis cache (``CAMCORE_CACHE_DIR``,
    the first run of a model never loaded: the graph is analysed, which imports onnx), then
    `repeat` times with that cache warm; the other rows and the warm one are medians.
    """
    explain = "camcore explain one.jpg"
    with tempfile.TemporaryDirectory(prefix="camcore-startup-cache-") as cache:
        env = dict(_env(tree), CAMCORE_CACHE_DIR=cache)
        commands = {
            "import camcore": [sys.executable, "-c", "import camcore"],
            "camcore --help": [sys.executable, "-m", "camcore.cli", "--help"],
            explain: [sys.executable, "-m", "camcore.cli", "explain", str(photo), "--out", str(out), "--quiet"],
        }

        def seconds(command) -> float:
            start = time.perf_counter()
            subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True)
            return time.perf_counter() - start

        first = seconds(commands[explain])
        times = {name: [] for name in commands}
        for _ in range(repeat):
            for name, command in commands.items():
                times[name].append(seconds(command))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"import camcore": medians["import camcore"], "camcore --help": medians["camcore --help"],
            f"{explain} (first run, empty cache)": first, f"{explain} (warm cache, median)": medians[explain]}


def load_average() -> float:
    return os.getloadavg()[0]


def measure(args) -> dict:
    trees = {"after": ROOT}
    if args.before:
        trees["before"] = Path(args.before).resolve()
    with tempfile.TemporaryDirectory(prefix="camcore-pipeline-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        photos = make_photos(folder, args.count)
        sizes = [max(_size(p)) for p in photos]
        os.environ["CAMCORE_CACHE_DIR"] = str(tmp / "cache")  # inherited by every child
        for tree in trees.values():
            subprocess.run([sys.executable, "-m", "camcore.cli", "explain", str(photos[0]), "--out",
                            str(tmp / "warm-up"), "--quiet"], env=_env(tree), cwd=tree, check=True,
                           capture_output=True)
        rounds, loads = [], []
        paths = PATHS + (OPENVINO_PATHS if args.openvino else ())
        for r in range(args.rounds):
            loads.append(load_average())
            order = paths[r % len(paths):] + paths[:r % len(paths)]
            this = {}
            for path_name in order:
                if path_name == "cli":
                    this[path_name] = run_cli(folder, ROOT, tmp / f"out-{r}", len(photos))["seconds"]
                elif path_name == "cli_openvino":
                    this[path_name] = run_cli(folder, ROOT, tmp / f"out-ov-{r}", len(photos),
                                              ("--backend", "openvino"))["seconds"]
                else:
                    this[path_name] = run_child(path_name, folder, ROOT)["seconds"]
            rounds.append(this)
            print(f"round {r + 1}: " + ", ".join(f"{k} {len(photos) / v:.1f} img/s" for k, v in this.items()),
                  file=sys.stderr)
        context = {name: run_child(name, folder, ROOT)["seconds"] for name in CONTEXT}
        b1 = run_child("batch1", folder, ROOT)
        before = {}
        if "before" in trees:
            before = {"explain_images": run_child("explain_images", folder, trees["before"])["seconds"],
                      "cli": run_cli(folder, trees["before"], tmp / "out-before", len(photos))["seconds"]}
        loads.append(load_average())
        one = photos[int(np.argmax(sizes))]
        starts = {tree_name: startup(tree, one, tmp / f"one-{tree_name}", args.startup_repeat)
                  for tree_name, tree in trees.items()}
        loads.append(load_average())
    median = {name: statistics.median(r[name] for r in rounds) for name in paths}
    rate = {name: args.count / s for name, s in {**median, **context}.items()}
    backends = {}
    if args.openvino:
        backends = {"explain_images openvino/onnxruntime": rate["explain_images_openvino"] / rate["explain_images"],
                    "cli openvino/onnxruntime": rate["cli_openvino"] / rate["cli"],
                    "openvino precision": run_child("explain_images_openvino", folder, ROOT).get("precision")}
    return {
        "command": " ".join(["python", "benchmarks/bench_pipeline.py", *(args.argv or [])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": args.count, "batch": BATCH, "longest_side_px": [min(sizes), max(sizes)],
        "rounds": rounds, "images_per_s": rate,
        "ratios": {"explain_images/floor": rate["explain_images"] / rate["floor"],
                   "cli/floor": rate["cli"] / rate["floor"], "batch1 explain/plain": b1["paired_ratio"]},
        "per_round_ratios": [{"explain_images/floor": r["floor"] / r["explain_images"],
                              "cli/floor": r["floor"] / r["cli"]} for r in rounds],
        "batch1": b1, "before_images_per_s": {k: args.count / v for k, v in before.items()},
        "before_label": args.before_label,
        "startup_s": starts, "load_average": loads, "workers_default": min(4, os.cpu_count() or 1),
        "backends": backends,
    }


def _size(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# --------------------------------------------------------------------------- report

def markdown(result: dict, machine_text: str) -> str:
    rate, ratios, b1 = result["images_per_s"], result["ratios"], result["batch1"]
    before = result["before_images_per_s"]
    lo, hi = result["longest_side_px"]
    lines = [
        "## From files to overlays: the image pipeline (issue 13)",
        "",
        f"Measured {result['date']} with `{result['command']}`: {result['count']} JPEG photos (longest side "
        f"{lo}-{hi} px, random crops of scikit-image's sample photos, seed 0), the embedded EfficientNet-Lite0, "
        f"batch {result['batch']}, {len(result['rounds'])} interleaved rounds (median), each path in a fresh "
        "process (imports and model loading not timed, except for the CLI: wall time of the command).",
        "",
        f"Machine: {machine_text} Load average (1 min) during the run: "
        + ", ".join(f"{v:.1f}" for v in result["load_average"]) + ".",
        "",
        f"| path | img/s | before ({result.get('before_label') or 'older checkout'}) |",
        "|---|---:|---:|",
    ]
    for name in (*PATHS, *[p for p in OPENVINO_PATHS if p in rate], *CONTEXT):
        old = f"{before[name]:.1f}" if name in before else ""
        lines.append(f"| {LABELS[name]} | {rate[name]:.1f} | {old} |")
    lines += [
        "",
        "Targets (ratios of the medians above; in brackets, the same ratio per round):",
        "",
    ]
    per_round = result["per_round_ratios"]
    for key in ("explain_images/floor", "cli/floor"):
        value, target = ratios[key], TARGETS[key]
        rounds = ", ".join(f"{r[key]:.2f}" for r in per_round)
        lines.append(f"- {key} = **{value:.3f}** ({'met' if value >= target else 'missed'}, target >= {target}) "
                     f"[{rounds}]")
    value = ratios["batch1 explain/plain"]
    lines.append(f"- batch 1, paired: plain latency / explain latency = **{value:.3f}** "
                 f"({'met' if value >= TARGETS['batch1 explain/plain'] else 'missed'}, goal >= 0.95); median "
                 f"latency plain {b1['plain_ms']:.2f} ms, explain {b1['explain_ms']:.2f} ms "
                 f"(ratio of medians {b1['ratio_of_medians']:.3f}), {b1['count']} photos, {b1['repeat']} runs of "
                 f"each per photo, order alternating")
    backends = result.get("backends") or {}
    if backends:
        lines += ["", f"Runtimes, same photos and rounds (OpenVINO at its default precision, which ran as "
                      f"{backends['openvino precision']}; onnxruntime at f32), images/s ratios:", ""]
        for key in ("explain_images openvino/onnxruntime", "cli openvino/onnxruntime"):
            base = key.split()[0]  # rounds hold seconds: the ratio of rates is onnxruntime's / openvino's
            rounds = ", ".join(f"{r[base] / r[base + '_openvino']:.2f}" for r in result["rounds"])
            lines.append(f"- {key} = **{backends[key]:.3f}** [{rounds}]")
    lines += ["", "Start-up, median wall seconds of repeated runs:", "",
              "| command | " + " | ".join(result["startup_s"]) + " |",
              "|---|" + "---:|" * len(result["startup_s"])]
    for command in next(iter(result["startup_s"].values())):
        lines.append(f"| `{command}` | " + " | ".join(f"{s[command]:.2f}" for s in result["startup_s"].values())
                     + " |")
    lines += ["", "![images per second per path](pipeline.png)"]
    return "\n".join(lines)


def plot(result: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*PATHS, *CONTEXT]
    short = {"floor": "floor (Pillow +\nplain ORT)", "explain_images": "explain_images", "cli": "camcore explain\nDIR",
             "pillow_decode_resize": "Pillow decode\n+ resize", "camcore_read_preprocess": "camcore read\n+ Preprocess",
             "skimage_decode_resize": "skimage decode\n+ resize", "explain_arrays": "explain()\narrays",
             "plain_arrays": "plain ORT\narrays"}
    after = [result["images_per_s"][n] for n in names]
    before = [result["before_images_per_s"].get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    xs = np.arange(len(names))
    ax.bar(xs + 0.2, after, 0.4, label="now")
    if any(before):
        ax.bar(xs - 0.2, before, 0.4, label=f"before ({result.get('before_label') or 'older checkout'})")
    ax.set_xticks(xs, [short[n] for n in names], fontsize=7)
    ax.set_ylabel("images per second (median)")
    ax.set_yscale("log")
    ax.set_title(f"EfficientNet-Lite0, {result['count']} JPEGs, batch {result['batch']}, {result['date'][:10]}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--before", metavar="DIR", help="a checkout of an older camcore to time as well")
    parser.add_argument("--before-label", default="", help="what --before is (a commit), for the table")
    parser.add_argument("--startup-repeat", type=int, default=7)
    parser.add_argument("--json", default=str(HERE / "pipeline.json"))
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md and the plot")
    parser.add_argument("--openvino", action="store_true",
                        help="also run explain_images and the CLI on the openvino backend (issue 21)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--photos", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.photos), args.workers)))
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    result = measure(args)
    sys.path.insert(0, str(ROOT))
    from camcore.benchmark import machine
    from bench_runtimes import machine_line, write_section

    text = markdown(result, machine_line(machine()))
    print(text)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        write_section("pipeline", text)
        plot(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
