"""Bounding boxes from a class activation map (the CAM paper's heuristic)."""

from __future__ import annotations

import numbers

import numpy as np

from ._validate import check_choice, check_ndim, float_array
from .errors import InvalidInput

__all__ = ["boxes"]

_MODES = ("largest", "all")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def boxes(map2d, *, threshold=0.2, mode="largest"):
    """Boxes around the connected regions of a map above a fraction of its maximum.

    The heuristic of Zhou et al. (CVPR 2016): keep the pixels with
    ``map2d >= threshold * max(map2d)``, label the 8-connected components of
    that mask, and box them.

    Parameters
    ----------
    map2d : (H, W) ndarray
        One map, usually a CAM upsampled to the image. Must not hold NaN or
        ``+inf`` (``-inf`` pixels are simply never kept).
    threshold : float in [0, 1], optional
        The fraction of the map's maximum a pixel needs to be kept.
    mode : {"largest", "all"}, optional
        ``"largest"``: the box of the component with the most pixels (ties:
        the component whose first pixel comes first in raster order).
        ``"all"``: every component, by decreasing pixel count (ties in raster
        order of their first pixel).

    Returns
    -------
    boxes : (n, 4) int64 ndarray
        Rows ``(x0, y0, x1, y1)``, half-open (the component's pixels satisfy
        ``x0 <= x < x1`` and ``y0 <= y < y1``), in pixels of `map2d`, so always
        within ``[0, W] x [0, H]``. ``n`` is 1 for ``"largest"`` and the number
        of components for ``"all"``. When the maximum is not positive there
        is no foreground and the result is empty, shape ``(0, 4)``.

    Raises
    ------
    InvalidInput
        `map2d` not 2-D or empty, NaN or ``+inf`` in it, `threshold` outside
        [0, 1], or an unknown `mode`.

    Notes
    -----
    `camcore.metrics.max_box_acc` follows the wsolevaluation protocol instead,
    which differs: it quantizes the map to uint8, keeps pixels strictly above
    ``int(threshold * max)``, picks the largest contour by polygon area and
    uses inclusive, clipped box corners.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((6, 8))
    >>> m[1:3, 1:4] = 1.0   # 6 pixels
    >>> m[3:6, 5:8] = 0.5   # 9 pixels, the largest region
    >>> m[0, 7] = 0.1       # below 0.2 * max: dropped
    >>> boxes(m)
    array([[5, 3, 8, 6]])
    >>> boxes(m, mode="all")
    array([[5, 3, 8, 6],
           [1, 1, 4, 3]])
    >>> boxes(m, threshold=0.6)
    array([[1, 1, 4, 3]])
    >>> boxes(np.zeros((4, 4))).shape
    (0, 4)
    """
    check_choice(mode, _MODES, "mode")
    if (
        not isinstance(threshold, numbers.Real)
        or isinstance(threshold, bool)
        or not 0 <= threshold <= 1
    ):
        raise InvalidInput(f"threshold must be a real number in [0, 1], got {threshold!r}")
    m = float_array(map2d, "map2d")
    check_ndim(m, 2, "map2d", "(H, W)")
    if m.size == 0:
        raise InvalidInput(f"map2d must not be empty, got shape {m.shape}")
    top = m.max()  # NaN propagates into the maximum
    if np.isnan(top) or top == np.inf:
        raise InvalidInput(f"map2d must not hold NaN or +inf, got maximum {top}")
    if top <= 0:
        return np.zeros((0, 4), dtype=np.int64)

    mask = m >= threshold * top
    rows = mask.any(axis=1)
    y0, y1 = _first(rows), _end(rows)
    band = mask[y0:y1]  # the rows holding kept pixels
    blob = _single_blob_box(band)
    if blob is not None:  # the usual CAM: one blob, no labelling needed
        return np.array([[blob[0], y0, blob[1], y1]], dtype=np.int64)
    # Label only the bounding box of the kept pixels.
    cols = band.any(axis=0)
    x0, x1 = _first(cols), _end(cols)
    crop = band[:, x0:x1]
    from scipy import ndimage  # only here: importing it costs more than most calls

    labels = np.empty(crop.shape, dtype=np.intp)  # intp: bincount needs no conversion
    count = ndimage.label(crop, structure=_EIGHT_CONNECTED, output=labels)
    if count == 1:
        return np.array([[x0, y0, x1, y1]], dtype=np.int64)
    # ndimage.label numbers components in raster order of their first pixel,
    # so label order is the tie-break order.
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    offset = np.array([x0, y0, x0, y0], dtype=np.int64)
    if mode == "largest":
        chosen = labels == int(np.argmax(sizes)) + 1  # argmax returns the first maximum
        rows, cols = chosen.any(axis=1), chosen.any(axis=0)
        box = np.array([[_first(cols), _first(rows), _end(cols), _end(rows)]], dtype=np.int64)
        return box + offset
    order = np.argsort(-sizes, kind="stable")
    slices = ndimage.find_objects(labels, max_label=count)
    found = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices], dtype=np.int64)
    return found[order] + offset


def _single_blob_box(band: np.ndarray):
    """``(x0, x1)`` when `band` is one component of a simple kind, else None.

    The kind: every row holds exactly one run of pixels, 8-adjacent to the
    next row's run. Checking it costs a few passes over the mask, far less
    than labelling it, and it settles the usual single-blob CAM.
    """
    width = band.shape[1]
    start = band.argmax(axis=1)
    if not band[np.arange(len(band)), start].all():
        return None  # an empty row: the pixels above and below are not connected
    rises = np.count_nonzero(band[:, 1:] > band[:, :-1]) + np.count_nonzero(band[:, 0])
    if rises != len(band):
        return None  # some row holds two runs or more
    if width == 1:
        end = np.ones_like(start)
    else:  # the one run ends at the last column or at its one fall
        end = np.where(band[:, -1], width, (band[:, :-1] > band[:, 1:]).argmax(axis=1) + 1)
    # Runs [s, e) and [s', e') in adjacent rows touch (8-connected) iff s' <= e and s <= e'.
    if np.all(start[1:] <= end[:-1]) and np.all(start[:-1] <= end[1:]):
        return int(start.min()), int(end.max())
    return None


def _first(hit: np.ndarray) -> int:
    return int(np.argmax(hit))


def _end(hit: np.ndarray) -> int:
    return len(hit) - int(np.argmax(hit[::-1]))
