"""`camcore inspect`: the head found in a model, and its candidate target layers."""

from __future__ import annotations

import argparse
import json

from .console import EXIT_OK
from .explain import _load
from .options import add_runtime_arguments

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore inspect` arguments."""
    parser.description = ("Exit status 2 (with the reason on stderr) when no method can explain "
                          "the model.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--feature", metavar="NAME", help="target layer (a 4-D tensor name; default: found)")
    add_runtime_arguments(parser)


def _dims(shape) -> list:
    return [d if isinstance(d, int) else (d or None) for d in shape]


def main(args) -> int:
    """Run `camcore inspect` with parsed `args`; returns the exit status."""
    from ..api import available_providers, candidate_layers
    from ..outputs import runtime_of

    explainer = _load(args.model, args, args.feature)
    head = explainer.head
    layers = candidate_layers(explainer)
    info = {
        "input": {"name": head.input.name, "shape": _dims(head.input.shape), "layout": explainer.input_layout,
                  "dtype": str(head.input.dtype)},
        "feature": {"name": head.feature, "shape": _dims(head.feature_shape), "layout": head.layout},
        "pooling": head.pooling,
        "pooling_node": head.pooling_node,
        "pooling_detail": head.pooling_detail,
        "logits": head.logits,
        "scoring": head.scoring,
        "num_classes": head.num_classes,
        "channels": head.channels,
        "cam": {"exact": head.affine, "reason": head.cam_refusal or None},
        "default_method": explainer.resolve_method("auto"),
        "layers": [{"name": name, "shape": _dims(shape), "layout": layout} for name, shape, layout in layers],
        "providers": available_providers(),
        "runtime": runtime_of(explainer),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK

    def shape_text(shape):
        return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"

    print(f"model        {args.model}")
    print(f"input        {info['input']['name']} {shape_text(info['input']['shape'])} "
          f"{info['input']['layout']} {info['input']['dtype']}")
    print(f"feature      {head.feature} {shape_text(info['feature']['shape'])} {head.layout}")
    pooling = f"{head.pooling_detail or head.pooling} at node {head.pooling_node!r}" if head.pooling else "none"
    print(f"pooling      {pooling}")
    print(f"logits       {head.logits} ({head.scoring})")
    print(f"classes      {head.num_classes}")
    print(f"channels     {head.channels}")
    print(f"cam          {'exact (global average pooling + affine head)' if head.affine else 'no: ' + head.cam_refusal}")
    print(f"method       {info['default_method']} by default (camcore explain --method)")
    print(f"layers       {len(layers)} candidate target layers (--feature NAME), last first:")
    for name, shape, layout in reversed(layers):
        print(f"  {name} {shape_text(_dims(shape))} {layout}")
    print(f"providers    {', '.join(info['providers'])}")
    runtime = info["runtime"]
    print(f"runtime      {runtime['backend']} {runtime['version']} on {', '.join(runtime['devices'])}, "
          f"precision {runtime['precision']}")
    return EXIT_OK
