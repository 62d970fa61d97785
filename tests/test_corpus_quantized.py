"""Corpus CNNs (real torch, keras and paddle exports) in onnxruntime's three int8 forms.

Each form is built with onnxruntime's own tools (tests/quantized.py) and must load and be
explained by default, CAM where the float head is GAP + affine, Grad-CAM otherwise, with the
logits of the deployed file.  One model per notable pattern keeps CI short: a dynamo MobileNetV3 (hard-swish SE head, not affine), a ResNet ending in global max
pooling (which QOperator graphs run on int8 tensors), a keras NHWC MobileNetV2 and paddle's
GoogLeNet (a padded whole-map AveragePool, Dropout between quantized pairs in the head).
"""

import numpy as np
import onnxruntime as ort
import pytest

import camcore
from tests import corpus, quantized

CASES = ("mobilenetv3_small_050_dynamo", "resnet18_maxpool_ts", "mobilenetv2_035_fromkeras_noopt",
         "googlenet")
ENTRIES = {e["name"]: e for e in corpus.manifest()}


def _entry(name):
    if name not in ENTRIES:
        corpus.require("torch")  # skips (fails under CI) naming the build command
        pytest.fail(f"corpus entry {name!r} is missing from the manifest")
    entry = ENTRIES[name]
    corpus.require(entry["framework"])
    return entry


def _size(entry) -> tuple:
    shape = entry["input"]["shape"]
    nhwc = shape[3] == 3 and shape[1] != 3
    return tuple(d if isinstance(d, int) else 64 for d in (shape[1:3] if nhwc else shape[2:4]))


@pytest.mark.parametrize("fmt", quantized.FORMATS)
@pytest.mark.parametrize("name", CASES)
def test_int8_corpus_model_is_explained_by_default(name, fmt):
    entry = _entry(name)
    preprocess = camcore.Preprocess.imagenet(_size(entry))
    path = quantized.build(corpus.home() / "models" / entry["file"], fmt, preprocess=preprocess)
    ex = camcore.load(path, providers=["cpu"], preprocess=preprocess)
    x, _ = preprocess.batch(quantized.photos()[:2], layout=ex.input_layout, dtype=ex.head.input.dtype)
    x = x[:ex.fixed_batch] if ex.fixed_batch and ex.fixed_batch <= len(x) else x
    out = ex.explain(x)
    expected = "cam" if entry["affine"] and entry["pooling"] == "avg" else "gradcam"
    assert out.method == expected, ex.head.cam_refusal
    raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {ex.head.input.name: x})
    np.testing.assert_array_equal(out.logits, np.asarray(raw[0]).reshape(len(x), -1))
    maps = ex.explain(x, method="gradcam").maps
    assert np.isfinite(maps).all() and (maps.reshape(len(x), -1).max(axis=1) > 0).all()
