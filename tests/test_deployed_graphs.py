"""Graph forms of deployed models that must load, on tiny models built with onnx.helper.

- shape-only head inputs behind a chain of nodes (a normalization in front, a float16 model's
  input Cast);
- fused ``com.microsoft`` nodes without types (onnxruntime's offline optimization);
- whole-map pooling written with a huge kernel and ``ceil_mode`` (dynamo's HF EfficientNet);
- uint8 NHWC inputs with the preprocessing in the graph;
- float16 heads whose backward pass needs ops onnxruntime lacks in float16.

Ground truth comes from the builders' own weights (NumPy), so every CAM is checked exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import camcore
from backends import onnx_graph, precision
from backends.contrib_ops import as_standard_ops, complete_types
from camcore.preprocess import Preprocess

K, C, IN = 6, 4, 3
MEAN = np.array([0.4, 0.5, 0.6], np.float32)
STD = np.array([0.2, 0.25, 0.3], np.float32)


def _rng(seed=0):
    return np.random.default_rng(seed)


class _Builder:
    def __init__(self, seed=0):
        self.nodes, self.inits, self.rng, self.count = [], [], _rng(seed), 0

    def const(self, value, name=None):
        self.count += 1
        name = name or f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, **attrs):
        self.count += 1
        out = f"t{self.count}_{op}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{self.count}_{op}", **attrs))
        return out

    def model(self, inputs, outputs, opset=17):
        graph = helper.make_graph(self.nodes, "tiny", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _classifier(b: _Builder, x: str, *, pool: str = "gap", shape_of: str | None = None):
    """Conv -> Relu -> (pooling) -> Reshape by a computed shape -> Gemm: ``(feature, logits, W, bias)``.

    With `shape_of`, the Reshape's batch size is read by Shape from that tensor (exporters
    do this with the input, or whatever tensor precedes it).
    """
    conv_w = b.rng.standard_normal((K, IN, 3, 3)).astype(np.float32) * 0.5
    feature = b.node("Relu", [b.node("Conv", [x, b.const(conv_w)], pads=[1, 1, 1, 1])])
    if pool == "gap":
        pooled = b.node("GlobalAveragePool", [feature])
    else:  # dynamo's HF EfficientNet: one 640-wide window, cut at the map's end
        pooled = b.node("AveragePool", [feature], kernel_shape=[640, 640], strides=[640, 640], ceil_mode=1,
                        count_include_pad=1)
    source = shape_of or pooled
    batch = b.node("Gather", [b.node("Shape", [source]), b.const(np.array([0], np.int64))], axis=0)
    flat = b.node("Reshape", [pooled, b.node("Concat", [batch, b.const(np.array([-1], np.int64))], axis=0)])
    weights = b.rng.standard_normal((C, K)).astype(np.float32)
    bias = b.rng.standard_normal(C).astype(np.float32)
    logits = b.node("Gemm", [flat, b.const(weights), b.const(bias)], transB=1)
    return feature, logits, weights, bias


def _check_cam(explainer, x, weights, bias, logits_of):
    out = explainer.explain(x, classes=np.arange(C), method="cam")
    np.testing.assert_allclose(explainer.head.weights, weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(explainer.head.bias, bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.maps.mean(axis=(-2, -1)) + bias, logits_of(x), rtol=1e-4, atol=1e-4)
    return out


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


# --------------------------------------------------------------------------- shape-only chains


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_normalization_in_front_of_a_shape_read(hw):
    """Sub/Div in front, and the head's Reshape reads Shape(normalized input): CAM, exactly."""
    b = _Builder(1)
    normalized = b.node("Div", [b.node("Sub", ["pixels", b.const(MEAN.reshape(1, 3, 1, 1))]),
                                b.const(STD.reshape(1, 3, 1, 1))])
    _, logits, weights, bias = _classifier(b, normalized, shape_of=normalized)
    model = b.model([helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, *hw])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    explainer = camcore.load(model)
    assert explainer.head.affine
    x = _rng(2).random((3, 3, *hw)).astype(np.float32)
    _check_cam(explainer, x, weights, bias, lambda v: _run(model, {"pixels": v}))


def test_shape_only_frontier_is_the_tensor_read():
    b = _Builder(1)
    cast = b.node("Cast", ["input"], to=TensorProto.FLOAT)
    _, logits, _, _ = _classifier(b, cast, shape_of=cast)
    model = b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    g = onnx_graph._Graph.build(model)
    pooled = next(n.output[0] for n in model.graph.node if n.op_type == "GlobalAveragePool")
    assert onnx_graph._shape_frontier(g, pooled, logits) == [cast]


def test_float16_keep_io_types_model():
    """float16 inside, float32 at both ends: the input Cast sits between the input and the Shape."""
    b = _Builder(3)
    half = b.node("Cast", ["input"], to=TensorProto.FLOAT16)
    conv_w = b.rng.standard_normal((K, IN, 3, 3)).astype(np.float16)
    feature = b.node("Relu", [b.node("Conv", [half, b.const(conv_w)], pads=[1, 1, 1, 1])])
    pooled = b.node("GlobalAveragePool", [feature])
    batch = b.node("Gather", [b.node("Shape", [half]), b.const(np.array([0], np.int64))], axis=0)
    flat = b.node("Reshape", [pooled, b.node("Concat", [batch, b.const(np.array([-1], np.int64))], axis=0)])
    weights = b.rng.standard_normal((C, K)).astype(np.float16)
    bias = b.rng.standard_normal(C).astype(np.float16)
    logits = b.node("Cast", [b.node("Gemm", [flat, b.const(weights), b.const(bias)], transB=1)],
                    to=TensorProto.FLOAT)
    model = b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    explainer = camcore.load(model)
    assert explainer.head.affine and explainer.head.feature == feature
    x = _rng(4).random((2, 3, 8, 8)).astype(np.float32)
    out = explainer.explain(x, classes=np.arange(C), method="cam")
    np.testing.assert_allclose(explainer.head.weights, weights.astype(np.float32), rtol=1e-3)
    # float16 features and logits: the CAM identity within float16's rounding of the logits
    np.testing.assert_allclose(out.maps.mean(axis=(-2, -1)) + bias.astype(np.float32), _run(model, {"input": x}),
                               rtol=5e-3, atol=5e-3)
    grads = explainer.explain(x, method="gradcam")  # the float16 head's backward pass, run in float32
    assert grads.method == "gradcam" and np.all(np.isfinite(grads.maps))


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("hw, size", [((7, 7), (7, 7)), ((5, 9), (5, 9)), (("H", "W"), (6, 11))])
def test_ceil_mode_pool_with_a_huge_kernel_is_global_and_cam_is_exact(hw, size):
    """Also with a map of unknown size (Hugging Face's optimum export has dynamic height and width)."""
    b = _Builder(5)
    feature, logits, weights, bias = _classifier(b, "x", pool="ceil")
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *hw])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    explainer = camcore.load(model)
    head = explainer.head
    assert head.affine and head.pooling == "AveragePool" and head.feature == feature
    where = f"{hw[0]}x{hw[1]} map" if isinstance(hw[0], int) else "map"
    assert f"over the whole {where}" in head.pooling_detail
    x = _rng(6).standard_normal((2, 3, *size)).astype(np.float32)
    out = _check_cam(explainer, x, weights, bias, lambda v: _run(model, {"x": v}))
    assert out.maps.shape == (2, C, *size)


def test_ceil_mode_pool_with_two_windows_is_local():
    b = _Builder(5)
    feature = b.node("Relu", ["x"])
    pooled = b.node("AveragePool", [feature], kernel_shape=[4, 4], strides=[4, 4], ceil_mode=1)  # 7 -> 2 windows
    logits = b.node("Flatten", [pooled])
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 7])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, 12])])
    g = onnx_graph._Graph.build(model)
    assert onnx_graph._window_pool(g, model.graph.node[1]) is None


# --------------------------------------------------------------------------- fused com.microsoft ops


def _offline(model, tmp_path, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(tmp_path / f"{level}.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / f"{level}.onnx"))


def test_offline_optimized_model_with_fused_nodes(tmp_path):
    """ORT_ENABLE_EXTENDED fuses Conv+Relu into com.microsoft.FusedConv and writes no types."""
    b = _Builder(7)
    feature, logits, weights, bias = _classifier(b, "x")
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    optimized = _offline(model, tmp_path, "ORT_ENABLE_EXTENDED")
    assert any(n.domain == "com.microsoft" for n in optimized.graph.node)
    fused = next(n for n in optimized.graph.node if n.domain == "com.microsoft")
    untyped = {vi.name for vi in onnx.shape_inference.infer_shapes(optimized).graph.value_info}
    assert fused.output[0] not in untyped  # onnx's own inference cannot type it
    completed = complete_types(optimized)
    typed = {vi.name: vi for vi in completed.graph.value_info}
    assert typed[fused.output[0]].type.tensor_type.elem_type == TensorProto.FLOAT
    assert len(typed[fused.output[0]].type.tensor_type.shape.dim) == 4
    assert complete_types(model) is model  # plain ONNX: untouched

    explainer = camcore.load(tmp_path / "ORT_ENABLE_EXTENDED.onnx")
    x = _rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _check_cam(explainer, x, weights, bias, lambda v: _run(model, {"x": v}))
    grads = explainer.explain(x, method="gradcam")
    reference = camcore.load(model).explain(x, method="gradcam")
    np.testing.assert_allclose(grads.maps, reference.maps, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pixels in, preprocessing inside


def _uint8_nhwc_model(hw, seed=9):
    """uint8 NHWC pixels -> Cast -> Sub -> Div -> Transpose -> the float NCHW classifier (and that one alone)."""
    b = _Builder(seed)
    f = b.node("Cast", ["pixels"], to=TensorProto.FLOAT)
    f = b.node("Div", [b.node("Sub", [f, b.const(MEAN * 255)]), b.const(STD * 255)])
    nchw = b.node("Transpose", [f], perm=[0, 3, 1, 2])
    _, logits, weights, bias = _classifier(b, nchw, shape_of=nchw)
    deployed = b.model([helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", *hw, 3])],
                       [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    b2 = _Builder(seed)
    _, logits2, _, _ = _classifier(b2, "x")
    plain = b2.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *hw])],
                     [helper.make_tensor_value_info(logits2, TensorProto.FLOAT, ["N", C])])
    return deployed, plain, weights, bias


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_uint8_nhwc_input_is_fed_pixels(hw):
    deployed, plain, weights, bias = _uint8_nhwc_model(hw)
    explainer = camcore.load(deployed)
    assert explainer.head.affine and explainer.input_layout == "NHWC"
    assert explainer.head.input.dtype == np.uint8
    rng = _rng(10)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), rng.integers(0, 256, (25, 25), dtype=np.uint8)]
    host = Preprocess(hw, mean=MEAN, std=STD)  # what the float model needs on the host
    results = explainer.explain_images(images, preprocess=host, top_k=2)
    reference = camcore.load(plain).explain_images(images, preprocess=host, top_k=2)
    for got, want in zip(results, reference):
        np.testing.assert_array_equal(got.classes, want.classes)
        np.testing.assert_allclose(got.cams, want.cams, rtol=1e-4, atol=1e-5)
        assert got.size == want.size and [b.tolist() for b in got.boxes] == [b.tolist() for b in want.boxes]
    # the pixels fed: the uint8 resize, no normalization
    x, _ = host.batch(images[:1], layout="NHWC", dtype=np.uint8)
    assert x.dtype == np.uint8 and x.shape == (1, *hw, 3)
    raw, _ = Preprocess(hw, mean=0, std=1, scale=1)(images[0])
    np.testing.assert_array_equal(x[0], raw)
    _check_cam(explainer, x, weights, bias, lambda v: _run(deployed, {"pixels": v}))


def test_uint16_image_into_a_uint8_model_is_rescaled():
    deployed, _, _, _ = _uint8_nhwc_model((16, 16))
    explainer = camcore.load(deployed)
    image = _rng(11).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    same_size = Preprocess((16, 16))  # no resize: the pixels themselves are fed
    a, b = explainer.explain_images([image, image.astype(np.uint16) * 257], top_k=1, preprocess=same_size)
    np.testing.assert_allclose(a.cams, b.cams, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- float16 backward in float32


def test_as_float32_keeps_the_function():
    b = _Builder(12)
    half = b.node("Cast", ["x"], to=TensorProto.FLOAT16)
    y = b.node("Mul", [half, b.const(np.array([0.5, 2, -1], np.float16))])
    z = b.node("Add", [y, b.node("ConstantOfShape", [b.const(np.array([3], np.int64))],
                                 value=numpy_helper.from_array(np.array([1.0], np.float16)))])
    out = b.node("Cast", [z], to=TensorProto.FLOAT)
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                    [helper.make_tensor_value_info(out, TensorProto.FLOAT, [3])])
    assert precision.has_float16(model)
    upcast = precision.as_float32(model)
    assert not precision.has_float16(upcast)
    x = np.array([1.5, -2.25, 4.0], np.float32)
    np.testing.assert_array_equal(_run(upcast, {"x": x}), _run(model, {"x": x}))
    assert precision.has_float16(model)  # the input model is not modified


@pytest.mark.parametrize("activation, params", [
    ("Relu", []), ("Sigmoid", []), ("Tanh", []), ("LeakyRelu", [0.1]), ("HardSigmoid", [0.3, 0.4]),
    ("Clip", [-0.5, 0.7]),
])
@pytest.mark.parametrize("with_sum", [False, True])
def test_as_standard_ops_fused_conv(activation, params, with_sum):
    rng = _rng(13)
    inputs = ["x", "w", "b"] + (["z"] if with_sum else [])
    extra = {"activation_params": params} if params else {}
    node = helper.make_node("FusedConv", inputs, ["y"], domain="com.microsoft", activation=activation,
                            pads=[1, 1, 1, 1], strides=[2, 1], **extra)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 5])]
    if with_sum:
        graph_inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4, 3, 5]))
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    standard = as_standard_ops(model)
    assert all(n.domain == "" for n in standard.graph.node)
    feed = {"x": rng.standard_normal((2, 3, 6, 5)).astype(np.float32)}
    if with_sum:
        feed["z"] = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(standard, feed), _run(model, feed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, attrs", [
    ("FusedGemm", {"activation": "LeakyRelu", "activation_alpha": 0.2, "transB": 1, "alpha": 0.5}),
    ("FusedGemm", {"activation": "Relu"}),
    ("QuickGelu", {"alpha": 1.5}),
    ("Gelu", {}),
    ("BiasGelu", {}),
])
def test_as_standard_ops_other_fused_nodes(op, attrs):
    rng = _rng(14)
    if op == "FusedGemm":
        w = rng.standard_normal((4, 5) if attrs.get("transB") else (5, 4)).astype(np.float32)
        inputs, inits = ["x", "w", "c"], [numpy_helper.from_array(w, "w"),
                                          numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "c")]
    elif op == "BiasGelu":
        inputs, inits = ["x", "bias"], [numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bias")]
    else:
        inputs, inits = ["x"], []
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    standard = as_standard_ops(model)
    assert all(n.domain == "" for n in standard.graph.node)
    x = rng.standard_normal((3, 5)).astype(np.float32) * 2
    np.testing.assert_allclose(_run(standard, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-5)


def test_unknown_fused_activation_is_kept():
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", activation="Softsign")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")])
    assert [n.op_type for n in as_standard_ops(helper.make_model(graph)).graph.node] == ["FusedConv"]


def test_gradients_through_a_fused_head(tmp_path):
    """A MobileNetV3-like head (pooling, 1x1 Conv + Relu, Gemm) fused by ORT_ENABLE_EXTENDED: Grad-CAM as the source's."""
    b = _Builder(15)
    conv_w = b.rng.standard_normal((K, IN, 3, 3)).astype(np.float32)
    feature = b.node("Relu", [b.node("Conv", ["x", b.const(conv_w)], pads=[1, 1, 1, 1])])
    pooled = b.node("GlobalAveragePool", [feature])
    head_w = b.rng.standard_normal((8, K, 1, 1)).astype(np.float32)
    hidden = b.node("Relu", [b.node("Conv", [pooled, b.const(head_w), b.const(np.ones(8, np.float32) * 0.1)])])
    logits = b.node("Gemm", [b.node("Flatten", [hidden]), b.const(b.rng.standard_normal((C, 8)).astype(np.float32))],
                    transB=1)
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                    [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", C])])
    optimized = _offline(model, tmp_path, "ORT_ENABLE_EXTENDED")
    fused = [n for n in optimized.graph.node if n.op_type == "FusedConv"]
    assert len(fused) == 2  # the backbone's and the head's
    x = _rng(16).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = camcore.load(tmp_path / "ORT_ENABLE_EXTENDED.onnx").explain(x, classes=np.arange(C))
    want = camcore.load(model).explain(x, classes=np.arange(C))
    assert got.method == want.method == "gradcam"
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)


def test_complete_types_leaves_unknown_domains_alone():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="org.example")
    after = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph([node, after], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)])
    assert complete_types(model) is model
