"""Token analysis and token maps on tiny transformers built with onnx.helper (tests/vit_zoo.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import camcore
from backends import analysis_cache, token_graph
from camcore import InvalidInput, NotCamCompatible
from camcore.methods import GRADIENT_METHODS
from camcore.perturbation import FORWARD_METHODS
from camcore.tokens import grid_for, grid_to_tokens, tokens_to_grid
from tests.vit_zoo import POOLINGS, vit

CASES = [(p, prefix, grid) for p in POOLINGS for prefix, grid in ((1, (2, 3)), (5, (3, 2)), (2, (1, 4)))
         if not (p == "cls_dist_mean" and prefix < 2)] + [("token_mean", 0, (2, 3))]


def _x(model, n=2, seed=0):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal((n, *dims[1:])).astype(np.float32)


def _run(model, names, x):
    from backends.onnx_graph import expose_outputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    s = ort.InferenceSession(expose_outputs(model, names).SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    return dict(zip(names, s.run(names, {"x": x})))


@pytest.mark.parametrize("pooling,prefix,grid", CASES, ids=lambda v: str(v))
def test_analysis_finds_pooling_prefix_grid_and_targets(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    head = token_graph.find_token_head(model)
    t = head.tokens
    assert (t.pooling, t.prefix, t.grid) == (pooling, prefix, grid)
    assert t.block_input == "block1_in" and t.norm_input == "block1_out"
    assert t.attention == ("attn0", "attn1")
    assert t.input_size == (grid[0] * 2, grid[1] * 2) and t.stride == (2, 2)
    names = [n for n, _ in t.tensors]
    assert {"block0_in", "block0_mid", "block0_out", "block1_in", "block1_out", "final_norm"} <= set(names)
    assert all(shape == ("N", prefix + grid[0] * grid[1], 8) for _, shape in t.tensors)
    assert head.layout == "NTC" and head.channels == 8 and head.num_classes == 5
    if pooling.startswith("cls"):
        assert head.feature == "block1_in" and not head.affine
    elif pooling == "token_mean" and prefix:
        assert head.feature == "block1_out" and "prefix tokens" in head.cam_refusal
    else:  # a mean over exactly the patch tokens, then Gemm: CAM is exact at the mean's input
        assert head.feature == "final_norm" and head.affine


@pytest.mark.parametrize("pooling,prefix,grid", CASES, ids=lambda v: str(v))
def test_every_method_maps_on_the_patch_grid(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model)
    for method in ["auto", *GRADIENT_METHODS, "eigencam", *FORWARD_METHODS]:
        out = explainer.explain(x, top_k=2, method=method)
        assert out.maps.shape == (2, 2, *grid), method
        assert np.isfinite(out.maps).all() and out.maps.dtype == np.float32
        if method not in ("cam", "auto", "eigencam") or explainer.head.affine:
            assert np.abs(out.maps).max() > 0, method


@pytest.mark.parametrize("prefix,grid", [(1, (2, 3)), (0, (3, 2))])
def test_cam_is_exact_on_a_mean_over_patch_tokens(prefix, grid):
    pooling = "token_mean_no_prefix" if prefix else "token_mean"
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=3)
    out = explainer.explain(x, classes=[0, 1, 2, 3, 4], method="cam")
    assert out.method == "cam"
    ref = _run(model, ["final_norm"], x)["final_norm"][:, prefix:].reshape(3, *grid, 8)
    expected = np.einsum("nhwc,kc->nkhw", ref.astype(np.float64), explainer.head.weights.astype(np.float64))
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.maps.mean((-2, -1)) + explainer.head.bias, out.logits, rtol=1e-4, atol=1e-4)


def test_gradcam_equals_numpy_reference_from_token_gradients():
    model = vit(pooling="cls", prefix=2, grid=(3, 2))
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model)
    g = explainer.gradients(x, top_k=1)
    assert g.layout == "NTC" and g.features.shape == (2, 8, 8) and g.gradients.shape == (2, 1, 8, 8)
    f = g.features[:, 2:].reshape(2, 3, 2, 8).astype(np.float64)
    d = g.gradients[:, :, 2:].reshape(2, 1, 3, 2, 8).astype(np.float64)
    weights = d.mean(axis=(2, 3))  # (N, k, C)
    expected = np.maximum(np.einsum("nkc,nhwc->nkhw", weights, f), 0)
    out = explainer.explain(x, classes=g.classes, method="gradcam")
    np.testing.assert_allclose(out.maps, expected, rtol=1e-4, atol=1e-6)


def test_token_gradients_match_finite_differences():
    model = vit(pooling="cls_concat_mean", prefix=1, grid=(2, 2), channels=4)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=1)
    g = explainer.gradients(x, classes=[[3]])
    tokens = g.features.astype(np.float64)
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(tokens.shape)
    eps = 1e-3

    def logit(t):
        return explainer.backend.run_head(t.astype(np.float32))[0, 3].astype(np.float64)

    numeric = (logit(tokens + eps * direction) - logit(tokens - eps * direction)) / (2 * eps)
    analytic = float((g.gradients[0, 0] * direction[0]).sum())
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic))


def test_patch_gradient_at_last_block_output_is_zero_under_cls_pooling():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    x = _x(model)
    at_output = camcore.load(model, providers=["cpu"], feature="block1_out").gradients(x)
    at_input = camcore.load(model, providers=["cpu"]).gradients(x)
    assert np.abs(at_output.gradients[:, :, 1:]).max() == 0
    assert np.abs(at_output.gradients[:, :, 0]).max() > 0
    assert np.abs(at_input.gradients[:, :, 1:]).max() > 0


def test_feature_must_be_a_token_tensor_of_the_stream():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    head = camcore.load(model, providers=["cpu"], feature="block0_out").head
    assert head.feature == "block0_out" and head.tokens.grid == (2, 3)
    with pytest.raises(NotCamCompatible, match="not a token tensor"):
        camcore.load(model, providers=["cpu"], feature="attn0")
    # the patch embedding is a 4-D map: explained as before, as a CNN feature map
    assert camcore.load(model, providers=["cpu"], feature="patch_embed").head.layout == "NCHW"


def test_explain_images_maps_land_on_the_image():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    explainer = camcore.load(model, providers=["cpu"])
    assert explainer.default_preprocess().size == (4, 6)
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    (result,) = explainer.explain_images([image], method="gradcam")
    assert result.cams.shape == (1, 2, 3) and result.maps.shape == (1, 20, 30)


def test_head_with_tokens_round_trips_through_the_cache():
    head = token_graph.find_token_head(vit(pooling="cls_concat_mean", prefix=3, grid=(2, 3)))
    document, arrays = analysis_cache.head_to_json(head)
    again = analysis_cache.head_from_json(document, arrays)
    assert analysis_cache.same_head(head, again)


def test_dynamic_spatial_axes_need_a_size():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    for axis in (2, 3):
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = "hw"
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "channels"
    explainer = camcore.load(model, providers=["cpu"], size=(4, 6))
    assert explainer.head.tokens.grid == (2, 3) and explainer.head.tokens.input_size == (4, 6)
    assert explainer.explain(np.zeros((1, 3, 4, 6), np.float32), method="gradcam").maps.shape == (1, 1, 2, 3)
    # another shape with as many patches: the grid follows the input's
    assert explainer.explain(np.zeros((1, 3, 6, 4), np.float32), method="gradcam").maps.shape == (1, 1, 3, 2)
    with pytest.raises(camcore.CamError, match="onnxruntime"):  # the position embedding is fixed: one line
        explainer.explain(np.zeros((1, 3, 8, 6), np.float32))


# --------------------------------------------------------------------------- the core reshape


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(0, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_tokens_grid_round_trip(n, prefix, gh, gw, c):
    rng = np.random.default_rng(n * 1000 + prefix * 100 + gh * 10 + gw)
    tokens = rng.standard_normal((n, prefix + gh * gw, c)).astype(np.float32)
    grid = tokens_to_grid(tokens, (gh, gw), prefix=prefix)
    assert grid.shape == (n, gh, gw, c)
    # row-major: token prefix + i * gw + j is cell (i, j)
    np.testing.assert_array_equal(grid[:, -1, 0], tokens[:, prefix + (gh - 1) * gw])
    np.testing.assert_array_equal(grid_to_tokens(grid, tokens[:, :prefix]), tokens)
    gradients = np.stack([tokens, 2 * tokens], axis=1)
    assert tokens_to_grid(gradients, (gh, gw), prefix=prefix).shape == (n, 2, gh, gw, c)


def test_token_count_must_fit_the_grid():
    with pytest.raises(InvalidInput, match="prefix"):
        tokens_to_grid(np.zeros((1, 7, 2)), (2, 2), prefix=1)
    assert grid_for(1 + 6, prefix=1, grid=(3, 2)) == (3, 2)
    assert grid_for(1 + 12, prefix=1, grid=(3, 2), stride=(2, 2), input_size=(8, 6)) == (4, 3)
    with pytest.raises(InvalidInput, match="cannot place"):
        grid_for(1 + 12, prefix=1, grid=(3, 2))


@pytest.mark.parametrize("pooling,prefix", [("cls", 1), ("token_mean", 0), ("cls_concat_mean", 3)])
def test_fused_graph_matches_the_numpy_path(pooling, prefix):
    model = vit(pooling=pooling, prefix=prefix, grid=(2, 3))
    x = _x(model)
    explainer = camcore.load(model, providers=["cpu"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for method in ["auto", *GRADIENT_METHODS]:
        fused = camcore.fuse(model, top_k=2, normalize=False, method=method)
        session = ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"])
        classes, maps = session.run(["cam_classes", "cam_maps"], {"x": x})
        expected = explainer.explain(x, classes=classes, method=method).maps
        assert maps.shape == (2, 2, 2, 3)
        np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6, err_msg=method)


def _cli(*args, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CAMCORE_CACHE_DIR": "off", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "camcore.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_inspect_and_explain_a_transformer(tmp_path):
    import json

    import onnx
    from PIL import Image

    model = vit(pooling="cls", prefix=5, grid=(2, 3))
    for axis in (2, 3):  # dynamic height and width: --size is needed, and taken
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = f"d{axis}"
    path = tmp_path / "vit.onnx"
    onnx.save(model, path)
    refused = _cli("inspect", str(path))
    assert refused.returncode != 0 and "--size" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    shown = _cli("inspect", str(path), "--size", "4x6", "--json")
    assert shown.returncode == 0, shown.stderr
    tokens = json.loads(shown.stdout)["tokens"]
    assert (tokens["pooling"], tokens["prefix_tokens"], tokens["grid"]) == ("cls", 5, [2, 3])
    assert tokens["last_block_input"] == "block1_in" and tokens["final_norm_input"] == "block1_out"
    assert tokens["attention"] == ["attn0", "attn1"] and "block0_out" in [t["name"] for t in tokens["tensors"]]
    text = _cli("inspect", str(path), "--size", "4x6")
    assert "grid         2x3 patches" in text.stdout and "prefix       5 token(s)" in text.stdout
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    run = _cli("explain", str(path), str(image), "--size", "4x6", "--out", str(out), "--method", "gradcam",
               "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    assert (out / "image.cam.png").exists() and json.loads(run.stdout)


@pytest.mark.parametrize("wrt", ["q", "k", "v"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fused_attention_gradient_matches_finite_differences(wrt, scale):
    """The opset-23 Attention op (torch's SDPA export): its backward pass against finite differences."""
    from onnx import TensorProto, helper

    from backends.backprop import add_backward

    shapes = {"q": [2, 2, 5, 3], "k": [2, 2, 4, 3], "v": [2, 2, 4, 6]}
    attrs = {} if scale is None else {"scale": scale}
    node = helper.make_node("Attention", ["q", "k", "v"], ["a"], name="attention", **attrs)
    tanh = helper.make_node("Tanh", ["a"], ["y"], name="tanh")  # a nonlinear read of the output
    graph = helper.make_graph([node, tanh], "attention",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    back = add_backward(model, wrt, "y")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    forward = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    backward = ort.InferenceSession(back.SerializeToString(), options, providers=["CPUExecutionProvider"])
    seed = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    grad = backward.run(["cam_grad"], {**feeds, "cam_seed": seed})[0]
    eps, expected = 1e-2, np.zeros(shapes[wrt])
    for i in np.ndindex(*shapes[wrt]):
        plus, minus = feeds[wrt].copy(), feeds[wrt].copy()
        plus[i] += eps
        minus[i] -= eps
        up = forward.run(None, {**feeds, wrt: plus})[0].astype(np.float64)
        down = forward.run(None, {**feeds, wrt: minus})[0].astype(np.float64)
        expected[i] = ((up - down) * seed).sum() / (2 * eps)
    np.testing.assert_allclose(grad, expected, rtol=1e-2, atol=1e-3 * max(1.0, np.abs(expected).max()))


def test_masked_attention_is_refused_in_one_line():
    from onnx import TensorProto, helper

    from backends.backprop import add_backward

    shapes = {"q": [1, 1, 3, 2], "k": [1, 1, 3, 2], "v": [1, 1, 3, 2], "m": [3, 3]}
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="attention")
    graph = helper.make_graph([node], "attention",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(NotCamCompatible, match="no gradient rule for Attention.*mask"):
        add_backward(model, "q", "y")
