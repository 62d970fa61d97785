"""Throughput of `camcore eval` against `Explainer.explain_images` on the same images.

A dataset of real photos (scikit-image's samples, repeated to `--images`
files, ImageNet-like sizes) is written to a temporary wsolevaluation metadata
folder with one box per image. In each round, interleaved, the embedded
EfficientNet-Lite0 runs:

* ``explain``: ``explain_images`` on the image paths (top-1 class, its map on
  the original image, the largest box), chunk by chunk;
* ``eval``: `camcore.evaluation.evaluate` on the same images (top-5 classes,
  the ground-truth CAM as a 224x224 bicubic map, MaxBoxAcc V1 + V2 over 100
  thresholds, the heuristic's top-k/GT-known box); it scores a batch in a
  second thread while the next one is read and run.

Both read and preprocess the images themselves. Throughput is the median
over rounds of images per second; the issue's target is eval within 10 % of
explain. The eval time is also broken down (model, CAM maps, MaxBoxAcc,
heuristic boxes) by timing those steps alone on one batch.

Usage:  python benchmarks/bench_eval.py [--images 64] [--rounds 3] [--batch-size 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage import data
from skimage.transform import resize

import camcore
from camcore.evaluation import GRID, evaluate, grid_boxes
from camcore.localize import boxes as heuristic_boxes
from camcore.metrics import box_accuracies
from camcore.wsol import read_dataset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "bench_eval.json"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "cat", "immunohistochemistry", "hubble_deep_field")
TARGET = 0.10


def write_dataset(folder: Path, n: int) -> tuple[Path, Path, list]:
    """`n` photos resized to ImageNet-like sizes (500 x 375 or 375 x 500), with a central box each."""
    images, meta = folder / "images", folder / "meta"
    images.mkdir()
    meta.mkdir()
    paths, ids = [], []
    for i in range(n):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        shape = (375, 500) if i % 2 == 0 else (500, 375)
        pixels = (resize(photo, shape, anti_aliasing=True) * 255).astype(np.uint8)
        image_id = f"{i:04d}.png"
        iio.imwrite(images / image_id, pixels)
        ids.append(image_id)
        paths.append(images / image_id)
    (meta / "image_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (meta / "class_labels.txt").write_text("".join(f"{i},285\n" for i in ids))
    (meta / "localization.txt").write_text("".join(f"{i},60,50,300,320\n" for i in ids))
    return images, meta, paths


def breakdown(explainer, dataset, images, batch: int) -> dict:
    """Milliseconds per image of each eval step, timed alone on the first batch."""
    samples = dataset.samples[:batch]
    preprocess = explainer.default_preprocess()
    out = {}
    t0 = time.perf_counter()
    pixels = [camcore.preprocess.read_image(images / s.image_id) for s in samples]
    x, geometries = preprocess.batch(pixels, layout=explainer.input_layout)
    out["read + preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    features, logits = explainer.forward({explainer.head.input.name: x})
    out["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.argsort(-logits.reshape(len(x), -1), axis=1, kind="stable")[:, :5]
    labels = np.array([[s.label] for s in samples])
    maps = camcore.cam(features, explainer.head.weights, labels, layout=explainer.head.layout)[:, 0]
    maps = camcore.normalize(camcore.upsample(maps.astype(np.float64), (GRID, GRID), method="bicubic"))
    out["top-5 + GT CAM + bicubic 224 + normalize"] = time.perf_counter() - t0
    gt = [grid_boxes(s.boxes, g) for s, g in zip(samples, geometries)]
    t0 = time.perf_counter()
    box_accuracies(maps, gt)
    out["MaxBoxAcc V1 + V2 (100 thresholds)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in maps:
        heuristic_boxes(m, threshold=0.2)
    out["heuristic box (GT map)"] = time.perf_counter() - t0
    return {key: 1e3 * seconds / len(samples) for key, seconds in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args()

    explainer = camcore.load(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        images, meta, paths = write_dataset(Path(tmp), args.images)
        dataset = read_dataset(meta)
        runs = {
            "explain": lambda: explainer.explain_images(paths, batch_size=args.batch_size),
            "eval": lambda: evaluate(explainer, dataset, images, batch_size=args.batch_size),
        }
        runs["eval"]()  # warm-up (first session run, caches)
        rates = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[name]()
                rates[name].append(args.images / (time.perf_counter() - t0))
        steps = breakdown(explainer, dataset, images, args.batch_size)

    median = {name: float(np.median(v)) for name, v in rates.items()}
    ratio = median["eval"] / median["explain"]
    print(f"{args.images} images (500x375 / 375x500), batch {args.batch_size}, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':<10}{'images/s':>10}{'ms/image':>10}")
    for name, rate in median.items():
        print(f"{name:<10}{rate:>10.1f}{1e3 / rate:>10.1f}")
    print(f"eval / explain throughput: {ratio:.2f} (target >= {1 - TARGET:.2f}: {'met' if ratio >= 1 - TARGET else 'missed'})")
    print("\neval steps, ms/image (one batch, timed alone):")
    for name, ms in steps.items():
        print(f"  {name:<42}{ms:>8.2f}")
    record = {
        "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
        "images_per_second": median, "all_rounds": rates, "eval_over_explain": ratio,
        "target_ratio": 1 - TARGET, "met": ratio >= 1 - TARGET, "eval_steps_ms_per_image": steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
