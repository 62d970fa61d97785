"""Throughput of `camcore.distributed.explain_dataset` on Ray Data against the local engine.

`--images` JPEGs (random crops of scikit-image's sample photos, 160 to 512
pixels a side, quality 75 to 95) are written to a temporary folder.  One local
Ray instance is started (its start-up time is reported, not counted).  In each
round, in a rotating order, the embedded EfficientNet-Lite0 explains every
image (top-1 class, its full-size map, the largest box) with:

* ``local``: ``camcore.load()`` then `Explainer.iter_explain_images` on the
  paths, ``batch_size`` images per model run, in this process;
* ``ray xN``: ``explain_dataset(ray.data.read_binary_files(paths, **read_options(N, files=len(paths))))``
  (0-CPU read tasks, at most 2 per actor) with ``concurrency=N`` actors (one CPU
  each), consumed by the driver block by block.

Each figure is end to end, model loading included (in the actors for Ray).
Every configuration runs on ``--images`` images and on ``--small`` of them, in
the same rounds; medians over rounds are reported.  A run costs a fixed part
(Ray Data's planning, starting the actor processes, loading the model) plus a
part per image, so the per-image cost is the slope
``(t(images) - t(small)) / (images - small)`` and the fixed cost what is left.
Ray's overhead at equal parallelism (one process, one model, the same
onnxruntime threads) is reported both ways: per image (the slope of ``ray x1``
against the local engine's; the issue's goal is at most 10 %), and end to end
on ``--images`` images.

Usage:  python benchmarks/bench_ray.py [--images 2000] [--small 500] [--rounds 3] [--batch-size 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage import data
from skimage import io as skio

import camcore
from camcore.distributed import explain_dataset, read_options

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "bench_ray.json"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "cat", "camera")
TARGET = 0.10


def write_images(folder: Path, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in PHOTOS]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h = int(rng.integers(160, min(512, photo.shape[0]) + 1))
        w = int(rng.integers(160, min(512, photo.shape[1]) + 1))
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        path = folder / f"{i:05d}.jpg"
        skio.imsave(path, photo[y:y + h, x:x + w], quality=int(rng.integers(75, 96)))
        paths.append(str(path))
    return paths


def run_local(paths, batch_size) -> tuple[float, int]:
    started = time.perf_counter()
    explainer = camcore.load(providers=["cpu"])
    n = sum(1 for r in explainer.iter_explain_images(paths, batch_size=batch_size, errors="report")
            if r.error is None)
    return time.perf_counter() - started, n


def run_ray(ray, paths, batch_size, actors) -> tuple[float, int]:
    started = time.perf_counter()
    ds = ray.data.read_binary_files(paths, include_paths=True,
                                    **read_options(actors, files=len(paths), batch_size=batch_size))
    out = explain_dataset(ds, batch_size=batch_size, concurrency=actors)
    n = sum(int(np.sum([e is None for e in b["error"]])) for b in out.iter_batches(batch_size=None))
    return time.perf_counter() - started, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=500, help="the smaller run of the per-image slope")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if not 0 < args.small < args.images:
        parser.error("--small must be between 0 and --images")

    import ray

    os.chdir(ROOT)  # Ray puts the driver's working directory on the workers' path
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        started = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray_start = time.perf_counter() - started
        cpus = int(ray.cluster_resources().get("CPU", 0))
        engines = {"local": lambda p: run_local(p, args.batch_size),
                   "ray x1": lambda p: run_ray(ray, p, args.batch_size, 1),
                   "ray x2": lambda p: run_ray(ray, p, args.batch_size, 2)}
        configs = [(name, n) for name in engines for n in (args.images, args.small)]
        times = {f"{name} {n}": [] for name, n in configs}
        for r in range(args.rounds):
            for name, n in configs[r % len(configs):] + configs[:r % len(configs)]:
                seconds, explained = engines[name](paths[:n])
                assert explained == n, (name, n, explained)
                times[f"{name} {n}"].append(seconds)
                print(f"round {r + 1} {name:<7} {n:5d} images {seconds:7.2f} s", flush=True)
        ray.shutdown()

    median = {key: float(np.median(t)) for key, t in times.items()}
    big, small = args.images, args.small
    per_image = {name: (median[f"{name} {big}"] - median[f"{name} {small}"]) / (big - small) for name in engines}
    fixed = {name: median[f"{name} {big}"] - big * per_image[name] for name in engines}
    overhead = per_image["ray x1"] / per_image["local"] - 1
    end_to_end = median[f"ray x1 {big}"] / median[f"local {big}"] - 1
    rows = [("engine", "actors", f"s, {big} images", "images/s", "vs local", "ms per image", "fixed s")]
    for name, actors in (("local", "-"), ("ray x1", "1"), ("ray x2", "2")):
        rows.append((name, actors, f"{median[f'{name} {big}']:.2f}", f"{big / median[f'{name} {big}']:.1f}",
                     f"{median[f'local {big}'] / median[f'{name} {big}']:.2f}x", f"{1000 * per_image[name]:.2f}",
                     f"{fixed[name]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    print("\n".join(lines))
    print(f"\n{big} and {small} images, batch {args.batch_size}, {args.rounds} rounds, {cpus} CPUs for Ray "
          f"(started in {ray_start:.1f} s, not counted)")
    print(f"Ray overhead at equal parallelism (1 actor vs local): per image {100 * overhead:+.1f} % "
          f"({1000 * (per_image['ray x1'] - per_image['local']):+.2f} ms), goal <= {100 * TARGET:.0f} %; "
          f"end to end on {big} images {100 * end_to_end:+.1f} % (fixed cost {fixed['ray x1']:.2f} s "
          f"against {fixed['local']:.2f} s)")
    report = {"images": big, "small": small, "batch_size": args.batch_size, "rounds": args.rounds, "cpus": cpus,
              "ray_start_s": ray_start, "seconds": times, "median_s": median,
              "images_per_s": {name: big / median[f"{name} {big}"] for name in engines},
              "per_image_ms": {k: 1000 * v for k, v in per_image.items()}, "fixed_s": fixed,
              "overhead_per_image": overhead, "overhead_end_to_end": end_to_end, "target": TARGET,
              "load_average": os.getloadavg()[0],
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "ray": ray.__version__}}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
