"""The fixture zoo is right: every model is valid ONNX, runs under onnxruntime, and its
recorded ground truth (feature, logits, layout, W, b) reproduces the model's own logits.

Only onnx, onnxruntime and numpy are used here, never a camcore backend.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.zoo import (CASES, CHANNELS, NUM_CLASSES, REFUSED, _expose_outputs, _Graph,
                       hot_spot_input)

ALL = {**CASES, **REFUSED}
POOLING_OPS = {"GlobalAveragePool", "ReduceMean", "AveragePool"}


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _spatial_axes(layout):
    return (2, 3) if layout == "NCHW" else (1, 2)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module", params=sorted(ALL))
def zoo_model(request):
    return ALL[request.param]()


@pytest.fixture(scope="module", params=sorted(CASES))
def compatible(request):
    return CASES[request.param]()


def test_names_disjoint_and_refusal_flags():
    assert not set(CASES) & set(REFUSED)
    assert all(CASES[name]().refuse is None for name in CASES)
    assert all(REFUSED[name]().refuse for name in REFUSED)


def test_checker_passes(zoo_model):
    onnx.checker.check_model(zoo_model.model, full_check=True)
    assert zoo_model.model.graph.input[0].name == zoo_model.input_name


def test_builders_are_deterministic(zoo_model):
    again = ALL[zoo_model.name]()
    assert again.model.SerializeToString() == zoo_model.model.SerializeToString()
    if zoo_model.weights is not None:
        np.testing.assert_array_equal(again.weights, zoo_model.weights)
        np.testing.assert_array_equal(again.bias, zoo_model.bias)


def test_random_input(zoo_model):
    x = zoo_model.random_input(3)
    assert x.shape == zoo_model.input_shape and x.dtype == zoo_model.input_dtype
    np.testing.assert_array_equal(x, zoo_model.random_input(3))
    assert not np.array_equal(x, zoo_model.random_input(4))


def test_ground_truth_reproduces_logits(compatible):
    zm = compatible
    assert zm.weights.shape[0] == NUM_CLASSES and zm.weights.dtype == np.float32
    assert zm.bias.shape == (NUM_CLASSES,) and zm.bias.dtype == np.float32
    plain = _session(zm.model)
    exposed = _session(_expose_outputs(zm.model, [zm.feature, zm.logits]))
    first = zm.model.graph.output[0].name
    for seed, shape in enumerate((zm.input_shape, *zm.other_input_shapes)):
        x = zm.random_input(seed, shape)
        features, logits, output = exposed.run([zm.feature, zm.logits, first], {zm.input_name: x})
        channel_axis = 1 if zm.layout == "NCHW" else 3
        assert features.shape[channel_axis] == zm.weights.shape[1]
        assert logits.shape == (shape[0], NUM_CLASSES)
        pooled = features.astype(np.float64).mean(axis=_spatial_axes(zm.layout))
        expected = pooled @ zm.weights.T.astype(np.float64) + zm.bias
        # float16 models and heads round logits to ~3 significant digits, hence atol=rtol=1e-2.
        np.testing.assert_allclose(logits, expected, atol=zm.atol, rtol=zm.rtol)
        # Exposing tensors leaves the model's own output unchanged (up to the last bits:
        # onnxruntime may fuse the modified graph differently).
        np.testing.assert_allclose(output, plain.run([first], {zm.input_name: x})[0],
                                   atol=zm.atol / 100, rtol=1e-5)


def test_first_output_is_scored_logits(compatible):
    zm = compatible
    first = zm.model.graph.output[0].name
    run = _session(_expose_outputs(zm.model, [zm.logits]))
    output, logits = (a.astype(np.float64) for a in run.run(
        [first, zm.logits], {zm.input_name: zm.random_input(0)}))
    if zm.scoring == "sigmoid":
        candidates = [1 / (1 + np.exp(-logits))]
    else:
        candidates = [logits, _softmax(logits), np.log(_softmax(logits))]
    assert any(np.allclose(output, c, atol=zm.atol, rtol=zm.rtol) for c in candidates)
    sigmoid_outputs = [n.output[0] for n in zm.model.graph.node if n.op_type == "Sigmoid"]
    assert (zm.scoring == "sigmoid") == (first in sigmoid_outputs)


def test_feature_feeds_the_recorded_pooling(compatible):
    zm = compatible
    nodes = [n for n in compatible.model.graph.node if n.op_type == zm.pooling]
    assert zm.pooling in POOLING_OPS
    assert any(n.input[0] == zm.feature for n in nodes)


def test_se_block_has_a_second_pooling_that_is_not_the_answer():
    zm = CASES["se_block_backbone"]()
    gaps = [n for n in zm.model.graph.node if n.op_type == "GlobalAveragePool"]
    assert len(gaps) == 2
    assert [n.input[0] for n in gaps].count(zm.feature) == 1


def test_avgpool_kernel_covers_the_map():
    zm = CASES["avgpool_full_map"]()
    (node,) = [n for n in zm.model.graph.node if n.op_type == "AveragePool"]
    kernel = onnx.helper.get_attribute_value(node.attribute[0])
    assert tuple(kernel) == zm.input_shape[2:]


def test_fp16_model_is_float16_throughout():
    zm = CASES["fp16_model"]()
    graph = zm.model.graph
    half = onnx.TensorProto.FLOAT16
    assert zm.input_dtype == np.float16
    assert all(t.data_type == half for t in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == half
    assert zm.weights.dtype == np.float32


def test_caffe2_style_weights_are_node_outputs():
    for name in ("constant_node_weights", "constantofshape_weights"):
        zm = CASES[name]()
        (gemm,) = [n for n in zm.model.graph.node if n.op_type == "Gemm"]
        initializers = {t.name for t in zm.model.graph.initializer}
        assert not set(gemm.input[1:]) & initializers
        producers = {o for n in zm.model.graph.node for o in n.output}
        assert set(gemm.input[1:]) <= producers


def test_dynamic_cases_have_symbolic_dims():
    for name, symbols in (("dynamic_batch", ["N"]), ("dynamic_batch_hw", ["N", "H", "W"])):
        zm = CASES[name]()
        dims = zm.model.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims if d.dim_param] == symbols
        assert len({s[0] for s in zm.other_input_shapes} | {zm.input_shape[0]}) > 1


def test_nhwc_transpose_gap_feature_is_the_transposed_tensor():
    zm = CASES["nhwc_transpose_gap"]()
    producer = {o: n for n in zm.model.graph.node for o in n.output}[zm.feature]
    assert producer.op_type == "Transpose" and producer.input[0] == "features"
    assert zm.layout == "NCHW" and zm.input_shape[3] == 3


@pytest.mark.parametrize("name", ["hot_spot_nchw", "hot_spot_nhwc"])
@pytest.mark.parametrize("y, x", [(0, 0), (8, 6), (2, 5), (6, 1)])
def test_hot_spot_features_are_hot_only_there(name, y, x):
    zm = CASES[name]()
    run = _session(_expose_outputs(zm.model, [zm.feature]))
    (features,) = run.run([zm.feature], {zm.input_name: hot_spot_input(zm, y, x)})
    if zm.layout == "NHWC":
        features = features.transpose(0, 3, 1, 2)
    assert features.shape == (1, CHANNELS, 9, 7)
    hot = np.zeros((9, 7), bool)
    hot[y, x] = True
    assert np.all(features[0][:, hot] > 0.5)
    assert np.all(features[0][:, ~hot] == 0)


def test_hot_spot_input_refuses_other_models():
    with pytest.raises(ValueError, match="does not preserve location"):
        hot_spot_input(CASES["gap_gemm"](), 0, 0)


def test_save_single_file(tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gap_gemm.onnx"]
    x = zm.random_input(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {zm.input_name: x})[0],
                                  _session(zm.model).run(None, {zm.input_name: x})[0])


def test_save_external_data(tmp_path):
    zm = CASES["external_data"]()
    path = zm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external_data.onnx",
                                                          "external_data.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    stored = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in stored.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {"conv_w", "fc_w"} <= set(external)
    # save() must not externalise the in-memory model.
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in zm.model.graph.initializer)
    x = zm.random_input(0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {zm.input_name: x})[0],
                                  _session(zm.model).run(None, {zm.input_name: x})[0])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_models_run_and_contain_the_reason(name):
    zm = REFUSED[name]()
    assert zm.weights is None and zm.bias is None
    (output,) = _session(zm.model).run(None, {zm.input_name: zm.random_input(0)})
    assert output.shape == (zm.input_shape[0], NUM_CLASSES) and np.all(np.isfinite(output))
    ops = {n.op_type: n for n in zm.model.graph.node}
    if zm.refuse == "no global average pooling":
        assert not ops.keys() & {"GlobalAveragePool", "ReduceMean"}
        if "AveragePool" in ops:
            kernel = onnx.helper.get_attribute_value(ops["AveragePool"].attribute[0])
            assert np.prod(kernel) < np.prod(zm.input_shape[2:])
    else:
        assert zm.refuse in ops


@pytest.mark.parametrize("name", ["mlp_head", "conv_hardswish_after_pool"])
def test_refused_heads_are_not_affine(name):
    # Feed pooled vectors straight into the head: f(a + b) != f(a) + f(b) - f(0).
    zm = REFUSED[name]()
    inferred = onnx.shape_inference.infer_shapes(zm.model)
    head = onnx.utils.Extractor(inferred).extract_model(["pooled"], [zm.logits])
    run = _session(head)
    rng = np.random.default_rng(0)
    a, b = (rng.normal(0, 3, (2, CHANNELS, 1, 1)).astype(np.float32) for _ in range(2))
    f = lambda v: run.run(None, {"pooled": v})[0]  # noqa: E731
    assert not np.allclose(f(a + b), f(a) + f(b) - f(np.zeros_like(a)), atol=1e-3)


def test_graph_names_are_deterministic():
    g = _Graph("x", 13, np.float32)
    assert g.op("Relu", ["a"]) == "relu_0" and g.op("Relu", ["relu_0"], "out") == "out"
    assert [n.name for n in g.nodes] == ["relu_0", "relu_1"]
