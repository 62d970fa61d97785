"""The vision-transformer corpus (timm and Hugging Face, three exporters) against torch's oracle.

What is checked here does not depend on camcore's analysis: every export runs in onnxruntime
and gives torch's logits, and the oracle is self-consistent (its gradients, its attention
probabilities, its grid and prefix count, its affine heads). The corpus comes from
``python3 tools/corpus/build.py --framework transformers`` (see tests/corpus.py); missing, these
tests skip naming that command (under CI they fail).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import corpus

RTOL = 1e-4
ENTRIES = corpus.transformer_entries()
TOKENS = [e for e in ENTRIES if e["layout"] == "NLC"]
CLS = [e for e in TOKENS if e["pooling"] in ("cls", "cls_dist_mean")]
MEAN = [e for e in TOKENS if e["pooling"] in ("token_mean", "token_mean_no_prefix", "cls_concat_mean")]
ATTENTION = [e for e in ENTRIES if e["attention"]]
AFFINE = [e for e in ENTRIES if e["affine"]]


def _load(entry: dict) -> dict:
    corpus.require(corpus.TRANSFORMERS)
    return corpus.load(entry)


def test_corpus_built():
    """Every family is there, each with the exporters that work for it."""
    corpus.require(corpus.TRANSFORMERS)
    kinds = {(e["library"], e["family"], e["export_kind"]) for e in ENTRIES}
    for family in ("vit", "deit_distilled", "beit", "vit_reg4", "swin", "levit"):
        assert {("timm", family, "ts"), ("timm", family, "dynamo")} <= kinds, family
    for family in ("vit", "deit_teacher", "beit", "dinov2", "swin", "swinv2", "cvt", "levit", "efficientnet"):
        assert {("hf", family, k) for k in ("ts", "dynamo", "optimum")} <= kinds, family
    for family in ("dinov2_reg", "pvt_v2", "focalnet"):
        assert ("hf", family, "dynamo") in kinds, family
    assert ("timm", "vit_sdpa", "dynamo") in kinds
    assert {e["pooling"] for e in ENTRIES} == {"cls", "cls_dist_mean", "token_mean", "token_mean_no_prefix",
                                              "cls_concat_mean", "spatial_mean", "gap"}


@pytest.mark.parametrize("entry", ENTRIES, ids=corpus.entry_id)
def test_onnxruntime_gives_torch_logits(entry):
    """``|logits_ort - logits_torch| <= 1e-4 max |logits_torch|`` per item."""
    import onnxruntime as ort

    case = _load(entry)
    d = case["data"]
    session = ort.InferenceSession(str(case["path"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [entry["input"]["name"]]
    logits = session.run(None, {entry["input"]["name"]: d["x"]})[0]
    assert logits.shape == d["logits"].shape == (2, entry["num_classes"])
    err = np.abs(logits.astype(np.float64) - d["logits"]).max(1) / np.abs(d["logits"]).max(1)
    assert err.max() <= RTOL, f"relative error {err.max():.2e}"


@pytest.mark.parametrize("entry", ENTRIES, ids=corpus.entry_id)
def test_attention_in_the_graph(entry):
    """Eager attention leaves one Softmax per attention-probability array of the oracle; timm's
    fused attention exported at opset 23 leaves ONNX ``Attention`` ops and no Softmax."""
    import collections

    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(_load(entry)["path"])).graph.node)
    if entry["attention_kind"] == "fused":
        assert ops["Attention"] > 0 and ops["Softmax"] == 0 and not entry["attention"]
    else:
        assert ops["Softmax"] == len(entry["attention"]) and ops["Attention"] == 0
        assert bool(entry["attention"]) == (entry["attention_kind"] != "none")


@pytest.mark.parametrize("entry", ENTRIES, ids=corpus.entry_id)
def test_oracle_arrays(entry):
    """The npz holds what the manifest says, the gradients are of the top-1 logits, and the
    token tensors hold the prefix tokens then the ``gh * gw`` patch tokens."""
    d = _load(entry)["data"]
    assert d["x"].shape == (2, 3, entry["image_size"], entry["image_size"])
    np.testing.assert_array_equal(d["grad_classes"], d["logits"].argmax(1))
    for name, target in entry["targets"].items():
        assert list(d[name].shape) == target["shape"]
        assert d[target["grad"]].shape == d[name].shape
        assert np.isfinite(d[target["grad"]]).all() and np.abs(d[target["grad"]]).max() > 0, name
    gh, gw = entry["grid"]
    if entry["layout"] == "NLC":
        for name in ("block_input", "norm_input"):
            assert d[name].shape[1] == entry["prefix_tokens"] + gh * gw, name
    if "spatial" in d:
        assert d["spatial"].shape[1:3] == (gh, gw)
        np.testing.assert_array_equal(d["spatial"].reshape(d["grad_spatial"].shape[0], -1),
                                      d["features"].reshape(d["features"].shape[0], -1))


@pytest.mark.parametrize("entry", CLS, ids=corpus.entry_id)
def test_cls_pooling_patch_gradient_is_zero_after_the_last_block(entry):
    """Under CLS pooling the head reads the prefix tokens alone, and nothing after the last block
    mixes tokens: the patch tokens' gradient there is exactly zero, and not at the block's input."""
    d = _load(entry)["data"]
    p = entry["prefix_tokens"]
    assert entry["patch_grad_max_norm_input"] == 0.0
    assert np.all(d["grad_norm_input"][:, p:] == 0)
    assert np.abs(d["grad_norm_input"][:, :p]).max() > 0
    assert np.abs(d["grad_block_input"][:, p:]).min(1).max() > 0


@pytest.mark.parametrize("entry", MEAN, ids=corpus.entry_id)
def test_mean_pooling_patch_gradient_is_not_zero(entry):
    """The contrast: when the head averages patch tokens, every patch token gets a gradient."""
    d = _load(entry)["data"]
    p = entry["prefix_tokens"]
    assert entry["patch_grad_max_norm_input"] > 0
    assert (np.abs(d["grad_norm_input"][:, p:]).max(-1) > 0).all()


@pytest.mark.parametrize("entry", ATTENTION, ids=corpus.entry_id)
def test_attention_probabilities(entry):
    """Each ``attn_LL`` is a Softmax output ``(N', heads, T, T')``: rows sum to one. With global
    attention the last layer attends over all tokens of the last stage (prefix and patches)."""
    d = _load(entry)["data"]
    for a in entry["attention"]:
        probs = d[a["name"]].astype(np.float64)
        assert list(probs.shape) == a["shape"] and d[a["grad"]].shape == probs.shape
        assert probs.min() >= 0
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    last = d[entry["attention"][-1]["name"]]
    gh, gw = entry["grid"]
    if entry["attention_kind"] == "global":
        assert last.shape[0] == 2 and last.shape[-2] == entry["prefix_tokens"] + gh * gw
    else:  # Swin's windows: each window's tokens, windows stacked on the batch axis
        assert last.shape[0] % 2 == 0 and last.shape[-1] == last.shape[-2] <= gh * gw


@pytest.mark.parametrize("entry", AFFINE, ids=corpus.entry_id)
def test_affine_heads_are_exact_cams(entry):
    """Mean pooling then an affine head: ``logits = mean(features) @ W.T + b`` (the identity exact
    CAM rests on), with ``W`` and ``b`` read off the torch head."""
    d = _load(entry)["data"]
    axes = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,)}[entry["layout"]]
    predicted = d["features"].astype(np.float64).mean(axes) @ d["weights"].T.astype(np.float64) + d["bias"]
    err = np.abs(predicted - d["logits"]).max(1) / np.abs(d["logits"]).max(1)
    assert err.max() <= RTOL, f"relative error {err.max():.2e}"
