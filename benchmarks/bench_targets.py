"""What a contrastive target costs: Grad-CAM of one class against Grad-CAM of ``y_c - y_ref`` and of
FinerCAM's ``y_c - sum_d w_d y_d``, on EfficientNet-Lite0 (CPU).

A contrast is one seed vector in the same backward pass of the head, so it should cost what one
class costs.  Rounds are interleaved (the order of the configurations rotates each round) and the
median time per image over the kept rounds is reported, with its ratio to plain top-1.

    python benchmarks/bench_targets.py --batch 16 --repeat 9 --warmup 2 --json bench_targets.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from skimage import data

import camcore
from camcore.targets import Targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--json", default="bench_targets.json")
    args = parser.parse_args()

    explainer = camcore.load(providers=["cpu"])
    preprocess = explainer.default_preprocess()
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    x, _ = preprocess.batch([photos[i % len(photos)] for i in range(args.batch)], layout=explainer.input_layout,
                            dtype=explainer.head.input.dtype)
    configs = {
        "top-1": None,
        "contrast class": Targets(contrast=282),
        "contrast finer": Targets(contrast="finer"),
    }
    times = {name: [] for name in configs}
    for round_ in range(args.warmup + args.repeat):
        names = list(configs)
        names = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in names:
            started = time.perf_counter()
            explainer.explain(x, classes=configs[name], method=args.method)
            if round_ >= args.warmup:
                times[name].append((time.perf_counter() - started) / args.batch)
    base = statistics.median(times["top-1"])
    rows = []
    print(f"{args.method}, EfficientNet-Lite0, CPU, batch {args.batch}, median of {args.repeat} rounds")
    print(f"{'target':<16}{'ms/image':>10}{'ratio':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"target": name, "ms_per_image": 1000 * median, "ratio": median / base,
                     "rounds_ms": [1000 * v for v in values]})
        print(f"{name:<16}{1000 * median:>10.2f}{median / base:>8.3f}")
    with open(args.json, "w") as f:
        json.dump({"method": args.method, "batch": args.batch, "repeat": args.repeat, "warmup": args.warmup,
                   "rows": rows, "numpy": np.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
