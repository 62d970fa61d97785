"""Options shared by the `camcore` commands: preprocessing, engine, method, argparse types, image lists."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import CamError

# NumPy and the rest of camcore are imported where needed: `camcore --help` stays fast.

__all__ = [
    "IMAGE_EXTENSIONS",
    "PROVIDERS_HELP",
    "WORKERS_HELP",
    "add_engine_arguments",
    "add_method_arguments",
    "add_preprocess_arguments",
    "input_size",
    "add_runtime_arguments",
    "runtime_options",
    "check_engine_arguments",
    "collect_images",
    "fraction",
    "nonnegative_int",
    "positive_int",
    "preprocess_from_args",
    "provider_list",
    "add_target_arguments",
    "add_output_arguments",
    "check_output_arguments",
    "targets_from_args",
    "describe_targets",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
PRECISIONS = ("f32", "bf16", "f16")
PROVIDERS_HELP = "onnxruntime providers, comma separated: cpu, cuda, tensorrt or full names"
WORKERS_HELP = ("threads that read images ahead of the model, and as many that draw and write "
                "overlays (default: CPU cores, at most 4; 0 reads in the main thread)")


# ----------------------------------------------------------------- preprocessing, engine and method flags

def input_size(text: str) -> tuple:
    """``224`` -> (224, 224); ``256x192`` or ``256,192`` -> (256, 192) as (H, W)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive ints), got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive ints), got {text!r}")
    return values * 2 if len(values) == 1 else values


def add_preprocess_arguments(parser: argparse.ArgumentParser, *, exif: bool = True) -> None:
    """Add ``--size --resize --mean --std --scale --bgr --interpolation`` (each overrides the model's default),
    and ``--no-exif`` with `exif` (commands that read photos; `camcore eval` reads stored pixels)."""
    group = parser.add_argument_group(
        "preprocessing", "override the model's default preprocessing (the embedded model's own; "
                         "ImageNet's at the model's input size for other models)")
    group.add_argument("--size", type=input_size, metavar="S|HxW", help="model input size, e.g. 224 or 256x192")
    group.add_argument("--resize", choices=("stretch", "crop"),
                       help="stretch the whole image, or center-crop (resize 256 / crop 224 style)")
    group.add_argument("--mean", type=float, nargs="+", metavar="M",
                       help="per-channel mean, 1 or 3 floats, on the scaled 0..1 range")
    group.add_argument("--std", type=float, nargs="+", metavar="S", help="per-channel std, 1 or 3 floats")
    group.add_argument("--scale", type=float, metavar="F",
                       help="multiplies integer pixels before mean/std (default 1/255; 1 keeps 0..255)")
    group.add_argument("--bgr", action="store_true", help="feed channels in BGR order (Caffe, OpenCV models)")
    group.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                       help="Pillow's resize filter; bilinear and bicubic are anti-aliased, as torchvision's "
                            "Resize on PIL images (default: bilinear)")
    if exif:
        group.add_argument("--no-exif", dest="exif_orientation", action="store_false",
                           help="read the stored pixels; by default a photo is turned upright as its EXIF "
                                "orientation says, and sizes and boxes refer to the upright image")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--engine --address --concurrency --num-gpus`` (Ray Data: `camcore.distributed`)."""
    group = parser.add_argument_group("engine", "run here, or on Ray Data (pip install 'camcore[ray]')")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process; ray: an actor pool on Ray (default: local)")
    group.add_argument("--address", metavar="ADDR",
                       help="Ray cluster to connect to, e.g. ray://head:10001 or auto (default: start a local Ray)")
    group.add_argument("--concurrency", type=positive_int, default=1, metavar="N",
                       help="Ray actors, each holding one model (default: 1)")
    group.add_argument("--num-gpus", type=float, default=0, metavar="G",
                       help="GPUs per Ray actor; > 0 uses onnxruntime's CUDA provider (default: 0)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    """The Ray options need ``--engine ray``: raise CamError naming the first one given without it."""
    if args.engine == "ray":
        return
    given = [flag for flag, value, default in (("--address", args.address, None),
                                                ("--concurrency", args.concurrency, 1),
                                                ("--num-gpus", args.num_gpus, 0)) if value != default]
    if given:
        raise CamError(f"{given[0]} needs --engine ray")


def preprocess_from_args(args: argparse.Namespace, explainer):
    """The explainer's default preprocessing with the flags given in `args` applied."""
    base = explainer.default_preprocess()
    changes = {name: getattr(args, name) for name in ("size", "resize", "mean", "std", "scale", "interpolation")
               if getattr(args, name, None) is not None}
    if getattr(args, "bgr", False):
        changes["channel_order"] = "BGR"
    if getattr(args, "exif_orientation", True) is False:
        changes["exif_orientation"] = False
    return dataclasses.replace(base, **changes) if changes else base


class _MethodNames:
    """`camcore.methods.METHODS`, imported when argparse first looks at it: building the
    parser (and `camcore --help`) imports no NumPy."""

    def __iter__(self):
        from ..methods import METHODS

        return iter(METHODS)

    def __contains__(self, name) -> bool:
        return name in tuple(self)


def add_method_arguments(parser) -> None:
    """--method and --feature, shared by explain, eval and fuse."""
    # A metavar, so that argparse lists the choices only when it prints this help.
    parser.add_argument("--method", choices=_MethodNames(), default="auto", metavar="METHOD",
                        help="one of %(choices)s: cam (exact, GAP + affine heads), a gradient method, or a "
                             "forward-only one (eigencam, ablationcam, reciprocam, scorecam); "
                             "auto: cam where it applies, else gradcam (default)")
    parser.add_argument("--feature", metavar="NAME",
                        help="target layer: a 4-D tensor name (default: the one feeding the last global "
                             "pooling; camcore inspect lists them)")


def add_runtime_arguments(parser: argparse.ArgumentParser, *, providers_default=None) -> None:
    """Add ``--backend --device --precision --providers``: which runtime runs the model, where, at what precision."""
    parser.add_argument("--backend", default="onnxruntime", metavar="NAME",
                        help="runtime: onnxruntime or openvino (or a registered backend; default: %(default)s)")
    parser.add_argument("--device", metavar="NAME",
                        help="OpenVINO device: CPU (default), GPU, NPU, AUTO (onnxruntime: use --providers)")
    # checked by runtime_options, not by argparse `choices`: a bad value is one error line, no usage text
    parser.add_argument("--precision", metavar="|".join(PRECISIONS),
                        help="inference precision; default: the runtime's own (OpenVINO: the device's, bf16 on "
                             "CPUs with AVX512-BF16 or AMX; onnxruntime: the model's types)")
    parser.add_argument("--providers", metavar="LIST", default=providers_default, help=PROVIDERS_HELP)


def runtime_options(args) -> dict:
    """The `camcore.load` keywords from the `add_runtime_arguments` flags."""
    backend = getattr(args, "backend", None) or "onnxruntime"
    precision = getattr(args, "precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise CamError(f"--precision must be one of {', '.join(PRECISIONS)} (or left out for the runtime's "
                       f"default), got {precision!r}")
    providers = provider_list(getattr(args, "providers", None))
    if backend != "onnxruntime" and providers is not None:
        raise CamError(f"--providers is for --backend onnxruntime; --backend {backend} takes --device")
    return {"backend": backend, "providers": providers, "device": getattr(args, "device", None),
            "precision": precision}


# ----------------------------------------------------------------- argparse types and inputs

def provider_list(text):
    """``--providers cpu,cuda`` -> ``["cpu", "cuda"]``; None when not given."""
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _int_from(text: str, low: int, expected: str) -> int:
    """`text` as an int >= `low`, else argparse's error saying `expected`."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_from(text, 0, "an int >= 0")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_from(text, 1, "a positive int")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def collect_images(paths) -> list:
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


# ----------------------------------------------------------------- targets and outputs (camcore.targets,
# camcore.saved_maps, camcore.coco, camcore.report): checked before any image is explained, so a bad
# entry stops the run with one line and no output

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
        choice.add_argument("--multilabel", type=fraction, metavar="T",
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
    if getattr(args, "report", False) and getattr(args, "results_format", "json") != "json":
        raise CamError("--report reads results.json: it needs --results-format json")
    coco = getattr(args, "coco", None)
    if coco is not None and Path(coco).is_dir():
        raise CamError(f"--coco takes a file name, got the folder {coco}")


def targets_from_args(args, explainer, images=(), folders=()):
    """The `camcore.targets.Targets` the flags ask for, validated against the model; None for plain top-k.

    Raises `InvalidInput` naming the bad entry (an unknown class, an image missing from the
    targets file, a malformed row) before anything is explained.
    """
    from ..targets import targets_from_options

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
