"""Throughput of `camcore.distributed.explain_dataset` on Ray Data against the local engine.

`--images` JPEGs (random crops of scikit-image's sample photos, 160 to 512
pixels a side, quality 75 to 95) are written to a temporary folder.  One local
Ray instance is started (its start-up time is reported, not counted).  In each
round, in a rotating order, the embedded EfficientNet-Lite0 explains every
image (top-1 class, its full-size map, the largest box) with:

* ``local``: ``camcore.load()`` then `Explainer.iter_explain_images` on the
  paths, ``batch_size`` images per model run, in this process;
* ``ray xN``: ``explain_dataset(path_dataset(paths))`` on ``N`` actors (one CPU
  each): the actors read the files, as the local engine does (``--engine ray``);
* ``ray x1 bytes``: ``explain_dataset(ray.data.read_binary_files(paths,
  **read_options(1, files=len(paths))))``: 0-CPU read tasks put the bytes in
  Ray's object store, as for files that only Ray's readers reach (S3).

Each figure is end to end, model loading included (in the actors for Ray), the
results consumed by the driver block by block.  A run costs a fixed part (Ray
Data's planning, starting the actor processes, loading the model) plus a part
per image, so each engine runs on ``--images`` images and on ``--small`` of
them in every round, and its cost per image is the slope
``(t(images) - t(small)) / (images - small)``.  Ray's per-image overhead at
equal parallelism (one actor, one model, the same onnxruntime threads, against
one process) is taken round by round, each Ray slope against the local slope
of the same round, so that the machine's drifts in speed cancel; the median
over rounds is reported with every round's value.  The issue's goal is at most
10 %.

Usage:  python benchmarks/bench_ray.py [--images 2000] [--small 500] [--rounds 6] [--batch-size 64] [--json PATH]
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
from camcore.distributed import explain_dataset, path_dataset, read_options

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


def run_ray(ray, paths, batch_size, actors, source) -> tuple[float, int]:
    started = time.perf_counter()
    if source == "paths":
        ds = path_dataset(paths, actors, batch_size=batch_size)
    else:
        ds = ray.data.read_binary_files(paths, include_paths=True,
                                        **read_options(actors, files=len(paths), batch_size=batch_size))
    out = explain_dataset(ds, batch_size=batch_size, concurrency=actors)
    n = sum(int(np.sum([e is None for e in b["error"]])) for b in out.iter_batches(batch_size=None))
    return time.perf_counter() - started, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=500, help="the smaller run of the per-image slope")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if not 0 < args.small < args.images:
        parser.error("--small must be between 0 and --images")

    import ray

    os.chdir(ROOT)  # Ray puts the driver's working directory on the workers' path
    big, small = args.images, args.small
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), big)
        started = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False  # as in --engine ray
        ray_start = time.perf_counter() - started
        cpus = int(ray.cluster_resources().get("CPU", 0))
        engines = {"local": lambda p: run_local(p, args.batch_size),
                   "ray x1": lambda p: run_ray(ray, p, args.batch_size, 1, "paths"),
                   "ray x1 bytes": lambda p: run_ray(ray, p, args.batch_size, 1, "bytes"),
                   "ray x2": lambda p: run_ray(ray, p, args.batch_size, 2, "paths")}
        configs = [(name, n) for name in engines for n in (big, small)]
        times = {f"{name} {n}": [] for name, n in configs}
        for r in range(args.rounds):
            for name, n in configs[r % len(configs):] + configs[:r % len(configs)]:
                seconds, explained = engines[name](paths[:n])
                assert explained == n, (name, n, explained)
                times[f"{name} {n}"].append(seconds)
                print(f"round {r + 1} {name:<12} {n:5d} images {seconds:7.2f} s", flush=True)
        ray.shutdown()

    # per round: each engine's cost per image (the slope) and fixed cost; Ray's overhead against local's slope
    slope = {name: [(b - s) / (big - small) for b, s in zip(times[f"{name} {big}"], times[f"{name} {small}"])]
             for name in engines}
    fixed = {name: [b - big * k for b, k in zip(times[f"{name} {big}"], slope[name])] for name in engines}
    overhead = {name: [k / loc - 1 for k, loc in zip(slope[name], slope["local"])] for name in engines if name != "local"}
    median = lambda values: float(np.median(values))  # noqa: E731
    rows = [("engine", f"s, {big} images", "images/s", "vs local", "ms per image", "per image vs local", "fixed s")]
    for name in engines:
        seconds = median(times[f"{name} {big}"])
        rows.append((name, f"{seconds:.2f}", f"{big / seconds:.1f}", f"{median(times[f'local {big}']) / seconds:.2f}x",
                     f"{1000 * median(slope[name]):.2f}",
                     "-" if name == "local" else f"{100 * median(overhead[name]):+.1f} %", f"{median(fixed[name]):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    print("\n".join(lines))
    print(f"\n{big} and {small} images, batch {args.batch_size}, {args.rounds} rounds (medians), {cpus} CPUs for Ray "
          f"(started in {ray_start:.1f} s, not counted)")
    for name, values in overhead.items():
        print(f"{name:<12} per-image overhead by round: " + ", ".join(f"{100 * v:+.1f} %" for v in values))
    headline = median(overhead["ray x1"])
    print(f"Ray overhead at equal parallelism (1 actor vs local, per image): {100 * headline:+.1f} % "
          f"(median of {args.rounds} rounds), goal <= {100 * TARGET:.0f} %")
    report = {"images": big, "small": small, "batch_size": args.batch_size, "rounds": args.rounds, "cpus": cpus,
              "ray_start_s": ray_start, "seconds": times, "per_image_s": slope, "fixed_s": fixed,
              "overhead_per_image": overhead, "overhead_median": {k: median(v) for k, v in overhead.items()},
              "images_per_s": {name: big / median(times[f"{name} {big}"]) for name in engines}, "target": TARGET,
              "load_average": os.getloadavg()[0],
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "ray": ray.__version__}}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
