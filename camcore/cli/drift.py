"""`camcore drift FLOAT.onnx DEPLOYED.onnx IMAGE...`: how a deployed form's explanations moved (`camcore.drift`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..outputs import atomic_write_bytes, encode_image, write_json
from .console import EXIT_OK
from .options import (add_preprocess_arguments, add_runtime_arguments, collect_images, fraction, positive_int,
                      preprocess_from_args, runtime_options)

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore drift` arguments (the CLI calls this when `drift` is chosen)."""
    parser.description = ("Explain the same images with a float model and its deployed form (int8, float16, "
                          "optimized) and report per image and overall: top-1 agreement, Pearson correlation "
                          "of the maps (of the float model's top-1 class), IoU of their boxes, change in Average "
                          "Drop and deletion AUC. Writes drift.json and drift.png (the worst images side by side).")
    parser.add_argument("reference", metavar="FLOAT.onnx", help="the float model ('embedded' for the default model)")
    parser.add_argument("deployed", metavar="DEPLOYED.onnx", help="its deployed form")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    parser.add_argument("--out", default="camcore-drift", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--method", default="auto", metavar="NAME",
                        help="method on both models (default: auto, CAM where the head allows it)")
    parser.add_argument("--steps", type=positive_int, default=16, metavar="S", help="deletion steps (default: 16)")
    parser.add_argument("--no-faithfulness", action="store_true",
                        help="skip Average Drop and deletion AUC (4 N (S + 2) model runs)")
    parser.add_argument("--worst", type=positive_int, default=4, metavar="N",
                        help="images in drift.png (default: 4)")
    parser.add_argument("--threshold", type=fraction, default=0.2, metavar="T",
                        help="box threshold as a fraction of the map's max (default: 0.2)")
    add_runtime_arguments(parser)  # both models run on the runtime, device and precision chosen
    parser.add_argument("--quiet", action="store_true", help="no table")
    add_preprocess_arguments(parser)


def _number(value, digits):
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def main(args) -> int:
    """Run `camcore drift` with parsed `args`; returns the exit status."""
    from ..api import load
    from ..drift import drift, picture
    from ..preprocess import read_image

    runtime = runtime_options(args)  # a bad combination stops here, before any model is read
    files = collect_images(args.inputs)
    reference = load(None if args.reference == "embedded" else args.reference, size=args.size, **runtime)
    deployed = load(args.deployed, class_names=reference.class_names, size=args.size, **runtime)
    images = [read_image(p) for p in files]
    result = drift(reference, deployed, images, preprocess=preprocess_from_args(args, reference), method=args.method,
                   threshold=args.threshold, steps=args.steps, faithfulness=not args.no_faithfulness,
                   sources=[str(p) for p in files])
    out = Path(args.out)
    picture_name = "drift.png"
    atomic_write_bytes(out / picture_name, encode_image(picture(result, images, count=args.worst,
                                                                class_name=reference.class_name)))
    records = []
    for rec in result["images"]:
        rec = dict(rec)
        for side in ("reference", "deployed"):
            rec[f"{side}_name"] = reference.class_name(rec[f"{side}_class"])
        records.append({k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()})
    overall = {k: (None if isinstance(v, float) and v != v else v) for k, v in result["overall"].items()}
    write_json(out / "drift.json", {"reference": args.reference, "deployed": args.deployed,
                                    "methods": result["methods"], "runtime": result["runtime"], "overall": overall, "images": records,
                                    "picture": picture_name, "steps": args.steps})
    if not args.quiet:
        faith = not args.no_faithfulness
        print(f"{'image':<28}{'float':>7}{'deployed':>9}{'r':>8}{'IoU':>7}" + (f"{'dAvgDrop':>10}{'dDelAUC':>9}" if faith else ""))
        for rec in result["images"]:
            line = (f"{Path(rec['source']).name[:27]:<28}{rec['reference_class']:>7}{rec['deployed_class']:>9}"
                    f"{_number(rec['pearson'], 3):>8}{rec['box_iou']:>7.3f}")
            if faith:
                line += f"{rec['delta_average_drop']:>+10.1f}{rec['delta_deletion_auc']:>+9.3f}"
            print(line)
        o = result["overall"]
        line = (f"{'overall':<28}{'top-1 agree':>16} {o['top1_agreement']:.3f}  r mean {_number(o['pearson_mean'], 3)}"
                f"  min {_number(o['pearson_min'], 3)}  IoU {o['box_iou_mean']:.3f}")
        if faith:
            line += f"  dAvgDrop {o['delta_average_drop']:+.1f}  dDelAUC {o['delta_deletion_auc']:+.3f}"
        print(line)
        print(f"wrote drift.json and {picture_name} to {out}/")
    return EXIT_OK
