"""`camcore compare`: one grid per image (rows: classes, columns: methods) and compare.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compare import DEFAULT_METHODS, _method_list, compare, grid
from ..errors import CamError
from ..methods import METHODS
from ..outputs import _unique_name, atomic_write_bytes, encode_image, runtime_of, write_json
from .console import EXIT_OK, Progress
from .options import (add_output_arguments, add_preprocess_arguments, add_runtime_arguments, add_target_arguments,
                      collect_images, fraction, positive_int, preprocess_from_args, runtime_options,
                      targets_from_args)

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore compare` arguments (the CLI calls this when `compare` is chosen)."""
    parser.description = ("Explain images with several methods: one PNG grid per image (rows: classes, "
                          "columns: methods) and compare.json with each method's time per image and, with "
                          "--faithfulness, its Average Drop, Increase in Confidence and deletion/insertion AUC. "
                          "A first argument ending in .onnx is the model.")
    parser.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE",
                        help="optional MODEL.onnx, then image files or folders")
    parser.add_argument("--methods", metavar="LIST",
                        help=f"comma-separated, from {', '.join(METHODS[1:])} "
                             f"(default: {','.join(DEFAULT_METHODS)}; cam only on GAP + affine heads)")
    parser.add_argument("--out", default="camcore-compare", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--top-k", type=positive_int, default=1, metavar="K", help="classes (rows) per image")
    parser.add_argument("--faithfulness", action="store_true", help="score each method's top-1 maps")
    parser.add_argument("--steps", type=positive_int, default=16, metavar="S", help="deletion/insertion steps")
    parser.add_argument("--max-channels", type=positive_int, metavar="M",
                        help="scorecam: keep the M channels of highest variance (default: all)")
    parser.add_argument("--width", type=positive_int, default=256, metavar="PX", help="cell width (default: 256)")
    parser.add_argument("--threshold", type=fraction, default=0.2, metavar="T",
                        help="box threshold as a fraction of the map's max (default: 0.2)")
    parser.add_argument("--feature", metavar="NAME", help="target layer (default: found)")
    add_runtime_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    add_target_arguments(parser)
    add_output_arguments(parser, maps=False, coco=False)
    add_preprocess_arguments(parser)


def main(args) -> int:
    """Run `camcore compare` with parsed `args`; returns the exit status."""
    from ..api import load
    from ..preprocess import read_image
    from ..targets import SEEDED_METHODS

    paths = list(args.inputs)
    model = paths.pop(0) if paths[0].lower().endswith(".onnx") else None
    if not paths:
        raise CamError("no images given: camcore compare [MODEL.onnx] IMAGE_OR_FOLDER... --methods LIST")
    runtime = runtime_options(args)  # the runtime flags are checked before anything is read
    files = collect_images(paths)
    explainer = load(model, feature=args.feature, size=args.size, **runtime)
    if args.max_channels is not None:
        explainer.method_options["max_channels"] = args.max_channels
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = targets_from_args(args, explainer, files, [p for p in paths if Path(p).is_dir()])
    if targets is not None and targets.seeded(explainer.head.num_classes) and methods is None:
        methods = [m for m in _method_list(explainer, None) if m in SEEDED_METHODS]  # those that can contrast
    methods = _method_list(explainer, methods)
    if targets is not None:
        for method in methods:
            targets.check_method(method, explainer.head.num_classes)
        if targets.multilabel is not None:
            raise CamError("compare draws the same rows of classes for every method: give --classes or "
                           "--targets, not --multilabel (camcore explain takes it)")
    preprocess = preprocess_from_args(args, explainer)
    images = [read_image(p, exif_orientation=preprocess.exif_orientation) for p in files]
    bar = Progress(len(methods), "compare", quiet=args.quiet, min_items=1)
    try:
        result = compare(explainer, images, methods=methods, preprocess=preprocess,
                         top_k=args.top_k, faithfulness=args.faithfulness, steps=args.steps,
                         threshold=args.threshold, progress=bar.update, classes=targets)
    finally:
        bar.close()
    out = Path(args.out)
    records, taken = [], set()
    for i, (path, image) in enumerate(zip(files, images)):
        cells = [(m, result["explanations"][m][i]) for m in result["methods"]]
        name = _unique_name(path.stem, taken, "png", kind="compare")
        atomic_write_bytes(out / name, encode_image(grid(image, cells, explainer, width=args.width)))
        first = cells[0][1]
        records.append({"path": str(path), "width": int(first.size[1]), "height": int(first.size[0]),
                        "grid": name, "classes": [
            {"index": int(c), "name": explainer.class_name(int(c)), "score": round(float(s), 6)}
            for c, s in zip(first.classes, first.scores)],
            "boxes": {m: [None if e.box(j) is None else list(e.box(j)) for j in range(len(e.classes))]
                      for m, e in cells}})
    summary = {"model": str(model or "embedded:efficientnet_lite0"), "methods": result["methods"],
               "images": records, "seconds_per_image": result["seconds_per_image"],
               "faithfulness": result["faithfulness"], "max_channels": args.max_channels,
               "runtime": runtime_of(explainer)}
    write_json(out / "compare.json", summary)
    if args.report:
        from ..report import write_report

        write_report(out)
    if not args.quiet:
        header = f"{'method':<12}{'s/image':>9}"
        if result["faithfulness"] is not None:
            header += f"{'AvgDrop%':>10}{'IncConf%':>10}{'del AUC':>9}{'ins AUC':>9}"
        print(header)
        for m in result["methods"]:
            line = f"{m:<12}{result['seconds_per_image'][m]:>9.4f}"
            if result["faithfulness"] is not None:
                f = result["faithfulness"][m]
                line += (f"{f['average_drop']:>10.2f}{f['increase_in_confidence']:>10.1f}"
                         f"{f['deletion_auc']:>9.4f}{f['insertion_auc']:>9.4f}")
            print(line)
        print(f"wrote {len(records)} grids and compare.json to {out}/")
    return EXIT_OK
