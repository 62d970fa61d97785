"""Forward-only methods (camcore.perturbation, method= in Explainer): closed forms on GAP + affine heads."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import camcore
from camcore import Explainer, InvalidInput
from camcore.methods import eigencam
from camcore.perturbation import ablationcam, reciprocam, scorecam
from tests.test_explainer import FakeBackend, make
from tests.fakes import load_on
from tests.zoo import CASES

FORWARD = ("ablationcam", "reciprocam", "scorecam")


def _nchw(f, layout):
    return f if layout == "NCHW" else f.transpose(0, 3, 1, 2)


def _inputs(layout, n=5, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, 3, 8, 8) if layout == "NCHW" else (n, 8, 8, 3)
    return rng.standard_normal(shape).astype(np.float32)


def ablation_closed_form(f, w, b, classes):
    """relu(sum_k (W[c, k] mean(f_k) / y_c) f_k) with y = mean(f) @ W.T + b."""
    means = f.mean(axis=(2, 3))
    y = means @ w.T + b
    weights = w[classes] * means[:, None, :] / np.take_along_axis(y, classes, 1)[..., None]
    return np.maximum(np.einsum("njk,nkhw->njhw", weights, f), 0)


def recipro_logits_closed_form(f, w, b, classes):
    """CAM / (h w) + b_c."""
    h, wd = f.shape[2:]
    cam = np.einsum("njk,nkhw->njhw", w[classes], f)
    return cam / (h * wd) + b[classes][..., None, None]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_ablationcam_closed_form_on_fake(layout):
    ex, _ = make(layout)
    x = _inputs(layout)
    out = ex.explain(x, top_k=2, method="ablationcam")
    expected = ablation_closed_form(_nchw(x, layout).astype(np.float64), ex.head.weights.astype(np.float64),
                                    ex.head.bias.astype(np.float64), out.classes)
    assert out.method == "ablationcam" and out.maps.shape == (5, 2, 8, 8)
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-5)
    assert out.maps.max() > 0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_reciprocam_logits_closed_form_on_fake(layout):
    ex, _ = make(layout, method_options={"scoring": "logits"})
    x = _inputs(layout)
    out = ex.explain(x, classes=[0, 3], method="reciprocam")
    expected = recipro_logits_closed_form(_nchw(x, layout).astype(np.float64), ex.head.weights.astype(np.float64),
                                          ex.head.bias.astype(np.float64), out.classes)
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-5)


def test_reciprocam_softmax_is_the_probability_of_the_masked_features():
    ex, _ = make()
    x = _inputs("NCHW", n=2)
    out = ex.explain(x, classes=[2], method="reciprocam")
    w, b = ex.head.weights.astype(np.float64), ex.head.bias.astype(np.float64)
    y, xx = 3, 5
    logits = x[1, :, y, xx] / 64 @ w.T + b  # only (y, xx) is kept: the mean is that pixel / 64
    p = np.exp(logits) / np.exp(logits).sum()
    assert out.maps[1, 0, y, xx] == pytest.approx(p[2], rel=1e-5)
    assert ((out.maps > 0) & (out.maps < 1)).all()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_scorecam_matches_its_formula_on_fake(layout):
    """Features are the input itself (8 x 8): no resize, so the masks are the normalized maps."""
    ex, _ = make(layout)
    x = _inputs(layout, n=3)
    out = ex.explain(x, top_k=2, method="scorecam")
    f = _nchw(x, layout).astype(np.float64)
    w, b = ex.head.weights.astype(np.float64), ex.head.bias.astype(np.float64)
    lo, hi = f.min(axis=(2, 3), keepdims=True), f.max(axis=(2, 3), keepdims=True)
    masks = (f - lo) / (hi - lo)  # (N, K, h, w)
    masked = f[:, None] * masks[:, :, None]  # (N, K masks, 3, h, w)
    s = masked.mean(axis=(3, 4)) @ w.T + b  # (N, K, C)
    s = np.take_along_axis(s, out.classes[:, None, :], 2).transpose(0, 2, 1)  # (N, k, K)
    weights = np.exp(s) / np.exp(s).sum(2, keepdims=True)
    expected = np.maximum(np.einsum("njk,nkhw->njhw", weights, f), 0)
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-5)


def test_scorecam_max_channels_keeps_the_highest_variance():
    rng = np.random.default_rng(3)
    f = rng.random((2, 4, 5, 5))
    f[0, 2] *= 10  # item 0: channel 2 varies most
    f[1, 0] *= 10
    calls = []

    def model(x, items):
        calls.append(len(x))
        return x.mean(axis=(2, 3)) @ np.eye(4)

    full = scorecam(f, f, [[0], [1]], model)
    assert sum(calls) == 8
    one = scorecam(f, f, [[0], [1]], model, max_channels=1)
    assert sum(calls) == 8 + 2
    # one kept channel: its weight is softmax of one score = 1
    np.testing.assert_allclose(one[0, 0], f[0, 2])
    np.testing.assert_allclose(one[1, 0], f[1, 0])
    np.testing.assert_allclose(scorecam(f, f, [[0], [1]], model, max_channels=4), full)


@pytest.mark.parametrize("method", FORWARD)
def test_batch_equals_item_by_item_and_inputs_untouched(method):
    ex, _ = make(method_options={"batch_size": 7})
    x = _inputs("NCHW", n=4)
    before = x.copy()
    together = ex.explain(x, top_k=2, method=method)
    alone = [ex.explain(x[i:i + 1], top_k=2, method=method) for i in range(4)]
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(together.maps, np.concatenate([a.maps for a in alone]), rtol=1e-6, atol=1e-7)
    again = ex.explain(x, top_k=2, method=method)
    np.testing.assert_array_equal(again.maps, together.maps)
    ex.method_options = {"batch_size": 1000}
    np.testing.assert_allclose(ex.explain(x, top_k=2, method=method).maps, together.maps, rtol=1e-6, atol=1e-7)


def test_head_runs_in_batches_without_the_backbone():
    ex, _ = make(method_options={"batch_size": 3})
    seen = []
    run_head = ex.backend.run_head
    ex.backend.run_head = lambda f, seeds=None: seen.append(len(f)) or run_head(f, seeds)
    ex.explain(_inputs("NCHW", n=2), top_k=3, method="ablationcam")
    assert seen == [3, 3, 2] and ex.backend.calls == [2]  # 2 * (3 channels + 1) rows, one backbone run
    seen.clear()
    ex.explain(_inputs("NCHW", n=1), method="reciprocam")
    assert seen == [3] * 21 + [1]  # 64 positions


def test_scorecam_runs_the_model_on_masked_inputs_in_batches():
    ex, _ = make(method_options={"batch_size": 4})
    ex.explain(_inputs("NCHW", n=2), method="scorecam")
    assert ex.backend.calls == [2, 4, 2]  # the batch, then 2 items x 3 channels in batches of 4


def test_method_options_are_validated():
    ex, _ = make(method_options={"max_chanels": 3})
    with pytest.raises(InvalidInput, match="method_options takes .* got \\['max_chanels'\\]"):
        ex.explain(_inputs("NCHW", n=1), method="scorecam")
    with pytest.raises(InvalidInput, match="max_channels must be None or an int >= 1, got 0"):
        scorecam(np.ones((1, 3, 4, 4)), np.ones((1, 2, 2, 2)), [[0]], lambda x, i: x.mean((2, 3)), max_channels=0)
    with pytest.raises(InvalidInput, match="scoring must be one of"):
        reciprocam(np.ones((1, 2, 2, 2)), [[0]], lambda f: f.mean((2, 3)), scoring="prob")
    with pytest.raises(InvalidInput, match=r"classes must be an \(1, k\) int array"):
        ablationcam(np.ones((1, 2, 2, 2)), [0], lambda f: f.mean((2, 3)))


def test_float16_features_give_float32_maps():
    f = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float16)
    head = lambda x: x.astype(np.float32).mean((2, 3))  # noqa: E731
    assert ablationcam(f, [[0], [1]], head).dtype == np.float32
    assert reciprocam(f, [[0], [1]], head).dtype == np.float32


# ---------------------------------------------------------------- real ONNX models (zoo)

ZOO = ["gap_gemm", "conv1x1_flatten", "batchnorm_4d", "nhwc_reducemean", "nhwc_transpose_gap",
       "dynamic_batch", "reshape_computed_shape", "sigmoid", "se_block_backbone"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_closed_forms_and_item_by_item(name, backend_name):
    zm = CASES[name]()
    ex = load_on(backend_name, zm.model, providers=["CPUExecutionProvider"], batch_size=4)
    ex.method_options = {"scoring": "logits", "batch_size": 5}
    shape = zm.other_input_shapes[-1] if zm.other_input_shapes else zm.input_shape
    shape = (4, *shape[1:]) if ex.fixed_batch is None else shape
    x = zm.random_input(seed=2, shape=shape)
    w, b = zm.weights.astype(np.float64), zm.bias.astype(np.float64)
    ablation = ex.explain(x, top_k=2, method="ablationcam")
    recipro = ex.explain(x, classes=ablation.classes, method="reciprocam")
    f, _ = ex.forward({ex.head.input.name: x})
    f = _nchw(np.asarray(f, np.float64), zm.layout)
    tol = dict(rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ablation.maps, ablation_closed_form(f, w, b, ablation.classes), **tol)
    np.testing.assert_allclose(recipro.maps, recipro_logits_closed_form(f, w, b, ablation.classes), **tol)
    for method in FORWARD:
        together = ex.explain(x, top_k=2, method=method).maps
        alone = np.concatenate([ex.explain(x[i:i + 1], top_k=2, method=method).maps for i in range(len(x))])
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_zoo_scorecam_matches_a_direct_computation(backend_name):
    zm = CASES["gap_gemm"]()
    ex = load_on(backend_name, zm.model, providers=["CPUExecutionProvider"])
    x = zm.random_input(seed=4)
    out = ex.explain(x, classes=[1], method="scorecam")
    f, logits = ex.forward({ex.head.input.name: x})
    from camcore.maps import normalize, upsample

    expected = []
    for i in range(len(x)):
        masks = normalize(upsample(f[i], x.shape[2:]))  # (K, H, W)
        s = np.array([ex.forward({ex.head.input.name: np.repeat(x[i:i + 1] * m, len(x), 0)})[1][0, 1]
                      for m in masks], np.float64)
        weights = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        expected.append(np.maximum(np.tensordot(weights, f[i], 1), 0))
    np.testing.assert_allclose(out.maps[:, 0], np.stack(expected), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- eigencam

_FEATURES = arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 5), st.integers(2, 5)),
                   elements=st.floats(-10, 10, allow_nan=False, width=32))


@settings(max_examples=60, deadline=None)
@given(_FEATURES)
def test_eigencam_sign_batch_layout_and_no_mutation(f):
    before = f.copy()
    maps = eigencam(f)
    np.testing.assert_array_equal(f, before)
    assert maps.shape == (f.shape[0], *f.shape[2:])
    total = f.sum(axis=1).reshape(len(f), -1)
    flat = maps.reshape(len(f), -1)
    corr = ((flat - flat.mean(1, keepdims=True)) * (total - total.mean(1, keepdims=True))).sum(1)
    scale = np.abs(flat).max() * np.abs(total).max() * flat.shape[1] + 1
    assert (corr >= -1e-9 * scale).all()
    for i in range(len(f)):
        np.testing.assert_allclose(eigencam(f[i:i + 1])[0], maps[i], atol=1e-9 * scale)
    np.testing.assert_allclose(eigencam(f.transpose(0, 2, 3, 1), layout="NHWC"), maps, atol=1e-9 * scale)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_eigencam_of_rank_one_features_is_the_centred_pattern(k, h, w, seed):
    """A = u_k * P for a pattern P: the first component is P - mean(P), scaled by |u|."""
    rng = np.random.default_rng(seed)
    pattern = rng.random((h, w))
    u = rng.random(k) + 0.1
    f = (u[:, None, None] * pattern)[None]
    expected = (pattern - pattern.mean()) * np.linalg.norm(u)
    np.testing.assert_allclose(eigencam(f)[0], expected, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 16, 4, 5), (2, 5, 6, 6), (1, 40, 3, 3)])
def test_eigencam_equals_the_svd_projection(shape):
    """Both Gram branches (h*w <= K and h*w > K) give X v_1 of the SVD, sign fixed the same way."""
    f = np.random.default_rng(sum(shape)).standard_normal(shape)
    maps = eigencam(f)
    for i in range(len(f)):
        x = f[i].reshape(shape[1], -1).T
        x = x - x.mean(0)
        m = x @ np.linalg.svd(x, full_matrices=False)[2][0]
        m *= np.sign(((m - m.mean()) * (f[i].sum(0).ravel() - f[i].sum())).sum())
        np.testing.assert_allclose(maps[i].ravel(), m, atol=1e-9)
    assert eigencam(f.astype(np.float32)).dtype == np.float32


# ---------------------------------------------------------------- pooled head, bounded chunks

from camcore.methods import perturbation as _perturbation  # noqa: E402


def _mlp_on_means(layout, k, c=4, seed=0):
    """A non-linear head after a global average pooling: ``(head(maps), head_from_means)``."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((k, 6)), rng.standard_normal((6, c))
    after = lambda m: np.tanh(m @ w1) @ w2  # noqa: E731
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    return (lambda f: after(f.mean(axis=axes))), after


_SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=40, deadline=None)
@given(shape=_SHAPES, layout=st.sampled_from(["NCHW", "NHWC"]), dtype=st.sampled_from([np.float32, np.float64]),
       scoring=st.sampled_from(["softmax", "logits"]), batch_size=st.integers(1, 40), seed=st.integers(0, 99))
def test_reciprocam_from_pooled_vectors_equals_the_masked_maps(shape, layout, dtype, scoring, batch_size, seed):
    n, k, h, w = shape
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, k, h, w) if layout == "NCHW" else (n, h, w, k)).astype(dtype)
    before = f.copy()
    run_head, run_pooled = _mlp_on_means(layout, k, seed=seed)
    classes = rng.integers(0, 4, (n, 2))
    plain = reciprocam(f, classes, run_head, layout=layout, scoring=scoring, batch_size=batch_size)
    pooled = reciprocam(f, classes, run_head=None, layout=layout, scoring=scoring, batch_size=batch_size,
                        run_pooled=run_pooled)
    # The pooling of a copy that keeps one position is that position's vector / (h w), exactly.
    np.testing.assert_array_equal(pooled, plain)
    np.testing.assert_array_equal(f, before)
    assert pooled.dtype == dtype and pooled.shape == (n, 2, h, w)


@settings(max_examples=40, deadline=None)
@given(shape=_SHAPES, layout=st.sampled_from(["NCHW", "NHWC"]), batch_size=st.integers(1, 40),
       seed=st.integers(0, 99))
def test_ablationcam_from_pooled_vectors_equals_the_zeroed_maps(shape, layout, batch_size, seed):
    n, k, h, w = shape
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, k, h, w) if layout == "NCHW" else (n, h, w, k))
    run_head, run_pooled = _mlp_on_means(layout, k, seed=seed)
    classes = rng.integers(0, 4, (n, 1))
    plain = ablationcam(f, classes, run_head, layout=layout, batch_size=batch_size)
    pooled = ablationcam(f, classes, None, layout=layout, batch_size=batch_size, run_pooled=run_pooled)
    np.testing.assert_allclose(pooled, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["reciprocam", "ablationcam"])
@pytest.mark.parametrize("n", [1, 16])
def test_masked_copies_are_bounded_and_made_in_one_buffer(monkeypatch, method, n):
    """Whatever the batch and `batch_size`, a run gets at most CHUNK_BYTES, always in the same buffer."""
    k, h, w = 4, 5, 6
    row_bytes = k * h * w * 8
    monkeypatch.setattr(_perturbation, "CHUNK_BYTES", 7 * row_bytes)
    f = np.random.default_rng(n).standard_normal((n, k, h, w))
    run_head, _ = _mlp_on_means("NCHW", k)
    seen = []
    recording = lambda batch: seen.append(batch) or run_head(batch)  # noqa: E731
    function = reciprocam if method == "reciprocam" else ablationcam
    got = function(f, np.zeros((n, 1), np.int64), recording, batch_size=1000)
    rows = n * (h * w if method == "reciprocam" else k + 1)
    assert [len(b) for b in seen] == [7] * (rows // 7) + ([rows % 7] if rows % 7 else [])
    assert all(b.nbytes <= 7 * row_bytes for b in seen)
    assert all(np.shares_memory(b, seen[0]) for b in seen)
    monkeypatch.setattr(_perturbation, "CHUNK_BYTES", 10**9)
    np.testing.assert_allclose(got, function(f, np.zeros((n, 1), np.int64), run_head, batch_size=1000),
                               rtol=1e-12, atol=1e-12)


def test_run_pooled_must_be_callable():
    with pytest.raises(InvalidInput, match="run_pooled must be None or a callable, got int"):
        reciprocam(np.ones((1, 2, 2, 2)), [[0]], lambda f: f.mean((2, 3)), run_pooled=3)


def _without_pooled_head(ex):
    """The same explainer, its backend's pooled head hidden: the masked-map path."""
    hidden = camcore.Explainer(ex.backend, method_options=ex.method_options)
    hidden.backend = type("Plain", (), {"head": ex.backend.head, "run": ex.backend.run,
                                        "run_head": ex.backend.run_head})()
    return hidden


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_pooled_head_equals_the_masked_maps(name, backend_name):
    """On each runtime, the head run from the pooled tensor gives the maps of the masked copies."""
    zm = CASES[name]()
    ex = load_on(backend_name, zm.model, providers=["CPUExecutionProvider"], batch_size=4)
    ex.method_options = {"scoring": "logits", "batch_size": 5}
    run_pooled = ex.backend.pooled_head()
    shape = zm.other_input_shapes[-1] if zm.other_input_shapes else zm.input_shape
    shape = (4, *shape[1:]) if ex.fixed_batch is None else shape
    x = zm.random_input(seed=3, shape=shape)
    plain = _without_pooled_head(ex)
    for method in ("reciprocam", "ablationcam"):
        got, expected = ex.explain(x, top_k=2, method=method), plain.explain(x, top_k=2, method=method)
        scale = np.abs(expected.maps).max()
        if ex.head.input.dtype == np.float16 or "fp16" in name:
            tol = dict(rtol=2e-3, atol=2e-3 * scale)
        elif method == "ablationcam":  # the means are summed by NumPy, not by the pooling: float32 order
            tol = dict(rtol=1e-5, atol=1e-5 * scale)
        else:  # one position kept: the pooling sums it with zeros, exactly
            tol = dict(rtol=1e-6, atol=1e-7 * scale)
        np.testing.assert_allclose(got.maps, expected.maps, **tol)
    assert run_pooled is not None  # every case of the zoo averages the whole map


@pytest.mark.parametrize("name", ["global_max_pool", "mlp_head"])
def test_zoo_pooled_head_only_after_an_average_pooling(name, backend_name):
    """A max pooling gives no pooled head (the masked maps are run); a non-affine head after a GAP does."""
    from tests.zoo import REFUSED

    ex = load_on(backend_name, REFUSED[name]().model, providers=["CPUExecutionProvider"])
    assert (ex.backend.pooled_head() is None) == (name == "global_max_pool")
    x = np.random.default_rng(0).standard_normal((2, *ex.head.input.shape[1:])).astype(np.float32)
    out = ex.explain(x, method="reciprocam")
    assert out.maps.shape[:2] == (2, 1) and np.isfinite(out.maps).all() and out.maps.max() > 0
    expected = _without_pooled_head(ex).explain(x, method="reciprocam").maps
    np.testing.assert_allclose(out.maps, expected, rtol=1e-6, atol=1e-7 * np.abs(expected).max())
