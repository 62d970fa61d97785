"""`camcore fuse`: write a model that computes its own class maps."""

from __future__ import annotations

import argparse

from ..errors import CamError
from ..outputs import atomic_write_bytes
from .console import EXIT_OK
from .options import add_method_arguments, positive_int

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore fuse` arguments."""
    parser.description = ("Adds outputs cam_classes, cam_scores and cam_maps to the model; gradient "
                          "methods are computed inside the graph.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    parser.add_argument("--top-k", type=positive_int, default=1, metavar="K")
    parser.add_argument("--size", nargs="+", metavar="H W|input",
                        help="resize the maps to H W, or to the model input size ('input')")
    parser.add_argument("--no-normalize", action="store_true", help="keep raw CAM values (no per-map min-max)")
    add_method_arguments(parser)


def main(args) -> int:
    """Run `camcore fuse` with parsed `args`; returns the exit status."""
    from ..api import fuse

    if args.size is None:
        size = None
    elif args.size == ["input"]:
        size = "input"
    else:
        try:
            size = tuple(int(s) for s in args.size)
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise CamError(f"--size takes H W (positive ints) or 'input', got {' '.join(args.size)}")
    fused = fuse(args.model, top_k=args.top_k, size=size, normalize=not args.no_normalize, method=args.method,
                 feature=args.feature)
    atomic_write_bytes(args.output, fused.SerializeToString())
    print(f"wrote {args.output}: outputs {', '.join(o.name for o in fused.graph.output)}")
    return EXIT_OK
