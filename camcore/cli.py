"""The `camcore` command: demo, explain, inspect, fuse (and bench, eval, compare from their own modules).

Exit statuses: 0 success; 1 an error (including any image that could not be
explained); 2 a usage error or a model CAM cannot explain; 130 interrupted.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
from pathlib import Path

from . import __version__
from ._cli_util import (EXIT_ERROR, EXIT_OK, IMAGE_FORMATS, Progress, add_engine_arguments, add_method_arguments,
                        add_preprocess_arguments, atomic_write_bytes, check_engine_arguments, encode_image, fail,
                        fraction, nonnegative_int, one_line, overlay_format, positive_int, preprocess_from_args,
                        provider_list, run_command, title_height, title_strip, write_json)
from .errors import CamError

__all__ = ["main", "build_parser"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
DEMO_IMAGES = ("chelsea", "coffee", "rocket")

# Subcommands that live in other modules, imported only when chosen: each module
# provides add_arguments(parser) and main(args) -> int.
PLUGINS = {
    "bench": ("backends.bench", "benchmark plain inference, explain and the fused graph per runtime"),
    "eval": ("camcore.evaluation", "localization accuracy on a wsolevaluation-style dataset"),
    "compare": ("camcore.compare", "every method side by side: grids, time per image, faithfulness"),
}


# ----------------------------------------------------------------- shared pieces

def _load(model, providers, feature=None):
    from .api import load

    return load(model, providers=providers, feature=feature)


# NumPy and the rest of camcore are imported inside the commands: `camcore --help` stays fast.

def _display(image):
    """An image as uint8 RGB for drawing (uint16 and float images rescaled)."""
    import numpy as np

    from .preprocess import as_rgb

    rgb = as_rgb(image)
    if rgb.dtype == np.uint8:
        return rgb
    from skimage.util import img_as_ubyte
    if rgb.dtype.kind == "f":
        rgb = np.clip(rgb, 0, 1)
    return img_as_ubyte(rgb)


def render(image, result, explainer, maps=None):
    """One overlay per explained class, side by side, each under a title strip.

    `maps` are the result's ``(k, H, W)`` maps when already at hand (else recomputed).
    Returns an ``(title_height(W) + H, k * W, 3)`` uint8 image for an ``(H, W)`` image.
    """
    import numpy as np

    from .render import overlay

    rgb = _display(image)
    maps = result.maps if maps is None else maps
    (height, width), top = rgb.shape[:2], title_height(rgb.shape[1])
    canvas = np.empty((top + height, len(result.classes) * width, 3), np.uint8)
    for j, (index, score) in enumerate(zip(result.classes, result.scores)):
        columns = slice(j * width, (j + 1) * width)
        canvas[:top, columns] = title_strip(f"{explainer.class_name(int(index))} {100 * float(score):.1f}%", width)
        canvas[top:, columns] = overlay(rgb, maps[j], boxes=result.box(j))
    return canvas


def _record(path, result, explainer) -> dict:
    """The results.json entry of one image."""
    if result.error is not None:
        return {"path": path, "width": None, "height": None, "error": one_line(result.error), "classes": []}
    height, width = (int(v) for v in result.size)
    classes = [{"index": int(c), "name": explainer.class_name(int(c)), "score": round(float(s), 6),
                "box": None if result.box(j) is None else list(result.box(j))}
               for j, (c, s) in enumerate(zip(result.classes, result.scores))]
    return {"path": path, "width": width, "height": height, "error": None, "classes": classes}


def _table(records) -> str:
    rows = [("image", "class", "score", "box")]
    for r in records:
        if r["error"] is not None:
            rows.append((r["path"], "error", "", r["error"]))
            continue
        top = r["classes"][0]
        rows.append((r["path"], f"{top['index']} {top['name']}", f"{top['score']:.3f}",
                     "-" if top["box"] is None else " ".join(map(str, top["box"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows)


def _unique_name(stem: str, taken: set, extension: str) -> str:
    name, n = f"{stem}.cam.{extension}", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.cam.{extension}"
    taken.add(name)
    return name


def _draw_and_write(path: Path, image_format: str, pixels, result, explainer, maps) -> None:
    """Render one overlay, encode it and write it atomically (runs in a writer thread)."""
    atomic_write_bytes(path, encode_image(render(pixels, result, explainer, maps), image_format))


def _explain_and_write(explainer, items, out: Path, *, preprocess, top_k, threshold, quiet, label,
                       method="auto", image_format="auto", workers=None):
    """Explain ``(name, stem, path or array)`` items, write ``<stem>.cam.<format>`` each; return the records.

    `image_format` is resolved per item by `overlay_format` ("auto": JPEG for JPEG files, else PNG).

    Images are read once, in `workers` threads ahead of inference (see
    `Explainer.iter_explain_images`); the decoded pixels and full-size maps of the
    images in flight travel with their results to as many writer threads, which
    render, encode and write the overlays while the next chunk runs.  At most
    ``2 * writers`` overlays wait to be written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .explainer import _default_workers

    records, taken = [], set()
    writers = _default_workers() if workers is None else max(1, workers)
    pending = collections.deque()
    progress = Progress(len(items), label, quiet=quiet)
    stream = explainer._explain_image_stream(
        (item for _, _, item in items), preprocess=preprocess, top_k=top_k, threshold=threshold,
        upsample="bilinear", classes=None, batch_size=None, errors="report", method=method, workers=workers,
        keep_pixels=True)
    pool = ThreadPoolExecutor(writers, thread_name_prefix="camcore-write")
    try:
        for (name, stem, source), (result, kept) in zip(items, stream):
            record = _record(name, result, explainer)
            if result.error is None:
                chosen = overlay_format(source, image_format)
                filename = _unique_name(stem, taken, chosen)
                pending.append(pool.submit(_draw_and_write, out / filename, chosen, kept[0], result,
                                           explainer, kept[1]))
                record["overlay"] = filename
                while len(pending) > 2 * writers:
                    pending.popleft().result()
                    progress.update()
            else:
                progress.update()
            records.append(record)
        while pending:
            pending.popleft().result()
            progress.update()
    finally:
        stream.close()
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return records


def _results(model, threshold, records, method="cam") -> dict:
    return {"model": str(model if model is not None else "embedded:efficientnet_lite0"),
            "method": method, "threshold": threshold, "images": records}


# ----------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from skimage import data

    explainer = _load(None, provider_list(args.providers))
    out = Path(args.out)
    items = [(f"skimage.data.{name}", name, getattr(data, name)()) for name in DEMO_IMAGES]
    records = _explain_and_write(explainer, items, out, preprocess=None, top_k=1, threshold=0.2,
                                 quiet=True, label="demo", workers=args.workers)
    write_json(out / "results.json", _results(None, 0.2, records))
    print(_table(records))
    print(f"\nwrote {len(records)} overlays and results.json to {out}/")
    return EXIT_OK


# ----------------------------------------------------------------- explain

def _collect_images(paths) -> list:
    """Files as given; folders searched recursively for image extensions (sorted)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise CamError(f"no images found in folder {p}")
            found.extend(inside)
        else:
            found.append(p)  # a missing file is reported per image, the others go on
    return found


def cmd_explain(args) -> int:
    paths = list(args.inputs)
    model = None
    if paths and paths[0].lower().endswith(".onnx"):
        model = paths.pop(0)
    if not paths:
        raise CamError("no images given: camcore explain [MODEL.onnx] IMAGE_OR_FOLDER...")
    check_engine_arguments(args)
    images = _collect_images(paths)
    explainer = _load(model, provider_list(args.providers), args.feature)
    explainer.batch_size = args.batch_size or explainer.batch_size
    method = explainer.resolve_method(args.method)
    preprocess = preprocess_from_args(args, explainer)
    out = Path(args.out)
    if args.engine == "ray":
        records = _explain_on_ray(model, images, out, preprocess, method, args)
    else:
        items = [(str(p), p.stem, str(p)) for p in images]
        records = _explain_and_write(explainer, items, out, preprocess=preprocess, top_k=args.top_k,
                                     threshold=args.threshold, quiet=args.quiet, label="explain", method=method,
                                     image_format=args.format, workers=args.workers)
    results = _results(model, args.threshold, records, method)
    write_results(out, results, args.results_format)
    if args.json:
        print(json.dumps(results, indent=2))
    elif not args.quiet:
        print(_table(records))
    failed = [r for r in records if r["error"] is not None]
    for r in failed:
        print(f"camcore: warning: {r['error']}", file=sys.stderr)
    if failed:
        fail(f"{len(failed)} of {len(records)} images could not be explained")
        return EXIT_ERROR
    return EXIT_OK


def _explain_on_ray(model, images, out, preprocess, method, args) -> list:
    from .distributed import _explain_options, explain_files

    options = _explain_options(method, args.top_k, preprocess, args.threshold, "bilinear")
    progress = Progress(len(images), "explain", quiet=args.quiet)
    try:
        return explain_files(model, [str(p) for p in images], out, options=options,
                             batch_size=args.batch_size or 64, concurrency=args.concurrency,
                             num_gpus=args.num_gpus, providers=provider_list(args.providers),
                             address=args.address, feature=args.feature, image_format=args.format,
                             progress=progress.update)
    finally:
        progress.close()


def write_results(out: Path, results: dict, fmt: str = "json") -> Path:
    """Write results.json, results.jsonl (one image record a line) or results.parquet, atomically."""
    if fmt == "json":
        return write_json(out / "results.json", results)
    if fmt == "jsonl":
        return atomic_write_bytes(out / "results.jsonl",
                                  "".join(json.dumps(r) + "\n" for r in results["images"]).encode("utf-8"))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from .errors import missing_dependency

        raise missing_dependency("pyarrow", "ray") from None
    cls = pa.struct([("index", pa.int64()), ("name", pa.string()), ("score", pa.float64()),
                     ("box", pa.list_(pa.int64()))])
    schema = pa.schema([("path", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("error", pa.string()), ("classes", pa.list_(cls)), ("overlay", pa.string())],
                       metadata={"model": results["model"], "method": results["method"],
                                 "threshold": str(results["threshold"])})
    table = pa.Table.from_pylist([{**{"overlay": None}, **r} for r in results["images"]], schema=schema)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return atomic_write_bytes(out / "results.parquet", buffer.getvalue().to_pybytes())


# ----------------------------------------------------------------- inspect

def _dims(shape) -> list:
    return [d if isinstance(d, int) else (d or None) for d in shape]


def cmd_inspect(args) -> int:
    from backends.onnx_graph import candidate_layers
    from backends.ort_session import import_onnxruntime

    explainer = _load(args.model, provider_list(args.providers), args.feature)
    head = explainer.head
    layers = candidate_layers(explainer.backend.model, logits=head.logits, output=head.output)
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
        "providers": import_onnxruntime().get_available_providers(),
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
    return EXIT_OK


# ----------------------------------------------------------------- fuse

def cmd_fuse(args) -> int:
    from .api import fuse

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


# ----------------------------------------------------------------- parser

def _chosen_command(argv) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _plugin_module(name: str):
    """Import the module behind a plugin subcommand, or raise CamError saying it is missing."""
    module_name = PLUGINS[name][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) in (module_name, module_name.rsplit(".", 1)[0])
        reason = f"{module_name} is not installed" if missing else one_line(exc)
        raise CamError(f"the '{name}' command is not available: {reason}") from None


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The `camcore` argument parser; plugin subcommands are built only when chosen in `argv`.

    Raises CamError when the chosen plugin's module cannot be imported.
    """
    parser = argparse.ArgumentParser(
        prog="camcore", description="Class Activation Maps for exported ONNX models.")
    parser.add_argument("--version", action="version", version=f"camcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    providers_help = "onnxruntime providers, comma separated: cpu, cuda, tensorrt or full names"
    workers_help = ("threads that read images ahead of the model, and as many that draw and write "
                    "overlays (default: CPU cores, at most 4; 0 reads in the main thread)")

    p = sub.add_parser("demo", help="explain three sample photos with the embedded model",
                       description="Explain scikit-image's chelsea, coffee and rocket photos with the "
                                   "embedded EfficientNet-Lite0: overlays, results.json and a table.")
    p.add_argument("--out", default="camcore-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--providers", metavar="LIST", help=providers_help)
    p.add_argument("--workers", type=nonnegative_int, metavar="N", help=workers_help)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", help="explain images with a model (default: the embedded one)",
                       description="Write <stem>.cam.png (.jpg for JPEG images, or --format) per image and one "
                                   "results.json. "
                                   "A first argument ending in .onnx is the model.")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE", help="optional MODEL.onnx, then image files or folders")
    p.add_argument("--out", default="camcore-out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K", help="classes per image (default: 1)")
    p.add_argument("--threshold", type=fraction, default=0.2, metavar="T",
                   help="box threshold as a fraction of the map's max (default: 0.2)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    p.add_argument("--format", choices=IMAGE_FORMATS, default="auto",
                   help="overlay file format; auto: jpg for JPEG images, else png (default: %(default)s)")
    p.add_argument("--providers", metavar="LIST", help=providers_help)
    add_method_arguments(p)
    p.add_argument("--workers", type=nonnegative_int, metavar="N", help=workers_help)
    p.add_argument("--results-format", choices=("json", "jsonl", "parquet"), default="json",
                   help="results.json, results.jsonl (a record a line) or results.parquet (default: json)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="images per model run; with --engine ray also per actor call and per output block "
                        "(default: 32 local, 64 ray)")
    add_engine_arguments(p)
    add_preprocess_arguments(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("inspect", help="show the head found in a model, and its candidate target layers",
                       description="Exit status 2 (with the reason on stderr) when no method can explain "
                                   "the model.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--feature", metavar="NAME", help="target layer (a 4-D tensor name; default: found)")
    p.add_argument("--providers", metavar="LIST", help=providers_help)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fuse", help="write a model that computes its own class maps (CAM or Grad-CAM)",
                       description="Adds outputs cam_classes, cam_scores and cam_maps to the model; gradient "
                                   "methods are computed inside the graph.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K")
    p.add_argument("--size", nargs="+", metavar="H W|input",
                   help="resize the maps to H W, or to the model input size ('input')")
    p.add_argument("--no-normalize", action="store_true", help="keep raw CAM values (no per-map min-max)")
    add_method_arguments(p)
    p.set_defaults(func=cmd_fuse)

    chosen = _chosen_command(argv)
    for name, (_, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _plugin_module(name)
            module.add_arguments(p)
            p.set_defaults(func=module.main)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except CamError as exc:
        fail(str(exc))
        return EXIT_ERROR
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
