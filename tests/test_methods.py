"""The gradient weightings of camcore.methods against per-pixel loops written from the papers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camcore import InvalidInput, cam
from camcore.methods import GRADIENT_METHODS, gradcam, gradcam_pp, hirescam, layercam, xgradcam


def _loops(method, f, g):
    """One image, one class: f (K, h, w), g (K, h, w) -> (h, w), pixel by pixel as the papers write it."""
    k_n, h, w = f.shape
    out = np.zeros((h, w))
    if method in ("hirescam", "layercam"):
        for k in range(k_n):
            for y in range(h):
                for x in range(w):
                    grad = g[k, y, x] if method == "hirescam" else max(g[k, y, x], 0.0)
                    out[y, x] += grad * f[k, y, x]
        return np.maximum(out, 0)
    weights = np.zeros(k_n)
    for k in range(k_n):
        if method == "gradcam":
            weights[k] = g[k].sum() / (h * w)
        elif method == "xgradcam":
            total = f[k].sum()
            weights[k] = sum(f[k, y, x] / total * g[k, y, x] for y in range(h) for x in range(w)) if total else 0
        else:  # gradcam++
            for y in range(h):
                for x in range(w):
                    gg = g[k, y, x]
                    denominator = 2 * gg ** 2 + f[k].sum() * gg ** 3
                    alpha = gg ** 2 / denominator if denominator else 0.0
                    weights[k] += alpha * max(gg, 0.0)
    for k in range(k_n):
        out += weights[k] * f[k]
    return np.maximum(out, 0)


arrays = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
                   st.integers(0, 2 ** 31 - 1))


@settings(max_examples=40, deadline=None)
@given(shape=arrays, method=st.sampled_from(sorted(GRADIENT_METHODS)))
def test_methods_match_the_papers_loops(shape, method):
    n, k, channels, h, w, seed = shape
    rng = np.random.default_rng(seed)
    f = np.maximum(rng.standard_normal((n, channels, h, w)), 0)  # post-ReLU activations
    g = rng.standard_normal((n, k, channels, h, w))
    f_before, g_before = f.copy(), g.copy()
    maps = GRADIENT_METHODS[method](f, g)
    assert maps.shape == (n, k, h, w) and maps.dtype == np.float64
    expected = np.array([[_loops(method, f[i], g[i, j]) for j in range(k)] for i in range(n)])
    np.testing.assert_allclose(maps, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(f, f_before)
    np.testing.assert_array_equal(g, g_before)
    nhwc = GRADIENT_METHODS[method](f.transpose(0, 2, 3, 1), g.transpose(0, 1, 3, 4, 2), layout="NHWC")
    np.testing.assert_allclose(nhwc, maps, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(shape=arrays)
def test_gradcam_of_a_gap_affine_head_is_relu_cam_over_hw(shape):
    """d logit_c / d f_k = W[c, k] / (h w) everywhere, so Grad-CAM = relu(CAM) / (h w)."""
    n, k, channels, h, w, seed = shape
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, channels, h, w))
    weights = rng.standard_normal((5, channels))
    classes = rng.integers(0, 5, (n, k))
    g = np.broadcast_to((weights[classes] / (h * w))[..., None, None], (n, k, channels, h, w))
    expected = np.maximum(cam(f, weights, classes), 0) / (h * w)
    np.testing.assert_allclose(gradcam(f, g), expected, rtol=1e-10, atol=1e-14)
    # The broadcast fast path and a materialized copy agree.
    np.testing.assert_allclose(gradcam(f, np.ascontiguousarray(g)), gradcam(f, g), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", [gradcam, gradcam_pp, xgradcam, hirescam, layercam])
def test_dtype_rule_and_validation(method):
    f16 = np.ones((1, 2, 3, 3), np.float16)
    g16 = np.ones((1, 1, 2, 3, 3), np.float16)
    assert method(f16, g16).dtype == np.float32
    assert method(f16.astype(np.float32), g16.astype(np.float32)).dtype == np.float32
    with pytest.raises(InvalidInput, match=r"gradients must be \(N, k, \*features.shape\[1:\]\)"):
        method(np.ones((1, 2, 3, 3)), np.ones((1, 1, 2, 3, 4)))
    with pytest.raises(InvalidInput, match="gradients must be 5-D"):
        method(np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)))
    with pytest.raises(InvalidInput, match="layout must be one of"):
        method(np.ones((1, 2, 3, 3)), np.ones((1, 1, 2, 3, 3)), layout="CHW")
