"""Localization metrics: IoU, the CAM paper's top-k / GT-known localization,
and the wsolevaluation protocol (MaxBoxAcc, MaxBoxAccV2, PxAP).

Two box conventions live here
-----------------------------
* `iou` and `localization_accuracy` use camcore's convention: ``(x0, y0, x1, y1)``
  half-open (``x0 <= x < x1``), as returned by `camcore.boxes`.
* `protocol_boxes`, `max_box_acc` and `pxap` follow clovaai/wsolevaluation
  (Choe et al., "Evaluating Weakly Supervised Object Localization Methods
  Right", CVPR 2020) exactly, so that numbers are comparable with its tables.

How the protocol differs from `camcore.boxes`
---------------------------------------------
================  ==================================  ===================================
                  `camcore.boxes`                      wsolevaluation protocol
================  ==================================  ===================================
map values        float map as given                  quantized ``uint8(map * 255)``
foreground        ``map >= threshold * max(map)``     ``u8 > int(threshold * max(u8))``
box               half-open ``(x0, y0, x1, y1)``      ``(x, y, x + w, y + h)`` of the
                                                      contour's bounding rect, with
                                                      ``x1, y1`` clipped to ``W - 1``,
                                                      ``H - 1`` (neither half-open nor
                                                      inclusive)
IoU               half-open areas                     inclusive areas (``x1 - x0 + 1``)
"largest"         most pixels                         largest contour polygon area
                                                      (``cv2.contourArea`` of the outer
                                                      contour through pixel centres;
                                                      holes count as inside)
"all"             every 8-connected component         every contour of
                                                      ``cv2.RETR_TREE``: each component
                                                      *and each hole*
no foreground     empty ``(0, 4)`` array              one box ``[0, 0, 0, 0]``
================  ==================================  ===================================

The protocol's boxes are computed here without OpenCV, from exact identities:

* an outer contour of ``cv2.findContours`` traces one 8-connected component, so
  its bounding rect is the component's bounding box;
* a hole contour traces the foreground pixels 4-adjacent to a hole (a
  4-connected background component that does not touch the image border), so
  its bounding rect is the hole's bounding box grown by one pixel;
* the polygon through the centres of the outer contour encloses, in each 2x2
  window of pixels of the hole-filled component, area 1 when all four are set,
  1/2 when three are and 0 otherwise; summing windows gives ``cv2.contourArea``;
* ties between equal areas go to the component found last in raster order,
  which is the first one in OpenCV's contour list (the protocol's test vectors
  rely on this);
* hole contours compete for the largest as well: a hole's contour can at most
  tie its component's outer contour (a one-pixel-thin ring), and then wins,
  being found later; those few holes are traced exactly (Suzuki & Abe).

`tests/test_metrics.py` checks these against a straightforward implementation
of Suzuki & Abe's border following (the algorithm inside ``cv2.findContours``)
on random multi-blob, few-level and bicubic CAM-like maps (ties, one-pixel
lines, holes, nested components). The previous per-level labelling
implementation was compared with OpenCV 4.8.1 and 5.0.0 running the
protocol's code path, outside the test suite: identical on 164,000 (map,
threshold) pairs; the run-based one below was compared with that one on 287
maps of 224 x 224 (real and random CAMs, pure noise) at 100 thresholds, both
contour rules: identical on all 57,400 box sets.

Speed: all levels of a map are handled at once, without labelling images.
The horizontal runs of ``u8 > L`` for every level come from one pass over
the pixel boundaries (a boundary between values a < b starts a run for the
levels in [a, b)); runs of consecutive rows that touch are joined by
`scipy.sparse.csgraph.connected_components`, which gives every level's
components, their boxes and first pixels. Contour areas are sums over pairs
of touching runs (each 2x2 window with 3 or 4 set pixels lies over one
such pair). Holes are looked for only at levels whose Euler number, computed
for all 257 levels at once from 2x2-window counts, is below the component
count: there the gaps between runs of a row, joined with 4-connectivity,
are holes unless they meet the outer background in the row above or below.
`box_accuracies` reads both contour rules from that one pass.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from ._validate import check_ndim, float_array
from .errors import InvalidInput

__all__ = [
    "BoxAccResult",
    "BoxAccuracies",
    "box_accuracies",
    "iou",
    "localization_accuracy",
    "max_box_acc",
    "pointing_game",
    "protocol_boxes",
    "PxapResult",
    "pxap",
    "pxap_counts",
]

_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def _box_array(boxes, name: str) -> np.ndarray:
    """Return `boxes` as a finite float ``(n, 4)`` array; ``(4,)`` becomes ``(1, 4)``."""
    arr = float_array(boxes, name)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidInput(f"{name} must have shape (4,) or (n, 4), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{name} must be finite, got non-finite coordinates")
    return arr


def _pairwise_iou(a: np.ndarray, b: np.ndarray, extra: float) -> np.ndarray:
    """IoU matrix of validated boxes; `extra` is 0 (half-open) or 1 (inclusive)."""
    a = a[:, None, :]
    b = b[None, :, :]
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + extra
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + extra
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[..., 2] - a[..., 0] + extra, 0, None) * np.clip(
        a[..., 3] - a[..., 1] + extra, 0, None
    )
    area_b = np.clip(b[..., 2] - b[..., 0] + extra, 0, None) * np.clip(
        b[..., 3] - b[..., 1] + extra, 0, None
    )
    union = area_a + area_b - inter
    out = np.zeros(union.shape, dtype=np.result_type(union.dtype, np.float32))
    np.divide(inter, union, out=out, where=union > 0)
    return out


def iou(a, b, *, inclusive=False):
    """Pairwise intersection over union of two sets of boxes.

    Parameters
    ----------
    a : (n, 4) or (4,) array_like
        Boxes ``(x0, y0, x1, y1)``. A single ``(4,)`` box is read as ``(1, 4)``.
    b : (m, 4) or (4,) array_like
        Boxes ``(x0, y0, x1, y1)``.
    inclusive : bool, optional
        False (default): half-open boxes, camcore's convention, area
        ``(x1 - x0) * (y1 - y0)``. True: inclusive pixel counts
        ``(x1 - x0 + 1) * (y1 - y0 + 1)``, as wsolevaluation computes IoU.

    Returns
    -------
    (n, m) ndarray
        ``out[i, j]`` is the IoU of ``a[i]`` and ``b[j]``, in [0, 1]. Float32
        when both inputs are float32 (or narrower), float64 otherwise.
        A pair whose union is empty (degenerate boxes) has IoU 0, never NaN.

    Examples
    --------
    >>> iou([0, 0, 2, 2], [[1, 0, 3, 2], [0, 0, 2, 2], [5, 5, 5, 9]])
    array([[0.33333333, 1.        , 0.        ]])
    >>> float(iou([1, 2, 5, 6], [3, 1, 4, 5], inclusive=True)[0, 0])  # 8 / 27
    0.2962962962962963
    """
    return _pairwise_iou(_box_array(a, "a"), _box_array(b, "b"), 1.0 if inclusive else 0.0)


def _class_set(value, name: str) -> frozenset:
    if isinstance(value, numbers.Integral):
        return frozenset((int(value),))
    try:
        labels = np.asarray(list(value) if isinstance(value, (set, frozenset)) else value)
    except Exception:
        labels = None
    if labels is None or labels.ndim > 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise InvalidInput(f"{name} must be an int or a collection of ints, got {value!r}")
    return frozenset(int(v) for v in np.atleast_1d(labels))


def _maybe_boxes(boxes, name: str) -> np.ndarray:
    """Like `_box_array`, but an empty entry means no box: ``(0, 4)``."""
    return np.zeros((0, 4)) if np.size(boxes) == 0 else _box_array(boxes, name)


def _any_hit(pred, gt: np.ndarray, threshold: float) -> bool:
    return pred.shape[0] > 0 and bool((_pairwise_iou(pred, gt, 0.0) >= threshold).any())


def localization_accuracy(
    pred_classes,
    pred_boxes,
    gt_classes,
    gt_boxes,
    *,
    k=1,
    iou_threshold=0.5,
    gt_known_boxes=None,
):
    """Top-k and GT-known localization accuracy of the CAM paper (ILSVRC protocol).

    Image ``n`` is *top-k localized* when, among its first `k` predicted
    classes, some ``j`` has ``pred_classes[n, j]`` among the image's ground-truth
    classes **and** a box ``pred_boxes[n][j]`` with IoU >= `iou_threshold` with
    any ground-truth box of the image. It is *GT-known localized* when the box
    computed for its ground-truth class reaches that IoU with any ground-truth
    box, whatever the classification. Ground-truth boxes are not tied to a class:
    with several ground-truth classes (multi-label), any box of the image counts.

    Parameters
    ----------
    pred_classes : (N, K) array_like of int
        Predicted classes of each image, best first. ``K >= k``.
    pred_boxes : (N, K, 4) array_like, or sequence of N sequences of K boxes
        ``pred_boxes[n][j]`` is the half-open box (``(4,)``) or boxes
        (``(b, 4)``, for instance ``camcore.boxes(..., mode="all")``; any of them
        counts; ``(0, 4)`` means no box, a miss) for class ``pred_classes[n, j]``.
    gt_classes : (N,) array_like of int, or sequence of N collections of ints
        The ground-truth class of each image, or the set of its classes.
    gt_boxes : sequence of N (m, 4) array_like
        The half-open ground-truth boxes of each image, ``m >= 1``.
    k : int, optional
        How many predictions count for top-k (1 and 5 in the paper).
    iou_threshold : float, optional
        Minimum IoU, inclusive (0.5 in the paper).
    gt_known_boxes : sequence of N boxes, optional
        The box or boxes (``(4,)`` or ``(b, 4)``) computed from the map of the
        image's ground-truth class. When None, the box of the first ``j`` (over
        all ``K`` predictions) with ``pred_classes[n, j]`` a ground-truth class is
        used, and an image whose ground-truth class was not predicted counts as
        a GT-known miss; pass `gt_known_boxes` for the paper's exact GT-known.

    Returns
    -------
    dict
        ``{"top_k_loc": float, "gt_known_loc": float}``, fractions in [0, 1].

    Examples
    --------
    >>> pred_classes = [[3, 7], [5, 1]]
    >>> pred_boxes = [[[0, 0, 10, 10], [0, 0, 1, 1]], [[0, 0, 4, 4], [20, 20, 30, 30]]]
    >>> gt_classes = [3, 1]
    >>> gt_boxes = [[[0, 0, 10, 9]], [[20, 20, 30, 30]]]
    >>> localization_accuracy(pred_classes, pred_boxes, gt_classes, gt_boxes, k=1)
    {'top_k_loc': 0.5, 'gt_known_loc': 1.0}
    >>> localization_accuracy(pred_classes, pred_boxes, gt_classes, gt_boxes, k=2)
    {'top_k_loc': 1.0, 'gt_known_loc': 1.0}
    """
    classes = np.asarray(pred_classes)
    check_ndim(classes, 2, "pred_classes", "(N, K)")
    if classes.size and classes.dtype.kind not in "iu":
        raise InvalidInput(f"pred_classes must hold ints, got dtype {classes.dtype}")
    n_images, n_pred = classes.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n_pred:
        raise InvalidInput(f"k must be an int in [1, {n_pred}] (pred_classes has K={n_pred}), got {k!r}")
    threshold = float(iou_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInput(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    if n_images == 0:
        raise InvalidInput("pred_classes must hold at least one image, got shape (0, K)")
    for arg, name in ((pred_boxes, "pred_boxes"), (gt_classes, "gt_classes"), (gt_boxes, "gt_boxes")):
        if len(arg) != n_images:
            raise InvalidInput(f"{name} must have one entry per image ({n_images}), got {len(arg)}")
    if gt_known_boxes is not None and len(gt_known_boxes) != n_images:
        raise InvalidInput(
            f"gt_known_boxes must have one entry per image ({n_images}), got {len(gt_known_boxes)}"
        )

    top_k = gt_known = 0
    for n in range(n_images):
        truth = _class_set(gt_classes[n], f"gt_classes[{n}]")
        gt = _box_array(gt_boxes[n], f"gt_boxes[{n}]")
        if gt.shape[0] == 0:
            raise InvalidInput(f"gt_boxes[{n}] must hold at least one box, got shape (0, 4)")
        if len(pred_boxes[n]) != n_pred:
            raise InvalidInput(
                f"pred_boxes[{n}] must hold one entry per predicted class ({n_pred}), "
                f"got {len(pred_boxes[n])}"
            )
        def hit(j, n=n, gt=gt):
            return _any_hit(_maybe_boxes(pred_boxes[n][j], f"pred_boxes[{n}][{j}]"), gt, threshold)

        top_k += any(int(classes[n, j]) in truth and hit(j) for j in range(k))
        if gt_known_boxes is not None:
            gt_known += _any_hit(_maybe_boxes(gt_known_boxes[n], f"gt_known_boxes[{n}]"), gt, threshold)
        else:
            first = next((j for j in range(n_pred) if int(classes[n, j]) in truth), None)
            gt_known += first is not None and hit(first)
    return {"top_k_loc": top_k / n_images, "gt_known_loc": gt_known / n_images}


def _quantize(scoremap: np.ndarray) -> np.ndarray:
    # float64 like the protocol's np.float maps, so uint8 rounding is identical
    return (scoremap.astype(np.float64) * 255).astype(np.uint8)


def _levels(u8: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Integer cut ``int(threshold * max(u8))`` per threshold, clipped to [-1, 255]."""
    # int() truncates; every cut below 0 keeps all pixels, every cut from 255 none
    return np.clip(np.trunc(thresholds * float(u8.max())), -1, 255).astype(np.int64)


def _windows(u8: np.ndarray) -> tuple:
    """Every 2x2 window of `u8` padded with -1: its 4 values ``(TL, TR, BL, BR)``, and sorted."""
    p = np.pad(u8.astype(np.int16), 1, constant_values=-1)
    a, b, c, d = p[:-1, :-1].ravel(), p[:-1, 1:].ravel(), p[1:, :-1].ravel(), p[1:, 1:].ravel()
    # a 5-comparator sorting network: much cheaper than np.sort along a short axis
    lo1, hi1, lo2, hi2 = np.minimum(a, b), np.maximum(a, b), np.minimum(c, d), np.maximum(c, d)
    smallest, mid1, mid2, largest = np.minimum(lo1, lo2), np.maximum(lo1, lo2), np.minimum(hi1, hi2), np.maximum(hi1, hi2)
    v = np.stack([smallest, np.minimum(mid1, mid2), np.maximum(mid1, mid2), largest])
    return (a, b, c, d), v  # v ascending: v[3] is the largest


def _euler_numbers(quads, v: np.ndarray) -> np.ndarray:
    """Euler number (8-connected components minus holes) of ``u8 > L`` for L = -1..255.

    Gray's 2x2-window count ``(Q1 - Q3 - 2 QD) / 4``, for all levels at once: a
    window holds exactly ``k`` foreground pixels for L between its k-th and
    (k+1)-th largest values.
    """
    a, b, c, d = quads

    def windows(lo, hi):  # how many windows have lo <= L < hi, per L = -1..255
        delta = np.bincount(lo + 1, minlength=258) - np.bincount(hi + 1, minlength=258)
        return np.cumsum(delta[:257])

    diagonal = (np.minimum(a, d) > np.maximum(b, c)) | (np.minimum(b, c) > np.maximum(a, d))
    q1 = windows(v[2], v[3])
    q3 = windows(v[0], v[1])
    qd = windows(v[1][diagonal], v[2][diagonal])
    return (q1 - q3 - 2 * qd) // 4


def _ranges(first: np.ndarray, n: np.ndarray) -> tuple:
    """Expand ranges ``[first[i], first[i] + n[i])``: returns (i, value) per element."""
    which = np.repeat(np.arange(n.size), n)
    return which, first[which] + np.arange(which.size) - np.repeat(np.cumsum(n) - n, n)


def _row_runs(values: np.ndarray, levels: np.ndarray) -> tuple:
    """Horizontal runs of ``values > L`` for every L of the sorted `levels`.

    Returns ``(level_index, row, start, stop)`` arrays (``stop`` exclusive),
    sorted by level, row and start. A run starts at column x for the levels in
    ``[values[x-1], values[x])`` and stops there for those in
    ``[values[x], values[x-1])`` (outside the image counts as -1), so all
    levels come from one pass over the pixel boundaries.
    """
    height, width = values.shape
    p = np.full((height, width + 2), -1, dtype=np.int16)
    p[:, 1:-1] = values
    left, right = p[:, :-1], p[:, 1:]
    rows, xs = np.nonzero(left != right)
    a, b = left[rows, xs], right[rows, xs]
    below = np.searchsorted(levels, np.arange(-1, 256), side="left")  # how many levels lie below v, v = -1..255
    first = below[np.minimum(a, b) + 1]
    which, level = _ranges(first, below[np.maximum(a, b) + 1] - first)
    # boundaries already run by row, then column; int16 levels get numpy's radix sort
    order = np.argsort(level.astype(np.int16), kind="stable")
    level, rows, xs = level[order], rows[which][order], xs[which][order]
    # in each (level, row) the boundaries alternate start, stop
    return level[0::2], rows[0::2], xs[0::2], xs[1::2]


def _run_components(runs: tuple, shape: tuple, eight: bool) -> dict:
    """Connected components of sorted row runs ``(level, row, start, stop)``, per level.

    Runs of consecutive rows of one level touch when ``start_a <= stop_b`` and
    ``start_b <= stop_a`` (8-connectivity), or when they overlap (4-). Returns
    the run -> component ``label`` and, per component: ``level``, ``box``
    ``(x0, y0, x1, y1)`` (exclusive ends, as the protocol's ``x + w``),
    ``raster`` (index of its first pixel) and ``area2`` (twice the polygon
    area through the pixel centres of its outer contour, exact when it has no
    hole: 2x2 windows with 3 set pixels add 1, with 4 add 2, and each such
    window lies over a pair of touching runs).
    """
    level, row, start, stop = runs
    height, width = shape
    n_runs = level.size
    reach = 1 if eight else 0
    span = width + 2
    group = level.astype(np.int64) * (height + 1) + row  # the next row of a run's level is group + 1
    key_start, key_stop = group * span + start, group * span + stop
    lo = np.searchsorted(key_stop, (group + 1) * span + start + 1 - reach, side="left")
    hi = np.searchsorted(key_start, (group + 1) * span + stop - 1 + reach, side="right")
    n = np.maximum(hi - lo, 0)
    a, b = _ranges(lo, n)
    # a is sorted: the edge list is already a CSR matrix
    indptr = np.concatenate([[0], np.cumsum(n)])
    graph = sparse.csr_matrix((np.ones(a.size, dtype=np.int8), b, indptr), shape=(n_runs, n_runs))
    count, label = csgraph.connected_components(graph, directed=False)
    # windows over touching runs a (row r) and b (row r + 1): both rows hold x and x + 1 -> 2;
    # one row holds both and the other one of them (its run ends or begins there) -> 1
    sa, ea, sb, eb = start[a], stop[a], start[b], stop[b]
    full = np.maximum(np.minimum(ea, eb) - np.maximum(sa, sb) - 1, 0)  # windows with 4 set pixels
    weight = 2 * full
    weight += ((sa < sb) & (sb < ea)).astype(np.int64) + ((sa < eb) & (eb < ea))
    weight += ((sb < sa) & (sa < eb)).astype(np.int64) + ((sb < ea) & (ea < eb))
    index = np.arange(n_runs)
    first = np.full(count, n_runs, dtype=np.int64)
    np.minimum.at(first, label, index)  # runs are in raster order within a level
    last = np.zeros(count, dtype=np.int64)
    np.maximum.at(last, label, index)
    x0 = np.full(count, width, dtype=np.int64)
    np.minimum.at(x0, label, start)
    x1 = np.zeros(count, dtype=np.int64)
    np.maximum.at(x1, label, stop)
    return {
        "label": label,
        "level": level[first],
        "box": np.stack([x0, row[first], x1, row[last] + 1], axis=1),
        "raster": row[first].astype(np.int64) * width + start[first],
        "area2": np.bincount(label[a], weights=weight, minlength=count),
        "blocks": np.bincount(label[a], weights=full, minlength=count),
    }


def _largest_per_level(comps: dict) -> np.ndarray:
    """Index of the component with the largest area per level; ties go to the last in raster order."""
    order = np.lexsort((comps["raster"], comps["area2"], comps["level"]))
    level = comps["level"][order]
    return order[np.flatnonzero(np.append(level[1:] != level[:-1], True))] if order.size else order


# the 8 neighbours clockwise on screen (rows grow downwards), from east
_AROUND = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _hole_border_area2(fg: np.ndarray, i: int, j: int) -> int:
    """Twice the polygon area of the hole border traced from foreground pixel (i, j), hole to its east.

    Suzuki & Abe's border following (steps 3.1-3.6, the algorithm of
    ``cv2.findContours``), then the shoelace formula, as ``cv2.contourArea``.
    """
    f = np.pad(fg, 1)
    start = (i + 1, j + 1)
    p1 = next((q for q in ((start[0] + di, start[1] + dj) for di, dj in _AROUND) if f[q]), None)
    if p1 is None:
        return 0
    previous, current, points = p1, start, []
    while True:
        back = _AROUND.index((previous[0] - current[0], previous[1] - current[1]))
        for s in range(1, 9):  # counterclockwise from the neighbour after the previous pixel
            di, dj = _AROUND[(back - s) % 8]
            following = (current[0] + di, current[1] + dj)
            if f[following]:
                break
        points.append(current)
        if following == start and current == p1:
            break
        previous, current = current, following
    y, x = np.array(points).T
    return int(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _take(runs: tuple, keep: np.ndarray) -> tuple:
    return tuple(r[keep] for r in runs)


def _map_boxes(u8: np.ndarray, levels: np.ndarray, largest: bool, every: bool) -> tuple:
    """Protocol boxes of one uint8 map at sorted unique `levels` (ints in [-1, 255]).

    Returns ``(largest, every)``; each wanted one is ``(boxes, level)``: an
    (M, 4) int64 array of boxes, clipped as the protocol does, and the (M,)
    index into `levels` of each, by level; the other is None. A level without
    foreground gives ``[0, 0, 0, 0]``.

    Levels whose foreground has holes (Euler number below the component
    count) also get the gaps between runs of a row: their 4-connected
    components that meet no other background are the holes, whose contour
    boxes are theirs grown by one pixel; and the largest contour is read on
    the foreground with its holes filled (runs joined across hole gaps).
    """
    height, width = u8.shape
    fg_runs = _row_runs(u8, levels)
    fg = _run_components(fg_runs, u8.shape, True)
    per_level = np.bincount(fg["level"], minlength=levels.size)
    euler = _euler_numbers(*_windows(u8))[levels + 1]
    holed = np.flatnonzero(per_level != euler)
    parts = {0: [], 1: []}  # mode -> [(boxes, level index)]
    empty = np.flatnonzero(per_level == 0)
    for mode in (0, 1):
        parts[mode].append((np.zeros((empty.size, 4), np.int64), empty))
    if every:
        parts[1].append((fg["box"], fg["level"]))
    refill = holed
    if holed.size:
        taken = np.flatnonzero(np.isin(fg_runs[0], holed))
        level, row, start, stop = _take(fg_runs, taken)
        group = level.astype(np.int64) * (height + 1) + row
        # holes are made of gaps between two runs of a row: any other background pixel lies left
        # of the first run or right of the last one, so it reaches the image border
        inner = np.flatnonzero(group[1:] == group[:-1])
        gaps = (level[inner], row[inner], stop[inner], start[inner + 1])
        pieces = _run_components(gaps, u8.shape, False)
        # a gap meets that outer background when the row above or below has no run of its level,
        # or starts after the gap starts, or stops before it stops
        outside = np.zeros(inner.size, dtype=bool)
        for step in (-1, 1):
            first = np.searchsorted(group, group[inner] + step, side="left")
            last = np.searchsorted(group, group[inner] + step, side="right") - 1
            outside |= (last < first) | (gaps[2] < start[np.minimum(first, group.size - 1)])
            outside |= gaps[3] > stop[np.maximum(last, 0)]
        is_hole = np.bincount(pieces["label"], weights=outside, minlength=pieces["level"].size) == 0
        grown = pieces["box"] + np.array([-1, -1, 1, 1])  # a hole's contour runs through the pixels around it
        if every:
            parts[1].append((grown[is_hole], pieces["level"][is_hole]))
        # hole contours compete for the largest too, but one can only tie the largest contour (never
        # exceed it), when its component has no 2x2 block (a one-pixel-thin ring: any block lies
        # between its outer and hole contours), and its area is at most 10 x its pixel count
        pixels = np.bincount(pieces["label"], weights=gaps[3] - gaps[2], minlength=is_hole.size)
        unfilled = np.zeros(levels.size)
        np.maximum.at(unfilled, fg["level"], fg["area2"])
        first_gap = np.full(is_hole.size, inner.size)
        np.minimum.at(first_gap, pieces["label"], np.arange(inner.size))
        around = fg["label"][taken[inner[first_gap]]]  # the component left of the hole's first gap
        thin = fg["blocks"][around] == 0
        rivals = np.flatnonzero(is_hole & thin & (10 * pixels >= unfilled[pieces["level"]]))
        # filling holes changes areas, hence the largest, only where there are several contours
        refill = np.union1d(holed[per_level[holed] > 1], pieces["level"][rivals])
        if largest and refill.size:  # fill the holes: runs on both sides of a hole gap become one
            new = np.ones(level.size, dtype=bool)
            new[inner + 1] = ~is_hole[pieces["label"]]
            begin, end = np.flatnonzero(new), np.flatnonzero(np.append(new[1:], True))
            keep = np.isin(level[begin], refill)
            begin, end = begin[keep], end[keep]
            filled = _run_components((level[begin], row[begin], start[begin], stop[end]), u8.shape, True)
    if largest:  # the winner of each level: area, raster index of its first pixel, box
        plain = np.isin(fg["level"], refill, invert=True)
        candidates = [{k: v[plain] for k, v in fg.items() if k != "label"}]
        if refill.size:
            candidates.append({k: v for k, v in filled.items() if k != "label"})
        comps = {k: np.concatenate([c[k] for c in candidates]) for k in candidates[0]}
        picked = _largest_per_level(comps)
        best = {k: v[picked] for k, v in comps.items()}
        if holed.size:  # trace the few holes that may tie
            for h in rivals:
                lv = pieces["level"][h]
                i, j = divmod(int(pieces["raster"][h]) - 1, width)  # left of its first pixel
                w = int(np.flatnonzero(best["level"] == lv)[0])
                area2 = _hole_border_area2(u8 > levels[lv], i, j)
                # found after its own component's outer border, so it wins ties with it
                if (area2, pieces["raster"][h] - 1) > (best["area2"][w], best["raster"][w]):
                    best["area2"][w], best["raster"][w], best["box"][w] = area2, pieces["raster"][h] - 1, grown[h]
        parts[0].append((best["box"], best["level"]))
    out = []
    for mode, wanted in enumerate((largest, every)):
        if not wanted:
            out.append(None)
            continue
        boxes = np.concatenate([p[0] for p in parts[mode]])
        owner = np.concatenate([p[1] for p in parts[mode]])
        np.minimum(boxes[:, 2], width - 1, out=boxes[:, 2])
        np.minimum(boxes[:, 3], height - 1, out=boxes[:, 3])
        order = np.argsort(owner, kind="stable")
        out.append((boxes[order], owner[order]))
    return tuple(out)


def _check_scoremaps(scoremaps, name: str, ndim: int, axes: str) -> np.ndarray:
    maps = float_array(scoremaps, name)
    check_ndim(maps, ndim, name, axes)
    if maps.size == 0:
        raise InvalidInput(f"{name} must not be empty, got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise InvalidInput(f"{name} must be finite, got NaN or infinity")
    lo, hi = float(maps.min()), float(maps.max())
    if lo < 0 or hi > 1:
        raise InvalidInput(f"{name} must be in [0, 1], got values in [{lo}, {hi}]")
    return maps


def _check_thresholds(values, name: str, low=None, high=None) -> np.ndarray:
    arr = float_array(values, name).astype(np.float64)
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    check_ndim(arr, 1, name, "(n,)")
    if arr.size == 0 or not np.isfinite(arr).all():
        raise InvalidInput(f"{name} must be a non-empty 1-D array of finite numbers, got {values!r}")
    if (low is not None and arr.min() < low) or (high is not None and arr.max() > high):
        raise InvalidInput(f"{name} must lie in [{low}, {high}], got values in [{arr.min()}, {arr.max()}]")
    return arr


def protocol_boxes(scoremap, thresholds, *, multi_contour=False):
    """Boxes of one score map at each threshold, exactly as wsolevaluation infers them.

    The map is quantized to ``u8 = uint8(scoremap * 255)``; at threshold ``t``
    the foreground is ``u8 > int(t * max(u8))``. Each contour of the foreground
    (``cv2.RETR_TREE``: components and holes) gives ``(x, y, x + w, y + h)`` of
    its bounding rect, with ``x1`` and ``y1`` clipped to ``W - 1`` and ``H - 1``.
    See the module docstring for how this is computed without OpenCV.

    Parameters
    ----------
    scoremap : (H, W) array_like
        Score map with values in [0, 1].
    thresholds : (T,) array_like
        Fractions of the map's maximum.
    multi_contour : bool, optional
        False: the box of the largest contour (by polygon area; ties go to the
        component found last in raster order). True: the boxes of all contours.

    Returns
    -------
    list of T (m, 4) int64 ndarrays
        Boxes in the protocol's convention. ``m == 1`` unless `multi_contour`;
        a threshold with no foreground gives the single box ``[0, 0, 0, 0]``.

    Examples
    --------
    >>> m = [[0, 0, 0, 0, 0], [0, .4, .4, .4, .6], [0, .4, 1, .8, .6], [0, .4, .4, .4, .6]]
    >>> [b.tolist() for b in protocol_boxes(m, [0.0, 0.4, 0.8])]
    [[[1, 1, 4, 3]], [[2, 1, 4, 3]], [[2, 2, 3, 3]]]
    """
    u8 = _quantize(_check_scoremaps(scoremap, "scoremap", 2, "(H, W)"))
    levels = _levels(u8, _check_thresholds(thresholds, "thresholds"))
    multi = bool(multi_contour)
    unique, inverse = np.unique(levels, return_inverse=True)
    boxes, owner = _map_boxes(u8, unique, not multi, multi)[multi]
    per_level = np.split(boxes, np.flatnonzero(np.diff(owner)) + 1)
    return [per_level[i] for i in inverse.reshape(-1)]


@dataclass(frozen=True)
class BoxAccResult:
    """The result of `max_box_acc`: BoxAcc counts at every (IoU, map) threshold.

    Attributes
    ----------
    counts : (n_iou, n_thresholds) ndarray of int64
        How many images are correctly localized at each pair of thresholds.
    n_images : int
        How many images were evaluated.
    thresholds : (n_thresholds,) ndarray
        The score-map thresholds.
    iou_thresholds : (n_iou,) ndarray
        The IoU thresholds.

    Results on disjoint sets of images with the same thresholds add up with
    ``+``, so that a dataset can be evaluated in chunks with the same figures.
    """

    counts: np.ndarray
    n_images: int
    thresholds: np.ndarray
    iou_thresholds: np.ndarray

    @property
    def curve(self) -> np.ndarray:
        """(n_iou, n_thresholds) ndarray: BoxAcc in percent."""
        return self.counts * 100.0 / self.n_images

    @property
    def best_thresholds(self) -> np.ndarray:
        """(n_iou,) ndarray: the first score-map threshold reaching the maximum, per IoU threshold."""
        return self.thresholds[np.argmax(self.counts, axis=1)]

    @property
    def per_iou(self) -> np.ndarray:
        """(n_iou,) ndarray: MaxBoxAcc in percent at each IoU threshold."""
        return self.curve.max(axis=1)

    @property
    def value(self) -> float:
        """MaxBoxAcc in percent, averaged over the IoU thresholds."""
        return float(self.per_iou.mean())

    def __add__(self, other):
        if not isinstance(other, BoxAccResult):
            return NotImplemented
        if not (
            np.array_equal(self.thresholds, other.thresholds)
            and np.array_equal(self.iou_thresholds, other.iou_thresholds)
        ):
            raise InvalidInput("BoxAccResult objects can only be added with identical thresholds")
        return BoxAccResult(
            self.counts + other.counts, self.n_images + other.n_images, self.thresholds, self.iou_thresholds
        )


def max_box_acc(
    scoremaps,
    gt_boxes,
    *,
    thresholds=np.arange(0, 1, 0.01),
    iou_thresholds=(0.3, 0.5, 0.7),
    multi_contour=True,
):
    """MaxBoxAcc (V1) and MaxBoxAccV2 of wsolevaluation (Choe et al., CVPR 2020).

    For every score-map threshold, an image is correct at IoU threshold ``d``
    when some box of `protocol_boxes` has inclusive IoU >= ``d`` with some
    ground-truth box. BoxAcc is the percentage of correct images; MaxBoxAcc its
    maximum over score-map thresholds, averaged over the IoU thresholds.
    MaxBoxAccV2 is the default; V1 is ``multi_contour=False,
    iou_thresholds=(0.5,)``.

    Parameters
    ----------
    scoremaps : (N, H, W) array_like
        Score maps in [0, 1] (wsolevaluation resizes to 224 x 224 and
        normalizes before this). Quantized in float64 as the protocol does.
    gt_boxes : sequence of N (m, 4) array_like
        Ground-truth boxes of each image in the protocol's convention (the
        inclusive coordinates of its ``localization.txt``, scaled to the map
        grid), ``m >= 1``.
    thresholds : (T,) array_like, optional
        Score-map thresholds, fractions of each map's maximum.
    iou_thresholds : (n_iou,) array_like, optional
        IoU thresholds in [0, 1].
    multi_contour : bool, optional
        True (V2): all contours' boxes count. False (V1): only the largest.

    Returns
    -------
    BoxAccResult
        ``.value`` (percent), ``.best_thresholds`` ``(n_iou,)``, ``.curve``
        ``(n_iou, T)`` in percent, ``.counts``; results of chunks add with ``+``.

    Examples
    --------
    >>> maps = np.zeros((2, 20, 20)); maps[0, 2:12, 1:16] = 1; maps[1, 14:, 14:] = 1
    >>> res = max_box_acc(maps, [[[1, 2, 15, 11]], [[14, 14, 19, 19]]])
    >>> res.value, res.curve.shape
    (100.0, (3, 100))
    >>> max_box_acc(maps, [[[1, 2, 15, 11]], [[0, 0, 5, 5]]], iou_thresholds=[0.5]).value
    50.0

    The protocol's box is one pixel wider and taller than the set pixels
    (``x + w`` read as inclusive) except at the image border, so a map that is
    exactly 1 inside an inclusive ground-truth box of ``w x h`` pixels reaches
    IoU ``w h / ((w + 1)(h + 1))``, not 1:

    >>> small = np.zeros((1, 8, 8)); small[0, 2:5, 1:6] = 1  # 5 x 3 pixels
    >>> max_box_acc(small, [[[1, 2, 5, 4]]], iou_thresholds=[0.5, 0.7]).per_iou
    array([100.,   0.])
    """
    multi = bool(multi_contour)
    return _box_acc_counts(scoremaps, gt_boxes, thresholds, iou_thresholds, (not multi, multi))[multi]


class BoxAccuracies(NamedTuple):
    """The result of `box_accuracies`: both contour rules from one pass.

    Attributes
    ----------
    largest : BoxAccResult
        Only the largest contour's box counts (``multi_contour=False``).
    all : BoxAccResult
        Every contour's box counts (``multi_contour=True``, MaxBoxAccV2).
    """

    largest: BoxAccResult
    all: BoxAccResult

    def __add__(self, other):
        if not isinstance(other, BoxAccuracies):
            return NotImplemented
        return BoxAccuracies(self.largest + other.largest, self.all + other.all)


def box_accuracies(scoremaps, gt_boxes, *, thresholds=np.arange(0, 1, 0.01), iou_thresholds=(0.3, 0.5, 0.7)):
    """`max_box_acc` with the largest contour and with all contours, in one pass.

    Each map is thresholded and labelled once per distinct level, and both
    contour rules read their boxes from that labelling, so this costs about
    half of two `max_box_acc` calls. MaxBoxAcc (V1) is
    ``result.largest`` at IoU 0.5; MaxBoxAccV2 is ``result.all.value`` with
    IoU thresholds (0.3, 0.5, 0.7).

    Parameters
    ----------
    scoremaps, gt_boxes, thresholds, iou_thresholds
        As in `max_box_acc`.

    Returns
    -------
    BoxAccuracies
        ``(largest, all)``, two `BoxAccResult`; results of chunks add with ``+``.

    Examples
    --------
    >>> maps = np.zeros((1, 20, 20)); maps[0, 2:12, 1:6] = 1; maps[0, 14:, 14:] = 0.5
    >>> res = box_accuracies(maps, [[[14, 14, 19, 19]]])
    >>> res.largest.value, res.all.value  # the big blob is the largest; V2 also sees the small one
    (0.0, 100.0)
    >>> bool(res.all.per_iou[1] == max_box_acc(maps, [[[14, 14, 19, 19]]], iou_thresholds=[0.5]).value)
    True
    """
    return BoxAccuracies(*_box_acc_counts(scoremaps, gt_boxes, thresholds, iou_thresholds, (True, True)))


def _box_acc_counts(scoremaps, gt_boxes, thresholds, iou_thresholds, wanted) -> tuple:
    """`BoxAccResult` for (largest contour, all contours), None where not `wanted`."""
    maps = _check_scoremaps(scoremaps, "scoremaps", 3, "(N, H, W)")
    if len(gt_boxes) != maps.shape[0]:
        raise InvalidInput(f"gt_boxes must have one entry per map ({maps.shape[0]}), got {len(gt_boxes)}")
    thresholds = _check_thresholds(thresholds, "thresholds")
    iou_thresholds = _check_thresholds(iou_thresholds, "iou_thresholds", 0.0, 1.0)
    counts = [np.zeros((iou_thresholds.size, thresholds.size), dtype=np.int64) if w else None for w in wanted]
    for n, scoremap in enumerate(maps):
        gt = _box_array(gt_boxes[n], f"gt_boxes[{n}]")
        if gt.shape[0] == 0:
            raise InvalidInput(f"gt_boxes[{n}] must hold at least one box, got shape (0, 4)")
        u8 = _quantize(scoremap)
        levels, inverse = np.unique(_levels(u8, thresholds), return_inverse=True)
        for count, found in zip(counts, _map_boxes(u8, levels, *wanted)):
            if count is None:
                continue
            boxes, owner = found
            best = np.zeros(levels.size)
            np.maximum.at(best, owner, _pairwise_iou(boxes, gt, 1.0).max(axis=1))
            count += best[inverse.reshape(-1)][None, :] >= iou_thresholds[:, None]
    return tuple(
        None if c is None else BoxAccResult(c, int(maps.shape[0]), thresholds, iou_thresholds) for c in counts
    )


def pxap(scoremaps, masks, *, ignore=None, thresholds=np.arange(0, 1, 0.01)):
    """Pixel average precision (PxAP) of wsolevaluation, in percent.

    Scores are binned with right edges ``thresholds + [1, 2, 3]`` (bins
    ``[t_i, t_i+1)``, ..., ``[t_last, 1)``, ``[1, 2)``, ``[2, 3]``), as its
    ``MaskEvaluator`` does on the raw float maps (no uint8 quantization).
    Precision and recall are taken at each edge from the top, and PxAP is
    ``sum(precision[i] * (recall[i] - recall[i-1]))`` over the edges where
    something is predicted. wsolevaluation's OpenImages masks mark an *ignore*
    region (inside an ignore box, outside every instance mask) that counts as
    neither positive nor negative; pass it as `ignore`.

    Parameters
    ----------
    scoremaps : (N, H, W) array_like
        Score maps in [0, 1].
    masks : (N, H, W) array_like of bool
        True (or nonzero) at ground-truth foreground pixels.
    ignore : (N, H, W) array_like of bool, optional
        True at pixels left out of the evaluation.
    thresholds : (T,) array_like, optional
        Increasing bin left edges, starting at 0 (the protocol's
        ``np.arange(0, 1, interval)``).

    Returns
    -------
    float
        PxAP in percent. `pxap_counts` gives the histograms behind it, which
        add up over chunks of a dataset.

    Examples
    --------
    >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
    >>> pxap(masks.astype(float), masks)
    100.0
    >>> pxap(np.full((1, 4, 4), 0.3), masks)  # a constant map: the positive fraction
    50.0
    """
    return pxap_counts(scoremaps, masks, ignore=ignore, thresholds=thresholds).value


@dataclass(frozen=True)
class PxapResult:
    """The score histograms behind `pxap`, summable with ``+`` over chunks of a dataset.

    Attributes
    ----------
    positive, negative : (T + 2,) ndarray of int64
        Counts of ground-truth positive / negative (not ignored) pixels per bin,
        bins ``[t_0, t_1), ..., [t_last, 1), [1, 2), [2, 3]``.
    thresholds : (T,) ndarray
    """

    positive: np.ndarray
    negative: np.ndarray
    thresholds: np.ndarray

    @property
    def value(self) -> float:
        """PxAP in percent."""
        tp = np.cumsum(self.positive[::-1])
        fp = np.cumsum(self.negative[::-1])
        if tp[-1] == 0:
            raise InvalidInput("masks must contain at least one positive (not ignored) pixel")
        predicted = tp + fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / predicted
        recall = tp / tp[-1]
        valid = predicted[1:] > 0
        return float((precision[1:] * np.diff(recall))[valid].sum() * 100)

    def __add__(self, other):
        if not isinstance(other, PxapResult):
            return NotImplemented
        if not np.array_equal(self.thresholds, other.thresholds):
            raise InvalidInput("PxapResult objects can only be added with identical thresholds")
        return PxapResult(self.positive + other.positive, self.negative + other.negative, self.thresholds)


def pxap_counts(scoremaps, masks, *, ignore=None, thresholds=np.arange(0, 1, 0.01)):
    """The histograms of `pxap` as a `PxapResult` (``.value`` is PxAP); chunks add with ``+``.

    Parameters are those of `pxap`.

    Examples
    --------
    >>> masks = np.zeros((2, 4, 4), bool); masks[:, :2] = True
    >>> maps = masks * 0.9 + 0.05
    >>> whole = pxap_counts(maps, masks)
    >>> parts = pxap_counts(maps[:1], masks[:1]) + pxap_counts(maps[1:], masks[1:])
    >>> whole.value == parts.value == pxap(maps, masks) == 100.0
    True
    """
    maps = _check_scoremaps(scoremaps, "scoremaps", 3, "(N, H, W)")
    truth = np.asarray(masks)
    if truth.shape != maps.shape:
        raise InvalidInput(f"masks must have the shape of scoremaps {maps.shape}, got {truth.shape}")
    truth = truth != 0
    keep = np.ones(maps.shape, dtype=bool)
    if ignore is not None:
        ignored = np.asarray(ignore)
        if ignored.shape != maps.shape:
            raise InvalidInput(f"ignore must have the shape of scoremaps {maps.shape}, got {ignored.shape}")
        keep = ~(ignored != 0)
    thresholds = _check_thresholds(thresholds, "thresholds")
    if np.any(np.diff(thresholds) <= 0) or thresholds[-1] >= 1:
        raise InvalidInput(f"thresholds must increase strictly and stay below 1, got {thresholds!r}")
    edges = np.append(thresholds, [1.0, 2.0, 3.0])
    pos_hist = np.histogram(maps[truth & keep], bins=edges)[0]
    neg_hist = np.histogram(maps[~truth & keep], bins=edges)[0]
    return PxapResult(pos_hist, neg_hist, thresholds)


def pointing_game(maps, boxes, *, tolerance=0.0):
    """The pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016).

    A hit when the map's maximum (the first in row-major order, on ties) lies within
    `tolerance` pixels of a ground-truth box: the Euclidean distance from the maximum's
    pixel to the box's nearest pixel is at most `tolerance` (the paper uses 15).
    Accuracy is the fraction of hits: higher is better.

    Parameters
    ----------
    maps : (N, H, W) ndarray
        Saliency maps on the grid of the boxes (e.g. ``ImageExplanation.maps[j]``).
    boxes : sequence of N (m, 4) array_like
        Ground-truth boxes of each map, half-open ``(x0, y0, x1, y1)`` pixels.
    tolerance : float, optional
        In pixels, >= 0.

    Returns
    -------
    hits : (N,) bool ndarray

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((2, 4, 4)); m[0, 1, 1] = 1; m[1, 3, 3] = 1
    >>> pointing_game(m, [[[0, 0, 2, 2]], [[0, 0, 2, 2]]]).tolist()
    [True, False]
    >>> pointing_game(m, [[[0, 0, 2, 2]], [[0, 0, 2, 2]]], tolerance=3).tolist()  # 2 sqrt(2) from (1, 1)
    [True, True]
    """
    m = float_array(maps, "maps")
    check_ndim(m, 3, "maps", "(N, H, W)")
    if len(boxes) != len(m):
        raise InvalidInput(f"boxes must hold one (m, 4) array per map ({len(m)}), got {len(boxes)}")
    if not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise InvalidInput(f"tolerance must be a number >= 0, got {tolerance!r}")
    flat = np.argmax(m.reshape(len(m), -1), axis=1)
    ys, xs = np.divmod(flat, m.shape[2])
    hits = np.zeros(len(m), dtype=bool)
    for i, b in enumerate(boxes):
        if np.size(b) == 0:
            continue
        b = _box_array(b, f"boxes[{i}]")
        dx = np.maximum(np.maximum(b[:, 0] - xs[i], xs[i] - (b[:, 2] - 1)), 0)
        dy = np.maximum(np.maximum(b[:, 1] - ys[i], ys[i] - (b[:, 3] - 1)), 0)
        hits[i] = bool((np.hypot(dx, dy) <= tolerance).any())
    return hits
