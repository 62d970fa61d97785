"""ViT Recipro-CAM: `reciprocam(mask="gaussian")`, and "reciprocam" on a transformer's tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import camcore
from camcore import InvalidInput
from camcore.perturbation import reciprocam
from camcore.scores import softmax
from tests.vit_zoo import vit

KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16


def gaussian_mask(h, w, y, x):
    """The 3x3 Gaussian centred on (y, x), written out cell by cell."""
    m = np.zeros((h, w))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                m[y + dy, x + dx] = KERNEL[dy + 1, dx + 1]
    return m


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(["NCHW", "NHWC"]), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_gaussian_mask_matches_the_loop_reference(n, h, w, k, classes_k, layout, batch_size, seed):
    rng = np.random.default_rng(seed)
    shape = (n, k, h, w) if layout == "NCHW" else (n, h, w, k)
    f = rng.standard_normal(shape)
    weights = rng.standard_normal((4, k * h * w))

    def head(x):
        return x.reshape(len(x), -1) @ weights.T

    classes = rng.integers(0, 4, (n, classes_k))
    got = reciprocam(f, classes, head, layout=layout, mask="gaussian", batch_size=batch_size)
    want = np.zeros((n, classes_k, h, w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                m = gaussian_mask(h, w, y, x)
                masked = f[i] * (m[None] if layout == "NCHW" else m[..., None])
                scores = softmax(head(masked[None]))[0]
                want[i, :, y, x] = scores[classes[i]]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_unknown_mask_is_refused():
    with pytest.raises(InvalidInput, match="mask"):
        reciprocam(np.ones((1, 1, 2, 2)), [[0]], lambda x: x.reshape(len(x), -1), mask="box")


@pytest.mark.parametrize("pooling,prefix,grid", [("cls", 1, (2, 3)), ("cls_dist_mean", 2, (3, 3)),
                                                 ("cls", 5, (3, 2)), ("token_mean", 0, (2, 2))], ids=str)
def test_vit_reciprocam_on_tokens_keeps_every_prefix_token(pooling, prefix, grid):
    """The masked copies are made at the token target layer; all prefix tokens are kept, unmasked."""
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    x = np.random.default_rng(0).standard_normal((2, 3, grid[0] * 2, grid[1] * 2)).astype(np.float32)
    out = explainer.explain(x, top_k=2, method="reciprocam")
    assert out.maps.shape == (2, 2, *grid)
    features, _ = explainer.forward({"x": x})
    gh, gw = grid
    for i in range(2):
        rows = []
        for y in range(gh):
            for xx in range(gw):
                m = gaussian_mask(gh, gw, y, xx).reshape(-1, 1)
                t = features[i].copy()
                t[prefix:] = t[prefix:] * m
                rows.append(t)
        scores = softmax(np.asarray(explainer.backend.run_head(np.stack(rows)), np.float64))
        want = scores[:, out.classes[i]].T.reshape(2, gh, gw)
        np.testing.assert_allclose(out.maps[i], want, rtol=1e-5, atol=1e-7)
    # the point mask of CNN Recipro-CAM is still there, as an option
    explainer.method_options = {"mask": "point"}
    point = explainer.explain(x, top_k=2, method="reciprocam").maps
    assert point.shape == out.maps.shape and not np.allclose(point, out.maps)


def _norm_reference(model, x, prefix, grid, classes):
    """ViT Recipro-CAM masked as OpenVINO XAI 1.1 masks, by hand: the last block's input and its
    first LayerNorm's output both multiplied by the Gaussian mask (prefix tokens kept), the rest
    of the model run from those two tensors (onnx's Extractor, onnxruntime); softmax scores."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    inferred = onnx.shape_inference.infer_shapes(model)
    norm = next(n for n in inferred.graph.node if n.op_type == "LayerNormalization" and n.input[0] == "block1_in")
    upper = Extractor(inferred).extract_model(["block1_in", norm.output[0]], ["logits"])
    lower = Extractor(inferred).extract_model(["x"], ["block1_in", norm.output[0]])
    run = ort.InferenceSession(upper.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens, normalized = ort.InferenceSession(lower.SerializeToString(),
                                              providers=["CPUExecutionProvider"]).run(None, {"x": x})
    gh, gw = grid
    want = np.zeros((len(x), classes.shape[1], gh, gw))
    for i in range(len(x)):
        for y in range(gh):
            for xx in range(gw):
                m = gaussian_mask(gh, gw, y, xx).reshape(-1, 1).astype(np.float32)
                t, u = tokens[i:i + 1].copy(), normalized[i:i + 1].copy()
                t[0, prefix:] *= m
                u[0, prefix:] *= m
                logits = run.run(["logits"], {"block1_in": t, norm.output[0]: u})[0]
                want[i, :, y, xx] = softmax(logits.astype(np.float64))[0, classes[i]]
    return want


@pytest.mark.parametrize("pooling,prefix,grid", [("cls", 1, (2, 3)), ("cls_dist_mean", 2, (3, 3)),
                                                 ("cls_concat_mean", 5, (3, 2))], ids=str)
def test_mask_at_normalized_masks_the_block_input_and_its_norm(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    explainer.method_options = {"mask_at": "normalized"}
    assert explainer.head.feature == "block1_in"
    x = np.random.default_rng(1).standard_normal((2, 3, grid[0] * 2, grid[1] * 2)).astype(np.float32)
    out = explainer.explain(x, top_k=2, method="reciprocam")
    want = _norm_reference(model, x, prefix, grid, out.classes)
    np.testing.assert_allclose(out.maps, want, rtol=1e-5, atol=1e-7)
    # not the map masked at the block input alone: the norm undoes the mask's scale there
    explainer.method_options = {}
    plain = explainer.explain(x, top_k=2, method="reciprocam").maps
    assert not np.allclose(plain, out.maps, rtol=1e-3, atol=1e-6)


def test_mask_at_is_refused_where_it_cannot_apply():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    x = np.zeros((1, 3, 4, 6), np.float32)
    explainer = camcore.load(model, providers=["cpu"])
    explainer.method_options = {"mask_at": "norm"}
    with pytest.raises(InvalidInput, match="mask_at must be one of 'input', 'normalized'"):
        explainer.explain(x, method="reciprocam")
    # the final norm's output enters no block: no LayerNormalization reads it
    at_end = camcore.load(model, providers=["cpu"], feature="final_norm")
    at_end.method_options = {"mask_at": "normalized"}
    with pytest.raises(camcore.NotCamCompatible, match="to enter a block") as refused:
        at_end.explain(x, method="reciprocam")
    assert "\n" not in str(refused.value)
    cnn = camcore.load(None, providers=["cpu"])
    cnn.method_options = {"mask_at": "normalized"}
    image = np.zeros((1, *cnn.head.input.shape[1:]), np.float32)
    with pytest.raises(InvalidInput, match="feature map"):
        cnn.explain(image, method="reciprocam")
