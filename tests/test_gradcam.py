"""Grad-CAM and its family on ONNX models: gradients computed inside the graph by onnxruntime.

The oracles: on GAP + affine heads Grad-CAM is exactly ``relu(CAM) / (h * w)``; elsewhere
the gradients must match directional finite differences of the head itself, and the fused
graphs must match the NumPy path, run in a process that never imports camcore.
"""

import numpy as np
import onnx
import pytest

import camcore
from camcore import InvalidInput, NotCamCompatible
from camcore.methods import GRADIENT_METHODS
from tests.fakes import load_on
from tests.test_fuse import reference, run_plain
from tests.zoo import CASES, REFUSED

NUMPY_DTYPES = {np.float16: 2e-3, np.float32: 1e-5}


def _load(zm, backend="onnxruntime", **kwargs):
    return load_on(backend, zm.model, providers=["cpu"], **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcam_is_relu_cam_over_hw_across_the_zoo(name, backend_name):
    zm = CASES[name]()
    ex = _load(zm, backend_name)
    x = zm.random_input(0)
    k = min(3, ex.head.num_classes)
    cam = ex.explain(x, top_k=k, method="cam")
    grad = ex.explain(x, top_k=k, method="gradcam")
    assert grad.method == "gradcam" and cam.method == "cam"
    np.testing.assert_array_equal(grad.classes, cam.classes)
    h, w = cam.maps.shape[-2:]
    expected = np.maximum(cam.maps, 0) / (h * w)
    scale = np.abs(cam.maps).max() / (h * w)
    tol = 1e-2 if zm.input_dtype == np.float16 or name == "cast_fp16_head" else 1e-5
    np.testing.assert_allclose(grad.maps, expected, atol=tol * scale)


def _directional_check(ex, features, classes, rng, eps):
    """<gradient, v> against the central difference of the head's logit along v."""
    grads = ex._class_gradients(features, classes)
    for j in range(classes.shape[1]):
        v = rng.standard_normal(features.shape).astype(features.dtype)
        plus = ex.backend.run_head(features + eps * v)
        minus = ex.backend.run_head(features - eps * v)
        rows = np.arange(len(features))
        numeric = (plus[rows, classes[:, j]] - minus[rows, classes[:, j]]) / (2 * eps)
        analytic = (grads[:, j].astype(np.float64) * v).reshape(len(v), -1).sum(1)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3 * np.abs(analytic).max())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_cam_refused_heads_get_gradients_matching_finite_differences(name, backend_name):
    zm = REFUSED[name]()
    ex = _load(zm, backend_name)
    x = zm.random_input(1)
    features, logits = ex.forward({zm.input_name: x})
    classes = np.argsort(-logits, axis=1)[:, :2]
    _directional_check(ex, features, classes, np.random.default_rng(0), eps=1e-2)
    out = ex.explain(x, top_k=2)
    assert out.method == "gradcam" and out.maps.shape[:2] == (len(x), 2) and out.maps.min() >= 0
    np.testing.assert_array_equal(out.classes, classes)


def test_earlier_target_layer_and_bypassed_layer(backend_name):
    zm = CASES["gap_gemm"]()
    ex = _load(zm, backend_name, feature="conv_0")  # the Conv before the Relu that feeds the pooling
    assert ex.head.feature == "conv_0" and not ex.head.affine and ex.head.layout == "NCHW"
    features, logits = ex.forward({zm.input_name: zm.random_input(2)})
    _directional_check(ex, features, np.argsort(-logits, axis=1)[:, :3], np.random.default_rng(1), eps=1e-3)
    se = CASES["se_block_backbone"]()
    with pytest.raises(NotCamCompatible, match="bypassed"):
        _load(se, backend_name, feature="sigmoid_6")  # the SE gate: the logits also see the features it gates


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_methods_batch_equals_item_by_item_and_public_gradients(method, backend_name):
    zm = REFUSED["conv_hardswish_after_pool"]()
    ex = _load(zm, backend_name)
    x = np.concatenate([zm.random_input(s) for s in range(3)])
    batch = ex.explain(x, top_k=3, method=method, batch_size=4)
    for i in range(len(x)):
        single = ex.explain(x[i:i + 1], top_k=3, method=method)
        np.testing.assert_allclose(single.maps[0], batch.maps[i], rtol=1e-5, atol=1e-7)
    g = ex.gradients(x, top_k=3)
    assert g.gradients.shape == (len(x), 3, *g.features.shape[1:]) and g.layout == "NCHW"
    np.testing.assert_array_equal(g.classes, batch.classes)
    expected = GRADIENT_METHODS[method](g.features, g.gradients)
    np.testing.assert_allclose(batch.maps, expected, rtol=1e-5, atol=1e-7)


def test_method_validation(backend_name):
    zm = REFUSED["mlp_head"]()
    ex = _load(zm, backend_name)
    with pytest.raises(InvalidInput, match="method must be one of .*'gradcam'.*got 'grad-cam'"):
        ex.explain(zm.random_input(0), method="grad-cam")
    with pytest.raises(NotCamCompatible, match="Relu"):
        ex.explain_images([np.zeros((8, 8, 3), np.uint8)], method="cam")
    [result] = ex.explain_images([np.zeros((12, 9, 3), np.uint8)], method="layercam", top_k=2)
    assert result.method == "layercam" and result.cams.shape == (2, 8, 8)


CONFIGS = {
    "top1": dict(top_k=1),
    "top3_resized": dict(top_k=3, size=(13, 11)),
    "top2_raw": dict(top_k=2, normalize=False),
}


def test_fused_gradient_graphs_match_numpy_without_camcore(tmp_path):
    """Every gradient method, fused for models CAM refuses and for NCHW/NHWC and dynamic shapes."""
    names = ["global_max_pool", "conv_hardswish_after_pool", "mlp_head", "nhwc_reducemean", "dynamic_batch_hw"]
    jobs, expected = {}, {}
    for name in names:
        zm = (REFUSED.get(name) or CASES[name])()
        ex = _load(zm)
        feeds = [{zm.input_name: zm.random_input(s, shape)} for s, shape in
                 enumerate((zm.input_shape, *zm.other_input_shapes[:1]))]
        for method in GRADIENT_METHODS:
            for config, kw in CONFIGS.items():
                fused = camcore.fuse(zm.model, method=method, **kw)
                onnx.checker.check_model(fused, full_check=True)
                key = f"{name}:{method}:{config}"
                jobs[key] = (fused, feeds)
                expected[key] = [reference(ex, feed[zm.input_name], method=method, **kw) for feed in feeds]
    results = run_plain(tmp_path, jobs)
    for key, outs in results.items():
        for out, (e, maps) in zip(outs, expected[key]):
            np.testing.assert_array_equal(out["cam_classes"], e.classes, err_msg=key)
            np.testing.assert_allclose(out["cam_scores"], e.scores, rtol=1e-5, err_msg=key)
            scale = 1.0 if "raw" not in key else max(float(np.abs(maps).max()), 1e-12)
            np.testing.assert_allclose(out["cam_maps"], maps, atol=1e-4 * scale, err_msg=key)


def test_fuse_auto_uses_gradcam_where_cam_is_refused():
    zm = REFUSED["global_max_pool"]()
    names = {n.name for n in camcore.fuse(zm.model).graph.node}
    assert any(n.startswith("cam_grad_") for n in names)
    names = {n.name for n in camcore.fuse(CASES["gap_gemm"]().model).graph.node}
    assert not any(n.startswith("cam_grad_") for n in names)
