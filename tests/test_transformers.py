"""Vision transformers of the real-export corpus: what camcore finds, against torch's own answers.

For every export of the corpus's ``transformers`` part (timm and Hugging Face models, exported by
TorchScript, dynamo and optimum; see tools/corpus/export_transformers.py), the manifest records how
the head pools (``pooling``), the prefix tokens (``prefix_tokens``) and the patch grid (``grid``),
and the npz holds torch's tokens and ``torch.autograd.grad`` at the last block's input
(``block_in``), at the final norm's input (``block_out``) and at the pooled tensor (``features``).
camcore must find the same pooling, prefix and grid from the graph alone, reproduce the gradients
within 1e-4 relative at the tensors it picks, and give every method's maps on the patch grid.
Missing corpus: skip naming the build command (under CI: fail, as test_corpus does).
"""

from __future__ import annotations

import numpy as np
import pytest

import camcore
from camcore.methods import GRADIENT_METHODS
from camcore.perturbation import FORWARD_METHODS

corpus = pytest.importorskip("tests.corpus", reason="tests/corpus.py (the real-export corpus) is not in this checkout")

FRAMEWORK = "transformers"
ENTRIES = corpus.manifest(FRAMEWORK)
TOKENS = [e for e in ENTRIES if e["pooling"] != "gap"]
RTOL = 1e-4
CLS = ("cls", "cls_dist_mean", "cls_concat_mean")


def _load(case, **kw):
    size = case.get("image_size")
    return camcore.load(case["path"], providers=["cpu"], size=(size, size) if size else None, **kw)


def _x(explainer, d):
    return {explainer.head.input.name: d["x"].astype(explainer.head.input.dtype)}


def _relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"shape {ours.shape}, torch's {theirs.shape}"
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def _require():
    corpus.require(FRAMEWORK)


@pytest.mark.parametrize("entry", TOKENS, ids=corpus.entry_id)
def test_pooling_prefix_and_grid_are_found(entry):
    _require()
    case = corpus.load(entry)
    tokens = _load(case).head.tokens
    assert tokens is not None, "not read as a transformer"
    assert tokens.pooling == entry["pooling"]
    assert tokens.prefix == entry["prefix_tokens"]
    assert list(tokens.grid) == list(entry["grid"])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["pooling"] == "gap"], ids=corpus.entry_id)
def test_a_cnn_is_not_read_as_a_transformer(entry):
    _require()
    head = _load(corpus.load(entry)).head
    assert head.tokens is None and head.layout in ("NCHW", "NHWC")


# the oracle's names of the last block's input and of the final norm's input
BLOCK_INPUT, NORM_INPUT = ("block_input", "block_in"), ("norm_input", "block_out")


def oracle_targets(entry, d, tokens) -> list:
    """``(key, camcore tensor, torch's tensor, torch's gradient)`` at the last block's input and at
    the final norm's input, as the manifest's ``targets`` name them."""
    out = []
    for key, spec in entry.get("targets", {}).items():
        name = tokens.block_input if key in BLOCK_INPUT else tokens.norm_input if key in NORM_INPUT else None
        grad = spec.get("grad") if spec.get("grad") in d else None
        if name is not None and key in d and grad is not None:
            out.append((key, name, d[key], d[grad]))
    return out


@pytest.mark.parametrize("entry", TOKENS, ids=corpus.entry_id)
def test_gradients_match_torch_at_the_last_block_and_the_final_norm(entry):
    _require()
    case = corpus.load(entry)
    d = case["data"]
    tokens = _load(case).head.tokens
    targets = oracle_targets(entry, d, tokens)
    assert targets
    for key, name, theirs, their_grad in targets:
        explainer = _load(case, feature=name)
        g = explainer.gradients(_x(explainer, d), classes=d["grad_classes"][:, None])
        features, grads = g.features, g.gradients[:, 0]
        if grads.shape != their_grad.shape and grads.size == their_grad.size:
            # the same tensor in another view: torch's (N, h*w, C) of a channels-last map
            grads, features = grads.reshape(their_grad.shape), features.reshape(theirs.shape)
        assert _relative(features, theirs) <= RTOL, f"{key}: camcore's {name!r} is not torch's tensor"
        error = _relative(grads, their_grad)
        assert error <= RTOL, f"{key} ({name!r}): gradient relative error {error:.2e}"


@pytest.mark.parametrize("entry", [e for e in TOKENS if e["pooling"] in ("cls", "cls_dist_mean")],
                         ids=corpus.entry_id)
def test_patch_gradient_after_the_last_block_is_zero_under_cls_pooling(entry):
    _require()
    case = corpus.load(entry)
    d = case["data"]
    tokens = _load(case).head.tokens
    explainer = _load(case, feature=tokens.norm_input)
    g = explainer.gradients(_x(explainer, d), classes=d["grad_classes"][:, None])
    assert np.abs(g.gradients[:, :, tokens.prefix:]).max() == 0
    assert np.abs(g.gradients[:, :, :tokens.prefix]).max() > 0
    assert tokens.block_input != tokens.norm_input
    assert _load(case).head.feature == tokens.block_input  # the default target


def _grid(array, tokens):
    """Oracle tokens (N, T, C) -> (N, gh, gw, C) on the grid (a 4-D map is returned as is)."""
    if array.ndim == 4:
        return array
    return camcore.tokens.tokens_to_grid(array, tokens.grid, prefix=tokens.prefix)


@pytest.mark.parametrize("entry", TOKENS, ids=corpus.entry_id)
def test_maps_of_every_method_on_the_patch_grid(entry):
    _require()
    case = corpus.load(entry)
    d = case["data"]
    explainer = _load(case)
    head, tokens = explainer.head, explainer.head.tokens
    x = _x(explainer, d)
    n = len(d["x"])
    for method in ["auto", *GRADIENT_METHODS, "eigencam", *FORWARD_METHODS]:
        out = explainer.explain(x, classes=d["grad_classes"][:, None], method=method)
        assert out.maps.shape == (n, 1, *tokens.grid), method
        assert np.isfinite(out.maps).all(), method
    np.testing.assert_allclose(out.logits, d["logits"], rtol=1e-4, atol=1e-4 * np.abs(d["logits"]).max())
    # Grad-CAM from torch's own tokens and gradients at the tensor camcore picks
    picked = [(t, gr) for _, name, t, gr in oracle_targets(entry, d, tokens) if name == head.feature]
    if not picked and head.affine and "features" in d and "grad" in d:
        picked = [(d["features"], d["grad"])]
    if picked:
        f = _grid(picked[0][0].astype(np.float64), tokens)
        grad = _grid(picked[0][1].astype(np.float64), tokens)
        if f.shape[1:3] != tuple(tokens.grid):
            f = f.reshape(n, *tokens.grid, -1)
            grad = grad.reshape(n, *tokens.grid, -1)
        weights = grad.mean(axis=(1, 2))
        expected = np.maximum(np.einsum("nc,nhwc->nhw", weights, f), 0)[:, None]
        ours = explainer.explain(x, classes=d["grad_classes"][:, None], method="gradcam").maps
        assert _relative(ours, expected) <= 1e-3
    if head.affine:  # exact CAM: the map's mean plus the bias is the logit
        out = explainer.explain(x, classes=d["grad_classes"][:, None], method="cam")
        picked = np.take_along_axis(d["logits"], d["grad_classes"][:, None], axis=1)
        np.testing.assert_allclose(out.maps.mean((-2, -1)) + head.bias[d["grad_classes"]][:, None], picked,
                                   rtol=1e-4, atol=1e-4 * np.abs(picked).max())
