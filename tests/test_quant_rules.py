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


def _qparams(values, margin=0.1):
    """uint8 scale and zero point covering `values` with a margin (as a MinMax calibration would)."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
    scale = (hi - lo) / 255
    return np.float32(scale), np.uint8(round(-lo / scale))


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _qoperator_attention(x, w_q, w_scale, heads, unpack):
    """A QOperator self-attention block as onnxruntime's quantizer writes a TorchScript ViT's:
    the fused QKV product on uint8, unpacked into queries, keys and values by integer
    Reshape/Split/Squeeze/Transpose (or Gather, or Slice), QLinearMatMul and QLinearSoftmax,
    then a float residual ``y = DQ(attention) + x``.  Returns the model and the float
    function it rounds (dequantized weights, no clipping inside the calibrated ranges)."""
    _, t, c = x.shape
    d = c // heads
    w_dq = w_q.astype(np.float64) * float(w_scale)

    def split_heads(a):  # (1, T, C) -> (1, H, T, D)
        return a.reshape(1, t, heads, d).transpose(0, 2, 1, 3)

    def float_parts(v):
        qkv = v @ w_dq
        q, k, vv = (split_heads(qkv[..., i * c:(i + 1) * c]) for i in range(3))
        scores = q @ k.transpose(0, 1, 3, 2)
        probs = _softmax(scores)
        ctx = probs @ vv
        return qkv, scores, probs, ctx, ctx.transpose(0, 2, 1, 3).reshape(1, t, c)

    qkv, scores, probs, ctx, _ = float_parts(x.astype(np.float64))
    params = {"x": _qparams(x), "qkv": _qparams(qkv), "s": _qparams(scores), "p": _qparams(probs),
              "o": _qparams(ctx)}
    inits = [numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(np.float32(w_scale), "ws"),
             numpy_helper.from_array(np.int8(0), "wz"),
             numpy_helper.from_array(np.array([1, t, c], np.int64), "out_shape")]
    axis2 = numpy_helper.from_array(np.array([2], np.int64), "axis2")
    qkv_shape = numpy_helper.from_array(np.array([1, t, 3, heads, d], np.int64), "qkv_shape")
    for name, (scale, zero) in params.items():
        inits += [numpy_helper.from_array(scale, f"{name}_s"), numpy_helper.from_array(zero, f"{name}_z")]
    q = [f"{n}_{k}" for n in ("x", "qkv") for k in ("s", "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "x_s", "x_z", "w", "ws", "wz", "qkv_s", "qkv_z"], ["qkv"])]
    if unpack == "split":  # onnxruntime's optimizer turns the unbind into Split -> Squeeze
        inits += [axis2, qkv_shape]
        nodes += [helper.make_node("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
                  helper.make_node("Split", ["qkv5"], ["q5", "k5", "v5"], axis=2)]
        for n in "qkv":
            nodes += [helper.make_node("Squeeze", [f"{n}5", "axis2"], [f"{n}4"]),
                      helper.make_node("Transpose", [f"{n}4"], [f"{n}h"], perm=[0, 2, 1, 3])]
    elif unpack == "gather":  # torch's unbind as exported: a Gather per part
        inits.append(qkv_shape)
        nodes += [helper.make_node("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
                  helper.make_node("Transpose", ["qkv5"], ["qkvt"], perm=[2, 0, 3, 1, 4])]
        for i, n in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{n}"))
            nodes.append(helper.make_node("Gather", ["qkvt", f"i{n}"], [f"{n}h"], axis=0))
    else:  # slices of the fused product
        inits += [axis2, numpy_helper.from_array(np.array([1, t, heads, d], np.int64), "head_shape")]
        for i, n in enumerate("qkv"):
            inits += [numpy_helper.from_array(np.array([i * c], np.int64), f"b{n}"),
                      numpy_helper.from_array(np.array([(i + 1) * c], np.int64), f"e{n}")]
            nodes += [helper.make_node("Slice", ["qkv", f"b{n}", f"e{n}", "axis2"], [f"{n}3"]),
                      helper.make_node("Reshape", [f"{n}3", "head_shape"], [f"{n}4"]),
                      helper.make_node("Transpose", [f"{n}4"], [f"{n}h"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("QLinearMatMul", ["qh", *q[2:], "kt", *q[2:], "s_s", "s_z"], ["scores"]),
              helper.make_node("QLinearSoftmax", ["scores", "s_s", "s_z", "p_s", "p_z"], ["probs"],
                               domain="com.microsoft", axis=-1, opset=13),
              helper.make_node("QLinearMatMul", ["probs", "p_s", "p_z", "vh", *q[2:], "o_s", "o_z"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", "out_shape"], ["outq"]),
              helper.make_node("DequantizeLinear", ["outq", "o_s", "o_z"], ["out"]),
              helper.make_node("Add", ["out", "x"], ["y"])]
    graph = helper.make_graph(nodes, "qop_attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.microsoft", 1)])
    return model, lambda v: float_parts(v)[-1] + v


@pytest.mark.parametrize("unpack", ["split", "gather", "slice"])
@pytest.mark.parametrize("heads", [1, 2])
def test_gradient_reaches_keys_and_values_through_integer_moves_of_a_qoperator_attention(unpack, heads):
    """QOperator transformers move the fused QKV product's uint8 values (Reshape, Split, Gather,
    Slice, Squeeze, Transpose) between QLinear ops: the gradient must flow through them, or
    every token but the one the head reads gets only its residual gradient (all-zero Grad-CAM
    maps on QOperator timm ViTs).  Oracle: finite differences of the float function rounded."""
    from backends import quant_graph

    rng = np.random.default_rng(heads * 7 + ("split", "gather", "slice").index(unpack))
    t, c = 5, 4
    x = rng.standard_normal((1, t, c)).astype(np.float32)
    w_q = rng.integers(-127, 128, (c, 3 * c)).astype(np.int8)
    model, f = _qoperator_attention(x, w_q, 0.01, heads, unpack)
    runnable = quant_graph.runnable(model)
    assert "QLinearMatMul" not in {n.op_type for n in runnable.graph.node}
    # The rewritten graph computes what the deployed one does, up to rounding.
    deployed, = _run(model, {"x": x})
    np.testing.assert_allclose(_run(runnable, {"x": x})[0], deployed, atol=0.02)
    seed = np.zeros((1, t, c), np.float32)
    seed[0, 0] = rng.standard_normal(c)  # the first token only, as a CLS head reads it
    got = _grad(runnable, "x", "y", x, seed)
    expected = _fd(lambda v: float(np.sum(seed * f(v))), x.astype(np.float64), eps=1e-4)
    # The attention path: every token, not only the seeded one through the residual.
    assert np.abs(expected[0, 1:]).max() > 0.05
    # The estimator differentiates at the rounded operands (int8 steps): a few % of the scale.
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * np.abs(expected).max())
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
@pytest.mark.parametrize("k,classes", [(4, 3), (6, 5)])
def test_gradient_passes_the_saturated_output_pairs_of_two_summed_heads(form, k, classes):
    """DeiT with its teacher: ``logits = DQ(Q(DQ(Q(head)) + DQ(Q(head_dist)))) / 2`` (QOperator: a
    QLinearAdd of the two quantized heads).  Each pair only rounds and saturates the reported
    logits; the gradient is taken through them, exactly ``seed @ (W1 + W2) / 2``, also for the
    classes the pairs' calibrated ranges clip (there the pairs' own gradient is zero)."""
    from backends import quant_graph

    rng = np.random.default_rng(k + classes + len(form))
    w1, w2 = (rng.standard_normal((classes, k)).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((3, k)).astype(np.float32)
    h1, h2 = x @ w1.T, x @ w2.T
    # Ranges covering half of each tensor's span: its largest values saturate.
    params = {n: _qparams(v * 0.5, margin=0.0) for n, v in (("h1", h1), ("h2", h2), ("s", h1 + h2))}
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.float32(2), "two")]
    for name, (scale, zero) in params.items():
        inits += [numpy_helper.from_array(scale, f"{name}_s"), numpy_helper.from_array(zero, f"{name}_z")]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], transB=1), helper.make_node("Gemm", ["x", "w2"], ["h2"], transB=1),
             helper.make_node("QuantizeLinear", ["h1", "h1_s", "h1_z"], ["h1q"]),
             helper.make_node("QuantizeLinear", ["h2", "h2_s", "h2_z"], ["h2q"])]
    if form == "qdq":
        nodes += [helper.make_node("DequantizeLinear", ["h1q", "h1_s", "h1_z"], ["h1d"]),
                  helper.make_node("DequantizeLinear", ["h2q", "h2_s", "h2_z"], ["h2d"]),
                  helper.make_node("Add", ["h1d", "h2d"], ["s"]),
                  helper.make_node("QuantizeLinear", ["s", "s_s", "s_z"], ["sq"])]
    else:
        nodes.append(helper.make_node("QLinearAdd", ["h1q", "h1_s", "h1_z", "h2q", "h2_s", "h2_z", "s_s", "s_z"], ["sq"],
                                      domain="com.microsoft"))
    nodes += [helper.make_node("DequantizeLinear", ["sq", "s_s", "s_z"], ["sd"]),
              helper.make_node("Div", ["sd", "two"], ["logits"])]
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = quant_graph.runnable(helper.make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.microsoft", 1)]))
    seed = np.eye(classes, dtype=np.float32)[np.argmax(h1 + h2, 1)]  # each row's top class: saturated
    bypassed, of = quant_graph.output_quantization_bypassed(model, "logits")
    got = _grad(bypassed, "x", of, x, seed)
    np.testing.assert_allclose(got, seed @ (w1 + w2) / 2, rtol=1e-5, atol=1e-6)
    # Through the pairs themselves the clipped estimator stops it for some rows' top class.
    stopped = np.all(_grad(model, "x", "logits", x, seed) == 0, axis=1)
    assert stopped.any() and np.all(got[stopped] != 0)
