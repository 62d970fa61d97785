"""The forward-only methods on real exports (torch, Keras, Paddle): closed forms, batch == item by item.

Uses the real-export corpus of tests/corpus.py (built by ``tools/corpus/build.py``): where it is
missing these tests skip naming the build command (under CI they fail, as test_corpus does).
"""

from __future__ import annotations

import numpy as np
import pytest

import camcore
from tests.fakes import load_on
from camcore import NotCamCompatible

corpus = pytest.importorskip("tests.corpus", reason="tests/corpus.py (the real-export corpus) is not in this checkout")

ENTRIES = corpus.manifest()
METHODS = ("eigencam", "ablationcam", "reciprocam", "scorecam")
RTOL = 1e-3  # of the largest magnitude compared: float32 sums over up to 2048 channels


def _close(actual, expected, rtol=RTOL):
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(np.asarray(actual, np.float64) - expected).max() <= rtol * scale


@pytest.mark.parametrize("entry", ENTRIES, ids=corpus.entry_id)
def test_forward_only_methods_on_real_exports(entry, backend_name):
    corpus.require(entry["framework"])
    case = corpus.load(entry)
    try:
        explainer = load_on(backend_name, case["path"], providers=["cpu"])
    except NotCamCompatible:
        assert entry["pooling"] == "token" or not entry["affine"]  # no 4-D target layer: nothing to perturb
        return
    d = case["data"]
    x, classes = d["x"], d["grad_classes"][:, None]
    explainer.method_options = {"scoring": "logits", "max_channels": 4, "batch_size": 64}
    maps = {}
    for method in METHODS:
        together = explainer.explain(x, classes=classes, method=method).maps
        alone = np.concatenate([explainer.explain(x[i:i + 1], classes=classes[i:i + 1], method=method).maps
                                for i in range(len(x))])
        assert np.isfinite(together).all() and together.shape[:2] == (2, 1)
        _close(together, alone.astype(np.float64), rtol=1e-5)
        maps[method] = together
    assert (maps["scorecam"] >= 0).all() and (maps["ablationcam"] >= 0).all()
    if entry["affine"]:
        f = d["features"].astype(np.float64)
        f = np.moveaxis(f, -1, 1) if entry["layout"] == "NHWC" else f
        w, b = d["weights"].astype(np.float64)[classes], d["bias"].astype(np.float64)[classes]
        means = f.mean(axis=(2, 3))
        y = np.einsum("njk,nk->nj", w, means) + b
        ablation = np.maximum(np.einsum("njk,nkhw->njhw", w * means[:, None] / y[..., None], f), 0)
        _close(maps["ablationcam"], ablation)
        recipro = np.einsum("njk,nkhw->njhw", w, f) / (f.shape[2] * f.shape[3]) + b[..., None, None]
        _close(maps["reciprocam"], recipro)
