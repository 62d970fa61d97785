"""The head of a GAP + linear model in NumPy, shared by the tests' fake backends."""

import numpy as np


def gap_linear_head(features, weights, bias, layout="NCHW", seeds=None):
    """``Backend.run_head`` of ``logits = mean_xy(features) @ weights.T + bias``.

    With `seeds` ``(M, k, C)``: the gradient of each ``seeds[m, j] . logits[m]`` is
    ``seeds[m, j] @ weights / (h * w)`` at every pixel.
    """
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    if seeds is None:
        return features.mean(axis=axes) @ weights.T + bias
    h, w = (features.shape[a] for a in axes)
    per_channel = (seeds @ weights / (h * w)).astype(features.dtype)  # (M, k, K)
    expand = per_channel[..., None, None] if layout == "NCHW" else per_channel[:, :, None, None, :]
    return np.broadcast_to(expand, (*seeds.shape[:2], *features.shape[1:])).copy()
