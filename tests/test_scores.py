"""camcore.scores: softmax, sigmoid and top-k, against their definitions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from camcore import InvalidInput
from camcore.scores import sigmoid, softmax, top_k

# Few distinct values, so that ties (also across the k-th place) are common.
_TIED = st.sampled_from([-2.0, -0.5, 0.0, 0.5, 3.0])
_FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(1, 12), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_top_k_is_the_stable_argsort(data, n, c, tied, dtype):
    logits = data.draw(arrays(dtype, (n, c), elements=_TIED if tied else _FINITE))
    k = data.draw(st.integers(1, c + 2))
    before = logits.copy()
    got = top_k(logits, k)
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(logits, before)


def test_top_k_ties_at_the_kth_place_go_to_the_lower_index():
    logits = np.array([[1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]] * 3)
    np.testing.assert_array_equal(top_k(logits, 3), [[1, 0, 2]] * 3)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(InvalidInput, match="k must be an int >= 1"):
        top_k(np.zeros((2, 3)), k)


def test_top_k_rejects_bad_shape():
    with pytest.raises(InvalidInput, match="logits"):
        top_k(np.zeros(3), 1)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 9)), elements=st.floats(-700, 700)))
def test_softmax_against_scipy(logits):
    from scipy.special import softmax as scipy_softmax

    p = softmax(logits)
    np.testing.assert_allclose(p, scipy_softmax(logits, axis=1), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    # order-preserving: a higher logit never gets a lower probability
    higher = logits[:, :, None] > logits[:, None, :]
    assert not np.any(higher & (p[:, :, None] < p[:, None, :]))


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(-30, 30)))
def test_sigmoid_against_scipy(z):
    from scipy.special import expit

    # the tanh form is exact to an absolute 1e-16, not relatively where sigmoid(z) is tiny
    np.testing.assert_allclose(sigmoid(z), expit(z), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigmoid(z) + sigmoid(-z), 1.0, rtol=1e-12)


def test_dtype_rule_and_no_overflow():
    big = np.array([[1e4, -1e4, 0.0]], np.float16)
    assert softmax(big).dtype == np.float32 and sigmoid(big).dtype == np.float32
    np.testing.assert_array_equal(softmax(big), [[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(sigmoid(np.array([800.0, -800.0])), [1.0, 0.0])
    assert softmax(np.array([[1, 2]])).dtype == np.float64
    np.testing.assert_allclose(softmax(np.array([[0.0], [1.0]]), axis=0)[:, 0], sigmoid(np.array([-1.0, 1.0])))


def test_explainer_and_faithfulness_use_these():
    import camcore.explainer as explainer
    import camcore.faithfulness as faithfulness

    assert explainer.softmax is softmax and explainer.sigmoid is sigmoid
    assert faithfulness.softmax is softmax and faithfulness.sigmoid is sigmoid
