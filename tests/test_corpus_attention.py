"""Attention rollout and GAE on the corpus's vision transformers, against torch's eager attention.

The corpus (tools/corpus/export_transformers.py) records each export's attention probabilities
from eager attention (``attention[i].name``, ``(N, heads, T, T)``) and ``torch.autograd.grad`` of the
logit of ``grad_classes`` at them (``attention[i].grad``).  camcore must read the same probabilities
from the graph, compute their gradients in the graph within 1e-4 relative, and give the rollout and
GAE maps of a NumPy reference computed from torch's tensors.  Where the attention is windowed
(Swin) or does not span the image's tokens, rollout and GAE are refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest

from camcore import CamError, NotCamCompatible
from tests.test_attention import gae_reference, rollout_reference
from tests.test_transformers import _load, _relative, _x

corpus = pytest.importorskip("tests.corpus", reason="tests/corpus.py (the real-export corpus) is not in this checkout")

FRAMEWORK = "transformers"
ENTRIES = [e for e in corpus.manifest(FRAMEWORK) if e.get("pooling") != "gap"]
RTOL = 1e-4


def _global(entry) -> bool:
    """Every recorded attention is square over the image's tokens (prefix + grid)."""
    tokens = entry["prefix_tokens"] + entry["grid"][0] * entry["grid"][1]
    att = entry.get("attention") or []
    return entry.get("attention_kind") == "global" and bool(att) and all(
        a["shape"][-2:] == [tokens, tokens] for a in att)


GLOBAL = [e for e in ENTRIES if _global(e)]
WINDOWED = [e for e in ENTRIES if e.get("attention_kind") == "windowed"]
OTHER = [e for e in ENTRIES if e not in GLOBAL and e not in WINDOWED]


def _case(entry):
    """The entry's recorded data, its explainer and the model-ready input."""
    corpus.require(FRAMEWORK)
    d = corpus.load(entry)
    explainer = _load(d)
    return d["data"], explainer, _x(explainer, d["data"])


def test_the_corpus_has_transformers_with_attention_to_read():
    corpus.require(FRAMEWORK)
    assert len(GLOBAL) >= 6 and WINDOWED


@pytest.mark.parametrize("entry", GLOBAL, ids=corpus.entry_id)
def test_attention_and_its_gradients_match_torch(entry):
    d, explainer, x = _case(entry)
    tokens = explainer.head.tokens
    assert tokens is not None and len(tokens.attention) == len(entry["attention"])
    n, classes = len(d["x"]), d["grad_classes"]
    seeds = np.zeros((n, 1, explainer.head.num_classes), np.float32)
    seeds[np.arange(n), 0, classes] = 1
    probabilities, gradients = explainer.backend.run_attention(x, seeds, tokens=entry["attention"][0]["shape"][-1])
    assert len(probabilities) == len(entry["attention"])
    for ours, our_grad, spec in zip(probabilities, gradients, entry["attention"]):
        theirs, their_grad = d[spec["name"]], d[spec["grad"]]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=spec["name"])
        error = _relative(our_grad[:, 0], their_grad)
        assert error <= RTOL, f"{spec['name']}: gradient relative error {error:.2e}"


@pytest.mark.parametrize("entry", GLOBAL, ids=corpus.entry_id)
def test_rollout_and_gae_match_the_numpy_reference_on_torch_attention(entry):
    d, explainer, x = _case(entry)
    classes = d["grad_classes"][:, None]
    prefix, grid, pooling = entry["prefix_tokens"], tuple(entry["grid"]), entry["pooling"]
    att = [d[a["name"]].astype(np.float64) for a in entry["attention"]]
    grads = [d[a["grad"]].astype(np.float64)[:, None] for a in entry["attention"]]
    ro = explainer.explain(x, classes=classes, method="rollout").maps
    assert ro.shape == (len(d["x"]), 1, *grid)
    assert _relative(ro[:, 0], rollout_reference(att, prefix, grid, pooling)) <= 1e-4
    ga = explainer.explain(x, classes=classes, method="gae").maps
    want = gae_reference(att, grads, prefix, grid, pooling)
    assert np.abs(want).max() > 0
    assert _relative(ga, want) <= 1e-3


@pytest.mark.parametrize("entry", WINDOWED, ids=corpus.entry_id)
def test_windowed_attention_is_refused_in_one_line(entry):
    _, explainer, x = _case(entry)
    for method in ("rollout", "gae"):
        with pytest.raises(NotCamCompatible, match=r"needs? .*attention.*(windowed|Swin).*the feature methods apply") as err:
            explainer.explain(x, method=method)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("entry", OTHER, ids=corpus.entry_id)
def test_other_attention_gives_a_grid_map_or_one_line(entry):
    """CvT, LeViT, PVTv2: attention of other stages or spatially reduced keys; a map on the grid or a refusal."""
    d, explainer, x = _case(entry)
    for method in ("rollout", "gae"):
        try:
            maps = explainer.explain(x, method=method).maps
        except CamError as err:
            assert "\n" not in str(err) and "the feature methods apply" in str(err), str(err)
        else:
            assert maps.shape == (len(d["x"]), 1, *explainer.head.tokens.grid) and np.isfinite(maps).all()
