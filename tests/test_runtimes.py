"""The runtime seam: OpenVINO against onnxruntime, precision, a third runtime, and errors.

At f32, every method's maps and logits on OpenVINO equal onnxruntime's within 1e-4 of
their largest magnitude (the zoo here; the corpus in test_corpus_runtimes below).  At
OpenVINO's default precision (bf16 on CPUs with AVX512-BF16 or AMX), the maps of the
sample photos correlate >= 0.99 with f32 and the top-1 class agrees.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from skimage import data

import camcore
from backends.graph_backend import GraphBackend
from camcore import CamError, Explainer
from camcore.errors import MissingDependency
from camcore.methods import METHODS, REGISTRY
from tests import corpus
from tests.fakes import ReferenceRuntime, load_on, run_time_reduce_axes
from tests.zoo import CASES, REFUSED

RTOL = 1e-4
FORWARD = ("eigencam", "ablationcam", "reciprocam", "scorecam")
PHOTOS = ("chelsea", "coffee", "rocket")


def _methods(ex: Explainer) -> list:
    """The methods that apply: CAM on affine heads, the attention methods on token models."""
    return [m for m in METHODS if m != "auto" and (m != "cam" or ex.head.affine)
            and ("attention" not in REGISTRY[m].needs or ex.head.tokens is not None)]


def _tolerance(method: str, ex: Explainer, x, classes, maps: np.ndarray, logits: np.ndarray) -> float:
    """The largest map difference two f32 runtimes may show for `method`, from onnxruntime's values.

    A map entry is in units of a logit's share per position, so differences are measured against
    ``max(max|maps|, max|logits| / positions)`` (a map that cancels to about 0, as HiResCAM's can,
    is not held to its own rounding).  AblationCAM divides logit drops by the logit
    (``w_k = (y_c - y_c^k) / y_c``): a relative difference ``RTOL`` of the logits moves each weight
    by up to ``2 RTOL max|y| / |y_c|``, and the map by that times ``sum_k |A_k|``.  XGrad-CAM divides
    by each channel's activation sum: the difference grows by ``sum|A_k| / |sum A_k|``.  Score-CAM
    min-max normalizes each channel over the positions: by ``max|A_k| / (max A_k - min A_k)`` over
    the channels that vary (Hugging Face's LeViT, at random weights, has channels constant over its
    tokens up to rounding:
    both runtimes normalize that rounding to [0, 1], and which channels have the highest variance
    is rounding too).
    """
    positions = int(np.prod(maps.shape[2:]))
    scale = max(float(np.abs(maps).max()), float(np.abs(logits).max()) / positions, 1e-30)
    if method not in ("ablationcam", "xgradcam", "scorecam"):
        return RTOL * scale
    features, _ = ex.forward({ex.head.input.name: x})
    f = np.asarray(features, np.float64)
    channel = 1 if ex.head.layout == "NCHW" else -1
    if method == "scorecam":
        per_channel = np.moveaxis(f, channel, 1).reshape(f.shape[0], f.shape[channel], -1)
        span = per_channel.max(-1) - per_channel.min(-1)
        varies = span > 0  # a constant channel gives zeros on both
        return RTOL * scale * max(1.0, float((np.abs(per_channel).max(-1)[varies] / span[varies]).max(initial=1.0)))
    if method == "ablationcam":
        y = np.abs(logits.astype(np.float64))
        ratio = float(y.max() / np.take_along_axis(y, classes, 1).min())
        return max(RTOL * scale, 2 * RTOL * ratio * float(np.abs(f).sum(axis=channel).max()))
    axes = {"NCHW": (2, 3), "NHWC": (1, 2)}.get(ex.head.layout, (1,))  # tokens (N, T, C): over T
    return RTOL * scale * max(1.0, float((np.abs(f).sum(axis=axes) / np.maximum(np.abs(f.sum(axis=axes)), 1e-30)).max()))


def _close(ours, theirs, what, tolerance=None):
    scale = max(float(np.abs(theirs).max()), 1e-12)
    error = float(np.abs(np.asarray(ours, np.float64) - theirs).max())
    tolerance = RTOL * scale if tolerance is None else tolerance
    assert error <= tolerance, f"{what}: max difference {error:.2e} > {tolerance:.3g} (largest value {scale:.3g})"
    return error / scale


@pytest.mark.parametrize("name", sorted(CASES) + sorted(REFUSED))
def test_openvino_f32_equals_onnxruntime_on_the_zoo(name):
    zm = (CASES.get(name) or REFUSED[name])()
    ort_ex = camcore.load(zm.model, providers=["cpu"])
    ov_ex = camcore.load(zm.model, backend="openvino", precision="f32")
    assert ov_ex.backend.precision == "f32"
    x = zm.random_input(3)
    k = min(3, ort_ex.head.num_classes)
    for method in _methods(ort_ex):
        ours = ov_ex.explain(x, top_k=k, method=method)
        theirs = ort_ex.explain(x, top_k=k, method=method)
        np.testing.assert_array_equal(ours.classes, theirs.classes)
        _close(ours.logits, theirs.logits.astype(np.float64), f"{name} {method} logits")
        _close(ours.maps, theirs.maps.astype(np.float64), f"{name} {method} maps")


@pytest.mark.parametrize("qkv", ["separate", "split"])
@pytest.mark.parametrize("pooling,prefix", [("cls", 1), ("cls_dist_mean", 2), ("token_mean", 1)])
def test_openvino_f32_equals_onnxruntime_on_tiny_vits(pooling, prefix, qkv, tmp_path):
    """Every method, the attention gradients (GAE) included, on the tiny transformers of tests/vit_zoo."""
    from tests.vit_zoo import vit

    path = tmp_path / "vit.onnx"
    # 12 channels: with 8, the (N, T, heads, d) = (N, 8, 2, 4) attention output of the distilled model
    # reads as a 2x4 map of its 8 tokens with no prefix, which the analysis prefers (fewer prefix tokens)
    path.write_bytes(vit(pooling=pooling, prefix=prefix, grid=(2, 3), qkv=qkv, channels=12).SerializeToString())
    ort_ex = camcore.load(path, providers=["cpu"])
    ov_ex = camcore.load(path, backend="openvino", precision="f32")
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype(np.float32)
    methods = _methods(ort_ex)
    assert "gae" in methods and "rollout" in methods
    for method in methods:
        ours = ov_ex.explain(x, top_k=2, method=method)
        theirs = ort_ex.explain(x, top_k=2, method=method)
        np.testing.assert_array_equal(ours.classes, theirs.classes)
        _close(ours.maps, theirs.maps.astype(np.float64), f"{pooling} {qkv} {method} maps",
               _tolerance(method, ort_ex, x, theirs.classes, theirs.maps, theirs.logits))


@pytest.fixture(scope="module")
def photos():
    return [getattr(data, name)() for name in PHOTOS]


def _pearson(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "eigencam", "reciprocam"])
def test_default_precision_maps_correlate_with_f32_on_the_photos(photos, method):
    """OpenVINO as deployed (its default precision) against f32: maps correlate >= 0.99, same top-1."""
    default = camcore.load(backend="openvino")
    f32 = camcore.load(backend="openvino", precision="f32")
    assert default.backend.precision in ("bf16", "f16", "f32") and f32.backend.precision == "f32"
    low = default.explain_images(photos, method=method)
    full = f32.explain_images(photos, method=method)
    for name, a, b in zip(PHOTOS, low, full):
        assert a.classes[0] == b.classes[0], f"{name}: top-1 {a.classes[0]} at {default.backend.precision}, " \
                                             f"{b.classes[0]} at f32"
        r = _pearson(a.cams[0], b.cams[0])
        assert r >= 0.99, f"{name} {method}: correlation {r:.4f}"


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_explicit_precision_is_what_runs(precision):
    ex = camcore.load(backend="openvino", precision=precision)
    assert ex.backend.precision == precision
    assert ex.backend.runtime.config["INFERENCE_PRECISION_HINT"] == precision


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="openvino", precision="fp32"), r"precision must be None .*'f32', 'bf16' or 'f16', got 'fp32'"),
    (dict(backend="onnxruntime", precision="bf16"), "precision must be None or 'f32' on onnxruntime"),
    (dict(backend="openvino", device="TPU"), "OpenVINO device 'TPU' is not available here"),
    (dict(backend="openvino", providers=["cuda"]), "providers are onnxruntime's"),
    (dict(backend="onnxruntime", device="GPU"), "device is for backend='openvino'"),
    (dict(backend="tensorrt"), "unknown backend 'tensorrt'; known backends: .*onnxruntime, openvino"),
])
def test_runtime_arguments_are_validated_in_one_line(kwargs, message):
    with pytest.raises(CamError, match=message) as info:
        camcore.load(CASES["gap_gemm"]().model, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingDependency, match=r"openvino is required .*camcore\[openvino\]"):
        camcore.load(CASES["gap_gemm"]().model, backend="openvino")


def test_the_analysis_cache_serves_both_runtimes(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMCORE_CACHE_DIR", str(tmp_path / "cache"))
    path = CASES["gap_gemm"]().save(tmp_path)
    first = camcore.load(path, backend="openvino", precision="f32")
    second = camcore.load(path)
    third = camcore.load(path, backend="openvino")
    assert not first.backend.cache_hit and second.backend.cache_hit and third.backend.cache_hit
    x = CASES["gap_gemm"]().random_input(0)
    _close(first.explain(x, top_k=2).maps, second.explain(x, top_k=2).maps.astype(np.float64), "cached")


@pytest.mark.parametrize("b_dims, b_shape", [([3], (3,)), (["m", 3], (1, 3)), (["m", 3], (2, 3))])
def test_openvino_reads_backward_sums_whose_axes_shapes_tell(b_dims, b_shape):
    """A batch symbol of its own on the output (as tf2onnx writes): the sums have constant axes and
    OpenVINO's gradient equals onnxruntime's.  Two independent symbols on one axis (either may be the
    1 that is stretched): the axis is summed over a constant axis too, and the run-time sizes select
    the sum (``b`` of 1 row) or the gradient as it is (2 rows); OpenVINO reads that as well."""
    from onnx import TensorProto, helper

    from backends.backprop import add_backward
    from backends.ov_session import OvRuntime
    from backends.ort_runtime import OrtRuntime

    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "t",
                              [helper.make_tensor_value_info("a", f, ["n", 3]), helper.make_tensor_value_info("b", f, b_dims)],
                              [helper.make_tensor_value_info("y", f, ["unk__0", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    back = add_backward(model, "a", "y")
    assert run_time_reduce_axes(back) == []
    back = back.SerializeToString()
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2, 3), np.float32), "b": rng.standard_normal(b_shape, np.float32),
            "cam_seed": rng.standard_normal((2, 3), np.float32)}
    expected = feed["b"] * feed["cam_seed"]
    np.testing.assert_allclose(OrtRuntime(["cpu"]).compile(back).run(["cam_grad"], feed)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(OvRuntime(precision="f32").compile(back).run(["cam_grad"], feed)[0], expected,
                               rtol=1e-5)


def test_a_third_runtime_is_an_adapter():
    """onnx's reference evaluator in ~20 lines (tests/fakes.py) runs every method, equal to onnxruntime's."""
    zm = REFUSED["conv_hardswish_after_pool"]()
    runtime = ReferenceRuntime()
    camcore.register_backend("onnx-reference", lambda model, **kw: GraphBackend(
        model, runtime, feature=kw.get("feature"), logits=kw.get("logits"), output=kw.get("output")))
    ref = camcore.load(zm.model, backend="onnx-reference")
    ort_ex = camcore.load(zm.model)
    x = zm.random_input(0)
    for method in ("gradcam", "reciprocam"):
        _close(ref.explain(x, top_k=2, method=method).maps,
               ort_ex.explain(x, top_k=2, method=method).maps.astype(np.float64), method)
    assert runtime.compiled == ["model", "gradients", "head"]


def test_cli_inspect_and_explain_say_which_precision_ran(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "camcore.cli", *map(str, args)], capture_output=True, text=True)

    proc = cli("inspect", "--json", CASES["gap_gemm"]().save(tmp_path), "--backend", "openvino", "--precision", "f32")
    assert proc.returncode == 0, proc.stderr
    runtime = json.loads(proc.stdout)["runtime"]
    assert (runtime["backend"], runtime["precision"], runtime["devices"]) == ("openvino", "f32", ["openvino:CPU"])
    from skimage import io as skio

    skio.imsave(tmp_path / "coffee.png", data.coffee(), check_contrast=False)
    results = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / backend
        proc = cli("explain", tmp_path / "coffee.png", "--out", out, "--quiet", "--backend", backend,
                   *(["--precision", "f32"] if backend == "openvino" else []))
        assert proc.returncode == 0, proc.stderr
        results[backend] = json.loads((out / "results.json").read_text())
    assert results["openvino"]["runtime"]["precision"] == "f32"
    assert results["onnxruntime"]["runtime"]["backend"] == "onnxruntime"
    a, b = (results[k]["images"][0]["classes"][0] for k in ("onnxruntime", "openvino"))
    assert a["index"] == b["index"] and abs(a["score"] - b["score"]) < 1e-4
    proc = cli("explain", tmp_path / "coffee.png", "--out", tmp_path / "x", "--backend", "openvino",
               "--providers", "cpu")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "camcore: error: --providers is for --backend onnxruntime; --backend openvino takes --device"]


def _attention_gradient_graph(ex: Explainer):
    """The graph the attention-gradient methods run: every attention probability and its gradient."""
    from backends import attention_graph

    folded = ex.backend.folded_model
    return attention_graph.attention_model(folded, attention_graph.attention_probabilities(folded), ex.head.logits,
                                           gradients=True)


# --------------------------------------------------------------------------- the corpus

ENTRIES = corpus.manifest()


@pytest.mark.parametrize("entry", ENTRIES, ids=corpus.entry_id)
def test_corpus_openvino_f32_equals_onnxruntime(entry):
    """Every real export, every method that applies: OpenVINO f32 within 1e-4 of onnxruntime."""
    corpus.require(entry["framework"])
    case = corpus.load(entry)
    try:
        ort_ex = camcore.load(case["path"], providers=["cpu"])
    except camcore.NotCamCompatible:
        with pytest.raises(camcore.NotCamCompatible):
            load_on("openvino", case["path"])
        return
    ov_ex = load_on("openvino", case["path"])
    d = case["data"]
    x, classes = d["x"], d["grad_classes"][:, None]
    for ex in (ort_ex, ov_ex):
        ex.method_options = {"max_channels": 4}
    _compare_every_method(ort_ex, ov_ex, x, classes)


def _compare_every_method(ort_ex: Explainer, ov_ex: Explainer, x, classes) -> dict:
    """Every method that applies, on both: OpenVINO's maps and logits within `_tolerance` of
    onnxruntime's, or the same refusal from both.  Returns ``{method: relative map difference or
    the refusal}``."""
    # Every backward graph sums over constant axes: OpenVINO's ONNX reader needs them.
    assert run_time_reduce_axes(ort_ex.backend.head_graph(True).model) == []
    if ort_ex.head.tokens is not None:
        try:
            attention = _attention_gradient_graph(ort_ex)
        except camcore.NotCamCompatible:
            attention = None
        assert attention is None or run_time_reduce_axes(attention) == []
    seen = {}
    for method in _methods(ort_ex):
        try:
            theirs = ort_ex.explain(x, classes=classes, method=method)
        except camcore.NotCamCompatible as refusal:
            with pytest.raises(camcore.NotCamCompatible) as info:
                ov_ex.explain(x, classes=classes, method=method)
            assert str(info.value) == str(refusal)
            seen[method] = str(refusal)
            continue
        ours = ov_ex.explain(x, classes=classes, method=method)
        np.testing.assert_array_equal(ours.classes, theirs.classes)
        _close(ours.logits, theirs.logits.astype(np.float64), f"{method} logits")
        seen[method] = _close(ours.maps, theirs.maps.astype(np.float64), f"{method} maps",
                              _tolerance(method, ort_ex, x, classes, theirs.maps, theirs.logits))
    return seen


TRANSFORMER_ENTRIES = corpus.transformer_entries()
# Hugging Face's EfficientNet pools with AvgPool2d(hidden_dim, ceil_mode=True): a kernel larger than
# its map, which OpenVINO 2026.4 refuses in the model itself (plain OpenVINO too), at reading or, with
# dynamic spatial axes (optimum), at the first run.
OV_REFUSED_POOLING = (r"openvino cannot read the model: Conversion is failed for: AveragePool-1[78]$"
                      r"|openvino failed: \[CPU\] AvgPool node with name '/efficientnet/pooler/AveragePool' "
                      r"Check 'cmp::le\(kernel, dim.get_length\(\)\)' failed")


@pytest.mark.parametrize("entry", TRANSFORMER_ENTRIES, ids=corpus.entry_id)
def test_transformer_corpus_openvino_f32_equals_onnxruntime(entry):
    """Every transformer export (timm and Hugging Face; TorchScript, dynamo and optimum), every
    method that applies: OpenVINO at f32 equals onnxruntime (`_tolerance`), or both refuse alike.
    The dynamo exports' fixed batch and TorchScript's unrelated token and batch symbols once left
    backward sums with run-time axes, which OpenVINO's reader refused."""
    corpus.require(corpus.TRANSFORMERS)
    case = corpus.load(entry)
    size = (entry["image_size"],) * 2  # optimum's exports leave the spatial axes dynamic
    d = case["data"]
    x, classes = d["x"], d["grad_classes"][:, None]
    ort_ex = camcore.load(case["path"], providers=["cpu"], size=size)
    ort_ex.method_options = {"max_channels": 4}
    if (entry["library"], entry["family"]) == ("hf", "efficientnet"):
        np.testing.assert_array_equal(ort_ex.explain(x, classes=classes, method="gradcam").classes, classes)
        with pytest.raises(CamError, match=OV_REFUSED_POOLING) as info:
            load_on("openvino", case["path"], size=size).explain(x, classes=classes, method="gradcam")
        assert "\n" not in str(info.value)
        return
    ov_ex = load_on("openvino", case["path"], size=size)
    ov_ex.method_options = {"max_channels": 4}
    seen = _compare_every_method(ort_ex, ov_ex, x, classes)
    compared = [m for m, v in seen.items() if not isinstance(v, str)]
    assert {"gradcam", "eigencam", "reciprocam"} <= set(compared), seen
    if entry["attention_kind"] == "global" and entry["pooling"] != "spatial_mean" and entry["family"] not in (
            "cvt", "levit", "pvt_v2"):  # attention over the image's tokens in every layer: GAE runs
        assert "gae" in compared, seen
