"""What the method families share: feature validation and the channel-weighted sum."""

from __future__ import annotations

import numpy as np

from .._validate import check_choice, check_ndim, float_array

LAYOUTS = ("NCHW", "NHWC")


def feature_array(features, layout: str) -> np.ndarray:
    """Validate `layout` and the 4-D `features`; return them as floats (dtype rule), in their own layout."""
    check_choice(layout, LAYOUTS, "layout")
    f = float_array(features, "features")
    check_ndim(f, 4, "features", "(N, h, w, K)" if layout == "NHWC" else "(N, K, h, w)")
    return f


def weighted_sum(weights: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``relu(sum_k weights[n, j, k] * f[n, k])`` as ``(N, k, h, w)`` for NCHW `f`, one batched GEMM."""
    n, k_feat, h, w = f.shape
    maps = np.matmul(weights, f.reshape(n, k_feat, h * w)).reshape(n, weights.shape[1], h, w)
    return np.maximum(maps, 0, out=maps)
