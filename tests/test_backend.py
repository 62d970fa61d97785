"""The ONNX backends against the fixture zoo: head discovery, the CAM oracle, refusals, errors (on every runtime)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import camcore
from camcore import CamError, InvalidInput, NotCamCompatible
from backends import onnx_graph
from tests.fakes import BACKENDS, load_on
from tests.zoo import CASES, REFUSED, hot_spot_input

ALIASES = {  # tensors that hold the same values as the zoo's "logits" (through Flatten/Squeeze/Cast)
    "conv1x1_flatten": {"class_map"},
    "conv1x1_squeeze": {"class_map"},
    "cast_fp16_head": {"logits_fp16"},
}


def reference_logits(zm, x):
    """Logits from the UNMODIFIED model under plain onnxruntime (not camcore's session)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(zm.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = {o.name: v for o, v in zip(session.get_outputs(), session.run(None, {zm.input_name: x}))}
    first = outputs[session.get_outputs()[0].name].astype(np.float64).reshape(len(x), -1)
    if zm.scoring == "sigmoid":
        return np.log(first) - np.log1p(-first)
    if zm.logits in outputs:
        return outputs[zm.logits].astype(np.float64).reshape(len(x), -1)
    if np.allclose(first.sum(1), 1, atol=1e-3) and (first >= 0).all():
        return np.log(first)  # softmax: logits up to a per-row constant
    if np.all(first <= 0) and np.allclose(np.exp(first).sum(1), 1, atol=1e-3):
        return first  # log-softmax: same
    return first


@pytest.fixture(scope="module", params=[(b, name) for b in BACKENDS for name in sorted(CASES)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    backend, name = request.param
    zm = CASES[name]()
    return zm, load_on(backend, zm.model, providers=["CPUExecutionProvider"])


def test_head_found(case):
    zm, ex = case
    head = ex.head
    assert head.layout == zm.layout
    assert head.pooling == zm.pooling
    assert head.feature == zm.feature
    assert head.logits in {zm.logits} | ALIASES.get(zm.name, set())
    assert head.scoring == zm.scoring
    assert head.input.name == zm.input_name
    assert (head.num_classes, head.channels) == zm.weights.shape
    assert head.weights.dtype == np.float32 and head.bias.dtype == np.float32
    np.testing.assert_allclose(head.weights, zm.weights, atol=max(zm.atol, 1e-5), rtol=zm.rtol)
    np.testing.assert_allclose(head.bias, zm.bias, atol=max(zm.atol, 1e-5), rtol=zm.rtol)


def test_cam_oracle_every_class(case):
    """mean_xy(maps) + bias == logits of the unmodified model, for every class and input size."""
    zm, ex = case
    num_classes = zm.weights.shape[0]
    for seed, shape in enumerate((zm.input_shape, *zm.other_input_shapes)):
        x = zm.random_input(seed, shape)
        out = ex.explain(x, classes=list(range(num_classes)))
        assert out.maps.dtype == np.float32 and out.maps.ndim == 4 and out.maps.shape[:2] == (len(x), num_classes)
        reconstructed = out.maps.mean(axis=(-2, -1)) + ex.head.bias
        expected = reference_logits(zm, x)
        if zm.scoring == "softmax" and not np.allclose(expected, out.logits, atol=10 * zm.atol):
            # softmax outputs only give logits up to a per-row constant
            expected = expected - expected.mean(1, keepdims=True) + out.logits.mean(1, keepdims=True)
        np.testing.assert_allclose(reconstructed, expected, atol=10 * zm.atol, rtol=10 * zm.rtol)
        np.testing.assert_allclose(out.logits, expected, atol=10 * zm.atol, rtol=10 * zm.rtol)


def test_top_k_scores(case):
    zm, ex = case
    x = zm.random_input(7)
    out = ex.explain(x, top_k=2)
    order = np.argsort(-out.logits, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out.classes, order)
    z = out.logits.astype(np.float64)
    probs = 1 / (1 + np.exp(-z)) if zm.scoring == "sigmoid" else np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(out.scores, np.take_along_axis(probs, order, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_by_cam_with_one_line_reason(name, backend_name):
    """CAM refuses these heads; loading still succeeds, for the gradient methods."""
    zm = REFUSED[name]()
    with pytest.raises(NotCamCompatible, match=zm.refuse) as info:
        onnx_graph.find_head(zm.model)
    assert "\n" not in str(info.value)
    ex = load_on(backend_name, zm.model)
    assert not ex.head.affine and ex.head.cam_refusal == str(info.value)
    with pytest.raises(NotCamCompatible, match=zm.refuse):
        ex.explain(zm.random_input(0), method="cam")
    assert ex.resolve_method("auto") == "gradcam"


@pytest.mark.parametrize("name", ["hot_spot_nchw", "hot_spot_nhwc"])
@pytest.mark.parametrize("y, x", [(0, 0), (2, 5), (8, 6), (4, 1)])
def test_orientation(name, y, x, backend_name):
    zm = CASES[name]()
    ex = load_on(backend_name, zm.model)
    out = ex.explain(hot_spot_input(zm, y, x), classes=[0])
    maps = out.maps[:, 0]
    assert maps.shape[1:] == (9, 7)
    for m in maps:
        assert np.unravel_index(np.argmax(np.abs(m)), m.shape) == (y, x)
        assert np.count_nonzero(m) == 1


def test_explain_chunking_is_invisible(backend_name):
    zm = CASES["dynamic_batch"]()
    ex = load_on(backend_name, zm.model)
    x = zm.random_input(3, (11, *zm.input_shape[1:]))
    whole = ex.explain(x, top_k=3, batch_size=64)
    chunked = ex.explain(x, top_k=3, batch_size=4)
    for a, b in zip((whole.logits, whole.classes, whole.scores, whole.maps),
                    (chunked.logits, chunked.classes, chunked.scores, chunked.maps)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_per_item_classes(backend_name):
    zm = CASES["dynamic_batch"]()
    ex = load_on(backend_name, zm.model)
    x = zm.random_input(1, (3, *zm.input_shape[1:]))
    classes = np.array([[0, 4], [1, 1], [3, 2]])
    out = ex.explain(x, classes=classes)
    np.testing.assert_array_equal(out.classes, classes)
    every = ex.explain(x, classes=range(5))
    np.testing.assert_allclose(out.maps, np.take_along_axis(every.maps, classes[:, :, None, None], 1), atol=1e-6)
    with pytest.raises(InvalidInput, match=r"classes must be in \[0, 5\), got 5"):
        ex.explain(x, classes=[5])
    with pytest.raises(InvalidInput, match="classes must be 1-D"):
        ex.explain(x, classes=np.zeros((2, 1), int))


def test_external_data_loads_from_its_folder(tmp_path, backend_name):
    zm = CASES["external_data"]()
    path = zm.save(tmp_path)
    assert (tmp_path / f"{zm.name}.onnx.data").is_file()
    ex = load_on(backend_name, path)
    np.testing.assert_allclose(ex.head.weights, zm.weights, atol=1e-5)
    (tmp_path / f"{zm.name}.onnx.data").unlink()
    with pytest.raises(CamError, match="external data file missing"):
        load_on(backend_name, path)


def test_external_data_cannot_escape_the_folder(tmp_path, backend_name):
    zm = CASES["external_data"]()
    inner = tmp_path / "model"
    inner.mkdir()
    path = zm.save(tmp_path)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"../{entry.value}"
    onnx.save(model, inner / "escaping.onnx")
    with pytest.raises(CamError, match="outside the model folder"):
        load_on(backend_name, inner / "escaping.onnx")


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff\x13", b"\x08\x07\x12\x04junk"])
def test_corrupt_file(tmp_path, content, backend_name):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(CamError, match="bad.onnx"):
        load_on(backend_name, path)


def test_missing_file(tmp_path, backend_name):
    with pytest.raises(CamError, match="model file not found"):
        load_on(backend_name, tmp_path / "nope.onnx")


def test_unknown_provider():
    zm = CASES["gap_gemm"]()
    with pytest.raises(CamError, match="unknown provider 'FooExecutionProvider'"):
        camcore.load(zm.model, providers=["FooExecutionProvider"])
    ex = camcore.load(zm.model, providers=[("CPUExecutionProvider", {})])
    assert ex.backend.providers == ["CPUExecutionProvider"]


def test_wrong_input_shape_and_dtype(backend_name):
    zm = CASES["gap_gemm"]()
    ex = load_on(backend_name, zm.model)
    x = zm.random_input()
    with pytest.raises(InvalidInput, match=r"input 'input' must be float32 with shape \(2, 3, 8, 8\), got float64"):
        ex.explain(x.astype(np.float64))
    with pytest.raises(InvalidInput, match=r"got float32 with shape \(2, 3, 8, 9\)"):
        ex.explain(np.zeros((2, 3, 8, 9), np.float32))


def test_overrides(backend_name):
    zm = CASES["two_outputs_prob_embedding"]()
    ex = load_on(backend_name, zm.model, feature=zm.feature, logits=zm.logits)
    assert (ex.head.feature, ex.head.logits) == (zm.feature, zm.logits)
    with pytest.raises(CamError, match="feature tensor 'nope' not found"):
        load_on(backend_name, zm.model, feature="nope")


def test_load_from_path_equals_in_memory(tmp_path, backend_name):
    zm = CASES["nhwc_reducemean"]()
    a = load_on(backend_name, zm.save(tmp_path))
    b = load_on(backend_name, zm.model)
    np.testing.assert_array_equal(a.head.weights, b.head.weights)
    assert a.source == str(tmp_path / "nhwc_reducemean.onnx") and b.source is None


@pytest.mark.parametrize("opset", [7, 8, 9])
def test_old_opsets_without_inferred_shapes(opset, backend_name):
    """Old graphs (Caffe2-era opsets): shape inference finds no channel count; one run does."""
    from tests.zoo import _build

    zm = _build(f"opset{opset}", opset=opset)
    ex = load_on(backend_name, zm.model)
    assert ex.head.feature_shape[1:] == (8, 8, 8)
    np.testing.assert_allclose(ex.head.weights, zm.weights, atol=1e-5)
    x = zm.random_input()
    out = ex.explain(x, classes=range(5))
    reconstructed = out.maps.mean(axis=(-2, -1)) + ex.head.bias
    np.testing.assert_allclose(reconstructed, out.logits, atol=1e-5)
    expected = reference_logits(zm, x)  # log-softmax: the logits up to a per-row constant
    np.testing.assert_allclose(reconstructed - reconstructed.mean(1, keepdims=True),
                               expected - expected.mean(1, keepdims=True), atol=1e-4)


@pytest.mark.parametrize("fixed", [1, 2])
def test_fixed_batch_models_take_any_number_of_items(fixed, backend_name):
    """gap_gemm is exported with batch 2; chunks are cut to the model's batch and the last one padded."""
    zm = CASES["gap_gemm"]() if fixed == 2 else CASES["reshape_const"]()
    model = zm.model
    if fixed == 1:
        model = onnx.ModelProto()
        model.CopyFrom(zm.model)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    ex = load_on(backend_name, model)
    assert ex.fixed_batch == fixed
    x = zm.random_input(4, (5, *zm.input_shape[1:]))
    out = ex.explain(x, classes=range(5), batch_size=64)
    assert out.maps.shape[0] == 5
    single = [ex.explain(x[i:i + 1], classes=range(5)) for i in range(5)]
    np.testing.assert_allclose(out.logits, np.concatenate([s.logits for s in single]), atol=1e-6)
    np.testing.assert_allclose(out.maps.mean(axis=(-2, -1)) + ex.head.bias, out.logits, atol=1e-5)
    images = ex.explain_images([np.full((8, 8, 3), v, np.uint8) for v in (0, 50, 100)],
                               preprocess=camcore.Preprocess(8))
    assert len(images) == 3 and all(len(r.classes) == 1 for r in images)
