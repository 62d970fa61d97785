"""camcore against real exports from torch, Keras (tf2onnx) and Paddle (paddle2onnx).

The corpus and each framework's own answers come from ``tools/corpus/build.py`` (see
tests/corpus.py). Where it is missing these tests skip, naming the command to build it; under
CI (``CI`` set) they fail instead, since CI builds it first.

Tolerances are relative: an error counts against the largest magnitude of the reference it is
compared with (per item for logits), at 1e-4.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import camcore
from camcore import NotCamCompatible
from tests import corpus
from tests.fakes import load_on

RTOL = 1e-4
ENTRIES = corpus.manifest()
AFFINE = [e for e in ENTRIES if e["affine"]]
REFUSED = [e for e in ENTRIES if not e["affine"]]


def _to_nchw(features: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(features, -1, 1) if layout == "NHWC" else features


@pytest.mark.parametrize("framework", corpus.FRAMEWORKS)
def test_corpus_built(framework):
    corpus.require(framework)
    entries = corpus.corpus_entries(framework)
    assert entries
    for e in entries:
        d = e["data"]
        assert d["x"].shape[0] == d["logits"].shape[0] == 2
        assert d["grad"].shape == d["features"].shape
        assert d["grad_classes"].shape == (2,)
        assert np.isfinite(d["logits"]).all() and np.isfinite(d["grad"]).all()


@pytest.fixture(scope="module")
def case(request, backend_name):
    """One export, loaded once per runtime for all the tests that use it (pytest groups them by entry)."""
    entry = corpus.load(request.param)
    corpus.require(entry["framework"])
    explainer, error = None, None
    try:
        explainer = load_on(backend_name, entry["path"], providers=["cpu"])
    except camcore.CamError as exc:
        error = exc
    return entry, explainer, error


def _explained(case):
    entry, explainer, error = case
    if error is not None:
        raise error
    d = entry["data"]
    classes = np.arange(d["logits"].shape[1])
    return entry, explainer, explainer.explain(d["x"], classes=classes, method="cam"), classes


@pytest.mark.parametrize("case", AFFINE, indirect=True, ids=corpus.entry_id)
def test_features_match_framework(case):
    """camcore reads the tensor the framework pools: ``|f_camcore - f| <= 1e-4 max|f|``."""
    entry, explainer, _, _ = _explained(case)
    assert explainer.head.affine
    d = entry["data"]
    features, _ = explainer.forward({explainer.head.input.name: d["x"]})
    ours = np.asarray(features, dtype=np.float64)
    if explainer.head.layout != entry["layout"]:
        ours = np.moveaxis(ours, 1, -1) if entry["layout"] == "NHWC" else np.moveaxis(ours, -1, 1)
    assert ours.shape == d["features"].shape
    assert np.abs(ours - d["features"]).max() <= RTOL * np.abs(d["features"]).max()


@pytest.mark.parametrize("case", AFFINE, indirect=True, ids=corpus.entry_id)
def test_cam_identity_gives_framework_logits(case):
    """``maps[n, c].mean() + bias[c]`` against the framework's ``logits[n, c]``, for every class:
    ``max_c |err[n, c]| <= 1e-4 max_c |logits[n, c]|`` for each item n."""
    entry, _, explanation, classes = _explained(case)
    d = entry["data"]
    recovered = explanation.maps.astype(np.float64).mean((-2, -1)) + d["bias"][classes]
    err = np.abs(recovered - d["logits"][:, classes]).max(1) / np.abs(d["logits"]).max(1)
    assert err.max() <= RTOL, f"relative error {err.max():.2e}"


@pytest.mark.parametrize("case", AFFINE, indirect=True, ids=corpus.entry_id)
def test_maps_are_framework_features_times_weights(case):
    """``maps[n, c] == sum_k W[c, k] f[n, k]`` with the framework's features and classifier."""
    entry, _, explanation, classes = _explained(case)
    d = entry["data"]
    f = _to_nchw(d["features"].astype(np.float64), entry["layout"])
    expected = np.einsum("ck,nkhw->nchw", d["weights"].astype(np.float64)[classes], f)
    assert explanation.maps.shape == expected.shape
    assert np.abs(explanation.maps - expected).max() <= RTOL * np.abs(expected).max()


@pytest.mark.parametrize("entry", AFFINE, ids=corpus.entry_id)
def test_oracle_gradient_is_the_classifier(entry):
    """The oracle is self-consistent: for GAP then affine, d logit_c / d f = W[c] / (h w)."""
    corpus.require(entry["framework"])
    d = corpus.load(entry)["data"]
    f = _to_nchw(d["features"], entry["layout"])
    expected = d["weights"][d["grad_classes"]][:, :, None, None] / (f.shape[2] * f.shape[3])
    grad = _to_nchw(d["grad"], entry["layout"])
    np.testing.assert_allclose(grad, np.broadcast_to(expected, grad.shape), rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case", REFUSED, indirect=True, ids=corpus.entry_id)
def test_non_affine_is_refused_naming_the_op(case):
    """CAM is refused on a head the framework finds non-affine: by `camcore.load` when no
    gradient target exists either, else by ``explain(method="cam")``; in one line naming a
    ``refuse_ops`` op (or, with no spatial pooling at all, saying so)."""
    entry, explainer, error = case
    if error is None:
        assert not explainer.head.affine, f"camcore found a CAM head: {explainer!r}"
        with pytest.raises(NotCamCompatible) as refused:
            explainer.explain(entry["data"]["x"], method="cam")
        error = refused.value
    assert isinstance(error, NotCamCompatible), repr(error)
    message = str(error)
    assert "\n" not in message
    if entry["pooling"] == "token":
        assert "no global average pooling" in message
    else:
        assert any(re.search(rf"\b{op}\b", message) for op in entry["refuse_ops"]), \
            f"{message!r} names none of {entry['refuse_ops']}"
