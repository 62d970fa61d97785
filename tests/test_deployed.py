"""No raw exceptions on deployed models: every corpus CNN and the embedded Lite0, under every transform.

``tools/corpus/deployed.py`` makes each transform (float16 with and without ``keep_io_types``,
onnxsim, onnxruntime's offline optimization BASIC and EXTENDED, an opset upgrade, external
data, a Sub/Div normalization in front, uint8 NHWC pixels in front).  Each deployed model goes
through what `camcore inspect` and `camcore explain` do: load, the candidate layers, the
default method, explain.  Each must end in an explanation or in one `CamError` line that this
file lists as expected (`REFUSED`); anything else fails.

The explanation is compared with the source model's on the same pixels: the same method and,
for the float32 transforms, the same top-1 and maps within 1e-3 of the largest map value.
float16 transforms compute every activation with an 11-bit significand (unit roundoff
2**-11 = 4.9e-4) through tens of layers; their maps are held to 2e-2 of the largest map value
and a Pearson correlation >= 0.999 with the source's (largest error seen: 7.7e-3, on
torch mobilenetv2_050_dynamo), and their top-1 to the source's where its top-2 margin exceeds
that error.  Where the source's maps are nearly flat (`FLOAT16_CONTRAST`) float16 rounding
is as large as their spatial variation; those float16 maps are held instead to the exact CAM of
the float16 model itself.

The transforms are built here from the corpus (CI builds the corpus first), one model at a
time in a temporary folder removed before the next model's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import camcore
from camcore import default_model
from camcore.errors import CamError
from tests import corpus

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("deployed", ROOT / "tools" / "corpus" / "deployed.py")
deployed = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("deployed", deployed)
_spec.loader.exec_module(deployed)

FLOAT16 = {"float16", "float16_keep_io"}
# (model, transform) -> what the one-line refusal must say, and why it is right.
REFUSED = {
    # Random weights drive inception's activations to 1.4e9, past float16's largest value
    # (65504): the float16 model itself computes inf (its own output is inf/NaN too).
    ("inception_v3_ts", "float16"): "must be finite",
    ("inception_v3_ts", "float16_keep_io"): "must be finite",
}
LITE0 = "efficientnet_lite0"

# The source maps' spatial contrast (smallest per-item std over the largest |value|) above which
# the float16 maps must correlate >= 0.999 with the float32 ones: 4 float16 unit roundoffs.
# Below it the maps are nearly flat and float16's own rounding of the features is as large as
# their spatial variation, so the correlation measures rounding noise, not camcore.  Measured
# (random weights, the noise inputs below): the Hugging Face EfficientNet exports have contrast
# 1.2e-4 (optimum), 2.3e-4 (dynamo) and 5.9e-4 (ts), at most 1.2 roundoffs: their features are
# nearly constant over space (spatial std / |channel mean| 1.3e-4 to 2.0e-4), and the float16
# model's own features differ from float32's by up to 5.5e-4 to 6.5e-4 of their largest value,
# so those features' spatial deviations correlate only 0.60 to 0.74 across precisions and the
# maps 0.74 to 0.79, though the logits agree (correlation 0.99999994, largest difference 9e-5
# on logits up to 0.21) and camcore reads the same feature tensor, pooling and head in both
# forms (the float32 model's head weights on float16 features reproduce the 0.74; the float16
# head weights on float32 features give 0.999999).  Every other corpus CNN has contrast >= 3.3e-3
# (mobilenetv2_avgpool7_fromkeras_opt) and keeps the correlation check.  Below the threshold the
# float16 maps are judged against the float16 model itself (`_assert_exact_cam_of_itself`).
FLOAT16_CONTRAST = 4 * 2.0**-11


def _models() -> list:
    """``(name, path, Source, (H, W), framework)`` for Lite0 and every corpus CNN, the
    transformers framework's CNNs (Hugging Face EfficientNet) included, ViTs excluded."""
    lite = default_model.preprocess()
    models = [(LITE0, default_model.path(), deployed.Source(mean=lite.mean, std=lite.std), tuple(lite.size), None)]
    for entry in corpus.manifest(*corpus.FRAMEWORKS, corpus.TRANSFORMERS):
        # CNNs: a 4-D feature map pooled over space (transformers' token poolings are another issue's)
        if entry["layout"] not in ("NCHW", "NHWC") or entry["pooling"] not in ("avg", "max", "gap"):
            continue
        shape = entry["input"]["shape"]
        hw = shape[2:4] if entry["layout"] == "NCHW" else shape[1:3]
        hw = tuple(d if isinstance(d, int) else 64 for d in hw)
        models.append((entry["name"], corpus.home() / "models" / entry["file"],
                       deployed.Source(layout=entry["layout"]), hw, entry["framework"]))
    return models


MODELS = _models()
CASES = [(m, t) for m in MODELS for t in deployed.TRANSFORMS]


def _pixels(name: str, hw: tuple) -> np.ndarray:
    """(2, H, W, 3) uint8: two photos for Lite0 (real weights), noise for the random-weight corpus."""
    from PIL import Image
    from skimage import data

    if name == LITE0:
        return np.stack([np.asarray(Image.fromarray(im).resize(hw[::-1], Image.Resampling.BILINEAR))
                         for im in (data.chelsea(), data.coffee())])
    return np.random.default_rng(0).integers(0, 256, (2, *hw, 3), dtype=np.uint8)


def _feed(transform: str, pixels: np.ndarray, info) -> np.ndarray:
    """The input each form takes for the same pixels."""
    if transform == "uint8_nhwc":
        return pixels
    x = pixels / 255.0
    if transform != "normalize_in_graph":
        x = (x - np.asarray(info.mean)) / np.asarray(info.std)
    if info.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, np.float16 if transform == "float16" else np.float32)


def _inspect_and_explain(path, x, classes=None):
    """What `camcore inspect` and `camcore explain` do: load, candidate layers, default method, explain."""
    from backends.onnx_graph import candidate_layers

    explainer = camcore.load(path, providers=["cpu"])
    head = explainer.head
    layers = candidate_layers(explainer.backend.model, logits=head.logits, output=head.output)
    method = explainer.resolve_method("auto")
    out = explainer.explain(x, method="auto", classes=classes)
    return explainer, layers, method, out


def _assert_exact_cam_of_itself(explainer, x, out, classes) -> None:
    """`out.maps` are the exact CAM of the deployed (float16) model: its own features weighted
    by its head, and their spatial means plus the bias give its own logits.

    The float16 model rounds its logits to float16, and the head weights are read back through
    those logits, so the identity holds to one float16 step of the largest logit (2**-10 of it;
    measured on the Hugging Face EfficientNets: 6.9e-5 on logits up to 0.13, optimum).
    """
    assert out.method == "cam", f"a nearly flat {out.method} map has no exact reference here"
    head = explainer.head
    own = explainer.gradients(x, classes=classes)
    features = own.features.astype(np.float64)
    if head.layout == "NHWC":
        features = features.transpose(0, 3, 1, 2)
    weights = head.weights.astype(np.float64)[classes]  # (N, k, K)
    reference = np.einsum("nkhw,njk->njhw", features, weights)
    maps = out.maps.astype(np.float64)
    np.testing.assert_allclose(maps, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    logits = own.logits.astype(np.float64)
    picked = np.take_along_axis(logits, classes, axis=1)
    np.testing.assert_allclose(maps.mean(axis=(-2, -1)) + head.bias[classes], picked,
                               rtol=0, atol=2.0**-10 * np.abs(logits).max())


class _Built:
    """The transforms of one model at a time, and the source's explanation."""

    def __init__(self, root: Path):
        self.root, self.name, self.made, self.source = root, None, {}, None
        self.outcomes = {}  # "model transform" -> method, or the refusal

    def get(self, model):
        name, path, info, hw, framework = model
        if framework is not None:
            corpus.require(framework)
        if name != self.name:
            if self.name is not None:
                shutil.rmtree(self.root / self.name, ignore_errors=True)
            self.name, self.made = name, deployed.build(path, self.root, info)
            pixels = _pixels(name, hw)
            x = _feed("source", pixels, info)
            self.source = (pixels, *_inspect_and_explain(path, x)[2:])
        return self.made, self.source


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The builder; with ``$CAMCORE_DEPLOYED_REPORT`` set, each case's outcome is written there as JSON."""
    root = tmp_path_factory.mktemp("deployed")
    builder = _Built(root)
    yield builder
    shutil.rmtree(root, ignore_errors=True)
    report = os.environ.get("CAMCORE_DEPLOYED_REPORT")
    if report:
        Path(report).write_text(json.dumps(builder.outcomes, indent=1))


@pytest.mark.parametrize("model, transform", CASES, ids=[f"{m[0]}-{t}" for m, t in CASES])
def test_deployed_form_explains_or_refuses_in_one_line(built, model, transform):
    name, _, info, _, _ = model
    made, (pixels, source_method, source) = built.get(model)
    target = made[transform]
    assert isinstance(target, Path), f"the tool could not make {transform} of {name}: {target}"
    x = _feed(transform, pixels, info)
    expected = REFUSED.get((name, transform))
    try:
        explainer, layers, method, out = _inspect_and_explain(target, x, classes=source.classes)
    except CamError as exc:  # anything else propagates and fails the test
        message = str(exc)
        built.outcomes[f"{name} {transform}"] = f"refused: {type(exc).__name__}: {message}"
        assert "\n" not in message and message
        assert expected is not None, f"{name} {transform} refused: {type(exc).__name__}: {message}"
        assert expected in message
        return
    built.outcomes[f"{name} {transform}"] = out.method
    assert expected is None, f"{name} {transform} is listed as refused but explains: update REFUSED"
    assert layers and method == source_method == out.method
    a, b = source.maps.astype(np.float64), out.maps.astype(np.float64)
    scale = np.abs(a).max()
    top1 = out.logits.argmax(axis=1)  # the deployed model's own top-1
    if transform in FLOAT16:
        assert np.abs(a - b).max() <= 2e-2 * scale
        contrast = a.std(axis=(-2, -1)).min() / scale if scale else 0.0
        if contrast > FLOAT16_CONTRAST:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.999
        elif a.std() > 0:  # (Grad-CAM's ReLU leaves some random-weight maps all zero, in both forms)
            _assert_exact_cam_of_itself(explainer, x, out, source.classes)
        logits = np.sort(source.logits, axis=1)
        clear = logits[:, -1] - logits[:, -2] > 2e-2 * np.abs(logits).max(axis=1)
        np.testing.assert_array_equal(top1[clear], source.classes[clear, 0])
    else:
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * scale)
        np.testing.assert_array_equal(top1, source.classes[:, 0])


def test_lite0_with_pixels_in_explains_photos_as_the_float_model(tmp_path):
    """Lite0 with a uint8 NHWC input and its normalization inside: `explain_images` feeds it the
    resized pixels and gets the float model's classes, scores, maps and boxes."""
    from skimage import data

    lite = default_model.preprocess()
    target = tmp_path / "lite0_pixels.onnx"
    deployed.uint8_nhwc(default_model.path(), target, deployed.Source(mean=lite.mean, std=lite.std))
    pixels = camcore.load(target, providers=["cpu"])
    assert pixels.head.input.dtype == np.uint8 and pixels.input_layout == "NHWC" and pixels.head.affine
    photos = [data.chelsea(), data.coffee(), data.astronaut()]
    got = pixels.explain_images(photos, preprocess=lite, top_k=2)
    want = camcore.load(providers=["cpu"]).explain_images(photos, top_k=2)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.classes, w.classes)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-5)
        np.testing.assert_allclose(g.cams, w.cams, rtol=0, atol=1e-4 * np.abs(w.cams).max())
        assert g.size == w.size and g.box(0) == w.box(0)
