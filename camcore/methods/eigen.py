"""Methods made from the target layer's activations alone: EigenCAM.

They need neither gradients nor re-runs, so any backend that returns the features can
use them.  The map is the same for every class.
"""

from __future__ import annotations

import numpy as np

from ._common import feature_array
from ._registry import MethodSpec

__all__ = ["eigencam"]


def eigencam(features, *, layout="NCHW"):
    """EigenCAM (Muhammad & Yeasin, IJCNN 2020): the first principal component of the activations.

    For each item, the activations are read as ``h*w`` samples of ``K`` channels,
    centred over the samples (``X = A - mean_xy(A)``, shape ``(h*w, K)``), and the map is
    their projection on the first right singular vector ``v_1`` of ``X``:
    ``M = X v_1`` (``v_1`` is read from the top eigenvector of the smaller Gram matrix,
    ``X X^T`` or ``X^T X``).  A singular vector's sign is arbitrary, so it is fixed to make ``M``
    correlate positively with the activation sum ``sum_k A_k`` (ties keep the SVD's
    sign).  The map is class-agnostic and may be negative: the paper applies no ReLU.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> base = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> f = np.stack([base, 2 * base])[None]     # two channels, one pattern
    >>> np.round(eigencam(f)[0] / np.sqrt(5), 6)
    array([[-1.5, -0.5],
           [ 0.5,  1.5]])
    """
    f = feature_array(features, layout)
    if layout == "NCHW":
        f = f.transpose(0, 2, 3, 1)
    n, h, w, k = f.shape
    samples = f.reshape(n, h * w, k)
    centred = samples - samples.mean(axis=1, keepdims=True)
    # v_1 comes from the top eigenvector of the smaller Gram matrix (X X^T or X^T X) in float64:
    # the same vector as the SVD's (up to sign), some 20x faster for 7 x 7 x 1280 features.
    x = centred.astype(np.float64)
    if h * w <= k:
        top = np.linalg.eigh(np.matmul(x, x.transpose(0, 2, 1)))[1][:, :, -1]  # u_1, (n, h*w)
        v1 = np.matmul(top[:, None, :], x)[:, 0]  # X^T u_1 = s_1 v_1
        norm = np.linalg.norm(v1, axis=1, keepdims=True)
        v1 = np.divide(v1, norm, out=np.zeros_like(v1), where=norm > 0)
    else:
        v1 = np.linalg.eigh(np.matmul(x.transpose(0, 2, 1), x))[1][:, :, -1]
    maps = np.matmul(x, v1[:, :, None])[..., 0].astype(centred.dtype)
    total = samples.sum(axis=2)
    correlation = ((maps - maps.mean(1, keepdims=True)) * (total - total.mean(1, keepdims=True))).sum(1)
    maps *= np.where(correlation < 0, -1, 1)[:, None].astype(maps.dtype)
    return maps.reshape(n, h, w)


def _eigencam_maps(given):
    """One class-agnostic map per item, repeated for each of its classes."""
    return np.repeat(eigencam(given.features, layout=given.layout)[:, None], given.classes.shape[1], axis=1)


SPECS = (MethodSpec("eigencam", frozenset({"features"}), eigencam, _eigencam_maps, class_specific=False),)
