"""Fused CAM graphs: full ONNX checking, runs under plain onnxruntime and plain OpenVINO in a process
that never imports camcore, and agreement with the NumPy path (`Explainer.explain` + `upsample` +
`normalize`) on the same runtime."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import camcore
from backends import onnx_graph
from backends.fuse_graph import OUTPUTS, _extreme_rows, fuse
from camcore import CamError, InvalidInput, NotCamCompatible, default_model
from camcore.explainer import softmax
from camcore.maps import resize_matrix
from tests.fakes import BACKENDS, load_on
from tests.zoo import CASES, NUM_CLASSES, REFUSED, _build, hot_spot_input

DYNAMO = Path(__file__).parent / "models" / "efficientnet_lite0_dynamo.onnx"

# Runs every job under onnxruntime alone and proves that camcore never got imported.
RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort

    results = {}
    for job in json.load(open(sys.argv[1])):
        feeds = np.load(job["feeds"])
        session = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for i in range(job["count"]):
            feed = {name: feeds[f"{i}.{name}"] for name in job["inputs"]}
            for name, value in zip(names, session.run(None, feed)):
                results[f"{job['key']}|{i}|{name}"] = value
    assert "camcore" not in sys.modules and "backends" not in sys.modules, sorted(sys.modules)
    np.savez(sys.argv[2], **results)
""")

# The same under OpenVINO alone (at f32, for equality checks), outputs fetched by their ONNX names.
OV_RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import openvino as ov

    core = ov.Core()
    results = {}
    for job in json.load(open(sys.argv[1])):
        feeds = np.load(job["feeds"])
        compiled = core.compile_model(core.read_model(job["model"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        for i in range(job["count"]):
            out = request.infer({name: feeds[f"{i}.{name}"] for name in job["inputs"]})
            for name in job["outputs"]:
                results[f"{job['key']}|{i}|{name}"] = np.array(out[compiled.output(name)])
    assert "camcore" not in sys.modules and "backends" not in sys.modules, sorted(sys.modules)
    np.savez(sys.argv[2], **results)
""")
RUNNERS = {"onnxruntime": RUNNER, "openvino": OV_RUNNER}


def run_plain(directory, jobs, runtime="onnxruntime"):
    """Run ``{key: (model, [feed, ...])}`` in a fresh interpreter with `runtime` only (onnxruntime or openvino).

    Returns ``{key: [{output name: array}, ...]}``, one dict per feed.
    """
    manifest = []
    for n, (key, (model, feeds)) in enumerate(jobs.items()):
        model_path, feeds_path = directory / f"model{n}.onnx", directory / f"feeds{n}.npz"
        onnx.save_model(model, model_path)
        np.savez(feeds_path, **{f"{i}.{name}": v for i, feed in enumerate(feeds) for name, v in feed.items()})
        manifest.append(dict(key=key, model=str(model_path), feeds=str(feeds_path), count=len(feeds),
                             inputs=sorted(feeds[0]), outputs=[o.name for o in model.graph.output]))
    (directory / "jobs.json").write_text(json.dumps(manifest))
    out = directory / "results.npz"
    done = subprocess.run([sys.executable, "-c", RUNNERS[runtime], str(directory / "jobs.json"), str(out)],
                          cwd=directory, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {key: [{} for _ in feeds] for key, (_, feeds) in jobs.items()}
    with np.load(out) as data:
        for name in data.files:
            key, i, output = name.split("|")
            results[key][int(i)][output] = data[name]
    return results


def input_hw(x):
    """Spatial size of a zoo or EfficientNet input batch (3 channels, NCHW or NHWC)."""
    return tuple(x.shape[2:]) if x.shape[1] == 3 else tuple(x.shape[1:3])


def reference(explainer, x, *, top_k, size=None, normalize=True, method="auto"):
    """The NumPy path: explain, then upsample and normalize as asked."""
    e = explainer.explain(x, top_k=top_k, method=method)
    maps = e.maps
    if size is not None:
        maps = camcore.upsample(maps, input_hw(x) if size == "input" else size)
    return e, camcore.normalize(maps) if normalize else maps


# --------------------------------------------------------------------------- the zoo matrix

CONFIGS = {
    "top2": dict(top_k=2),
    "top1_resized": dict(top_k=1, size=(13, 11)),
    "top3_input_size": dict(top_k=3, size="input"),
    "all_raw": dict(top_k=NUM_CLASSES, normalize=False),
}


@dataclass
class Matrix:
    zoo: dict = field(default_factory=dict)
    explainers: dict = field(default_factory=dict)
    feeds: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    runtime: str = "onnxruntime"


@pytest.fixture(scope="module", params=BACKENDS)
def matrix(tmp_path_factory, request):
    """Every zoo case fused in every configuration, all run in one plain-runtime process (per runtime)."""
    m, jobs = Matrix(), {}
    m.runtime = request.param
    for name in sorted(CASES):
        zm = CASES[name]()
        m.zoo[name] = zm
        m.explainers[name] = load_on(m.runtime, zm.model, providers=["CPUExecutionProvider"])
        shapes = (zm.input_shape, *zm.other_input_shapes)
        m.feeds[name] = [{zm.input_name: zm.random_input(seed, shape)} for seed, shape in enumerate(shapes)]
        jobs[(name, "plain")] = (zm.model, m.feeds[name])
        for config, kw in CONFIGS.items():
            m.fused[name, config] = fuse(zm.model, **kw)
            jobs[(name, config)] = (m.fused[name, config], m.feeds[name])
    flat = run_plain(tmp_path_factory.mktemp("fuse_matrix"), {"/".join(k): v for k, v in jobs.items()}, m.runtime)
    m.results = {tuple(k.split("/")): v for k, v in flat.items()}
    return m


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_zoo_matches_numpy_path(matrix, name, config):
    zm, kw = matrix.zoo[name], CONFIGS[config]
    fused = matrix.fused[name, config]
    onnx.checker.check_model(fused, full_check=True)
    assert fused.ir_version == zm.model.ir_version
    assert list(fused.opset_import) == list(zm.model.opset_import)
    original = [o.name for o in zm.model.graph.output]
    assert [o.name for o in fused.graph.output] == original + list(OUTPUTS)
    # fp16 models: onnxruntime's CPU provider drops the fp32 -> fp16 -> fp32 cast pair in front of
    # the fused Cast, so the fused maps use unrounded features (see test_fp16_fused_math_exact).
    fp16 = zm.input_dtype == np.float16
    for feed, got, plain in zip(matrix.feeds[name], matrix.results[name, config], matrix.results[name, "plain"]):
        x = feed[zm.input_name]
        e, want = reference(matrix.explainers[name], x, **kw)
        n, k = len(x), kw["top_k"]
        h, w = e.maps.shape[2:]
        expected_hw = {None: (h, w), "input": input_hw(x)}.get(kw.get("size"), kw.get("size"))
        assert got["cam_classes"].dtype == np.int64 and got["cam_classes"].shape == (n, k)
        assert got["cam_scores"].dtype == np.float32 and got["cam_scores"].shape == (n, k)
        assert got["cam_maps"].dtype == np.float32 and got["cam_maps"].shape == (n, k, *expected_hw)
        np.testing.assert_array_equal(got["cam_classes"], e.classes)
        np.testing.assert_allclose(got["cam_scores"], e.scores, rtol=1e-2 if fp16 else 1e-5, atol=1e-6)
        if kw.get("normalize", True):
            np.testing.assert_allclose(got["cam_maps"], want, rtol=0, atol=1e-2 if fp16 else 1e-4)
            # Scaled before interpolating (static sizes): [0, 1] up to float rounding.
            assert got["cam_maps"].min() >= -1e-6 and got["cam_maps"].max() <= 1 + 1e-6
        else:
            scale = np.abs(want).max()
            np.testing.assert_allclose(got["cam_maps"], want, rtol=0, atol=(1e-2 if fp16 else 1e-5) * scale)
        for out in original:
            np.testing.assert_allclose(got[out], plain[out], rtol=0, atol=1e-6)


def test_matrix_covers_layouts_batches_and_sizes(matrix):
    """The matrix above exercises what the issue names: NCHW, NHWC, fp16, two batch sizes, dynamic H x W."""
    assert {zm.layout for zm in matrix.zoo.values()} == {"NCHW", "NHWC"}
    assert any(zm.input_dtype == np.float16 for zm in matrix.zoo.values())
    shapes = [feed["input"].shape for feed in matrix.feeds["dynamic_batch_hw"]]
    assert len({s[0] for s in shapes}) >= 2 and len({s[2:] for s in shapes}) >= 2
    hws = {r["cam_maps"].shape[2:] for r in matrix.results["dynamic_batch_hw", "top3_input_size"]}
    assert hws == {s[2:] for s in shapes}
    # Both resize paths: Resize for dynamic spatial sizes, interpolation MatMuls for static ones.
    ops = {key: {n.op_type for n in fused.graph.node if n.name.startswith("cam_")}
           for key, fused in matrix.fused.items()}
    assert "Resize" in ops["dynamic_batch_hw", "top3_input_size"]
    assert "Resize" in ops["dynamic_batch_hw", "top1_resized"]
    assert "Resize" not in ops["gap_gemm", "top3_input_size"] | ops["nhwc_reducemean", "top1_resized"]


def test_raw_maps_keep_the_cam_identity(matrix):
    """normalize=False: mean_xy(maps) + bias[classes] == logits[classes]."""
    for name in ("gap_gemm", "nhwc_reducemean", "conv1x1_flatten", "batchnorm_4d", "dynamic_batch_hw"):
        zm, ex = matrix.zoo[name], matrix.explainers[name]
        for feed, got in zip(matrix.feeds[name], matrix.results[name, "all_raw"]):
            logits = ex.explain(feed[zm.input_name]).logits
            classes = got["cam_classes"]
            np.testing.assert_allclose(got["cam_maps"].mean(axis=(2, 3)) + ex.head.bias[classes],
                                       np.take_along_axis(logits, classes, axis=1), atol=1e-4)


def test_fp16_fused_math_exact(tmp_path):
    """fp16 model: from the float32 features and logits the fused graph actually used, the
    fused classes, scores and maps are the NumPy path's within 1e-4."""
    zm = CASES["fp16_model"]()
    ex = camcore.load(zm.model, providers=["CPUExecutionProvider"])
    fused = onnx_graph.expose_outputs(fuse(zm.model, top_k=2, size=(10, 6)),
                                      ["cam_features_float", "cam_logits_float"])
    feeds = [{zm.input_name: zm.random_input(seed)} for seed in range(2)]
    for got in run_plain(tmp_path, {"fp16": (fused, feeds)})["fp16"]:
        features, logits = got["cam_features_float"], got["cam_logits_float"]
        assert features.dtype == logits.dtype == np.float32
        classes = np.argsort(-logits, axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(got["cam_classes"], classes)
        np.testing.assert_allclose(got["cam_scores"], np.take_along_axis(softmax(logits), classes, 1),
                                   rtol=1e-5, atol=1e-6)
        want = camcore.normalize(camcore.upsample(camcore.cam(features, ex.head.weights, classes), (10, 6)))
        np.testing.assert_allclose(got["cam_maps"], want, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- real models


@pytest.mark.parametrize("source", ["embedded", "dynamo"])
def test_efficientnet_lite0(tmp_path, source, backend_name):
    model = None if source == "embedded" else DYNAMO
    fused = fuse(model, top_k=3, size="input")
    onnx.checker.check_model(fused, full_check=True)
    # Static 7x7 -> 224x224: the interpolation MatMuls, with concrete declared shapes.
    assert "Resize" not in {n.op_type for n in fused.graph.node}
    dims = [d.dim_value or d.dim_param for d in fused.graph.output[-1].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    plain = onnx.load(str(default_model.path() if model is None else model))
    assert (fused.ir_version, list(fused.opset_import)) == (plain.ir_version, list(plain.opset_import))
    ex = load_on(backend_name, model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feeds = [{"input": rng.standard_normal((n, 3, 224, 224)).astype(np.float32)} for n in (1, 3)]
    results = run_plain(tmp_path, {"fused": (fused, feeds), "plain": (plain, feeds)}, backend_name)
    for feed, got, base in zip(feeds, results["fused"], results["plain"]):
        e, want = reference(ex, feed["input"], top_k=3, size="input")
        assert got["cam_maps"].shape == (len(feed["input"]), 3, 224, 224)
        np.testing.assert_array_equal(got["cam_classes"], e.classes)
        np.testing.assert_allclose(got["cam_scores"], e.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["cam_maps"], want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["logits"], base["logits"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- maps edge cases


def test_constant_and_nan_maps_become_zeros(tmp_path):
    """As camcore.normalize: a constant map, or one holding NaN anywhere, normalizes to zeros."""
    zm = CASES["gap_gemm"]()
    x = zm.random_input(3)
    x[0, :, 5, 6] = np.nan  # not at the first pixel: onnxruntime's ReduceMin/ReduceMax skip NaN there
    hot = CASES["hot_spot_nchw"]()
    jobs = {
        "nan_norm": (fuse(zm.model, top_k=2, size=(12, 12)), [{zm.input_name: x}]),
        "nan_raw": (fuse(zm.model, top_k=2, normalize=False), [{zm.input_name: x}]),
        "constant": (fuse(hot.model, top_k=2, size="input"), [{hot.input_name: np.zeros(hot.input_shape, np.float32)}]),
    }
    results = {key: runs[0] for key, runs in run_plain(tmp_path, jobs).items()}
    raw = results["nan_raw"]["cam_maps"]
    assert np.isnan(raw[0]).any() and np.isfinite(raw[1]).all()
    normalized = results["nan_norm"]["cam_maps"]
    np.testing.assert_array_equal(normalized[0], 0)
    np.testing.assert_allclose(normalized[1], camcore.normalize(camcore.upsample(raw[1], (12, 12))), atol=1e-4)
    np.testing.assert_array_equal(results["constant"]["cam_maps"], 0)


@pytest.mark.parametrize("name", ["hot_spot_nchw", "hot_spot_nhwc"])
def test_orientation(tmp_path, name):
    zm = CASES[name]()
    y, x = 6, 2
    got = run_plain(tmp_path, {name: (fuse(zm.model), [{zm.input_name: hot_spot_input(zm, y, x)}])})[name][0]
    maps = got["cam_maps"]
    assert maps.shape == (1, 1, 9, 7)
    assert np.unravel_index(np.argmax(np.abs(maps[0, 0] - maps[0, 0].mean())), (9, 7)) == (y, x)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), out_h=st.integers(1, 40), out_w=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1))
def test_resized_extremes_lie_on_extreme_rows(h, w, out_h, out_w, seed):
    """The min and max of a bilinear upsample (or downsample) are on the rows and columns that
    `_extreme_rows` keeps, so normalization can read them from a tiny probe."""
    maps = np.random.default_rng(seed).standard_normal((3, h, w))
    full = camcore.upsample(maps, (out_h, out_w))
    rows = _extreme_rows(resize_matrix(out_h, h, "bilinear", "<f8"))
    cols = _extreme_rows(resize_matrix(out_w, w, "bilinear", "<f8"))
    assert len(rows) <= min(out_h, 2 * h + 2) and len(cols) <= min(out_w, 2 * w + 2)
    probe = full[:, rows][:, :, cols]
    np.testing.assert_array_equal(probe.max(axis=(1, 2)), full.max(axis=(1, 2)))
    np.testing.assert_array_equal(probe.min(axis=(1, 2)), full.min(axis=(1, 2)))


# --------------------------------------------------------------------------- opsets


@pytest.mark.parametrize("opset", [9, 10, 11])
def test_old_opsets_keep_their_version(tmp_path, opset):
    zm = _build(f"opset{opset}", opset=opset)
    # Static sizes resize with MatMuls at any opset.
    fused = {"plain_size": fuse(zm.model, top_k=2), "resized": fuse(zm.model, top_k=2, size=(16, 16))}
    for model in fused.values():
        onnx.checker.check_model(model, full_check=True)
        assert (model.ir_version, list(model.opset_import)) == (zm.model.ir_version, list(zm.model.opset_import))
        topk = next(n for n in model.graph.node if n.op_type == "TopK")
        assert len(topk.input) == (1 if opset < 10 else 2)
    ex = camcore.load(zm.model, providers=["CPUExecutionProvider"])
    feeds = [{zm.input_name: zm.random_input(1)}]
    results = run_plain(tmp_path, {key: (model, feeds) for key, model in fused.items()})
    for key, size in (("plain_size", None), ("resized", (16, 16))):
        e, want = reference(ex, feeds[0][zm.input_name], top_k=2, size=size)
        np.testing.assert_array_equal(results[key][0]["cam_classes"], e.classes)
        np.testing.assert_allclose(results[key][0]["cam_maps"], want, rtol=0, atol=1e-4)
    # Dynamic spatial sizes need Resize with half_pixel coordinates (opset 11).
    dynamic = _build(f"dynamic_opset{opset}", opset=opset, batch="N", dynamic_hw=True)
    if opset < 11:
        with pytest.raises(CamError, match=r"opset >= 11; the model has opset"):
            fuse(dynamic.model, size=(16, 16))
    else:
        assert any(n.op_type == "Resize" for n in fuse(dynamic.model, size=(16, 16)).graph.node)


# --------------------------------------------------------------------------- refusals, validation, purity


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_cam_refused_like_explain(name):
    zm = REFUSED[name]()
    with pytest.raises(NotCamCompatible, match=zm.refuse) as fused:
        fuse(zm.model, method="cam")
    with pytest.raises(NotCamCompatible) as explained:
        camcore.load(zm.model).explain(zm.random_input(0), method="cam")
    assert str(fused.value) == str(explained.value)


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=0), r"top_k must be an int in \[1, 5\]"),
    (dict(top_k=6), r"top_k must be an int in \[1, 5\]"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(size=(0, 4)), r"size must be a pair \(H, W\)"),
    (dict(size=(4,)), "size must be a pair"),
    (dict(size=(2.5, 4)), "size must be a pair"),
    (dict(size="inputs"), "size must be None, 'input'"),
    (dict(normalize="yes"), "normalize must be a bool"),
])
def test_invalid_arguments(kw, message):
    with pytest.raises(InvalidInput, match=message):
        fuse(CASES["gap_gemm"]().model, **kw)


def test_pure_deterministic_and_named():
    zm = CASES["nhwc_reducemean"]()
    before = zm.model.SerializeToString()
    first, second = fuse(zm.model, top_k=2, size="input"), fuse(zm.model, top_k=2, size="input")
    assert zm.model.SerializeToString() == before
    assert first.SerializeToString() == second.SerializeToString()
    original = {n.name for n in zm.model.graph.node}
    added = [n for n in first.graph.node if n.name not in original]
    assert added and all(n.name.startswith("cam_") and all(o.startswith("cam_") for o in n.output) for n in added)
    weights = {t.name: t for t in first.graph.initializer}["cam_weights"]
    ex = camcore.load(zm.model)
    np.testing.assert_array_equal(numpy_helper.to_array(weights), ex.head.weights)
    with pytest.raises(CamError, match="fused already"):
        fuse(first)


def test_path_with_external_data(tmp_path):
    zm = CASES["external_data"]()
    path = zm.save(tmp_path)
    fused = fuse(path, top_k=2)
    onnx.checker.check_model(fused, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}["cam_weights"]
    np.testing.assert_allclose(weights, zm.weights, atol=1e-5)


def test_api_delegates():
    zm = CASES["gap_gemm"]()
    assert camcore.fuse(zm.model, top_k=2).SerializeToString() == fuse(zm.model, top_k=2).SerializeToString()
