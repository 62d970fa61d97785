"""The graph-analysis cache (backends/analysis_cache.py): hits equal cold loads, and never import onnx."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from skimage import data

import camcore
from backends import analysis_cache, onnx_graph
from backends.ort_session import OrtBackend
from camcore import CamError, Head
from camcore.cli import main as cli_main
from tests.zoo import CASES, REFUSED

ROOT = Path(__file__).resolve().parents[1]
# CAM heads of several layouts, poolings and dtypes, symbolic dims, and gradient-only heads.
ZOO = ["gap_gemm", "nhwc_transpose_gap", "avgpool_padded_include_pad", "fp16_model", "paddle_minus_one_dims",
       "two_outputs_prob_embedding", "mlp_head", "global_max_pool"]


def zoo(name):
    return (CASES.get(name) or REFUSED[name])()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder for this test; returns where its entries go."""
    monkeypatch.setenv("CAMCORE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "analysis"


def entries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_same_head(a: Head, b: Head):
    """Every field equal and of the same type; arrays of the same dtype, shape and values."""
    for f in dataclasses.fields(Head):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert type(x) is type(y) and x == y, (f.name, x, y)
    # Shapes keep their ints, str and None; specs their numpy dtypes.
    for x, y in zip((a.input, *a.inputs), (b.input, *b.inputs)):
        assert [type(d) for d in x.shape] == [type(d) for d in y.shape] and type(x.dtype) is type(y.dtype)
    assert [type(d) for d in a.feature_shape] == [type(d) for d in b.feature_shape]


def assert_same_explanation(a, b):
    for name in ("logits", "classes", "scores", "maps"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert a.method == b.method


@pytest.mark.parametrize("name", ZOO)
def test_hit_equals_cold_load(name, cache, tmp_path):
    zm = zoo(name)
    path = zm.save(tmp_path)
    cold = OrtBackend(path, providers=["cpu"])
    assert not cold.cache_hit and len(entries(cache)) == 1
    warm = OrtBackend(path, providers=["cpu"])
    assert warm.cache_hit
    assert_same_head(warm.head, cold.head)
    x = zm.random_input(seed=3)
    reference, explainer = camcore.Explainer(cold), camcore.Explainer(warm)
    # "auto" is CAM or Grad-CAM; Grad-CAM reads the graph itself, from the file on first use after a hit.
    for method in ("auto", "gradcam"):
        assert_same_explanation(reference.explain(x, top_k=2, method=method),
                                explainer.explain(x, top_k=2, method=method))


def test_embedded_model_hit_equals_cold_load(cache):
    photo = data.chelsea()
    cold = camcore.load()
    assert not cold.backend.cache_hit
    warm = camcore.load()
    assert warm.backend.cache_hit
    assert_same_head(warm.head, cold.head)
    [a], [b] = (ex.explain_images([photo], top_k=3) for ex in (cold, warm))
    assert a.classes.tolist() == b.classes.tolist() and a.classes[0] == 285  # Egyptian cat
    assert a.scores.tobytes() == b.scores.tobytes() and a.maps.tobytes() == b.maps.tobytes()
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_warm_cache_never_imports_onnx(cache, tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    np.save(tmp_path / "x.npy", zm.random_input())
    photo = tmp_path / "one.jpg"
    Image.fromarray(data.chelsea()).save(photo)
    camcore.load(path)
    camcore.load()  # the embedded model, for the CLI
    assert len(entries(cache)) == 2
    code = f"""
import json, sys
import numpy as np
import camcore
from camcore.cli import main

ex = camcore.load({str(path)!r})
ex.explain(np.load({str(tmp_path / 'x.npy')!r}), top_k=2)
rc = main(["explain", {str(photo)!r}, "--out", {str(tmp_path / 'out')!r}, "--quiet"])
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "ml_dtypes"))
before = loaded()
ex.backend.model  # the graph, read on demand: now onnx is imported
print(json.dumps({{"hit": ex.backend.cache_hit, "rc": rc, "before": before, "after": loaded()}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["hit"] and report["rc"] == 0
    assert report["before"] == []
    assert "onnx" in report["after"]
    assert [p.name for p in (tmp_path / "out").glob("one.cam.*")] == ["one.cam.jpg"]  # JPEG in, JPEG out


def test_modified_model_file_is_a_miss(cache, tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    old = camcore.load(path)
    model = onnx.load_model(str(path))
    bias = next(t for t in model.graph.initializer if t.name == "fc_b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1), "fc_b"))
    onnx.save_model(model, str(path))
    new = camcore.load(path)
    assert not new.backend.cache_hit and len(entries(cache)) == 2
    np.testing.assert_allclose(new.head.bias, old.head.bias + 1, atol=1e-5)
    assert camcore.load(path).backend.cache_hit


def test_changed_file_after_a_hit_is_an_error_when_the_graph_is_read(cache, tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    camcore.load(path)
    ex = camcore.load(path)
    assert ex.backend.cache_hit
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(CamError, match="changed since it was loaded"):
        ex.backend.model


def test_other_analysis_code_is_a_miss(cache, tmp_path, monkeypatch):
    """An entry written by other graph code of the same camcore version is not read."""
    path = CASES["gap_gemm"]().save(tmp_path)
    camcore.load(path)
    assert camcore.load(path).backend.cache_hit
    assert len(analysis_cache.code_fingerprint()) == 64
    monkeypatch.setattr(analysis_cache, "code_fingerprint", lambda: "0" * 64)
    assert not camcore.load(path).backend.cache_hit and len(entries(cache)) == 2


def test_feature_override_is_another_entry(cache, tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    layers = [name for name, _, _ in onnx_graph.candidate_layers(zm.model)]
    other = next(name for name in layers if name != zm.feature)
    default = camcore.load(path)
    chosen = camcore.load(path, feature=other)
    assert not chosen.backend.cache_hit and len(entries(cache)) == 2
    again_default, again_chosen = camcore.load(path), camcore.load(path, feature=other)
    assert again_default.backend.cache_hit and again_chosen.backend.cache_hit
    assert again_default.head.feature == default.head.feature == zm.feature
    assert again_chosen.head.feature == chosen.head.feature == other


@pytest.mark.parametrize("damage", ["head.json", "head.npz", "exposed.onnx", "missing exposed.onnx", "key"])
def test_corrupt_entry_is_a_miss_and_rewritten(damage, cache, tmp_path):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    cold = OrtBackend(path)
    [entry] = [cache / name for name in entries(cache)]
    good = {f.name: f.read_bytes() for f in entry.iterdir()}
    if damage.startswith("missing"):
        (entry / damage.split()[1]).unlink()
    elif damage == "key":  # a well-formed entry of another key under this name
        meta = json.loads(good["head.json"])
        meta["key"]["model_sha256"] = "0" * 64
        (entry / "head.json").write_text(json.dumps(meta))
    else:
        (entry / damage).write_bytes(good[damage][:len(good[damage]) // 2])
    assert analysis_cache.lookup(json.loads(good["head.json"])["key"]) is None
    again = OrtBackend(path)
    assert not again.cache_hit
    assert_same_head(again.head, cold.head)
    assert entries(cache) == [entry.name]  # rewritten in place, no temporary folder left
    assert {f.name: f.read_bytes() for f in entry.iterdir()} == good
    assert OrtBackend(path).cache_hit


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMCORE_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert analysis_cache.folder() is None
    path = CASES["gap_gemm"]().save(tmp_path)
    assert not camcore.load(path).backend.cache_hit
    assert not camcore.load(path).backend.cache_hit
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMCORE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert analysis_cache.folder() == tmp_path / "mine" / "analysis"
    monkeypatch.delenv("CAMCORE_CACHE_DIR")
    assert analysis_cache.folder() == tmp_path / "xdg" / "camcore" / "analysis"
    path = CASES["gap_gemm"]().save(tmp_path)
    camcore.load(path)
    assert len(entries(tmp_path / "xdg" / "camcore" / "analysis")) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute paths only
    assert analysis_cache.folder() == tmp_path / "home" / ".cache" / "camcore" / "analysis"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert analysis_cache.folder() == tmp_path / "home" / ".cache" / "camcore" / "analysis"


def test_unwritable_folder_means_no_cache(tmp_path, monkeypatch):
    # Below a regular file no folder can be made, even as root (file modes do not stop root).
    (tmp_path / "plain-file").write_text("not a folder")
    monkeypatch.setenv("CAMCORE_CACHE_DIR", str(tmp_path / "plain-file" / "cache"))
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    first, second = camcore.load(path), camcore.load(path)
    assert not first.backend.cache_hit and not second.backend.cache_hit
    x = zm.random_input()
    np.testing.assert_array_equal(second.explain(x).maps, first.explain(x).maps)
    assert (tmp_path / "plain-file").read_text() == "not a folder"


def test_external_data_and_in_memory_models_are_not_cached(cache, tmp_path):
    zm = CASES["external_data"]()
    path = zm.save(tmp_path)
    assert (tmp_path / f"{zm.name}.onnx.data").is_file()
    first, second = camcore.load(path), camcore.load(path)
    assert not first.backend.cache_hit and not second.backend.cache_hit
    np.testing.assert_allclose(second.head.weights, zm.weights, atol=1e-5, rtol=1e-4)
    memory = camcore.load(CASES["gap_gemm"]().model)
    assert not memory.backend.cache_hit and memory.backend.folder is None
    assert entries(cache) == []


def test_head_json_cannot_carry_is_not_stored(cache, tmp_path):
    head = OrtBackend(CASES["gap_gemm"]().save(tmp_path)).head
    parts = analysis_cache.entry_key("1" * 64, onnxruntime_version="test")
    tupled = dataclasses.replace(head, extra={"pooled": ("a", "b")})  # JSON turns tuples into lists
    assert not analysis_cache.store(parts, b"model", tupled)
    assert analysis_cache.lookup(parts) is None
    assert analysis_cache.store(parts, b"model", head)
    exposed, back = analysis_cache.lookup(parts)
    assert exposed == b"model"
    assert_same_head(back, head)


def test_inspect_and_fuse_read_the_graph_after_a_hit(cache, tmp_path, capsys):
    zm = CASES["gap_gemm"]()
    path = zm.save(tmp_path)
    outputs = []
    for _ in range(2):
        assert cli_main(["inspect", str(path), "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
        outputs.append(camcore.fuse(path, top_k=2).SerializeToString())
    assert OrtBackend(path).cache_hit
    assert outputs[0] == outputs[2] and outputs[0]["layers"]
    assert outputs[1] == outputs[3]
