"""`camcore demo`: explain scikit-image's sample photos with the embedded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..outputs import _results, runtime_of, write_json
from .console import EXIT_OK
from .explain import _explain_and_write, _load, _table
from .options import WORKERS_HELP, add_runtime_arguments, nonnegative_int

__all__ = ["DEMO_IMAGES", "add_arguments", "main"]

DEMO_IMAGES = ("chelsea", "coffee", "rocket")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore demo` arguments."""
    parser.description = ("Explain scikit-image's chelsea, coffee and rocket photos with the "
                          "embedded EfficientNet-Lite0: overlays, results.json and a table.")
    parser.add_argument("--out", default="camcore-demo", metavar="DIR", help="output folder (default: %(default)s)")
    add_runtime_arguments(parser)
    parser.add_argument("--workers", type=nonnegative_int, metavar="N", help=WORKERS_HELP)


def main(args) -> int:
    """Run `camcore demo` with parsed `args`; returns the exit status."""
    from skimage import data

    explainer = _load(None, args)
    out = Path(args.out)
    items = [(f"skimage.data.{name}", name, getattr(data, name)()) for name in DEMO_IMAGES]
    records = _explain_and_write(explainer, items, out, preprocess=None, top_k=1, threshold=0.2,
                                 quiet=True, label="demo", workers=args.workers)
    write_json(out / "results.json", _results(None, 0.2, records, runtime=runtime_of(explainer)))
    print(_table(records))
    print(f"\nwrote {len(records)} overlays and results.json to {out}/")
    return EXIT_OK
