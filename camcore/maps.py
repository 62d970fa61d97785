"""Class activation maps: computing them, resizing them, normalizing them.

All three functions are batched array code (BLAS matrix products), with no
Python loop over images, classes or pixels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._validate import check_choice, check_ndim, check_size, float_array
from .errors import InvalidInput

__all__ = ["cam", "upsample", "normalize"]

_LAYOUTS = ("NCHW", "NHWC")
_UPSAMPLE_METHODS = ("nearest", "bilinear", "bicubic")
_NORMALIZE_METHODS = ("minmax", "max")
# Keys' cubic convolution parameter of OpenCV INTER_CUBIC, torch bicubic and
# ONNX Resize (its default cubic_coeff_a).
_CUBIC_A = -0.75
# From this many classes shared by the batch, cam() uses one big GEMM.
_ONE_GEMM_MIN_CLASSES = 256
# Interpolation matrices up to this size (8 MB as float64) are cached.
_CACHED_MATRIX_MAX_ENTRIES = 1 << 20
# OpenBLAS runs a GEMM on one thread when m * n * k <= 65536 * 4 (interface/gemm.c:
# SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD). Above it, its threads spin-wait,
# and on a busy machine a 7x7 map upsampled to a photo took 5 ms instead of 0.1 ms.
_ONE_THREAD_GEMM = 1 << 18


def cam(features, weights, classes=None, *, layout="NCHW"):
    """Class activation maps of a global-average-pooling + affine head.

    ``M[n, j] = sum_k weights[classes[n, j], k] * features[n, k]``, so that for
    a head ``logits = mean_xy(features) @ weights.T + bias`` the spatial mean
    of ``M[n, j]`` plus ``bias[classes[n, j]]`` is the logit of that class.
    The bias is not part of the map.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
        The feature maps that feed the global average pooling.
    weights : (C, K) ndarray
        The classifier weights, one row per class.
    classes : None, int sequence of length k, or (N, k) int ndarray, optional
        Which classes to map. None maps every class (``k = C``); a 1-D
        sequence maps the same classes for every item; an ``(N, k)`` array
        gives the classes of each item (for example its top-k predictions).
        Indices must lie in ``[0, C)``.
    layout : {"NCHW", "NHWC"}, optional
        The axis order of `features`.

    Returns
    -------
    maps : (N, k, h, w) ndarray
        ``maps[n, j]`` is the map of class ``classes[n, j]`` for item ``n``.
        The dtype is the common float type of `features` and `weights` after
        the dtype rule (float16 -> float32, integers -> float64).

    Raises
    ------
    InvalidInput
        Wrong ndim, mismatched K, class index out of range, unknown layout,
        or a non-finite value in the features or the used weights.

    Examples
    --------
    >>> import numpy as np
    >>> f = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    >>> w = np.array([[1, 0, 0], [0, 1, -1]], dtype=np.float32)
    >>> m = cam(f, w, classes=[[1], [0]])
    >>> m.shape, m.dtype
    ((2, 1, 2, 2), dtype('float32'))
    >>> m[0, 0]
    array([[-4., -4.],
           [-4., -4.]], dtype=float32)
    >>> cam(f, w).shape
    (2, 2, 2, 2)
    """
    check_choice(layout, _LAYOUTS, "layout")
    f = float_array(features, "features")
    axes = "(N, K, h, w)" if layout == "NCHW" else "(N, h, w, K)"
    check_ndim(f, 4, "features", axes)
    w = float_array(weights, "weights")
    check_ndim(w, 2, "weights", "(C, K)")
    dtype = np.result_type(f, w)
    f = f.astype(dtype, copy=False)
    w = w.astype(dtype, copy=False)
    if layout == "NCHW":
        n, k_feat, h, wd = f.shape
    else:
        n, h, wd, k_feat = f.shape
    if w.shape[1] != k_feat:
        raise InvalidInput(
            f"weights must have K={k_feat} columns to match features {f.shape} ({layout}), "
            f"got shape {w.shape}"
        )
    rows = w if classes is None else w[_class_indices(classes, n, w.shape[0])]

    k = rows.shape[-2]
    if rows.ndim == 2 and k >= _ONE_GEMM_MIN_CLASSES:
        # Many shared classes: one (k, K) x (K, N*h*w) GEMM runs BLAS far more
        # efficiently than N thin ones; the copy of the features is cheap next to it.
        if layout == "NCHW":
            stacked = f.reshape(n, k_feat, h * wd).transpose(1, 0, 2).reshape(k_feat, n * h * wd)
            out = (rows @ stacked).reshape(k, n, h * wd).transpose(1, 0, 2)
        else:
            out = (f.reshape(n * h * wd, k_feat) @ rows.T).reshape(n, h * wd, k).transpose(0, 2, 1)
        out = np.ascontiguousarray(out)
    else:
        # rows is (k, K) or (N, k, K); matmul broadcasts a shared (k, K) over the batch.
        if layout == "NCHW":
            flat = f.reshape(n, k_feat, h * wd)
        else:
            # A transposed view: BLAS reads it as a transposed operand, no copy.
            flat = f.reshape(n, h * wd, k_feat).transpose(0, 2, 1)
        out = np.matmul(rows, flat)
    if not np.isfinite(out).all():
        _raise_non_finite(f, rows)
    return out.reshape(n, k, h, wd)


def _class_indices(classes, n: int, n_classes: int) -> np.ndarray:
    idx = np.asarray(classes)
    if idx.size == 0 and idx.dtype.kind not in "iu":
        idx = idx.astype(np.intp)
    if idx.dtype.kind not in "iu":
        raise InvalidInput(f"classes must hold integer class indices, got dtype {idx.dtype}")
    check_ndim(idx, (1, 2), "classes", "(k,) or (N, k)")
    if idx.ndim == 2 and idx.shape[0] != n:
        raise InvalidInput(
            f"classes must be (N, k) with N={n} to match features, got shape {idx.shape}"
        )
    if idx.size:
        lo, hi = idx.min(), idx.max()
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise InvalidInput(
                f"classes must be indices in [0, {n_classes}) (weights has {n_classes} rows), "
                f"got {bad}"
            )
    return idx


def _raise_non_finite(f: np.ndarray, rows: np.ndarray):
    if not np.isfinite(f).all():
        raise InvalidInput("features must be finite, got NaN or infinity")
    if not np.isfinite(rows).all():
        raise InvalidInput("weights must be finite for the requested classes, got NaN or infinity")
    raise InvalidInput(
        f"features and weights overflow {f.dtype} in the class activation maps; "
        "pass float64 inputs"
    )


def upsample(maps, size, *, method="bilinear"):
    """Resize the last two axes of a batch of maps with half-pixel centers.

    Output pixel ``i`` of an axis of length ``n_out`` resized from ``n_in``
    samples the source coordinate ``src = (i + 0.5) * n_in / n_out - 0.5``
    (the convention of OpenCV ``cv2.resize``, torch ``align_corners=False``
    and ONNX ``Resize`` with ``coordinate_transformation_mode="half_pixel"``).

    * ``"bilinear"``: ``src`` is clamped to ``[0, n_in - 1]``, then linear
      interpolation between its two neighbours (OpenCV ``INTER_LINEAR``, torch
      ``bilinear``, ONNX ``linear``).
    * ``"bicubic"``: Keys' cubic convolution with ``a = -0.75`` on the four
      samples around ``src``, whose indices are clamped to ``[0, n_in - 1]``
      (OpenCV ``INTER_CUBIC``, torch ``bicubic``, ONNX ``cubic`` with its
      default ``cubic_coeff_a``). It may overshoot the input range.
    * ``"nearest"``: source index ``floor((i + 0.5) * n_in / n_out)``, clamped to
      ``n_in - 1``, computed exactly in integers (torch ``nearest-exact``,
      PIL ``NEAREST``, OpenCV ``INTER_NEAREST_EXACT``, ONNX ``nearest`` with
      ``nearest_mode="round_prefer_ceil"``).

    No antialiasing is applied when shrinking. The two axes are interpolated
    separably, as two matrix products per map broadcast over the batch by
    ``np.matmul`` (the interpolation matrices are cached).

    Parameters
    ----------
    maps : (..., h, w) ndarray
        Any batch of 2-D maps. Must be finite (a matrix product would spread a
        NaN over whole rows and columns).
    size : (H, W) pair of positive ints
        The output size.
    method : {"bilinear", "nearest", "bicubic"}, optional
        The interpolation.

    Returns
    -------
    resized : (..., H, W) ndarray
        Float, following the dtype rule (float16 -> float32, integers ->
        float64). A new array; `maps` is not modified.

    Raises
    ------
    InvalidInput
        `maps` with fewer than 2 dimensions, empty or non-finite, a bad
        `size`, or an unknown `method`.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> upsample(m, (4, 4))
    array([[0.  , 0.25, 0.75, 1.  ],
           [0.5 , 0.75, 1.25, 1.5 ],
           [1.5 , 1.75, 2.25, 2.5 ],
           [2.  , 2.25, 2.75, 3.  ]])
    >>> upsample(m, (2, 4), method="nearest")
    array([[0., 0., 1., 1.],
           [2., 2., 3., 3.]])
    >>> upsample(np.zeros((8, 3, 7, 7), np.float32), (224, 224)).shape
    (8, 3, 224, 224)
    """
    check_choice(method, _UPSAMPLE_METHODS, "method")
    out_h, out_w = check_size(size)
    m = float_array(maps, "maps")
    _check_maps(m)
    lead, (h, w) = m.shape[:-2], m.shape[-2:]
    if h == 0 or w == 0:
        raise InvalidInput(f"maps must have non-empty last two axes (h, w), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InvalidInput("maps must be finite, got NaN or infinity")
    ry = resize_matrix(out_h, h, method, m.dtype.str)
    rx = resize_matrix(out_w, w, method, m.dtype.str)
    batch = m.reshape(-1, h, w)
    # Per-map products, broadcast over the batch by matmul, cut into row blocks so
    # that each BLAS call runs on one thread (_ONE_THREAD_GEMM). One big threaded
    # GEMM is no faster (the work is bound by writing the output) and wakes
    # OpenBLAS workers that then spin and starve other work on small machines.
    # The axis that shrinks the work goes first.
    if out_h * h * w + out_h * w * out_w <= h * w * out_w + out_h * h * out_w:
        out = _one_thread_matmul(np.matmul(ry, batch), rx.T)
    else:
        out = _one_thread_matmul(ry, np.matmul(batch, rx.T))
    return out.reshape(*lead, out_h, out_w)


def _one_thread_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.matmul(a, b)`` for ``a (..., n, k)``, ``b (..., k, m)``, in blocks of rows of `a`
    small enough for a single-threaded GEMM each."""
    n, k = a.shape[-2:]
    m = b.shape[-1]
    rows = max(1, _ONE_THREAD_GEMM // max(1, k * m))
    if n <= rows:
        return np.matmul(a, b)
    out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (n, m), np.result_type(a, b))
    for start in range(0, n, rows):
        np.matmul(a[..., start:start + rows, :], b, out=out[..., start:start + rows, :])
    return out


def _check_maps(m: np.ndarray) -> None:
    if m.ndim < 2:
        raise InvalidInput(f"maps must be at least 2-D (..., h, w), got shape {m.shape}")


def resize_matrix(n_out: int, n_in: int, method: str = "bilinear", dtype: str = "<f4") -> np.ndarray:
    """The interpolation matrix of `upsample` along one axis.

    `upsample` computes ``R_H @ map @ R_W.T`` with these matrices; the fused graph
    (``camcore.fuse``) uses the same ones, so both paths share one definition.

    Parameters
    ----------
    n_out, n_in : int
        Output and input lengths.
    method : {"nearest", "bilinear", "bicubic"}
    dtype : str
        NumPy dtype string of the result.

    Returns
    -------
    (n_out, n_in) read-only ndarray
        Small matrices are cached (sizes are few in practice).

    Examples
    --------
    >>> resize_matrix(4, 2, "bilinear", "<f8")
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]])
    """
    if n_out * n_in <= _CACHED_MATRIX_MAX_ENTRIES:
        return _cached_resize_matrix(n_out, n_in, method, dtype)
    return _build_resize_matrix(n_out, n_in, method, dtype)


@lru_cache(maxsize=64)
def _cached_resize_matrix(n_out: int, n_in: int, method: str, dtype: str) -> np.ndarray:
    return _build_resize_matrix(n_out, n_in, method, dtype)


def _build_resize_matrix(n_out: int, n_in: int, method: str, dtype: str) -> np.ndarray:
    dst = np.arange(n_out)
    r = np.zeros((n_out, n_in))
    if method == "nearest":
        # floor((dst + 0.5) * n_in / n_out) in exact integer arithmetic.
        src = np.minimum((2 * dst + 1) * n_in // (2 * n_out), n_in - 1)
        r[dst, src] = 1.0
    else:
        x = (dst + 0.5) * (n_in / n_out) - 0.5
        if method == "bilinear":
            x = np.clip(x, 0.0, n_in - 1)
            i0 = np.floor(x).astype(np.intp)
            t = x - i0
            taps = np.stack([i0, i0 + 1], axis=1)
            coef = np.stack([1.0 - t, t], axis=1)
        else:
            i0 = np.floor(x).astype(np.intp)
            t = x - i0
            taps = i0[:, None] + np.arange(-1, 3)
            coef = _keys(t[:, None] - np.arange(-1, 3))
        # Clamped taps: edge samples repeat; add.at sums weights that coincide.
        np.add.at(r, (np.repeat(dst, taps.shape[1]), np.clip(taps, 0, n_in - 1).ravel()),
                  coef.ravel())
    r = r.astype(dtype)
    r.setflags(write=False)
    return r


def _keys(d: np.ndarray, a: float = _CUBIC_A) -> np.ndarray:
    """Keys' cubic convolution kernel at offsets `d`."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def normalize(maps, *, method="minmax"):
    """Scale each map to [0, 1], independently over its last two axes.

    * ``"minmax"``: ``(m - min) / (max - min)``.
    * ``"max"``: ``m / max``, as in the CAM authors' ILSVRC scripts, with
      negative values clipped to 0 so the result stays in [0, 1]. A map
      whose maximum is not positive has no positive evidence and becomes 0.

    A constant map, or a map holding any NaN or infinity, comes back as all
    zeros (as in clovaai/wsolevaluation), rather than raising, so that one bad
    map does not stop a batch.

    Parameters
    ----------
    maps : (..., h, w) ndarray
        Any batch of 2-D maps.
    method : {"minmax", "max"}, optional
        The scaling.

    Returns
    -------
    normalized : (..., h, w) ndarray
        Values in [0, 1]; float, following the dtype rule. A new array.

    Raises
    ------
    InvalidInput
        `maps` with fewer than 2 dimensions, or an unknown `method`.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([[[-1.0, 0.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]]])
    >>> normalize(m)
    array([[[0.  , 0.25],
            [0.5 , 1.  ]],
    <BLANKLINE>
           [[0.  , 0.  ],
            [0.  , 0.  ]]])
    >>> np.round(normalize(m[0], method="max"), 3)
    array([[0.   , 0.   ],
           [0.333, 1.   ]])
    """
    check_choice(method, _NORMALIZE_METHODS, "method")
    m = float_array(maps, "maps")
    _check_maps(m)
    if m.size == 0:
        return m.copy()
    hi = m.max(axis=(-2, -1), keepdims=True)
    lo = m.min(axis=(-2, -1), keepdims=True)
    # min and max propagate NaN, and an infinity shows up in one of them.
    finite = np.isfinite(lo) & np.isfinite(hi)
    if method == "minmax":
        valid = finite & (hi > lo)
        with np.errstate(invalid="ignore", over="ignore"):
            num, den = m - lo, hi - lo
    else:
        valid = finite & (hi > 0)
        num, den = np.maximum(m, 0), hi
    with np.errstate(invalid="ignore", over="ignore"):
        out = num / np.where(valid, den, 1)
    out[np.broadcast_to(~valid, out.shape)] = 0
    return out
