"""Command-line options shared by explain, compare, eval and the Ray engine: targets and outputs (private).

``--classes``, ``--targets FILE``, ``--multilabel T`` and ``--contrast`` choose what to
explain (`camcore.targets`); ``--save-maps``, ``--maps-dtype``, ``--coco FILE`` and
``--report`` choose what is written beside the overlays (`camcore.saved_maps`,
`camcore.coco`, `camcore.report`).  Everything given is validated before any image is
explained, so a bad entry stops the run with one line and no output.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import CamError

__all__ = ["add_target_arguments", "add_output_arguments", "targets_from_args", "describe_targets",
           "check_output_arguments", "coco_root", "write_extras"]


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a threshold in [0, 1], got {text!r}")
    return value


def add_target_arguments(parser: argparse.ArgumentParser, *, contrast_only: bool = False) -> None:
    """Add ``--classes --targets --multilabel`` (one of them) and ``--contrast``."""
    group = parser.add_argument_group("targets", "which classes to explain (default: the top-k by score)")
    if not contrast_only:
        choice = group.add_mutually_exclusive_group()
        choice.add_argument("--classes", metavar="LIST",
                            help="class indices or names, comma separated, for every image (e.g. 281,285 or "
                                 "'tabby,Egyptian cat'); on a single-logit model, 'negative' is its negated logit")
        choice.add_argument("--targets", metavar="FILE",
                            help="CSV (IMAGE,CLASS rows) or JSON ({IMAGE: CLASS or [CLASSES]}) of each image's "
                                 "class(es), e.g. the ground truth; IMAGE is a path as given, a path relative to "
                                 "the file's folder or to a folder given, or a unique file name")
        choice.add_argument("--multilabel", type=_threshold, metavar="T",
                            help="every class whose sigmoid score is at least T (e.g. 0.3)")
    group.add_argument("--contrast", metavar="CLASS|finer",
                       help="explain each class against a reference class (name or index), or 'finer': "
                            "FinerCAM's most similar classes; cam and the gradient methods only")


def add_output_arguments(parser: argparse.ArgumentParser, *, maps: bool = True, coco: bool = True,
                         report: bool = True) -> None:
    """Add ``--save-maps --maps-dtype --coco --report`` (those asked for)."""
    group = parser.add_argument_group("outputs", "written beside the overlays and results.json")
    if maps:
        group.add_argument("--save-maps", action="store_true",
                           help="write the raw feature-resolution maps of each image to <stem>.maps.npz "
                                "(one per block with --engine ray), named in results.json; camcore.load_maps "
                                "reads them")
        group.add_argument("--maps-dtype", choices=("float32", "float16"), default=None,
                           help="how --save-maps stores the maps (default: float32)")
    if coco:
        group.add_argument("--coco", metavar="FILE",
                           help="write the boxes as COCO detections (pycocotools, FiftyOne)")
    if report:
        group.add_argument("--report", action="store_true",
                           help="write report.html to browse the images, maps, classes and boxes offline")


def check_output_arguments(args) -> None:
    """Flags that need another: raise CamError naming the first."""
    if getattr(args, "maps_dtype", None) is not None and not getattr(args, "save_maps", False):
        raise CamError("--maps-dtype needs --save-maps")
    coco = getattr(args, "coco", None)
    if coco is not None and Path(coco).is_dir():
        raise CamError(f"--coco takes a file name, got the folder {coco}")


def targets_from_args(args, explainer, images=(), folders=()):
    """The `camcore.targets.Targets` the flags ask for, validated against the model; None for plain top-k.

    Raises `InvalidInput` naming the bad entry (an unknown class, an image missing from the
    targets file, a malformed row) before anything is explained.
    """
    from .targets import targets_from_options

    classes, file, multilabel = (getattr(args, name, None) for name in ("classes", "targets", "multilabel"))
    if getattr(args, "top_k", 1) != 1 and (classes or file or multilabel is not None):
        given = "--classes" if classes else "--targets" if file else "--multilabel"
        raise CamError(f"--top-k and {given} both choose the classes: give one")
    targets = targets_from_options(class_names=explainer.class_names, num_classes=explainer.head.num_classes,
                                   classes=classes, targets_file=file, multilabel=multilabel,
                                   contrast=getattr(args, "contrast", None), top_k=getattr(args, "top_k", 1),
                                   images=[str(p) for p in images], roots=list(folders))
    return targets


def describe_targets(args) -> str | None:
    """A few words for results.json and the report: what was explained."""
    parts = []
    if getattr(args, "classes", None):
        parts.append(f"classes {args.classes}")
    if getattr(args, "targets", None):
        parts.append(f"targets from {Path(args.targets).name}")
    if getattr(args, "multilabel", None) is not None:
        parts.append(f"every class with sigmoid >= {args.multilabel}")
    if getattr(args, "contrast", None):
        parts.append(f"contrast against {'FinerCAM references' if args.contrast == 'finer' else args.contrast}")
    return ", ".join(parts) or None


def coco_root(images) -> str | None:
    """The folder the COCO file names images from: the deepest folder holding all of them."""
    folders = [os.path.dirname(os.path.abspath(str(p))) for p in images]
    return os.path.commonpath(folders) if folders else None


def write_extras(out: Path, records: list, args, *, images=(), num_classes=None, class_name=None,
                 seconds_per_image=None) -> None:
    """After results.json: the ``--coco`` file and the ``--report`` page (with the time per image), when asked."""
    if getattr(args, "coco", None):
        from .coco import write_coco

        root = coco_root(images)
        write_coco(args.coco, records, root=root, num_classes=num_classes, class_name=class_name,
                   description=f"camcore boxes of {getattr(args, 'method', 'auto')}")
    if getattr(args, "report", False):
        from .report import write_report

        write_report(out, summary={"seconds_per_image": seconds_per_image})
