"""Gradient rules of the int8 ops (backends/backprop/quantization.py) on tiny graphs.

Oracle: central finite differences of the unrounded function the clipped straight-through
estimator differentiates (``clip(x, lo, hi)`` for a QDQ pair, the float product with the
dequantized weights for MatMulInteger/ConvInteger), where it is exact: inside the range.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.backprop import add_backward
from camcore.errors import NotCamCompatible

OPSET = [helper.make_opsetid("", 17)]
RANGES = {TensorProto.UINT8: (0, 255, np.uint8), TensorProto.INT8: (-128, 127, np.int8)}


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _grad(model, wrt, of, x, seed):
    m = add_backward(model, wrt, of)
    return _run(m, {wrt: x, "cam_seed": seed})[-1]


def _fd(f, x, eps=1e-3):
    """Central differences of sum(seed * f(x)) are taken by the caller; here: J^T seed per entry."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        grad.reshape(-1)[i] = (f(up.reshape(x.shape)) - f(down.reshape(x.shape))) / (2 * eps)
    return grad


@pytest.mark.parametrize("elem", sorted(RANGES))
@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (3, 4)])
def test_qdq_pair_is_the_clipped_straight_through_estimator(elem, per_axis, shape):
    qmin, qmax, zdtype = RANGES[elem]
    rng = np.random.default_rng(len(shape) + per_axis)
    channels = shape[1]
    scale = (rng.uniform(0.02, 0.05, channels) if per_axis else np.array(0.03)).astype(np.float32)
    zero = (np.full(channels, 10) if per_axis else np.array(10)).astype(zdtype)
    weight = rng.standard_normal(shape).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=1),
             helper.make_node("Mul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z"),
                               numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=OPSET)
    s = scale.reshape(-1, *[1] * (len(shape) - 2)) if per_axis else scale
    lo, hi = (qmin - 10) * s, (qmax - 10) * s
    # Values inside the range (away from its ends), and some well outside.
    x = rng.uniform(-1, 1, shape).astype(np.float32) * (hi - lo) * 0.45 + (hi + lo) / 2
    outside = rng.random(shape) < 0.3
    x = np.where(outside, np.where(rng.random(shape) < 0.5, lo - 1.0, hi + 1.0), x).astype(np.float32)
    seed = rng.standard_normal(shape).astype(np.float32)
    got = _grad(model, "x", "y", x, seed)

    def unrounded(v):  # what the estimator differentiates: the clip, no rounding
        return float(np.sum(seed * np.clip(v, lo, hi) * weight))

    expected = _fd(unrounded, x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.all(got[outside] == 0) and np.all(got[~outside] != 0)


def _dynamic_matmul_model(w_q, w_scale, w_zero, bias):
    k, c = w_q.shape
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["scale"]),
             helper.make_node("Mul", ["accf", "scale"], ["prod"]),
             helper.make_node("Add", ["prod", "b"], ["y"])]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, c])],
                              [numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(w_scale, "ws"),
                               numpy_helper.from_array(w_zero, "wz"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.mark.parametrize("k,c", [(4, 3), (7, 5)])
def test_dynamic_quantize_and_matmul_integer(k, c):
    rng = np.random.default_rng(k)
    w_q = rng.integers(-100, 100, (k, c)).astype(np.int8)
    w_scale, w_zero = np.float32(0.01), np.int8(3)
    bias = rng.standard_normal(c).astype(np.float32)
    model = _dynamic_matmul_model(w_q, w_scale, w_zero, bias)
    x = rng.standard_normal((3, k)).astype(np.float32)
    seed = rng.standard_normal((3, c)).astype(np.float32)
    got = _grad(model, "x", "y", x, seed)
    w_dq = (w_q.astype(np.float64) - float(w_zero)) * float(w_scale)
    expected = _fd(lambda v: float(np.sum(seed * (v @ w_dq + bias))), x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pads,group", [((0, 0, 0, 0), 1), ((1, 1, 1, 1), 1), ((1, 1, 1, 1), 2)])
def test_conv_integer(pads, group):
    rng = np.random.default_rng(sum(pads) + group)
    cin, cout, size = 2, 4, 5
    w_q = rng.integers(0, 255, (cout, cin // group, 3, 3)).astype(np.uint8)
    w_zero = np.uint8(rng.integers(100, 150))  # onnxruntime's ConvInteger takes a per-tensor zero point
    w_scale = np.float32(0.02)
    x_zero = np.uint8(7)
    nodes = [helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], pads=list(pads), group=group),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "ws"], ["y"])]
    # The uint8 input comes from a DynamicQuantizeLinear-free QuantizeLinear of a float x.
    nodes.insert(0, helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]))
    graph = helper.make_graph(nodes, "convint",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(w_zero, "wz"),
                               numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(x_zero, "xz"),
                               numpy_helper.from_array(np.float32(1.0), "xs")])
    model = helper.make_model(graph, opset_imports=OPSET)
    x = rng.uniform(0, 100, (1, cin, size, size)).astype(np.float32)  # inside the uint8 range
    y = _run(model, {"x": x})[0]
    seed = rng.standard_normal(y.shape).astype(np.float32)
    got = _grad(model, "x", "y", x, seed)
    # Oracle: the float Conv with dequantized weights (y = conv(x, w_dq) with x_scale 1), by differences.
    w_dq = (w_q.astype(np.float32) - np.float32(w_zero)) * w_scale
    float_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=list(pads), group=group)],
                                    "conv", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, x.shape)],
                                    [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                                    [numpy_helper.from_array(w_dq.astype(np.float64), "w")])
    from onnx.reference import ReferenceEvaluator

    conv = ReferenceEvaluator(helper.make_model(float_graph, opset_imports=OPSET))
    expected = _fd(lambda v: float(np.sum(seed * conv.run(None, {"x": v})[0])), x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_block_quantization_is_refused_naming_the_op():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, block_size=2),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=2)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.full((2, 2), 0.1, np.float32), "s"),
                               numpy_helper.from_array(np.zeros((2, 2), np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(NotCamCompatible, match="DequantizeLinear .*block_size"):
        add_backward(model, "x", "y")


def test_fused_integer_kernel_is_refused_in_one_line_naming_the_methods_without_gradient():
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "xs", "ws", "xz"], ["y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.ones((3, 4), np.int8), "w"),
                               numpy_helper.from_array(np.float32(0.1), "ws")])
    model = helper.make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(NotCamCompatible) as info:
        add_backward(model, "x", "y")
    message = str(info.value)
    assert "\n" not in message
    assert "MatMulIntegerToFloat" in message
    assert "eigencam, ablationcam, scorecam, reciprocam" in message
