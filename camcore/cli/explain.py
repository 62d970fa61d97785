"""`camcore explain` (and `camcore demo`): overlays and result records for images."""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

from ..errors import CamError
from ..outputs import (IMAGE_FORMATS, _record, _results, _unique_name, atomic_write_bytes, encode_image, runtime_of,
                       overlay_format, render, write_results)
from .console import EXIT_ERROR, EXIT_OK, Progress, fail
from .options import (WORKERS_HELP, add_engine_arguments, add_method_arguments, add_output_arguments,
                      add_preprocess_arguments, add_runtime_arguments, add_target_arguments, check_engine_arguments,
                      check_output_arguments, collect_images, describe_targets, fraction, nonnegative_int,
                      positive_int, preprocess_from_args, runtime_options, targets_from_args)

# NumPy and the rest of camcore are imported inside the commands: `camcore --help` stays fast.

__all__ = ["add_arguments", "main"]


def _load(model, args, feature=None):
    """`camcore.load` with the runtime the `add_runtime_arguments` flags in `args` pick."""
    from ..api import load

    return load(model, feature=feature, size=getattr(args, "size", None), **runtime_options(args))


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


def _draw_and_write(path: Path, image_format: str, pixels, result, explainer, maps, maps_path=None,
                    maps_dtype="float32") -> None:
    """Render one overlay, encode it and write it atomically (runs in a writer thread); with `maps_path`,
    also the raw maps (`camcore.saved_maps`)."""
    atomic_write_bytes(path, encode_image(render(pixels, result, explainer, maps), image_format))
    if maps_path is not None:
        from ..saved_maps import save_maps

        save_maps(maps_path, [result], dtype=maps_dtype, class_names=explainer.class_name)


def _explain_and_write(explainer, items, out: Path, *, preprocess, top_k, threshold, quiet, label,
                       method="auto", image_format="auto", workers=None, classes=None, maps_dtype=None):
    """Explain ``(name, stem, path or array)`` items, write ``<stem>.cam.<format>`` each; return the records.

    `classes` chooses the classes (`camcore.targets.Targets`, rows in the order of `items`);
    with `maps_dtype`, each image's raw maps go to ``<stem>.maps.npz`` beside its overlay.

    `image_format` is resolved per item by `overlay_format` ("auto": JPEG for JPEG files, else PNG).

    Images are read once, in `workers` threads ahead of inference (see
    `Explainer.iter_explain_images`); the decoded pixels and full-size maps of the
    images in flight travel with their results to as many writer threads, which
    render, encode and write the overlays while the next chunk runs.  At most
    ``2 * writers`` overlays wait to be written.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..explainer import _default_workers

    records, taken = [], set()
    writers = _default_workers() if workers is None else max(1, workers)
    pending = collections.deque()
    progress = Progress(len(items), label, quiet=quiet)
    stream = explainer._explain_image_stream(
        (item for _, _, item in items), preprocess=preprocess, top_k=top_k, threshold=threshold,
        upsample="bilinear", classes=classes, batch_size=None, errors="report", method=method, workers=workers,
        keep_pixels=True)
    pool = ThreadPoolExecutor(writers, thread_name_prefix="camcore-write")
    try:
        for (name, stem, source), (result, kept) in zip(items, stream):
            record = _record(name, result, explainer)
            if result.error is None:
                chosen = overlay_format(source, image_format)
                filename = _unique_name(stem, taken, chosen)
                maps_name = None if maps_dtype is None else filename[:-len(f".cam.{chosen}")] + ".maps.npz"
                pending.append(pool.submit(_draw_and_write, out / filename, chosen, kept[0], result,
                                           explainer, kept[1], maps_name and out / maps_name, maps_dtype))
                record["overlay"] = filename
                if maps_name is not None:
                    record["maps"] = maps_name
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore explain` arguments."""
    parser.description = ("Write <stem>.cam.png (.jpg for JPEG images, or --format) per image and one "
                          "results.json. "
                          "A first argument ending in .onnx is the model.")
    parser.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE",
                        help="optional MODEL.onnx, then image files or folders")
    parser.add_argument("--out", default="camcore-out", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--top-k", type=positive_int, default=1, metavar="K", help="classes per image (default: 1)")
    parser.add_argument("--threshold", type=fraction, default=0.2, metavar="T",
                        help="box threshold as a fraction of the map's max (default: 0.2)")
    parser.add_argument("--json", action="store_true", help="print results.json to stdout")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="auto",
                        help="overlay file format; auto: jpg for JPEG images, else png (default: %(default)s)")
    add_runtime_arguments(parser)
    add_method_arguments(parser)
    parser.add_argument("--workers", type=nonnegative_int, metavar="N", help=WORKERS_HELP)
    parser.add_argument("--results-format", choices=("json", "jsonl", "parquet"), default="json",
                        help="results.json, results.jsonl (a record a line) or results.parquet (default: json)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="images per model run; with --engine ray also per actor call and per output block "
                             "(default: 32 local, 64 ray)")
    add_target_arguments(parser)
    add_output_arguments(parser)
    add_engine_arguments(parser)
    add_preprocess_arguments(parser)


def main(args) -> int:
    """Run `camcore explain` with parsed `args`; returns the exit status."""
    paths = list(args.inputs)
    model = None
    if paths and paths[0].lower().endswith(".onnx"):
        model = paths.pop(0)
    if not paths:
        raise CamError("no images given: camcore explain [MODEL.onnx] IMAGE_OR_FOLDER...")
    runtime_options(args)  # the runtime flags are checked before anything is read
    check_engine_arguments(args)
    check_output_arguments(args)
    images = collect_images(paths)
    explainer = _load(model, args, args.feature)
    explainer.batch_size = args.batch_size or explainer.batch_size
    method = explainer.resolve_method(args.method)
    # the targets are read and checked before anything is explained or written
    targets = targets_from_args(args, explainer, images, [p for p in paths if Path(p).is_dir()])
    if targets is not None:
        targets.check_method(method, explainer.head.num_classes)
    maps_dtype = (args.maps_dtype or "float32") if args.save_maps else None
    preprocess = preprocess_from_args(args, explainer)
    out = Path(args.out)
    started = time.perf_counter()
    if args.engine == "ray":
        records = _explain_on_ray(model, images, out, preprocess, method, args, targets, maps_dtype)
    else:
        items = [(str(p), p.stem, str(p)) for p in images]
        records = _explain_and_write(explainer, items, out, preprocess=preprocess, top_k=args.top_k,
                                     threshold=args.threshold, quiet=args.quiet, label="explain", method=method,
                                     image_format=args.format, workers=args.workers, classes=targets,
                                     maps_dtype=maps_dtype)
    seconds = (time.perf_counter() - started) / max(1, len(records))
    results = _results(model, args.threshold, records, method, runtime=runtime_of(explainer))
    if targets is not None:
        results["targets"] = describe_targets(args)
    write_results(out, results, args.results_format)
    write_extras(out, records, args, images=images, num_classes=explainer.head.num_classes,
                 class_name=explainer.class_name, seconds_per_image=round(seconds, 6))
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


def _explain_on_ray(model, images, out, preprocess, method, args, targets=None, maps_dtype=None) -> list:
    from ..distributed import _explain_options, explain_files

    options = _explain_options(method, args.top_k, preprocess, args.threshold, "bilinear")
    options.update({"classes": targets} if targets is not None else {})
    progress = Progress(len(images), "explain", quiet=args.quiet)
    try:
        return explain_files(model, [str(p) for p in images], out, options=options,
                             batch_size=args.batch_size or 64, concurrency=args.concurrency,
                             num_gpus=args.num_gpus, **runtime_options(args),
                             address=args.address, feature=args.feature, image_format=args.format,
                             progress=progress.update, maps_dtype=maps_dtype)
    finally:
        progress.close()


def coco_root(images) -> str | None:
    """The folder the COCO file names images from: the deepest folder holding all of them."""
    folders = [os.path.dirname(os.path.abspath(str(p))) for p in images]
    return os.path.commonpath(folders) if folders else None


def write_extras(out: Path, records: list, args, *, images=(), num_classes=None, class_name=None,
                 seconds_per_image=None) -> None:
    """After results.json: the ``--coco`` file and the ``--report`` page (with the time per image), when asked."""
    if getattr(args, "coco", None):
        from ..coco import write_coco

        root = coco_root(images)
        write_coco(args.coco, records, root=root, num_classes=num_classes, class_name=class_name,
                   description=f"camcore boxes of {getattr(args, 'method', 'auto')}")
    if getattr(args, "report", False):
        from ..report import write_report

        write_report(out, summary={"seconds_per_image": seconds_per_image})
