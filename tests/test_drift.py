"""`camcore drift` on the runtime chosen by the shared runtime options: both models load with
``--backend --device --precision``, drift.json says which runtime ran each, and OpenVINO at f32
measures the drift onnxruntime measures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from skimage import data
from skimage import io as skio
from skimage.transform import resize

from camcore import default_model

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea", "coffee")


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "camcore.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The embedded model, a deployed form of it (its weights fake-quantized to int8 levels, per tensor, in
    their stored type: the graph is the same, the values drift) and two photos."""
    folder = tmp_path_factory.mktemp("drift")
    model = onnx.load(default_model.path())
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f" and values.ndim >= 2:  # conv and dense weights (float16, cast in the graph)
            scale = float(np.abs(values).max()) / 127 or 1.0
            quantized = (np.round(values / scale) * scale).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(quantized, init.name))
    deployed = folder / "lite0-int8-weights.onnx"
    onnx.save(model, deployed)
    images = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        small = resize(photo, (photo.shape[0] // 2, photo.shape[1] // 2), preserve_range=True).astype(np.uint8)
        skio.imsave(folder / f"{name}.png", small, check_contrast=False)
        images.append(folder / f"{name}.png")
    return deployed, images


@pytest.fixture(scope="module")
def reports(inputs, tmp_path_factory):
    """drift.json on onnxruntime, and on OpenVINO at f32."""
    deployed, images = inputs
    found = {}
    for backend, flags in (("onnxruntime", ()), ("openvino", ("--precision", "f32"))):
        out = tmp_path_factory.mktemp(backend)
        proc = cli("drift", "embedded", deployed, *images, "--steps", "2", "--worst", "1", "--quiet", "--out", out,
                   "--backend", backend, *flags)
        assert proc.returncode == 0, proc.stderr
        found[backend] = json.loads((out / "drift.json").read_text())
    return found


def test_drift_json_says_which_runtime_ran_each_model(reports):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'camcore[openvino]')")
    import onnxruntime
    import openvino

    for side in ("reference", "deployed"):
        ov = reports["openvino"]["runtime"][side]
        assert (ov["backend"], ov["precision"], ov["devices"]) == ("openvino", "f32", ["openvino:CPU"])
        assert ov["version"] == openvino.get_version()
        ort = reports["onnxruntime"]["runtime"][side]
        assert (ort["backend"], ort["version"]) == ("onnxruntime", onnxruntime.__version__)
        assert ort["devices"] == ["CPUExecutionProvider"] and ort["precision"] == "f32"


def test_openvino_f32_drift_equals_onnxruntime_drift(reports):
    """At f32 the two runtimes agree on logits and maps within 1e-4 of their largest magnitude
    (tests/test_runtimes.py).  So the figures agree to within:

    * scores: a softmax probability moves by at most half the largest logit change, and the logits
      (|y| < 20 here) move by 2e-3 at most: 1e-3;
    * Pearson correlations of maps that each move by 1e-4 of their maximum: 1e-3;
    * deletion AUC, a mean of such probabilities: 1e-3; Average Drop, 100 times a ratio of
      them: 0.1 percent points;
    and the classes and boxes (thresholded at 0.2 of the maximum, far from a 1e-4 change) are equal.
    """
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'camcore[openvino]')")
    ort, ov = reports["onnxruntime"], reports["openvino"]
    assert ov["methods"] == ort["methods"] == {"reference": "cam", "deployed": "cam"}
    assert len(ov["images"]) == len(ort["images"]) == len(PHOTOS)
    tolerances = {"score": 1e-3, "pearson": 1e-3, "deletion_auc": 1e-3, "average_drop": 0.1}
    for a, b in zip(ort["images"], ov["images"]):
        assert a["source"] == b["source"]
        for key in ("reference_class", "deployed_class", "reference_name", "top1_agree", "reference_box",
                    "deployed_box", "box_iou"):
            assert a[key] == b[key], key
        for key, value in a.items():
            suffix = next((s for s in tolerances if key.endswith(s)), None)
            if suffix is not None:
                assert abs(value - b[key]) <= tolerances[suffix], (key, value, b[key])
    # the deployed form did drift, but little: a figure that moves is measured, not copied
    assert all(0.9 < r["pearson"] < 1 for r in ort["images"])
    for key in ("top1_agreement", "box_iou_mean"):
        assert ort["overall"][key] == ov["overall"][key]
    assert abs(ort["overall"]["pearson_mean"] - ov["overall"]["pearson_mean"]) <= 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp32"], "--precision must be one of f32, bf16, f16 (or left out for the runtime's default), "
                              "got 'fp32'"),
    (["--backend", "openvino", "--providers", "cpu"],
     "--providers is for --backend onnxruntime; --backend openvino takes --device"),
])
def test_a_bad_runtime_option_is_one_error_line(inputs, tmp_path, flags, message):
    deployed, images = inputs
    out = tmp_path / "out"
    proc = cli("drift", "embedded", deployed, *images, "--out", out, *flags)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"camcore: error: {message}"]
    assert not out.exists()


def test_a_deployed_path_loads_on_the_reference_runtime(inputs):
    """`drift(explainer, path)`: the path is loaded on the explainer's runtime, device and requested precision."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'camcore[openvino]')")
    import camcore
    from camcore.drift import drift

    deployed, images = inputs
    reference = camcore.load(backend="openvino", precision="f32")
    result = drift(reference, deployed, [skio.imread(images[0])], faithfulness=False)
    assert result["runtime"]["deployed"]["backend"] == "openvino"
    assert result["runtime"]["deployed"]["precision"] == "f32"
    assert result["runtime"]["deployed"]["devices"] == ["openvino:CPU"]
    assert 0.9 < result["images"][0]["pearson"] < 1
