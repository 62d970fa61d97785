"""Output files shared by the `camcore` command and the Ray engine (application layer).

Overlay drawing and encoding (`render`, title strips), result records
(`_record`, `_results`, `write_results`), unique overlay names and atomic
writes: readers see either the old file or the complete new one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

# NumPy, Pillow and the rest of camcore are imported where needed: `camcore --help`
# stays fast.

__all__ = [
    "IMAGE_FORMATS",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "runtime_of",
    "encode_image",
    "overlay_format",
    "title_strip",
    "title_height",
    "render",
    "write_results",
    "one_line",
]


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



# ----------------------------------------------------------------- title strips and overlays

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


def _unique_name(stem: str, taken: set, extension: str, kind: str = "cam") -> str:
    """``<stem>.<kind>.<extension>``, or ``<stem>-2.<kind>.<extension>``... when taken; added to `taken`."""
    name, n = f"{stem}.{kind}.{extension}", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.{kind}.{extension}"
    taken.add(name)
    return name


# ----------------------------------------------------------------- records

def one_line(message) -> str:
    """The first line of an error message (or of an exception's text, else its type name)."""
    text = str(message).strip()
    if not text:
        return type(message).__name__ if isinstance(message, BaseException) else ""
    return text.splitlines()[0]


def _record(path, result, explainer) -> dict:
    """The results.json entry of one image."""
    if result.error is not None:
        return {"path": path, "width": None, "height": None, "error": one_line(result.error), "classes": []}
    height, width = (int(v) for v in result.size)
    classes = [{"index": int(c), "name": explainer.class_name(int(c)), "score": round(float(s), 6),
                "box": None if result.box(j) is None else list(result.box(j))}
               for j, (c, s) in enumerate(zip(result.classes, result.scores))]
    return {"path": path, "width": width, "height": height, "error": None, "classes": classes}


def runtime_of(explainer) -> dict:
    """Which runtime ran: ``{"backend", "version", "devices", "precision"}`` (the precision read back from it).

    A backend without a `runtime` (a fake, a third-party one) reports what it has, else None.
    """
    backend = explainer.backend
    runtime = getattr(backend, "runtime", None)
    devices = getattr(backend, "providers", None)
    return {"backend": getattr(runtime, "name", type(backend).__name__),
            "version": getattr(runtime, "version", None),
            "devices": list(devices) if devices is not None else [],
            "precision": getattr(backend, "precision", None)}


def _results(model, threshold, records, method="cam", runtime=None) -> dict:
    results = {"model": str(model if model is not None else "embedded:efficientnet_lite0"),
               "method": method, "threshold": threshold, "images": records}
    if runtime is not None:
        results["runtime"] = runtime
    return results


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
                                 "threshold": str(results["threshold"]),
                                 **({"runtime": json.dumps(results["runtime"])} if "runtime" in results else {})})
    table = pa.Table.from_pylist([{**{"overlay": None}, **r} for r in results["images"]], schema=schema)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return atomic_write_bytes(out / "results.parquet", buffer.getvalue().to_pybytes())
