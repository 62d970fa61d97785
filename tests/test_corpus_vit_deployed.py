"""Vision transformers of the corpus in their deployed forms: int8 (onnxruntime's QDQ, QOperator and
dynamic quantization), float16 (onnxconverter-common) and onnxruntime's offline optimization.

Each form is made from the float export as users make it (tests/quantized.py, tools/corpus/deployed.py)
and must be read as the float model is: the same pooling, prefix tokens and patch grid.  Each method
that applies to the float model must run on the deployed one, and its map must correlate with the
float model's map on the same photos (the calibration photos, resized to the 32x32 input):

* float forms (float16 with float32 inputs, offline optimization): Pearson >= 0.99 (measured >= 0.999);
* int8 forms: Pearson >= 0.9.  Measured minimum over items, random weights: 0.960 (Grad-CAM,
  timm ViT QDQ), 0.967 (GAE, same), 0.988 (CAM, HF Swin QOperator), 0.993 (Grad-CAM, BEiT QDQ and
  QOperator), 0.961 (Grad-CAM, timm ViT QOperator; all-zero until the gradient passed the
  fused QKV product's uint8 Split), 0.991 (GAE, DeiT distilled QOperator; 0.63 to 0.80 for
  Grad-CAM and GAE until the gradient passed its two heads' saturated output pairs), >= 0.998 for
  rollout and dynamic quantization.  int8 rounds every activation to 1/255
  of its calibrated range; with random weights the maps' spatial variation is of that order.

Recipro-CAM is run but held to the float map only in the form that computes in float32 (offline
optimization): its map is the class score of masked copies, which with random weights differ from
each other by less than the int8 or float16 rounding of the logits, so the correlation measures
rounding noise (measured mean Pearson with the float map: 0.09 to 0.56 for int8 ViT/DeiT/BEiT, 0.93
to 1.0 for float16 with a float16 input; float16 with float32 inputs gave >= 0.99 on one head graph
and 0.89 to 0.99 on the same photos once the head computed the last block for the CLS query alone,
its float16 logits then 6e-5 rms off the float32 ones instead of 5e-5).

Where a method cannot apply (attention methods on Swin's windowed attention), the refusal is one
`CamError` line naming the methods that do apply, as for the float model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import camcore
from camcore.errors import CamError
from tests import corpus, quantized

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("deployed", ROOT / "tools" / "corpus" / "deployed.py")
deployed = sys.modules.get("deployed")
if deployed is None:
    deployed = importlib.util.module_from_spec(_spec)
    sys.modules["deployed"] = deployed
    _spec.loader.exec_module(deployed)

# One model per pooling kind: CLS (timm ViT), a mean without the prefix token (BEiT, the int8 export
# that was refused), a mean over a channels-last stage with windowed attention and exact CAM (HF Swin),
# two tokens read by two summed heads (timm DeiT distilled: each head's output quantized).
MODELS = ("timm_vit_ts", "timm_beit_ts", "hf_swin_optimum", "timm_deit_distilled_ts")
FORMS = ("qdq", "qoperator", "dynamic", "float16_keep_io", "ort_extended")
FLOAT_FORMS = {"float16_keep_io", "ort_extended"}
METHODS = ("cam", "gradcam", "eigencam", "reciprocam", "rollout", "gae")
INT8_PEARSON, FLOAT_PEARSON = 0.9, 0.99
# (model, form) -> methods that do not yet reproduce the float map (see the branch report).
KNOWN_GAPS: dict = {}
ENTRIES = {e["name"]: e for e in corpus.transformer_entries()}


def _entry(name):
    corpus.require(corpus.TRANSFORMERS)
    if name not in ENTRIES:
        pytest.fail(f"corpus entry {name!r} is missing from the manifest")
    return ENTRIES[name]


def _form(path: Path, form: str, preprocess, tmp: Path) -> Path:
    if form in quantized.FORMATS:
        return quantized.build(path, form, preprocess=preprocess)
    made = deployed.build(path, tmp, deployed.Source(), names=[form])[form]
    assert isinstance(made, Path), f"the tool could not make {form}: {made}"
    return made


def _explain(explainer, x, method, classes):
    try:
        return explainer.explain(x.astype(explainer.head.input.dtype), method=method, classes=classes).maps
    except CamError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"{method}: not one line: {message!r}"
        return message


def _pearson(a, b) -> np.ndarray:
    """Per item; 1.0 where both maps are constant and equal (GAE's uniform map on BEiT)."""
    out = []
    for u, v in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        if u.std() == 0 or v.std() == 0:
            out.append(1.0 if np.allclose(u, v, rtol=0, atol=1e-6 * max(np.abs(u).max(), 1e-30)) else 0.0)
        else:
            out.append(np.corrcoef(u, v)[0, 1])
    return np.array(out)


@pytest.fixture(scope="module")
def floats():
    """name -> (float explainer, photos batch, classes, method -> maps or refusal)."""
    return {}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", MODELS)
def test_deployed_transformer_is_read_and_explained_as_the_float_model(name, form, floats, tmp_path):
    entry = _entry(name)
    path = corpus.home() / "models" / entry["file"]
    size = (entry["image_size"], entry["image_size"])
    preprocess = camcore.Preprocess.imagenet(size)
    if name not in floats:
        source = camcore.load(path, providers=["cpu"], size=size)
        x, _ = preprocess.batch(quantized.photos(), layout="NCHW")
        x = x.astype(np.float32)
        classes = source.explain(x, method="gradcam").classes
        floats[name] = (source, x, classes, {m: _explain(source, x, m, classes) for m in METHODS})
    source, x, classes, reference = floats[name]
    target = camcore.load(_form(path, form, preprocess, tmp_path), providers=["cpu"], size=size)

    got, want = target.head.tokens, source.head.tokens
    assert got is not None, "not read as a transformer"
    assert (got.pooling, got.prefix, tuple(got.grid)) == (want.pooling, want.prefix, tuple(want.grid))
    assert (got.pooling, got.prefix, list(got.grid)) == (entry["pooling"], entry["prefix_tokens"], entry["grid"])
    assert len(got.attention) == len(want.attention)
    assert (target.head.weights is None) == (source.head.weights is None)  # exact CAM where the float has it

    threshold = FLOAT_PEARSON if form in FLOAT_FORMS else INT8_PEARSON
    for method in METHODS:
        ours, theirs = _explain(target, x, method, classes), reference[method]
        if isinstance(theirs, str):  # refused for the float model: refused here too, in one line
            assert isinstance(ours, str), f"{method}: the float model refuses it, {form} explains it"
            continue
        assert not isinstance(ours, str), f"{method} refused on {form}: {ours}"
        assert ours.shape == theirs.shape == (len(x), 1, *want.grid) and np.isfinite(ours).all(), method
        if method in KNOWN_GAPS.get((name, form), ()) or (method == "reciprocam" and form != "ort_extended"):
            continue
        r = _pearson(theirs, ours)
        assert r.min() >= threshold, f"{method} on {form}: Pearson with the float map {np.round(r, 3)}"


def test_swin_attention_methods_are_refused_in_one_line_in_int8(tmp_path):
    """Windowed attention stays windowed once quantized: rollout and GAE are refused, naming what applies."""
    entry = _entry("hf_swin_optimum")
    size = (entry["image_size"],) * 2
    path = quantized.build(corpus.home() / "models" / entry["file"], "qoperator",
                           preprocess=camcore.Preprocess.imagenet(size))
    explainer = camcore.load(path, providers=["cpu"], size=size)
    x = np.zeros((1, 3, *size), np.float32)
    for method in ("rollout", "gae"):
        with pytest.raises(CamError) as refusal:
            explainer.explain(x, method=method)
        message = str(refusal.value)
        assert "\n" not in message and "gradcam" in message and "reciprocam" in message


@pytest.mark.parametrize("form", ["qdq", "qoperator", "dynamic", "float16_keep_io"])
def test_dynamo_swin_is_read_on_its_grid_in_deployed_forms(form, tmp_path):
    """The dynamo exporter writes HF Swin's AdaptiveAvgPool1d as a pool of an unsqueezed (N, C, 1, T)
    view, and QDQ puts a Q/DQ pair between the view and the pool: the tokens are still found (the
    int8 model was read as a CNN with a 1x16 map before), and every method maps on the 4x4 grid."""
    entry = _entry("hf_swin_dynamo")
    size = (entry["image_size"],) * 2
    path = _form(corpus.home() / "models" / entry["file"], form, camcore.Preprocess.imagenet(size), tmp_path)
    explainer = camcore.load(path, providers=["cpu"], size=size)
    tokens = explainer.head.tokens
    assert tokens is not None and (tokens.pooling, tokens.prefix, list(tokens.grid)) == (
        entry["pooling"], entry["prefix_tokens"], entry["grid"])
    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(explainer.head.input.dtype)
    for method in ("gradcam", "eigencam", "reciprocam"):
        maps = explainer.explain(x, method=method).maps
        assert maps.shape == (2, 1, *entry["grid"]) and np.isfinite(maps).all(), method
