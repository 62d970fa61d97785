"""Every `method=` on the embedded EfficientNet-Lite0 (CPU): speed, cost and faithfulness in one run.

For each method: images per second of `Explainer.explain(top_k=1)` on a batch of
16 preprocessed photos (scikit-image's chelsea, coffee and rocket, repeated),
the model and head runs one image costs, and the Average Drop and deletion /
insertion AUC (16 steps; `camcore.faithfulness`) of its top-1 maps on the three
photos.

Timing: one warm-up call per method (it builds the head sessions), then
`--rounds` rounds, each running every method once in a rotating order; img/s is
the median over rounds.  Full Score-CAM (1280 model runs per image) is timed on
a batch of 1 in a single round, Score-CAM with ``max_channels=64`` on the batch
of 16 in a single round: the table says so.  A method that cannot run here
(e.g. gradient methods without in-graph backprop) is listed with its error.

Usage:  python benchmarks/bench_methods.py [--rounds 3] [--json PATH] [--methods a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import camcore
from camcore.faithfulness import average_drop, confidence_scores, deletion_insertion
from camcore.maps import upsample
from camcore.methods import GRADIENT_METHODS
from camcore.perturbation import runs_per_image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "bench_methods.json"
PHOTOS = ("chelsea", "coffee", "rocket")
BATCH = 16
STEPS = 16
SCORECAM_FAST = 64
METHODS = ("cam", *GRADIENT_METHODS, "eigencam", "ablationcam", "reciprocam", "scorecam", "scorecam-64")


def cost(method: str, channels: int, positions: int) -> str:
    """Runs per image beyond nothing: '1 model + n head' (gradient rows: forward + backward head runs)."""
    if method in GRADIENT_METHODS:
        return "1 model + 1 head fwd+bwd"
    if method in ("cam", "eigencam"):
        return "1 model"
    name, _, m = method.partition("-")
    runs = runs_per_image(name, channels=channels, positions=positions, max_channels=int(m) if m else None)
    return f"{1 + runs['model']} model" + (f" + {runs['head']} head" if runs["head"] else "")


def configure(explainer, method: str) -> str:
    """Set the method's options; return the `method=` name."""
    name, _, m = method.partition("-")
    explainer.method_options = {"max_channels": int(m)} if m else {}
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args()
    methods = METHODS if args.methods is None else tuple(args.methods.split(","))

    from skimage import data

    ex = camcore.load(providers=["cpu"])
    photos = [getattr(data, name)() for name in PHOTOS]
    x3, _ = ex.default_preprocess().batch(photos, layout=ex.input_layout, dtype=ex.head.input.dtype)
    x16 = np.resize(x3, (BATCH, *x3.shape[1:]))
    features, _ = ex.forward({ex.head.input.name: x3[:1]})
    channels, positions = features.shape[1], features.shape[2] * features.shape[3]
    load_before = os.getloadavg()

    rows, errors = {}, {}
    timed = []
    for method in methods:
        name = configure(ex, method)
        try:
            ex.explain(x3[:1], method=name)  # warm-up: builds the head sessions
        except Exception as exc:  # a method that cannot run on this install is reported, not fatal
            errors[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            continue
        timed.append(method)
        rows[method] = {"cost": cost(method, channels, positions), "seconds": []}

    def time_once(method):
        name = configure(ex, method)
        batch = x3[:1] if method == "scorecam" else x16
        started = time.perf_counter()
        ex.explain(batch, method=name)
        rows[method]["seconds"].append(time.perf_counter() - started)
        rows[method]["batch"] = len(batch)

    single = [m for m in timed if m.startswith("scorecam")]
    repeated = [m for m in timed if m not in single]
    for r in range(args.rounds):
        order = repeated[r % max(len(repeated), 1):] + repeated[:r % max(len(repeated), 1)]
        for method in order:
            time_once(method)
    for method in single:
        time_once(method)

    for method in timed:
        row = rows[method]
        row["images_per_second"] = row["batch"] / float(np.median(row["seconds"]))
        row["rounds"] = len(row["seconds"])
        name = configure(ex, method)
        out = ex.explain(x3, method=name)
        maps = upsample(out.maps[:, 0].astype(np.float64), tuple(x3.shape[2:]), method="bilinear")
        original, masked = confidence_scores(ex, x3, maps, out.classes[:, 0])
        curves = deletion_insertion(ex, x3, maps, out.classes[:, 0], steps=STEPS)
        row.update(average_drop=average_drop(original, masked), deletion_auc=float(curves["deletion_auc"].mean()),
                   insertion_auc=float(curves["insertion_auc"].mean()))
    load_after = os.getloadavg()

    lines = ["| method | needs gradients | runs per image | img/s (batch) | Average Drop % (lower is better) "
             "| deletion AUC (lower) | insertion AUC (higher) |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        grads = "yes" if method in GRADIENT_METHODS else "no"
        if method in errors:
            lines.append(f"| {method} | {grads} | - | not run: {errors[method]} | - | - | - |")
            continue
        row = rows[method]
        lines.append(f"| {method} | {grads} | {row['cost']} | {row['images_per_second']:.3g} ({row['batch']}) | "
                     f"{row['average_drop']:.1f} | {row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} |")
    table = "\n".join(lines)
    print(table)
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    report = {"model": "embedded efficientnet_lite0", "provider": "CPUExecutionProvider", "batch": BATCH,
              "photos": list(PHOTOS), "steps": STEPS, "channels": channels, "positions": positions,
              "rounds": args.rounds, "methods": rows, "not_run": errors, "table": table,
              "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count(),
              "platform": platform.platform(), "numpy": np.__version__}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
