"""Helpers shared by the `camcore` command-line tools (private).

Preprocessing flags, atomic file writes, a progress bar on stderr, error
handling without tracebacks, and a tiny 5x7 bitmap font for the title strips
drawn above overlays (scikit-image has no text rendering).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import CamError, NotCamCompatible

# NumPy, Pillow and the rest of camcore are imported where needed: `camcore --help`
# stays fast.

__all__ = [
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_REFUSED",
    "EXIT_INTERRUPTED",
    "add_engine_arguments",
    "add_preprocess_arguments",
    "check_engine_arguments",
    "preprocess_from_args",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "encode_image",
    "IMAGE_FORMATS",
    "overlay_format",
    "Progress",
    "run_command",
    "fail",
    "one_line",
    "title_strip",
    "title_height",
]

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------- preprocessing flags

def _size(text: str) -> tuple:
    """``224`` -> (224, 224); ``256x192`` or ``256,192`` -> (256, 192) as (H, W)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive ints), got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive ints), got {text!r}")
    return values * 2 if len(values) == 1 else values


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--size --resize --mean --std --scale --bgr --interpolation`` (each overrides the model's default)."""
    group = parser.add_argument_group(
        "preprocessing", "override the model's default preprocessing (the embedded model's own; "
                         "ImageNet's at the model's input size for other models)")
    group.add_argument("--size", type=_size, metavar="S|HxW", help="model input size, e.g. 224 or 256x192")
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
    return dataclasses.replace(base, **changes) if changes else base


# ----------------------------------------------------------------- files

def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Readers see either the old file or the complete new one; the temporary file
    is removed on any error, including KeyboardInterrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


IMAGE_FORMATS = ("auto", "png", "jpg", "webp")
# Chosen for speed. PNG: zlib level 1 with the run-length strategy (3, Z_RLE) writes a
# photo-sized overlay 4-5x faster than Pillow's default (level 6), and the file is about
# as small (measured on a 650x600 overlay: 30 ms and 511 kB against 155 ms and 521 kB).
_ENCODER_OPTIONS = {
    "png": dict(format="PNG", compress_level=1, compress_type=3),
    "jpg": dict(format="JPEG", quality=90),
    "webp": dict(format="WEBP", quality=85, method=0),
}


def overlay_format(source, requested: str = "auto") -> str:
    """The file format of an overlay: `requested`, or with "auto" the input's when it is JPEG, else PNG.

    A JPEG photo's overlay gains nothing from lossless PNG, which costs 10x more to
    encode (18 ms against 1.5 ms for a 600x380 overlay here); other inputs keep PNG.
    """
    if requested != "auto":
        return requested
    suffix = Path(source).suffix.lower() if isinstance(source, (str, os.PathLike)) else ""
    return "jpg" if suffix in (".jpg", ".jpeg") else "png"


def encode_image(image, image_format: str = "png") -> bytes:
    """The bytes of an ``(H, W, 3)`` uint8 image as PNG, JPEG or WebP (Pillow)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **_ENCODER_OPTIONS[image_format])
    return buffer.getvalue()


# ----------------------------------------------------------------- progress and errors

class Progress:
    """A tqdm progress bar on stderr.

    Shown only when there are more than `min_items` items, the stream is a terminal
    and `quiet` is false; otherwise every call is a no-op (and tqdm is not imported).
    """

    def __init__(self, total: int, label: str, *, quiet: bool = False, min_items: int = 8, stream=None):
        stream = stream or sys.stderr
        self.bar = None
        if not quiet and total > min_items and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=stream, unit="img", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fail(message: str) -> None:
    """Print one ``camcore: error: ...`` line on stderr."""
    print(f"camcore: error: {message}", file=sys.stderr)


def provider_list(text):
    """``--providers cpu,cuda`` -> ``["cpu", "cuda"]``; None when not given."""
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def run_command(fn, args) -> int:
    """Run ``fn(args) -> int`` and turn expected failures into one stderr line and an exit status.

    NotCamCompatible -> 2, other CamError and OSError -> 1, KeyboardInterrupt -> 130.
    """
    try:
        return int(fn(args) or 0)
    except NotCamCompatible as exc:
        fail(one_line(exc))
        return EXIT_REFUSED
    except CamError as exc:
        fail(one_line(exc))
        return EXIT_ERROR
    except OSError as exc:
        fail(one_line(exc) if exc.filename is None else f"{exc.strerror or exc}: {exc.filename}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Objects half-built by the interrupted call (imageio plugins) complain when freed.
        sys.unraisablehook = lambda unraisable: None
        fail("interrupted")
        return EXIT_INTERRUPTED


def one_line(message) -> str:
    """The first line of an error message (or of an exception's text, else its type name)."""
    text = str(message).strip()
    if not text:
        return type(message).__name__ if isinstance(message, BaseException) else ""
    return text.splitlines()[0]


# ----------------------------------------------------------------- title strips

@lru_cache(maxsize=None)
def _font(size: int):
    """Pillow's default font at `size` pixels (its bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _font_size(width: int) -> int:
    return max(10, min(28, width // 28))


def title_height(width: int) -> int:
    """Height in pixels of the title strip drawn above an image `width` pixels wide."""
    return _font_size(width) * 3 // 2


def title_strip(text: str, width: int, *, background=(32, 32, 32), foreground=(255, 255, 255)):
    """An ``(title_height(width), width, 3)`` uint8 strip with `text` drawn by Pillow.

    Text that does not fit is cut and ends with ``...``.

    Examples
    --------
    >>> strip = title_strip("Egyptian cat 79.1%", 320)
    >>> strip.shape, title_height(320)
    ((16, 320, 3), 16)
    >>> int((strip > 128).all(axis=2).sum()) > 20  # light text on a dark strip
    True
    """
    import numpy as np
    from PIL import Image, ImageDraw

    height, font = title_height(width), _font(_font_size(width))
    margin = height // 4
    room = width - 2 * margin
    if font.getlength(text) > room:
        while text and font.getlength(text + "...") > room:
            text = text[:-1]
        text += "..."
    strip = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(strip)
    top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]  # no anchors: bitmap fonts lack them
    draw.text((margin, (height - bottom - top) // 2), text, fill=tuple(foreground), font=font)
    return np.array(strip)


class _MethodNames:
    """`camcore.methods.METHODS`, imported when argparse first looks at it: building the
    parser (and `camcore --help`) imports no NumPy."""

    def __iter__(self):
        from .methods import METHODS

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
