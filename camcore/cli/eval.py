"""`camcore eval`: localization accuracy (and faithfulness) on a wsolevaluation-style dataset."""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np

from ..errors import CamError
from ..outputs import runtime_of, write_json
from .console import EXIT_OK, Progress
from .options import (add_engine_arguments, add_method_arguments, add_preprocess_arguments, add_runtime_arguments,
                      add_target_arguments, check_engine_arguments, fraction, positive_int, preprocess_from_args,
                      runtime_options, targets_from_args)

__all__ = ["add_arguments", "main"]


def _thresholds(text: str) -> np.ndarray:
    """``start:stop:step`` -> ``np.arange(start, stop, step)`` within [0, 1)."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:stop:step, e.g. 0:1:0.01, got {text!r}") from None
    if not (0 <= start < stop <= 1 and step > 0):
        raise argparse.ArgumentTypeError(f"expected 0 <= start < stop <= 1 and step > 0, got {text!r}")
    return np.arange(start, stop, step)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore eval` arguments (the CLI calls this when `eval` is chosen)."""
    parser.description = ("Localization accuracy of a model's CAMs on a wsolevaluation metadata folder or "
                          "Pascal-VOC XML annotations, following wsolevaluation's protocol (224x224 maps).")
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="MODEL.onnx (default: the embedded EfficientNet-Lite0)")
    parser.add_argument("--metadata", required=True, metavar="DIR",
                        help="image_ids.txt + class_labels.txt + localization.txt, or VOC .xml files")
    parser.add_argument("--images", required=True, metavar="DIR", help="image root")
    parser.add_argument("--synsets", metavar="FILE",
                        help="VOC only: synset per line, line i = class i (default: synsets.txt or "
                             "LOC_synset_mapping.txt in the metadata folder)")
    parser.add_argument("--mask-root", metavar="DIR", help="root of the mask paths (default: --images)")
    parser.add_argument("--thresholds", type=_thresholds, default=np.arange(0, 1, 0.01), metavar="A:B:STEP",
                        help="score-map thresholds for MaxBoxAcc and PxAP (default: 0:1:0.01)")
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                        help="predicted classes per image (default: 5)")
    parser.add_argument("--threshold", type=fraction, default=0.2, metavar="T",
                        help="box threshold of the top-k/GT-known heuristic, fraction of the max (default: 0.2)")
    parser.add_argument("--json", metavar="FILE", help="write every figure and setting to FILE")
    parser.add_argument("--save-maps", metavar="DIR", help="write score maps as DIR/<image_id>.npy")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="images per model run")
    add_runtime_arguments(parser)
    parser.add_argument("--faithfulness", action="store_true",
                        help="also report Average Drop, Increase in Confidence, deletion/insertion AUC and the "
                             "pointing game of the CAMs (2 * (steps + 2) more model runs per image)")
    parser.add_argument("--steps", type=positive_int, default=16, metavar="S",
                        help="deletion/insertion steps (default: 16)")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    add_target_arguments(parser, contrast_only=True)
    add_method_arguments(parser)
    add_engine_arguments(parser)
    add_preprocess_arguments(parser, exif=False)  # dataset boxes refer to the stored pixels


def _format(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(args) -> int:
    """Run `camcore eval` with parsed `args`; returns the exit status."""
    from ..api import load
    from ..evaluation import evaluate
    from ..wsol import read_dataset

    if args.model is not None and not args.model.lower().endswith(".onnx"):
        raise CamError(f"MODEL must be an .onnx file, got {args.model!r}: "
                       "camcore eval [MODEL.onnx] --metadata DIR --images DIR")
    runtime_options(args)  # the runtime flags are checked before anything is read
    check_engine_arguments(args)
    dataset = read_dataset(args.metadata, synsets=args.synsets, images_root=args.images)
    if dataset.unannotated:
        print(f"camcore: warning: {len(dataset.unannotated)} listed images have no annotations and are left "
              f"out (first: {dataset.unannotated[0]})", file=sys.stderr)
    explainer = load(args.model, feature=args.feature, size=args.size, **runtime_options(args))
    preprocess = preprocess_from_args(args, explainer)
    method = explainer.resolve_method(args.method)
    contrast = None if args.contrast is None else targets_from_args(args, explainer).contrast
    bar = Progress(len(dataset.samples), "eval", quiet=args.quiet)
    engine, session = None, contextlib.nullcontext()
    if args.engine == "ray":
        from ..distributed import evaluate_engine, ray_session

        engine = evaluate_engine(args.model, concurrency=args.concurrency, num_gpus=args.num_gpus,
                                 feature=args.feature, size=args.size, **runtime_options(args))
        session = ray_session(args.address)
    try:
        with session:
            results = evaluate(explainer, dataset, args.images, preprocess=preprocess, thresholds=args.thresholds,
                               top_k=args.top_k, threshold=args.threshold, batch_size=args.batch_size,
                               mask_root=args.mask_root, save_maps=args.save_maps, progress=bar.update,
                               method=method, faithfulness=args.faithfulness, steps=args.steps, engine=engine,
                               contrast=contrast)
    finally:
        bar.close()
    results["dataset"].update(metadata=str(args.metadata), images=str(args.images))
    results["runtime"] = runtime_of(explainer)
    if args.json:
        write_json(args.json, results)
    if not args.quiet:
        rows = [("top1_loc", "top-1 loc"), ("top5_loc", "top-5 loc"), ("gt_known_loc", "GT-known loc"),
                ("max_box_acc_v1", "MaxBoxAcc"), ("max_box_acc_v2", "MaxBoxAccV2"), ("pxap", "PxAP"),
                ("top1_cls", "top-1 cls"), ("top5_cls", "top-5 cls")]
        for key, name in rows:
            print(f"{name:<14}{_format(results[key]):>8}")
        if results["faithfulness"] is not None:
            for key, name in (("average_drop", "Average Drop"), ("increase_in_confidence", "Incr. in Conf."),
                              ("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"),
                              ("pointing_game", "pointing game")):
                value = results["faithfulness"][key]
                text = "-" if value is None else f"{value:.4f}" if key.endswith("auc") else f"{value:.2f}"
                print(f"{name:<14}{text:>8}")
        counts = results["counts"]
        print(f"{counts['evaluated']} images in {results['seconds']:.1f} s"
              + (f", {counts['unannotated']} without annotations" if counts["unannotated"] else ""))
    return EXIT_OK
