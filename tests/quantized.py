"""int8 forms of a float ONNX model, made with onnxruntime's own quantization tools.

``build(source, fmt)`` quantizes the float model at `source` as users do before deployment,

after onnxruntime's ``quant_pre_process`` (as its documentation recommends):

* ``"dynamic"``: ``quantize_dynamic`` (weights int8; activations quantized at run time by
  DynamicQuantizeLinear, products by MatMulInteger/ConvInteger);
* ``"qdq"``: ``quantize_static`` in QDQ format, weights per channel (QuantizeLinear/DequantizeLinear
  pairs around float ops);
* ``"qoperator"``: ``quantize_static`` in QOperator format, weights per channel (QLinearConv, QLinearAdd,
  com.microsoft QLinearGlobalAveragePool, QGemm ...).

Static formats are calibrated (MinMax) on a few real photos from ``skimage.data``, preprocessed
by the given `Preprocess`.  Models are cached under ``$CAMCORE_QUANT_CACHE`` (default
``.quantized/`` in the repository), keyed by the source file's sha256, the format and the
onnxruntime version, so CI pays the cost (about 20 s per format for EfficientNet-Lite0) once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("dynamic", "qdq", "qoperator")
# Calibration photos; the drift tests explain other photos as well as these.
CALIBRATION = ("astronaut", "coffee", "rocket", "chelsea")
# Part of the cache key: change it when the recipe below changes.
RECIPE = "pre_process+int8 weights per channel (static), QInt8 (dynamic); uint8 activations; v2"


def cache_dir() -> Path:
    return Path(os.environ.get("CAMCORE_QUANT_CACHE") or ROOT / ".quantized")


def photos(names=CALIBRATION) -> list:
    from skimage import data

    return [getattr(data, name)() for name in names]


def _calibration_reader(model_path: str, preprocess, names):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    spec = onnx.load(model_path, load_external_data=False).graph.input[0]
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    layout = "NHWC" if len(dims) == 4 and dims[3] == 3 and dims[1] != 3 else "NCHW"
    batch, _ = preprocess.batch(photos(names), layout=layout)
    fixed = dims[0] if dims and dims[0] > 0 else 1  # a model exported at batch B takes B rows
    rows = [batch[i:i + 1].repeat(fixed, axis=0) for i in range(len(batch))]
    input_name = spec.name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{input_name: row} for row in rows])

        def get_next(self):
            return next(self.rows, None)

    return Reader()


def build(source, fmt: str, *, preprocess=None, calibration=CALIBRATION, cache=None) -> Path:
    """Path of the `fmt` int8 form of the float model at `source` (built once, then cached)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    source = Path(source)
    key = hashlib.sha256(source.read_bytes() + f"{fmt}{calibration}{RECIPE}{onnxruntime.__version__}".encode()).hexdigest()
    target = Path(cache or cache_dir()) / f"{source.stem}.{fmt}.{key[:16]}.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out, pre = Path(tmp) / target.name, Path(tmp) / "pre.onnx"
        # onnxruntime's recommended first step (folds constants, fuses Conv+BN): exporters'
        # Constant-node weights would otherwise be left in float.
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        source = pre
        if fmt == "dynamic":
            quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)  # the defaults users call
        else:
            if preprocess is None:
                raise ValueError("static quantization needs the model's preprocessing for calibration")
            reader = _calibration_reader(str(source), preprocess, calibration)
            quantize_static(str(source), str(out), reader,
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        os.replace(out, target)  # atomic: a parallel run never reads half a file
    return target


if __name__ == "__main__":  # build the embedded model's three forms
    from camcore import default_model

    for f in FORMATS:
        print(build(default_model.path(), f, preprocess=default_model.preprocess()))
