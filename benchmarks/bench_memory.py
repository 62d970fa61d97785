"""Peak memory of `Explainer.explain_images` over many images against one chunk.

Target (issue 5): explaining 10,000 images keeps the peak resident set size within
1.5x of the peak for a single chunk.

Each measurement runs in a fresh Python subprocess, because a process's peak RSS
(``VmHWM``, see `camcore.benchmark.peak_rss_mib`) never goes down.  The subprocess loads the embedded
EfficientNet-Lite0, then calls ``explain_images`` (which returns the list of every
result, so it is the stricter of the two image entry points) on a generator that
makes random 375x500x3 uint8 images one at a time, so the inputs are never all in
memory.  The generator also samples the current RSS (``/proc/self/statm``) every
`--sample` images.  One subprocess explains a single chunk (the explainer's
``batch_size``, 32), the other `--count` images (default 10,000).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_memory.py --count 10000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE_SHAPE = (375, 500, 3)
CHUNK = 32  # the Explainer's default batch_size
TARGET = 1.5


def _rss_now_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(count: int, sample: int, method: str = "auto", top_k: int = 1) -> dict:
    """Explain `count` random images in this process; report RSS figures."""
    import numpy as np

    import camcore
    from camcore.benchmark import peak_rss_mib

    explainer = camcore.load(None, providers=["cpu"])
    samples = []

    def images():
        rng = np.random.default_rng(0)
        for i in range(count):
            if i % sample == 0:
                samples.append([i, round(_rss_now_mib(), 1)])
            yield rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)

    after_load = peak_rss_mib()
    start = time.perf_counter()
    results = explainer.explain_images(images(), top_k=top_k, method=method)
    seconds = time.perf_counter() - start
    samples.append([count, round(_rss_now_mib(), 1)])
    boxes = sum(len(r.boxes[0]) for r in results)
    return {"count": count, "chunk": explainer.batch_size, "results": len(results), "boxes_found": boxes,
            "setup_peak_rss_mib": round(after_load, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_samples": samples, "seconds": round(seconds, 1), "images_per_s": round(count / seconds, 2)}


def measure(count: int, sample: int, method: str = "auto", top_k: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, __file__, "--child", str(count), "--sample", str(sample),
                           "--method", method, "--top-k", str(top_k)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child for {count} images failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    one, many = result["single_chunk"], result["many"]
    lines = [
        "## Memory: explain_images over many images",
        "",
        f"Measured {result['date']} with `{result['command']}` on {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, onnxruntime {result['machine']['onnxruntime']}.",
        "",
        "Each row is a fresh subprocess: the embedded EfficientNet-Lite0 (CPU), "
        f"`explain_images(images, top_k={result['top_k']}, method={result['method']!r})` "
        f"on a generator of random {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} RGB uint8 images (made one at a time), "
        "every result kept in the returned list. Peak RSS is the process's `VmHWM` (whole process: Python, "
        "numpy, onnxruntime, the model).",
        "",
        "| images | chunk | peak RSS MiB | peak after loading MiB | seconds | images/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (one, many):
        lines.append(f"| {r['count']} | {r['chunk']} | {r['peak_rss_mib']} | {r['setup_peak_rss_mib']} | "
                     f"{r['seconds']} | {r['images_per_s']} |")
    ratio = result["ratio"]
    lines += [
        "",
        f"Peak RSS for {many['count']} images / peak for one chunk = **{ratio:.3f}** "
        f"({'met' if ratio <= TARGET else 'missed'}, target <= {TARGET}).",
        "",
        f"Current RSS while the {many['count']} images ran (MiB, sampled every {result['sample']} images): "
        + ", ".join(f"{i}: {mib}" for i, mib in many["rss_samples"]) + ".",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="images in the long run (default: 10000)")
    parser.add_argument("--sample", type=int, default=1000, help="RSS sampling interval in images")
    parser.add_argument("--json", default=str(HERE / "memory.json"))
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--method", default="auto", help="explain_images(method=...) (default: auto)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.sample, args.method, args.top_k)))
        return 0

    sys.path.insert(0, str(ROOT))
    from camcore.benchmark import machine
    from bench_runtimes import write_section

    single = measure(CHUNK, args.sample, args.method, args.top_k)
    if single["chunk"] != CHUNK:
        raise SystemExit(f"the explainer's chunk is {single['chunk']}, this script assumes {CHUNK}")
    many = measure(args.count, args.sample, args.method, args.top_k)
    result = {"command": " ".join(["python", "benchmarks/bench_memory.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "sample": args.sample, "method": args.method, "top_k": args.top_k,
              "single_chunk": single, "many": many,
              "ratio": many["peak_rss_mib"] / single["peak_rss_mib"], "target": TARGET}
    text = markdown(result)
    print(text)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        write_section("memory", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
