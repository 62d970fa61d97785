"""The graph forms a deployed vision transformer adds, on tiny onnx.helper models run by onnxruntime:
QLinearSoftmax written as DQ -> Softmax -> Q, FusedMatMul and SkipLayerNormalization unfused, and
float16 reducing scatters computed in float32.  Each rewritten graph must compute what the original does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends import contrib_ops, precision, quant_graph


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("shape", [(1, 2, 5, 5), (2, 3, 17, 17)])
def test_qlinear_softmax_as_qdq_gives_the_same_probabilities(shape):
    scale_x, scale_y = np.float32(0.05), np.float32(1 / 256)
    inits = [numpy_helper.from_array(scale_x, "sx"), numpy_helper.from_array(np.uint8(128), "zx"),
             numpy_helper.from_array(scale_y, "sy"), numpy_helper.from_array(np.uint8(0), "zy")]
    node = helper.make_node("QLinearSoftmax", ["x", "sx", "zx", "sy", "zy"], ["y"], domain="com.microsoft",
                            axis=-1, opset=13)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)], inits)
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    rewritten = quant_graph.qoperator_as_qdq(model)
    assert "Softmax" in [n.op_type for n in rewritten.graph.node]
    want, got = _run(model, {"x": x})[0], _run(rewritten, {"x": x})[0]
    assert np.abs(want.astype(int) - got.astype(int)).max() <= 1  # one int8 step (rounding ties)
    assert got.astype(np.float64).sum(-1).mean() * scale_y == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fused_matmul_and_skip_layer_norm_unfused_compute_the_same(trans_b):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 3, 4, 5) if trans_b else (2, 3, 5, 4)).astype(np.float32)
    skip = rng.standard_normal((2, 12, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"gamma": rng.standard_normal(4).astype(np.float32), "beta": rng.standard_normal(4).astype(np.float32),
              "bias": rng.standard_normal(4).astype(np.float32), "shape": np.array([2, 12, 4], np.int64)}.items()]
    nodes = [
        helper.make_node("FusedMatMul", ["a", "b"], ["p"], domain="com.microsoft", alpha=0.25, transB=trans_b),
        helper.make_node("Reshape", ["p", "shape"], ["p3"]),
        helper.make_node("SkipLayerNormalization", ["p3", "skip", "gamma", "beta", "bias"], ["y", "", "", "sum"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("Add", ["y", "sum"], ["out"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape) for n, v in (("a", a), ("b", b), ("skip", skip))]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    feed = {"a": a, "b": b, "skip": skip}
    unfused = contrib_ops.as_standard_ops(model)
    assert all(n.domain in ("", "ai.onnx") for n in unfused.graph.node)
    np.testing.assert_allclose(_run(unfused, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_float16_scatter_add_runs_in_float32():
    data = helper.make_tensor_value_info("d", TensorProto.FLOAT16, [4])
    updates = helper.make_tensor_value_info("u", TensorProto.FLOAT16, [3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])
    index = numpy_helper.from_array(np.array([0, 0, 2], np.int64), "i")
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], reduction="add")
    model = _model([node], [data, updates], [out], [index], opset=18)
    d, u = np.array([1, 2, 3, 4], np.float16), np.array([0.5, 0.25, 1], np.float16)
    with pytest.raises(Exception):  # the CPU provider has no float16 reducing scatter
        _run(model, {"d": d, "u": u})
    got = _run(precision.float32_scatter_adds(model), {"d": d, "u": u})[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.array([1.75, 2, 4, 4], np.float16))
