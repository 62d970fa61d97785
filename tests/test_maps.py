"""Tests of camcore.maps: cam, upsample, normalize."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from camcore import InvalidInput, cam, normalize, upsample
from camcore import maps as maps_module
from camcore.maps import resize_matrix

# ---------------------------------------------------------------- cam


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    k=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    c=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_cam_mean_plus_bias_is_the_logit(n, k, h, w, c, seed):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, k, h, w))
    weights = rng.standard_normal((c, k))
    bias = rng.standard_normal(c)
    # The head computed independently: global average pooling, then affine.
    pooled = features.sum(axis=(2, 3)) / (h * w)
    logits = pooled @ weights.T + bias

    maps = cam(features, weights)
    assert maps.shape == (n, c, h, w)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) + bias, logits, rtol=1e-10, atol=1e-10)

    per_item = rng.integers(0, c, size=(n, 2))
    picked = cam(features, weights, per_item)
    np.testing.assert_allclose(
        picked.mean(axis=(2, 3)) + bias[per_item],
        np.take_along_axis(logits, per_item, axis=1),
        rtol=1e-10,
        atol=1e-10,
    )

    nhwc = cam(features.transpose(0, 2, 3, 1), weights, layout="NHWC")
    np.testing.assert_allclose(nhwc, maps, rtol=1e-12, atol=1e-12)


def test_cam_values_by_hand():
    f = np.zeros((1, 2, 1, 2))
    f[0, 0] = [[1, 2]]
    f[0, 1] = [[3, 5]]
    w = np.array([[1.0, 1.0], [2.0, -1.0], [0.0, 10.0]])
    np.testing.assert_array_equal(cam(f, w, [2, 1])[0], [[[30.0, 50.0]], [[-1.0, -1.0]]])
    np.testing.assert_array_equal(cam(f, w, np.array([[0]]))[0, 0], [[4.0, 7.0]])


def test_cam_classes_forms_agree():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3, 4, 2, 3)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    every = cam(f, w)
    # float32 BLAS may sum in another order for another shape: compare to rounding.
    np.testing.assert_allclose(cam(f, w, [4, 0]), every[:, [4, 0]], rtol=1e-5, atol=1e-6)
    idx = np.array([[1], [3], [0]])
    np.testing.assert_allclose(cam(f, w, idx)[:, 0], every[[0, 1, 2], [1, 3, 0]], rtol=1e-5, atol=1e-6)
    assert cam(f, w, []).shape == (3, 0, 2, 3)


@pytest.mark.parametrize("n", [0, 3])
def test_cam_many_shared_classes_take_the_one_gemm_path_with_the_same_result(n):
    # 300 shared classes go through one big GEMM; compare with per-item products.
    rng = np.random.default_rng(8)
    f = rng.standard_normal((n, 5, 2, 3))
    w = rng.standard_normal((300, 5))
    expected = np.einsum("ck,nkyx->ncyx", w, f)
    np.testing.assert_allclose(cam(f, w), expected, atol=1e-12)
    np.testing.assert_allclose(cam(f.transpose(0, 2, 3, 1), w, layout="NHWC"), expected, atol=1e-12)
    picked = np.arange(299, -1, -1)
    np.testing.assert_allclose(cam(f, w, picked), expected[:, picked], atol=1e-12)
    assert cam(f, w).flags.c_contiguous


def test_cam_nhwc_on_a_non_contiguous_input():
    rng = np.random.default_rng(2)
    nchw = rng.standard_normal((2, 6, 3, 3))
    w = rng.standard_normal((4, 6))
    nhwc = np.moveaxis(nchw, 1, -1)  # a strided view, not a copy
    np.testing.assert_allclose(cam(nhwc, w, layout="NHWC"), cam(nchw, w), atol=1e-12)


@pytest.mark.parametrize(
    "fdtype, wdtype, expected",
    [
        (np.float16, np.float16, np.float32),
        (np.float32, np.float32, np.float32),
        (np.float32, np.float64, np.float64),
        (np.int64, np.float32, np.float64),
        (np.uint8, np.int32, np.float64),
    ],
)
def test_cam_dtype_rule(fdtype, wdtype, expected):
    f = np.ones((1, 2, 2, 2), fdtype)
    w = np.ones((3, 2), wdtype)
    out = cam(f, w)
    assert out.dtype == expected
    np.testing.assert_array_equal(out, np.full((1, 3, 2, 2), 2.0))


def test_cam_does_not_mutate_inputs():
    f = np.arange(8.0).reshape(1, 2, 2, 2)
    w = np.array([[1.0, 2.0]])
    f0, w0 = f.copy(), w.copy()
    cam(f, w, [0])
    np.testing.assert_array_equal(f, f0)
    np.testing.assert_array_equal(w, w0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(features=np.zeros((3, 7, 7))), r"features must be 4-D \(N, K, h, w\), got shape \(3, 7, 7\)"),
        (dict(weights=np.zeros(4)), r"weights must be 2-D \(C, K\), got shape \(4,\)"),
        (dict(weights=np.zeros((5, 3))), r"weights must have K=4 columns.*got shape \(5, 3\)"),
        (dict(classes=[0, 5]), r"classes must be indices in \[0, 5\).*got 5"),
        (dict(classes=[-1]), r"classes must be indices in \[0, 5\).*got -1"),
        (dict(classes=[0.5]), r"classes must hold integer class indices, got dtype float64"),
        (dict(classes=np.zeros((3, 1), int)), r"classes must be \(N, k\) with N=2.*got shape \(3, 1\)"),
        (dict(classes=np.zeros((2, 1, 1), int)), r"classes must be 1-D or 2-D"),
        (dict(layout="NHCW"), r"layout must be one of 'NCHW', 'NHWC', got 'NHCW'"),
        (dict(features=np.zeros((2, 3, 3, 5)), layout="NHWC"), r"weights must have K=5 columns"),
    ],
)
def test_cam_invalid_input(kwargs, pattern):
    args = dict(features=np.zeros((2, 4, 3, 3)), weights=np.zeros((5, 4)), classes=None)
    args.update(kwargs)
    with pytest.raises(InvalidInput, match=pattern):
        cam(args.pop("features"), args.pop("weights"), args.pop("classes"), **args)


def test_cam_non_finite_inputs():
    f = np.ones((1, 2, 2, 2))
    w = np.ones((3, 2))
    bad_f = f.copy()
    bad_f[0, 1, 0, 0] = np.nan
    with pytest.raises(InvalidInput, match="features must be finite"):
        cam(bad_f, w)
    bad_w = w.copy()
    bad_w[2, 0] = np.inf
    with pytest.raises(InvalidInput, match="weights must be finite for the requested classes"):
        cam(f, bad_w)
    # A non-finite row of a class that is not requested does not matter.
    np.testing.assert_array_equal(cam(f, bad_w, [0, 1]), np.full((1, 2, 2, 2), 2.0))


# ---------------------------------------------------------------- upsample


def ref_src(i, n_in, n_out):
    return (i + 0.5) * n_in / n_out - 0.5


def ref_bilinear_1d(v, n_out):
    """Straight from the definition: clamp the source coordinate, then lerp."""
    n_in = len(v)
    out = np.empty(n_out)
    for i in range(n_out):
        x = min(max(ref_src(i, n_in, n_out), 0.0), n_in - 1)
        x0 = int(math.floor(x))
        x1 = min(x0 + 1, n_in - 1)
        t = x - x0
        out[i] = (1 - t) * v[x0] + t * v[x1]
    return out


def keys(d, a=-0.75):
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def ref_bicubic_1d(v, n_out):
    """Keys a=-0.75 on the four samples around src, indices clamped to the edge."""
    n_in = len(v)
    out = np.empty(n_out)
    for i in range(n_out):
        x = ref_src(i, n_in, n_out)
        x0 = math.floor(x)
        out[i] = sum(keys(x - j) * v[min(max(j, 0), n_in - 1)] for j in range(x0 - 1, x0 + 3))
    return out


def ref_nearest_1d(v, n_out):
    n_in = len(v)
    return np.array([v[min(math.floor((i + 0.5) * n_in / n_out), n_in - 1)] for i in range(n_out)])


REF_1D = {"bilinear": ref_bilinear_1d, "bicubic": ref_bicubic_1d, "nearest": ref_nearest_1d}


def ref_resize(m, size, method):
    """Separable reference: resize every column, then every row, with loops."""
    f = REF_1D[method]
    h, w = m.shape
    cols = np.stack([f(m[:, x], size[0]) for x in range(w)], axis=1)
    return np.stack([f(cols[y], size[1]) for y in range(size[0])], axis=0)


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    out_h=st.integers(1, 23),
    out_w=st.integers(1, 23),
    method=st.sampled_from(["bilinear", "bicubic", "nearest"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_upsample_matches_reference_loops(h, w, out_h, out_w, method, seed):
    maps = np.random.default_rng(seed).standard_normal((3, h, w))
    out = upsample(maps, (out_h, out_w), method=method)
    assert out.shape == (3, out_h, out_w)
    for i in range(3):
        np.testing.assert_allclose(
            out[i], ref_resize(maps[i], (out_h, out_w), method), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
@pytest.mark.parametrize("shape, size", [((7, 7), (600, 800)), ((7, 5), (37, 3)), ((3, 9), (5, 700))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsample_in_one_thread_blocks_equals_one_product(lead, shape, size, dtype, monkeypatch):
    """Photo-sized outputs are computed in row blocks (one thread per GEMM): same values as
    one product, whichever axis goes first, for one block, many, or a ragged last block."""
    maps = np.random.default_rng(3).standard_normal(lead + shape).astype(dtype)
    want = np.einsum("ij,...jk,lk->...il", resize_matrix(size[0], shape[0], "bilinear", "<f8"), maps,
                     resize_matrix(size[1], shape[1], "bilinear", "<f8"))
    for threshold in (1 << 18, 50, 1):
        monkeypatch.setattr(maps_module, "_ONE_THREAD_GEMM", threshold)
        out = upsample(maps, size)
        assert out.shape == lead + size and out.dtype == dtype and out.flags.c_contiguous
        np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_upsample_bilinear_ramp_is_exact():
    h, w, out_h, out_w = 5, 7, 23, 31
    y, x = np.mgrid[0:h, 0:w]
    ramp = 2.0 * x - 3.0 * y + 1.0
    out = upsample(ramp, (out_h, out_w))
    sy = (np.arange(out_h) + 0.5) * h / out_h - 0.5
    sx = (np.arange(out_w) + 0.5) * w / out_w - 0.5
    expected = 2.0 * np.clip(sx, 0, w - 1)[None, :] - 3.0 * np.clip(sy, 0, h - 1)[:, None] + 1.0
    np.testing.assert_allclose(out, expected, atol=1e-12)
    # Away from the clamped edges it is the ramp itself at the source coordinate.
    iy = (sy >= 0) & (sy <= h - 1)
    ix = (sx >= 0) & (sx <= w - 1)
    unclamped = 2.0 * sx[None, :] - 3.0 * sy[:, None] + 1.0
    np.testing.assert_allclose(out[np.ix_(iy, ix)], unclamped[np.ix_(iy, ix)], atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_upsample_interpolates_at_the_sample_positions(method):
    # Scale 3: output 3j + 1 sits exactly on input sample j, where the kernel is 1 there, 0 elsewhere.
    m = np.random.default_rng(7).standard_normal((5, 6))
    out = upsample(m, (15, 18), method=method)
    np.testing.assert_allclose(out[1::3, 1::3], m, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
def test_upsample_large_axis_matches_reference(method):
    # A 1100 -> 1000 axis has an interpolation matrix too big to cache: built per call.
    m = np.random.default_rng(9).standard_normal((2, 1100))
    out = upsample(m, (3, 1000), method=method)
    np.testing.assert_allclose(out, ref_resize(m, (3, 1000), method), rtol=1e-10, atol=1e-10)


def test_upsample_nearest_rule():
    # floor((i + 0.5) * 3 / 7) -> 0 0 1 1 1 2 2 ; shrinking 4 -> 2 picks 1 and 3.
    v = np.array([[10.0, 20.0, 30.0]])
    np.testing.assert_array_equal(upsample(v, (1, 7), method="nearest")[0], [10, 10, 20, 20, 20, 30, 30])
    u = np.arange(4.0)[:, None]
    np.testing.assert_array_equal(upsample(u, (2, 1), method="nearest")[:, 0], [1.0, 3.0])


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
def test_upsample_same_size_is_identity(method):
    m = np.random.default_rng(3).standard_normal((2, 6, 5))
    np.testing.assert_allclose(upsample(m, (6, 5), method=method), m, atol=1e-13)


def test_upsample_bilinear_stays_in_range_and_keeps_constants():
    m = np.random.default_rng(4).random((4, 7, 7))
    out = upsample(m, (50, 33))
    assert out.min() >= m.min() - 1e-12 and out.max() <= m.max() + 1e-12
    np.testing.assert_allclose(upsample(np.full((3, 3), 2.5), (8, 5), method="bicubic"), 2.5, atol=1e-12)


def test_upsample_batch_shapes_dtypes_and_no_mutation():
    m = np.random.default_rng(5).random((2, 3, 7, 7)).astype(np.float32)
    m0 = m.copy()
    out = upsample(m, (224, 224))
    first = out.copy()
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_array_equal(m, m0)
    ref = upsample(m.astype(np.float64), (224, 224))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(out[1, 2], upsample(m[1, 2], (224, 224)), atol=1e-6)
    assert upsample(np.ones((2, 2), np.int32), (3, 3)).dtype == np.float64
    assert upsample(np.ones((2, 2), np.float16), (3, 3)).dtype == np.float32
    assert upsample(np.ones((0, 2, 2)), (3, 3)).shape == (0, 3, 3)
    out[:] = 0  # the result is a fresh, writable array (the cached matrices are not exposed)
    np.testing.assert_array_equal(upsample(m, (224, 224)), first)


def onnx_resize(x, size, mode, **attrs):
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node(
        "Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
        coordinate_transformation_mode="half_pixel", **attrs,
    )
    graph = helper.make_graph(
        [node],
        "resize",
        [
            helper.make_tensor_value_info("x", TensorProto.DOUBLE, None),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    sizes = np.array([*x.shape[:2], *size], np.int64)
    return ReferenceEvaluator(model).run(None, {"x": x, "sizes": sizes})[0]


@pytest.mark.parametrize(
    "method, mode, attrs",
    [
        ("bilinear", "linear", {}),
        ("bicubic", "cubic", {"cubic_coeff_a": -0.75}),
        ("nearest", "nearest", {"nearest_mode": "round_prefer_ceil"}),
    ],
)
@pytest.mark.parametrize("shape, size", [((7, 7), (224, 224)), ((5, 3), (11, 2)), ((8, 9), (3, 4))])
def test_upsample_matches_onnx_resize_half_pixel(method, mode, attrs, shape, size):
    x = np.random.default_rng(6).standard_normal((2, 1, *shape))
    np.testing.assert_allclose(upsample(x, size, method=method), onnx_resize(x, size, mode, **attrs), atol=1e-5)


@pytest.mark.parametrize(
    "maps, size, method, pattern",
    [
        (np.zeros(4), (2, 2), "bilinear", r"maps must be at least 2-D \(\.\.\., h, w\), got shape \(4,\)"),
        (np.zeros((2, 0, 3)), (2, 2), "bilinear", r"maps must have non-empty last two axes"),
        (np.zeros((2, 2)), (0, 2), "bilinear", r"size must be a pair \(H, W\) of positive ints, got \(0, 2\)"),
        (np.zeros((2, 2)), (2.5, 2), "bilinear", r"size must be a pair"),
        (np.zeros((2, 2)), 5, "bilinear", r"size must be a pair"),
        (np.zeros((2, 2)), (2, 2), "area", r"method must be one of 'nearest', 'bilinear', 'bicubic', got 'area'"),
        (np.array([[0.0, np.nan]]), (2, 2), "nearest", r"maps must be finite"),
    ],
)
def test_upsample_invalid_input(maps, size, method, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        upsample(maps, size, method=method)


# ---------------------------------------------------------------- normalize


def test_normalize_minmax_and_max_values():
    m = np.array([[-2.0, 0.0], [2.0, 6.0]])
    np.testing.assert_allclose(normalize(m), [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(normalize(m, method="max"), [[0.0, 0.0], [1 / 3, 1.0]])


def test_normalize_degenerate_maps_become_zeros():
    batch = np.array(
        [
            [[1.0, 2.0], [3.0, 5.0]],
            [[4.0, 4.0], [4.0, 4.0]],  # constant
            [[1.0, np.nan], [3.0, 5.0]],  # NaN
            [[1.0, np.inf], [3.0, 5.0]],  # infinity
            [[-1.0, -2.0], [-3.0, -5.0]],  # no positive value ("max" only)
        ]
    )
    mm = normalize(batch)
    np.testing.assert_allclose(mm[0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(mm[1:4], 0.0)
    np.testing.assert_allclose(mm[4], [[1.0, 0.75], [0.5, 0.0]])
    mx = normalize(batch, method="max")
    np.testing.assert_allclose(mx[0], [[0.2, 0.4], [0.6, 1.0]])
    np.testing.assert_array_equal(mx[1], 1.0)
    np.testing.assert_array_equal(mx[2:], 0.0)


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    st.sampled_from(["minmax", "max"]),
)
def test_normalize_is_in_unit_range_per_map(maps, method):
    out = normalize(maps, method=method)
    assert out.dtype == np.float32 and out.shape == maps.shape
    assert np.all((out >= 0) & (out <= 1))
    for m, o in zip(maps, out):
        hi, lo = m.max(), m.min()
        if method == "minmax" and hi > lo:
            assert o.max() == 1 and o.min() == 0
            assert o.flat[np.argmax(m)] == 1
        if method == "max" and hi > 0:
            np.testing.assert_allclose(o, np.maximum(m, 0) / hi, rtol=1e-6)


def test_normalize_dtypes_and_no_mutation():
    m = np.arange(6, dtype=np.int16).reshape(2, 3)
    assert normalize(m).dtype == np.float64
    assert normalize(m.astype(np.float16)).dtype == np.float32
    f = np.array([[1.0, np.nan]])
    normalize(f)
    assert np.isnan(f[0, 1])
    assert normalize(np.zeros((0, 3, 3))).shape == (0, 3, 3)


@pytest.mark.parametrize(
    "maps, method, pattern",
    [
        (np.zeros(3), "minmax", r"maps must be at least 2-D \(\.\.\., h, w\), got shape \(3,\)"),
        (np.zeros((2, 2)), "std", r"method must be one of 'minmax', 'max', got 'std'"),
        (np.array([["a"]]), "minmax", r"maps must be a real numeric array"),
    ],
)
def test_normalize_invalid_input(maps, method, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        normalize(maps, method=method)
