"""In-graph gradients on real exports against each framework's own autograd.

For every export of the corpus (tests/corpus.py, built by ``tools/corpus/build.py``), the
export script recorded ``grad = d logits[n, c_n] / d features`` with ``torch.autograd.grad``,
``tf.GradientTape`` or ``paddle.grad`` at the layer feeding the global pooling.  camcore must
find that layer, reproduce the gradient from the ONNX graph alone within 1e-4 relative, and
explain every CNN: CAM where the head is GAP + affine, Grad-CAM where it is not.  Missing
corpus: skip naming the build command (under CI: fail, as test_corpus does).
"""

from __future__ import annotations

import numpy as np
import pytest

import camcore
from tests.fakes import load_on, run_time_reduce_axes

corpus = pytest.importorskip("tests.corpus", reason="tests/corpus.py (the real-export corpus) is not in this checkout")

ENTRIES = corpus.manifest()
CNNS = [e for e in ENTRIES if e["pooling"] != "token"]
RTOL = 1e-4


def _nchw(array: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(array, -1, -3) if layout == "NHWC" else array


@pytest.mark.parametrize("entry", CNNS, ids=corpus.entry_id)
def test_gradients_match_framework_autograd(entry, backend_name):
    """``|g_camcore - g| <= 1e-4 max|g|`` at the framework's own feature layer, per export."""
    corpus.require(entry["framework"])
    case = corpus.load(entry)
    d = case["data"]
    explainer = load_on(backend_name, case["path"], providers=["cpu"])
    assert explainer.resolve_method("auto") == ("cam" if entry["affine"] else "gradcam")
    # Only the batch is dynamic: every sum of the backward graph has constant axes (OpenVINO's ONNX
    # reader needs them so).
    assert run_time_reduce_axes(explainer.backend.head_graph(True).model) == []
    g = explainer.gradients({explainer.head.input.name: d["x"]}, classes=d["grad_classes"][:, None])
    features = _nchw(g.features.astype(np.float64), g.layout)
    expected_features = _nchw(d["features"].astype(np.float64), entry["layout"])
    assert features.shape == expected_features.shape, "camcore's target layer is not the framework's"
    assert np.abs(features - expected_features).max() <= RTOL * np.abs(expected_features).max()
    ours = _nchw(g.gradients[:, 0].astype(np.float64), g.layout)
    theirs = _nchw(d["grad"].astype(np.float64), entry["layout"])
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert error <= RTOL, f"gradient relative error {error:.2e}"
    out = explainer.explain(d["x"], classes=d["grad_classes"][:, None])
    assert out.method == ("cam" if entry["affine"] else "gradcam") and np.isfinite(out.maps).all()
