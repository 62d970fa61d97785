"""Gradient-weighted class activation maps: the methods that need ``features`` and ``gradients``.

Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM, each ``f(features (N, K, h, w),
gradients (N, k, K, h, w)) -> maps (N, k, h, w)``; the conventions (layouts, dtype rule,
the ReLU, the GAP + affine closed form) are in `camcore.methods`.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_ndim, float_array
from ..errors import InvalidInput
from ._common import feature_array, weighted_sum
from ._registry import MethodSpec

__all__ = ["gradcam", "gradcam_pp", "xgradcam", "hirescam", "layercam", "GRADIENT_METHODS"]


def _channels_first(features, gradients, layout: str):
    """Validate; return NCHW ``(N, K, h, w)`` features and ``(N, k, K, h, w)`` gradients in one dtype."""
    f = feature_array(features, layout)
    g = float_array(gradients, "gradients")
    nhwc = layout == "NHWC"
    check_ndim(g, 5, "gradients", "(N, k, h, w, K)" if nhwc else "(N, k, K, h, w)")
    if g.shape[0] != f.shape[0] or g.shape[2:] != f.shape[1:]:
        raise InvalidInput(f"gradients must be (N, k, *features.shape[1:]) = ({f.shape[0]}, k, "
                           f"{', '.join(map(str, f.shape[1:]))}), got shape {g.shape}")
    if nhwc:
        f, g = f.transpose(0, 3, 1, 2), g.transpose(0, 1, 4, 2, 3)
    dtype = np.result_type(f, g)
    return f.astype(dtype, copy=False), g.astype(dtype, copy=False)


def _spatial_mean(g: np.ndarray) -> np.ndarray:
    """``g.mean(axis=(-2, -1))``, read off one pixel when `g` is spatially constant by construction
    (a broadcast view, as backends return for targets read only by an average pooling)."""
    if g.strides[-1] == 0 and g.strides[-2] == 0:
        return g[..., 0, 0].copy()
    return g.mean(axis=(-2, -1))


def gradcam(features, gradients, *, layout="NCHW"):
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    ``alpha[c, k] = mean_xy(dY_c / dA_k)`` and ``M_c = relu(sum_k alpha[c, k] A_k)``.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
        Activations ``A`` of the target layer.
    gradients : (N, k, K, h, w) ndarray, or (N, k, h, w, K) with ``layout="NHWC"``
        ``dY_c / dA`` for the k classes of each item.
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> f = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    >>> g = np.stack([np.full((2, 2, 2), 0.25), -np.full((2, 2, 2), 0.25)])[None]
    >>> gradcam(f, g.astype(np.float32))[0, 0]
    array([[1. , 1.5],
           [2. , 2.5]], dtype=float32)
    >>> float(gradcam(f, g.astype(np.float32))[0, 1].max())
    0.0
    """
    f, g = _channels_first(features, gradients, layout)
    return weighted_sum(_spatial_mean(g), f)


def gradcam_pp(features, gradients, *, layout="NCHW"):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018).

    ``w[c, k] = sum_xy alpha[c, k, x, y] relu(dY_c / dA_kxy)`` with
    ``alpha = g^2 / (2 g^2 + sum_ab A_kab g^3)`` where ``g = dY_c / dA_kxy``: the
    paper's closed form for ``Y_c = exp(S_c)``, whose higher derivatives are powers of
    the first (``alpha = 0`` where the denominator is 0).  ``M_c = relu(sum_k w[c, k] A_k)``.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    gradients : (N, k, K, h, w) ndarray, or (N, k, h, w, K) with ``layout="NHWC"``
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> f = np.ones((1, 1, 2, 2))
    >>> g = np.full((1, 1, 1, 2, 2), 0.5)
    >>> gradcam_pp(f, g)[0, 0]  # alpha = 0.25 / (0.5 + 4 * 0.125) = 0.25; w = 4 * 0.25 * 0.5
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    f, g = _channels_first(features, gradients, layout)
    g2 = g * g
    denominator = 2 * g2 + f.sum(axis=(-2, -1))[:, None, :, None, None] * g2 * g
    alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(-2, -1))
    return weighted_sum(weights, f)


def xgradcam(features, gradients, *, layout="NCHW"):
    """XGrad-CAM (Fu et al., BMVC 2020).

    ``w[c, k] = sum_xy (A_kxy / sum_ab A_kab) dY_c / dA_kxy`` (0 for a channel whose
    activations sum to 0) and ``M_c = relu(sum_k w[c, k] A_k)``.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    gradients : (N, k, K, h, w) ndarray, or (N, k, h, w, K) with ``layout="NHWC"``
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> f = np.array([[[[1.0, 3.0]]]])          # (1, 1, 1, 2)
    >>> g = np.array([[[[[2.0, 1.0]]]]])        # w = (1 * 2 + 3 * 1) / 4
    >>> xgradcam(f, g)
    array([[[[1.25, 3.75]]]])
    """
    f, g = _channels_first(features, gradients, layout)
    total = f.sum(axis=(-2, -1))
    weighted = (g * f[:, None]).sum(axis=(-2, -1))
    weights = np.divide(weighted, total[:, None], out=np.zeros_like(weighted), where=total[:, None] != 0)
    return weighted_sum(weights, f)


def hirescam(features, gradients, *, layout="NCHW"):
    """HiResCAM (Draelos & Carin, 2020, arXiv:2011.08891).

    ``M_c = relu(sum_k dY_c / dA_k * A_k)``: the gradient multiplies the activations
    element-wise instead of being averaged first.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    gradients : (N, k, K, h, w) ndarray, or (N, k, h, w, K) with ``layout="NHWC"``
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> f = np.array([[[[1.0, 2.0]], [[1.0, 1.0]]]])        # (1, 2, 1, 2)
    >>> g = np.array([[[[[1.0, 1.0]], [[-3.0, 0.0]]]]])     # (1, 1, 2, 1, 2)
    >>> hirescam(f, g)
    array([[[[0., 2.]]]])
    """
    f, g = _channels_first(features, gradients, layout)
    maps = (g * f[:, None]).sum(axis=2)
    return np.maximum(maps, 0, out=maps)


def layercam(features, gradients, *, layout="NCHW"):
    """LayerCAM (Jiang et al., IEEE TIP 2021).

    ``M_c = relu(sum_k relu(dY_c / dA_k) * A_k)``: positive gradients weight each
    location of each channel.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    gradients : (N, k, K, h, w) ndarray, or (N, k, h, w, K) with ``layout="NHWC"``
    layout : {"NCHW", "NHWC"}, optional

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> f = np.array([[[[1.0, 2.0]], [[1.0, 1.0]]]])        # (1, 2, 1, 2)
    >>> g = np.array([[[[[1.0, 1.0]], [[-3.0, 0.5]]]]])     # (1, 1, 2, 1, 2)
    >>> layercam(f, g)
    array([[[[1. , 2.5]]]])
    """
    f, g = _channels_first(features, gradients, layout)
    maps = (np.maximum(g, 0) * f[:, None]).sum(axis=2)
    return np.maximum(maps, 0, out=maps)


# Method name -> weighting function, for `Explainer.explain(method=...)`.
GRADIENT_METHODS = {
    "gradcam": gradcam,
    "gradcam++": gradcam_pp,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "layercam": layercam,
}


def _spec(name, function):
    def compute(given):
        return function(given.features, given.gradients, layout=given.layout)
    return MethodSpec(name, frozenset({"features", "gradients"}), function, compute)


SPECS = tuple(_spec(name, function) for name, function in GRADIENT_METHODS.items())
