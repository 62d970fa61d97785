"""Rendering a map over an image: colormaps, alpha blending and box outlines."""

from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np

from ._validate import check_choice, check_ndim, float_array
from .errors import InvalidInput
from .maps import normalize, upsample

__all__ = ["overlay"]

# matplotlib's "jet" segment data: per channel, (x, y) knots of a piecewise
# linear function of the value in [0, 1] (no jumps, so np.interp is exact).
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_COLORMAPS = ("jet", "gray")
_LUT_SIZE = 256


@lru_cache(maxsize=None)
def _lut(name: str) -> np.ndarray:
    """The (256, 3) uint8 lookup table of a colormap, as matplotlib builds it."""
    x = np.linspace(0.0, 1.0, _LUT_SIZE)
    if name == "jet":
        rgb = np.stack([np.interp(x, *zip(*_JET[c])) for c in ("red", "green", "blue")], axis=1)
        lut = (rgb * 255).astype(np.uint8)  # matplotlib truncates (bytes=True)
    else:
        lut = np.repeat(np.arange(_LUT_SIZE, dtype=np.uint8)[:, None], 3, axis=1)
    lut.setflags(write=False)
    return lut


def overlay(image, map2d, *, alpha=0.5, colormap="jet", boxes=None, color=(0, 255, 0)):
    """Blend a colored map over an image and draw boxes on it.

    The map is resized to the image with `camcore.upsample` (bilinear) when
    the sizes differ, scaled to [0, 1] with `camcore.normalize` ("minmax"; a
    constant map gets the colormap's lowest color), and colored through a
    256-entry lookup table as matplotlib does (entry ``min(int(v * 256), 255)``).
    Each pixel is then ``round((1 - alpha) * image + alpha * color)``.

    Parameters
    ----------
    image : (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) ndarray
        Gray, RGB or RGBA (the alpha channel is dropped); uint8, or float
        with values in [0, 1].
    map2d : (h, w) ndarray
        The map to show, finite; any range.
    alpha : float in [0, 1], optional
        The map's opacity: 0 gives the image back, 1 the colored map alone.
    colormap : {"jet", "gray"}, optional
        ``"jet"`` is matplotlib's definition (dark blue -> cyan -> yellow ->
        dark red); ``"gray"`` maps entry ``i`` to ``(i, i, i)``.
    boxes : (n, 4) or (4,) array_like, optional
        Boxes ``(x0, y0, x1, y1)``, half-open, in image pixels (rounded to the
        nearest integer), drawn as outlines inside each box with a thickness
        of ``max(1, round(min(H, W) / 100))`` pixels, clipped to the image.
    color : (3,) ints in [0, 255], optional
        The RGB color of the box outlines.

    Returns
    -------
    rendered : (H, W, 3) uint8 ndarray
        A new RGB image.

    Raises
    ------
    InvalidInput
        Wrong shapes or dtypes, a float image outside [0, 1], a non-finite map
        or box, `alpha` outside [0, 1], an unknown `colormap`, a bad `color`.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.full((4, 4, 3), 100, dtype=np.uint8)
    >>> m = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> out = overlay(image, m, alpha=1.0)
    >>> out.shape, out.dtype
    ((4, 4, 3), dtype('uint8'))
    >>> out[0, 0], out[0, 3]   # jet's lowest and highest colors
    (array([  0,   0, 127], dtype=uint8), array([127,   0,   0], dtype=uint8))
    >>> overlay(image, m, alpha=0.0)[0, 0]
    array([100, 100, 100], dtype=uint8)
    >>> framed = overlay(image, m, alpha=0.0, boxes=[[1, 1, 3, 3]], color=(255, 0, 0))
    >>> framed[1, 1], framed[0, 0]
    (array([255,   0,   0], dtype=uint8), array([100, 100, 100], dtype=uint8))
    """
    check_choice(colormap, _COLORMAPS, "colormap")
    if not _is_real(alpha) or not 0 <= alpha <= 1:
        raise InvalidInput(f"alpha must be a real number in [0, 1], got {alpha!r}")
    rgb = _rgb(image)
    height, width = rgb.shape[:2]
    m = float_array(map2d, "map2d")
    check_ndim(m, 2, "map2d", "(h, w)")
    if m.size == 0:
        raise InvalidInput(f"map2d must not be empty, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InvalidInput("map2d must be finite, got NaN or infinity")
    if m.shape != (height, width):
        m = upsample(m, (height, width), method="bilinear")
    level = np.minimum((normalize(m) * _LUT_SIZE).astype(np.intp), _LUT_SIZE - 1)
    if rgb.dtype == np.uint8:
        # Each output byte is a function of (level, input byte): one lookup per channel in
        # tables holding the formula below, exact and 5x faster than the float blend.
        out = np.empty((height, width, 3), np.uint8)
        rows = level * _LUT_SIZE
        for c, table in enumerate(_blend_tables(colormap, float(alpha))):
            np.take(table, rows + rgb[:, :, c], out=out[:, :, c])
    else:
        colored = np.take(_lut(colormap), level, axis=0)  # 4x faster than _lut(colormap)[level]
        out = np.clip(np.rint(_blend(rgb, colored, alpha)), 0, 255).astype(np.uint8)
    if boxes is not None:
        _draw_boxes(out, _box_array(boxes), _rgb_color(color))
    return out


def _blend(rgb, colored, alpha):
    """``(1 - alpha) * rgb + alpha * colored`` in float32 (0..255 scale, before rounding)."""
    return (1.0 - alpha) * rgb.astype(np.float32, copy=False) + alpha * colored.astype(np.float32)


@lru_cache(maxsize=16)
def _blend_tables(colormap: str, alpha: float) -> tuple:
    """Per channel, the (256 * 256,) uint8 table of the rounded blend at ``level * 256 + byte``."""
    byte = np.arange(_LUT_SIZE, dtype=np.float32)
    tables = []
    for c in range(3):
        colored = _lut(colormap)[:, c][:, None]  # (level, 1)
        table = np.clip(np.rint(_blend(byte[None, :], colored, alpha)), 0, 255).astype(np.uint8).ravel()
        table.setflags(write=False)
        tables.append(table)
    return tuple(tables)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _rgb(image) -> np.ndarray:
    """The image as (H, W, 3): uint8 as given, float as float32 on the 0..255 scale."""
    img = np.asarray(image)
    check_ndim(img, (2, 3), "image", "(H, W) or (H, W, C)")
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise InvalidInput(
            f"image must have 1, 3 or 4 channels (gray, RGB, RGBA), got shape {img.shape}"
        )
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InvalidInput(f"image must not be empty, got shape {img.shape}")
    if img.dtype == np.uint8:
        scaled = img
    elif img.dtype.kind == "f":
        if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
            raise InvalidInput(
                f"image must hold values in [0, 1] when float, got range "
                f"[{img.min()}, {img.max()}]"
            )
        scaled = img.astype(np.float32) * 255
    else:
        raise InvalidInput(f"image must be uint8 or float in [0, 1], got dtype {img.dtype}")
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    return np.broadcast_to(scaled[:, :, :3], (*scaled.shape[:2], 3))


def _box_array(boxes) -> np.ndarray:
    b = float_array(boxes, "boxes")
    if b.shape == (4,):
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise InvalidInput(f"boxes must be (n, 4) (x0, y0, x1, y1), got shape {b.shape}")
    if not np.isfinite(b).all():
        raise InvalidInput("boxes must be finite, got NaN or infinity")
    b = np.rint(b).astype(np.int64)
    if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
        raise InvalidInput(f"boxes must have x0 <= x1 and y0 <= y1, got {b.tolist()}")
    return b


def _rgb_color(color) -> np.ndarray:
    c = np.asarray(color)
    if c.shape != (3,) or c.dtype.kind not in "iu" or c.min() < 0 or c.max() > 255:
        raise InvalidInput(f"color must be 3 ints in [0, 255] (R, G, B), got {color!r}")
    return c.astype(np.uint8)


def _draw_boxes(out: np.ndarray, boxes: np.ndarray, color: np.ndarray) -> None:
    """Paint outlines inside each box, in place, clipped to the image."""
    height, width = out.shape[:2]
    t = max(1, round(min(height, width) / 100))

    def fill(y0, y1, x0, x1):
        y0, y1 = max(y0, 0), min(y1, height)
        x0, x1 = max(x0, 0), min(x1, width)
        if y0 < y1 and x0 < x1:
            out[y0:y1, x0:x1] = color

    for x0, y0, x1, y1 in boxes.tolist():
        fill(y0, min(y0 + t, y1), x0, x1)  # top
        fill(max(y1 - t, y0), y1, x0, x1)  # bottom
        fill(y0, y1, x0, min(x0 + t, x1))  # left
        fill(y0, y1, max(x1 - t, x0), x1)  # right
