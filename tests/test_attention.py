"""Attention rollout and GAE (camcore.methods.attention) against straightforward loop references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camcore import InvalidInput, NotCamCompatible
from camcore.methods import REGISTRY, gae, rollout
from camcore.methods.attention import POOLINGS, pooled_token


def probabilities(rng, layers, n, heads, tokens, dtype=np.float64):
    logits = rng.normal(size=(layers, n, heads, tokens, tokens)) * 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return list((e / e.sum(-1, keepdims=True)).astype(dtype))


def reference_rows(pooling, prefix, tokens):
    """Which rows the head reads, and with which weights, written out per pooling."""
    patches = list(range(prefix, tokens))
    return {"cls": {0: 1.0}, "cls_dist_mean": {0: 0.5, 1: 0.5},
            "token_mean": {t: 1 / tokens for t in range(tokens)},
            "token_mean_no_prefix": {t: 1 / len(patches) for t in patches},
            "cls_concat_mean": {0: 0.5, **{t: 0.5 / len(patches) for t in patches}}}[pooling]


def rollout_reference(att, prefix, grid, pooling):
    n, heads, tokens = att[0].shape[:3]
    out = np.zeros((n, *grid))
    for i in range(n):
        r = np.eye(tokens)
        for a in att:
            m = np.zeros((tokens, tokens))
            for h in range(heads):
                m += a[i, h] / heads
            m = 0.5 * m + 0.5 * np.eye(tokens)
            for row in range(tokens):
                m[row] /= m[row].sum()
            r = m @ r
        row = sum(w * r[t] for t, w in reference_rows(pooling, prefix, tokens).items())
        out[i] = row[prefix:].reshape(grid)
    return out


def gae_reference(att, grads, prefix, grid, pooling):
    n, heads, tokens = att[0].shape[:3]
    k = grads[0].shape[1]
    out = np.zeros((n, k, *grid))
    for i in range(n):
        for j in range(k):
            r = np.eye(tokens)
            for a, g in zip(att, grads):
                cam = np.zeros((tokens, tokens))
                for h in range(heads):
                    cam += np.clip(g[i, j, h] * a[i, h], 0, None) / heads
                r = r + cam @ r
            row = sum(w * r[t] for t, w in reference_rows(pooling, prefix, tokens).items())
            out[i, j] = row[prefix:].reshape(grid)
    return out


shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(0, 3),
                   st.integers(1, 3), st.integers(1, 3), st.sampled_from(POOLINGS), st.integers(0, 2**31 - 1))


def _prefix_ok(pooling, prefix):
    return prefix >= {"cls": 1, "cls_dist_mean": 2, "cls_concat_mean": 1}.get(pooling, 0)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_rollout_matches_the_loop_reference(case):
    layers, n, heads, prefix, gh, gw, pooling, seed = case
    if not _prefix_ok(pooling, prefix):
        prefix += 2
    rng = np.random.default_rng(seed)
    att = probabilities(rng, layers, n, heads, prefix + gh * gw)
    got = rollout(att, prefix=prefix, grid=(gh, gw), pooling=pooling)
    assert got.shape == (n, gh, gw) and got.dtype == np.float64
    np.testing.assert_allclose(got, rollout_reference(att, prefix, (gh, gw), pooling), rtol=1e-10, atol=1e-12)
    # rolled-out rows stay distributions: the pooled row sums to 1 over all tokens
    assert np.all(got >= 0) and np.all(got.sum(axis=(1, 2)) <= 1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(1, 3))
def test_gae_matches_the_loop_reference(case, k):
    layers, n, heads, prefix, gh, gw, pooling, seed = case
    if not _prefix_ok(pooling, prefix):
        prefix += 2
    rng = np.random.default_rng(seed)
    tokens = prefix + gh * gw
    att = probabilities(rng, layers, n, heads, tokens)
    grads = [rng.normal(size=(n, k, heads, tokens, tokens)) for _ in range(layers)]
    got = gae(att, grads, prefix=prefix, grid=(gh, gw), pooling=pooling)
    assert got.shape == (n, k, gh, gw)
    np.testing.assert_allclose(got, gae_reference(att, grads, prefix, (gh, gw), pooling), rtol=1e-10, atol=1e-12)
    assert np.all(got >= 0)


def test_dtype_rule_and_inputs_untouched():
    rng = np.random.default_rng(0)
    att = probabilities(rng, 2, 2, 3, 5, np.float16)
    grads = [rng.normal(size=(2, 1, 3, 5, 5)).astype(np.float16) for _ in range(2)]
    before = [a.copy() for a in att]
    assert rollout(att, prefix=1, grid=(2, 2)).dtype == np.float32
    assert gae(att, grads, prefix=1, grid=(2, 2)).dtype == np.float32
    a32 = [a.astype(np.float32) for a in att]
    assert rollout(a32, prefix=1, grid=(2, 2)).dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(att, before))
    # one (L, N, H, T, T) array is the same as the list of layers
    np.testing.assert_array_equal(rollout(np.stack(a32), prefix=1, grid=(2, 2)), rollout(a32, prefix=1, grid=(2, 2)))


def test_gae_with_zero_gradient_is_the_identity_row():
    """No gradient anywhere: R stays I, so the CLS row has nothing on the patches."""
    rng = np.random.default_rng(1)
    att = probabilities(rng, 3, 1, 2, 5)
    grads = [np.zeros((1, 2, 2, 5, 5)) for _ in range(3)]
    np.testing.assert_array_equal(gae(att, grads, prefix=1, grid=(2, 2)), np.zeros((1, 2, 2, 2)))


def test_uniform_attention_rolls_out_uniformly():
    att = [np.full((1, 2, 5, 5), 0.2)] * 4
    got = rollout(att, prefix=1, grid=(2, 2))
    np.testing.assert_allclose(got, np.full((1, 2, 2), got[0, 0, 0]))
    assert got[0, 0, 0] > 0


def test_windowed_attention_is_refused_naming_the_methods_that_apply():
    att = [np.full((1, 2, 4, 4), 0.25)]  # a 2x2 window's attention, on a 4x4 grid
    with pytest.raises(NotCamCompatible, match="not the image's 16 .*gradcam"):
        rollout(att, prefix=0, grid=(4, 4), pooling="token_mean")
    with pytest.raises(NotCamCompatible, match="windowed"):
        gae(att, [np.zeros((1, 1, 2, 4, 4))], prefix=0, grid=(4, 4), pooling="token_mean")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix=0, pooling="cls"), "reads 1 prefix"),
    (dict(prefix=1, pooling="mean"), "pooling must be one of"),
])
def test_bad_pooling_is_refused(kwargs, message):
    p = kwargs["prefix"]
    att = [np.full((1, 1, p + 4, p + 4), 1 / (p + 4))]
    with pytest.raises(InvalidInput, match=message):
        rollout(att, grid=(2, 2), **kwargs)


def test_gae_refuses_mismatched_gradients():
    att = [np.full((1, 1, 5, 5), 0.2)] * 2
    with pytest.raises(InvalidInput, match="one array per attention layer"):
        gae(att, [np.zeros((1, 1, 1, 5, 5))], prefix=1, grid=(2, 2))
    with pytest.raises(InvalidInput, match=r"must be \(1, k, 1, 5, 5\)"):
        gae(att, [np.zeros((1, 1, 2, 5, 5))] * 2, prefix=1, grid=(2, 2))


def test_registered_with_what_they_need():
    assert REGISTRY["rollout"].needs == {"attention"} and not REGISTRY["rollout"].class_specific
    assert REGISTRY["gae"].needs == {"attention", "attention_gradients"} and REGISTRY["gae"].function is gae


def test_pooled_token_sums_to_one():
    for pooling in POOLINGS:
        assert pooled_token(pooling, prefix=2, tokens=11).sum() == pytest.approx(1.0)
