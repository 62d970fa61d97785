"""`camcore compare`: every method side by side, with its time per image and, when asked, its faithfulness.

For each image it writes ``<stem>.compare.png``: one row per explained class
(the model's top-k, the same for every method), one column per method, each
cell the map over the image with its box and a title.  ``compare.json`` holds
each method's time per image (one `Explainer.explain` call on the whole
preprocessed batch, so one-time setup such as building a head session counts)
and, with ``--faithfulness``, Average Drop, Increase in Confidence and
deletion/insertion AUC of the top-1 map (see `camcore.faithfulness`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .errors import CamError, InvalidInput
from .methods import METHODS

__all__ = ["DEFAULT_METHODS", "compare", "grid", "add_arguments", "main"]

# scorecam runs the whole model once per channel: only when asked.
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "ablationcam",
                   "reciprocam")


def _method_list(explainer, methods) -> list:
    """Validated method names, in order, without repeats; "cam" is left out of the default on non-affine heads."""
    if methods is None:
        return [m for m in DEFAULT_METHODS if m != "cam" or explainer.head.affine]
    chosen = []
    for name in methods:
        resolved = explainer.resolve_method(name)
        if resolved not in chosen:
            chosen.append(resolved)
    if not chosen:
        raise InvalidInput("methods must name at least one method")
    return chosen


def compare(explainer, images, *, methods=None, preprocess=None, top_k: int = 1, faithfulness: bool = False,
            steps: int = 16, threshold: float = 0.2, progress=None) -> dict:
    """Explain `images` with each method; return the maps, timings and faithfulness figures.

    Parameters
    ----------
    explainer : Explainer
    images : sequence of (H, W, 3) ndarray
        Decoded images (`camcore.preprocess.read_image`).
    methods : sequence of str, optional
        Default `DEFAULT_METHODS` ("cam" only where the head is GAP + affine).
    preprocess : Preprocess, optional
    top_k : int
        Classes per image (the grid's rows).
    faithfulness : bool
        Also score the top-1 map of each method (`confidence_scores`, `deletion_insertion`).
    steps : int
        Deletion/insertion steps.
    threshold : float
        Box threshold, fraction of the map's maximum.
    progress : callable, optional
        Called with 1 after each method.

    Returns
    -------
    dict
        ``methods`` (names), ``explanations`` (method -> list of `ImageExplanation`),
        ``seconds_per_image`` (method -> float), ``faithfulness`` (method -> dict, or None).
    """
    from .explainer import ImageExplanation, _image_maps
    from .faithfulness import average_drop, confidence_scores, deletion_insertion, increase_in_confidence
    from .localize import boxes as find_boxes
    from .maps import upsample

    methods = _method_list(explainer, methods)
    preprocess = preprocess or explainer.default_preprocess()
    x, geometries = preprocess.batch(images, layout=explainer.input_layout, dtype=explainer.head.input.dtype)
    size = x.shape[2:] if explainer.input_layout == "NCHW" else x.shape[1:3]
    result = {"methods": methods, "explanations": {}, "seconds_per_image": {},
              "faithfulness": {} if faithfulness else None}
    for method in methods:
        started = time.perf_counter()
        out = explainer.explain(x, top_k=top_k, method=method)
        result["seconds_per_image"][method] = (time.perf_counter() - started) / len(x)
        explained = []
        for j, geometry in enumerate(geometries):
            full = _image_maps(out.maps[j], geometry, "bilinear")
            found = [find_boxes(m, threshold=threshold) for m in full]
            explained.append(ImageExplanation(None, geometry.original_size, out.classes[j], out.scores[j], found,
                                              out.maps[j], geometry, method=method))
        result["explanations"][method] = explained
        if faithfulness:
            top1 = upsample(out.maps[:, 0].astype(np.float64), tuple(size), method="bilinear")
            original, masked = confidence_scores(explainer, x, top1, out.classes[:, 0])
            curves = deletion_insertion(explainer, x, top1, out.classes[:, 0], steps=steps)
            result["faithfulness"][method] = {
                "average_drop": average_drop(original, masked),
                "increase_in_confidence": increase_in_confidence(original, masked),
                "deletion_auc": float(curves["deletion_auc"].mean()),
                "insertion_auc": float(curves["insertion_auc"].mean()),
                "steps": int(steps)}
        if progress is not None:
            progress(1)
    return result


def grid(image, cells, explainer, *, width: int = 256) -> np.ndarray:
    """One picture: rows are classes, columns are methods.

    Parameters
    ----------
    image : (H, W) or (H, W, 3) ndarray
    cells : list of (method, ImageExplanation)
        The columns, in order.
    width : int
        Width of each cell in pixels (the image is resized to it, keeping its aspect).

    Returns
    -------
    (rows * (title + h), columns * width, 3) uint8 ndarray
    """
    from skimage.transform import resize

    from ._cli_util import title_strip
    from .cli import _display
    from .localize import boxes as find_boxes
    from .maps import upsample
    from .render import overlay

    rgb = _display(image)
    height = max(1, round(rgb.shape[0] * width / rgb.shape[1]))
    small = (resize(rgb, (height, width), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
    rows = []
    for j in range(len(cells[0][1].classes)):
        row = []
        for method, explained in cells:
            shown = upsample(explained.maps[j], (height, width))
            box = find_boxes(shown)
            tile = overlay(small, shown, boxes=box if len(box) else None)
            title = (f"{method} {explainer.class_name(int(explained.classes[j]))} "
                     f"{100 * float(explained.scores[j]):.1f}%")
            row.append(np.concatenate([title_strip(title, width), tile]))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore compare` arguments (the CLI calls this when `compare` is chosen)."""
    from ._cli_util import add_preprocess_arguments, fraction, positive_int

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
    parser.add_argument("--providers", metavar="LIST",
                        help="onnxruntime providers, comma separated: cpu, cuda, tensorrt or full names")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    add_preprocess_arguments(parser)


def main(args) -> int:
    """Run `camcore compare` with parsed `args`; returns the exit status."""
    from ._cli_util import (EXIT_OK, Progress, atomic_write_bytes, encode_image, preprocess_from_args, provider_list,
                            write_json)
    from .api import load
    from .cli import _collect_images
    from .preprocess import read_image

    paths = list(args.inputs)
    model = paths.pop(0) if paths[0].lower().endswith(".onnx") else None
    if not paths:
        raise CamError("no images given: camcore compare [MODEL.onnx] IMAGE_OR_FOLDER... --methods LIST")
    files = _collect_images(paths)
    explainer = load(model, providers=provider_list(args.providers), feature=args.feature)
    if args.max_channels is not None:
        explainer.method_options["max_channels"] = args.max_channels
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    images = [read_image(p) for p in files]
    methods = _method_list(explainer, methods)
    bar = Progress(len(methods), "compare", quiet=args.quiet, min_items=1)
    try:
        result = compare(explainer, images, methods=methods, preprocess=preprocess_from_args(args, explainer),
                         top_k=args.top_k, faithfulness=args.faithfulness, steps=args.steps,
                         threshold=args.threshold, progress=bar.update)
    finally:
        bar.close()
    out = Path(args.out)
    records, taken = [], set()
    for i, (path, image) in enumerate(zip(files, images)):
        cells = [(m, result["explanations"][m][i]) for m in result["methods"]]
        name, n = f"{path.stem}.compare.png", 1
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}.compare.png"
        taken.add(name)
        atomic_write_bytes(out / name, encode_image(grid(image, cells, explainer, width=args.width)))
        first = cells[0][1]
        records.append({"path": str(path), "grid": name, "classes": [
            {"index": int(c), "name": explainer.class_name(int(c))} for c in first.classes],
            "boxes": {m: [None if e.box(j) is None else list(e.box(j)) for j in range(len(e.classes))]
                      for m, e in cells}})
    summary = {"model": str(model or "embedded:efficientnet_lite0"), "methods": result["methods"],
               "images": records, "seconds_per_image": result["seconds_per_image"],
               "faithfulness": result["faithfulness"], "max_channels": args.max_channels}
    write_json(out / "compare.json", summary)
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
