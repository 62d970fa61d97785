"""Deployed forms of a model: the edits people make before shipping an ONNX classifier.

Each transform reads one ``.onnx`` file and writes its deployed form; `TRANSFORMS` maps a name
to the function, so another transform is one more table entry::

    python tools/corpus/deployed.py --out DIR MODEL.onnx [MODEL.onnx ...] [--transform NAME ...]

writes ``DIR/<model stem>/<transform>.onnx`` (external data beside it where the transform makes
some).  Runs in the test venv (onnx, onnxruntime, onnxconverter-common, onnxsim); the tests build
the transforms of every corpus CNN and of the embedded EfficientNet-Lite0 in a fixture
(tests/test_deployed.py), so CI builds them from the corpus each run.

A transform takes ``(source, target, info)``: the source path, the target path and a `Source`
describing the model's input (name, layout, normalization).  It raises `Unsupported` with a
one-line reason when the tool it wraps cannot transform this model: that is a fact about the
tool, recorded by the tests, not a camcore refusal.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Unsupported(Exception):
    """The wrapped tool cannot produce this transform of this model."""


@dataclass(frozen=True)
class Source:
    """What a transform needs to know about the model beyond its graph.

    layout : "NCHW" or "NHWC", where the image input keeps its channels.
    mean, std : per-channel normalization on 0..1 pixels (the host's `Preprocess`).
    """

    layout: str = "NCHW"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def _load(source: Path):
    import onnx

    return onnx.load_model(str(source))


def _save(model, target: Path) -> None:
    import onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target))


def _image_input(model):
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise Unsupported(f"expected one image input, got {[i.name for i in inputs]}")
    return inputs[0]


# --------------------------------------------------------------------------- float16


def _float32_storage(model):
    """`model` with each Cast of a float16 initializer replaced by the float32 initializer it makes.

    The embedded EfficientNet-Lite0 stores its weights in float16, each cast to float32 by a
    node; onnxconverter-common refuses a model that has float16 tensors already.
    """
    from onnx import TensorProto, helper, numpy_helper

    stored = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    if not stored:
        return model
    kept, made = [], []
    for node in model.graph.node:
        to = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.input[0] in stored and to == TensorProto.FLOAT:
            made.append(numpy_helper.from_array(numpy_helper.to_array(stored[node.input[0]]).astype(np.float32),
                                                node.output[0]))
        else:
            kept.append(node)
    read = {i for n in kept for i in n.input}
    initializers = [t for t in model.graph.initializer if t.name in read or t.name not in stored] + made
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    del model.graph.value_info[:]
    return model


def float16(source: Path, target: Path, info: Source, *, keep_io_types: bool = False) -> None:
    """onnxconverter-common's ``convert_float_to_float16`` (float16 weights and activations)."""
    import warnings

    from onnxconverter_common import float16 as f16

    try:
        with warnings.catch_warnings():  # it warns about every value it clamps to float16's range
            warnings.simplefilter("ignore")
            converted = f16.convert_float_to_float16(_float32_storage(_load(source)), keep_io_types=keep_io_types)
    except Exception as exc:
        raise Unsupported(f"onnxconverter-common: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    _save(converted, target)


def float16_keep_io(source: Path, target: Path, info: Source) -> None:
    """float16 inside, float32 inputs and outputs (``keep_io_types=True``: Casts at both ends)."""
    float16(source, target, info, keep_io_types=True)


# --------------------------------------------------------------------------- simplifiers, runtimes


def onnxsim(source: Path, target: Path, info: Source) -> None:
    """onnx-simplifier with its defaults (constant folding, redundant ops removed)."""
    import onnxsim as sim

    try:
        simplified, ok = sim.simplify(_load(source))
    except Exception as exc:
        raise Unsupported(f"onnxsim: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not ok:
        raise Unsupported("onnxsim: its own check of the simplified model failed")
    _save(simplified, target)


def _ort_offline(source: Path, target: Path, level: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    target.parent.mkdir(parents=True, exist_ok=True)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def ort_basic(source: Path, target: Path, info: Source) -> None:
    """onnxruntime's offline optimization, ``ORT_ENABLE_BASIC`` (constant folding, node eliminations)."""
    _ort_offline(source, target, "ORT_ENABLE_BASIC")


def ort_extended(source: Path, target: Path, info: Source) -> None:
    """``ORT_ENABLE_EXTENDED``: fused ``com.microsoft`` nodes (FusedConv, ...) without value_info."""
    _ort_offline(source, target, "ORT_ENABLE_EXTENDED")


# --------------------------------------------------------------------------- graph edits


# onnx's version converter has few down-conversion adapters (none below 14 for Relu): convert up.
_TARGET_OPSET = 21


def version_convert(source: Path, target: Path, info: Source) -> None:
    """``onnx.version_converter`` up to opset 21."""
    import onnx
    from onnx import version_converter

    model = _load(source)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    goal = _TARGET_OPSET
    if current is not None and current >= goal:
        raise Unsupported(f"the model is at opset {current} already")
    try:
        converted = version_converter.convert_version(model, goal)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise Unsupported(f"version_converter {current} -> {goal}: {str(exc).splitlines()[0][:200]}") from None
    _save(converted, target)


def external_data(source: Path, target: Path, info: Source) -> None:
    """Every initializer in one external-data file beside the model (``<name>.data``)."""
    import onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_load(source), str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{target.stem}.data", size_threshold=0)


def _prepend(model, nodes: list, new_input, initializers: list):
    """`model` with `nodes` computing its image input from `new_input` (a ValueInfoProto)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    original = _image_input(out)
    keep = [i for i in out.graph.input if i.name != original.name]
    del out.graph.input[:]
    out.graph.input.extend([new_input, *keep])
    graph_nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend([*nodes, *graph_nodes])
    out.graph.initializer.extend(initializers)
    onnx.checker.check_model(out)
    return out


def _normalization(info: Source, scale: float, shape: list):
    """``(mean, std)`` initializers so that ``(x - mean) / std`` equals the host's normalization."""
    from onnx import numpy_helper

    mean = (np.asarray(info.mean, np.float32) * np.float32(scale)).reshape(shape)
    std = (np.asarray(info.std, np.float32) * np.float32(scale)).reshape(shape)
    return numpy_helper.from_array(mean, "cam_pre_mean"), numpy_helper.from_array(std, "cam_pre_std")


def normalize_in_graph(source: Path, target: Path, info: Source) -> None:
    """A plain Sub/Div normalization in front: the input takes 0..1 pixels, same layout and shape."""
    from onnx import TensorProto, helper

    model = _load(source)
    original = _image_input(model)
    if original.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise Unsupported("the image input is not float32")
    shape = [1, 3, 1, 1] if info.layout == "NCHW" else [1, 1, 1, 3]
    mean, std = _normalization(info, 1.0, shape)
    new = helper.make_value_info("pixels", original.type)
    nodes = [helper.make_node("Sub", ["pixels", mean.name], ["cam_pre_centered"], name="cam_pre_sub"),
             helper.make_node("Div", ["cam_pre_centered", std.name], [original.name], name="cam_pre_div")]
    _save(_prepend(model, nodes, new, [mean, std]), target)


def uint8_nhwc(source: Path, target: Path, info: Source) -> None:
    """uint8 NHWC pixels in: Cast, Sub, Div (on 0..255), then a Transpose to NCHW models."""
    from onnx import TensorProto, helper

    model = _load(source)
    original = _image_input(model)
    if original.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise Unsupported("the image input is not float32")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in original.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise Unsupported(f"the image input is not 4-D: {dims}")
    nhwc = [dims[0], dims[2], dims[3], dims[1]] if info.layout == "NCHW" else dims
    mean, std = _normalization(info, 255.0, [1, 1, 1, 3])
    new = helper.make_tensor_value_info("pixels", TensorProto.UINT8, nhwc)
    normalized = original.name if info.layout == "NHWC" else "cam_pre_nhwc"
    nodes = [helper.make_node("Cast", ["pixels"], ["cam_pre_float"], to=TensorProto.FLOAT, name="cam_pre_cast"),
             helper.make_node("Sub", ["cam_pre_float", mean.name], ["cam_pre_centered"], name="cam_pre_sub"),
             helper.make_node("Div", ["cam_pre_centered", std.name], [normalized], name="cam_pre_div")]
    if info.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [normalized], [original.name], perm=[0, 3, 1, 2],
                                      name="cam_pre_transpose"))
    _save(_prepend(model, nodes, new, [mean, std]), target)


# name -> function(source, target, info); the quantized transforms join this table.
TRANSFORMS = {
    "float16": float16,
    "float16_keep_io": float16_keep_io,
    "onnxsim": onnxsim,
    "ort_basic": ort_basic,
    "ort_extended": ort_extended,
    "version_convert": version_convert,
    "external_data": external_data,
    "normalize_in_graph": normalize_in_graph,
    "uint8_nhwc": uint8_nhwc,
}


def build(source: Path, out: Path, info: Source | None = None, names=None) -> dict:
    """Write the transforms `names` (default all) of `source` under ``out/<stem>/``.

    Returns
    -------
    dict
        transform name -> target path, or the `Unsupported` reason (a str) when the tool
        could not make it.  A target already on disk and newer than the source is kept.
    """
    info = info or Source()
    results = {}
    for name in names or TRANSFORMS:
        target = out / source.stem / f"{name}.onnx"
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            results[name] = target
            continue
        try:
            TRANSFORMS[name](source, target, info)
            results[name] = target
        except Unsupported as exc:
            target.unlink(missing_ok=True)
            results[name] = str(exc)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--transform", action="append", choices=sorted(TRANSFORMS))
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    args = parser.parse_args(argv)
    report = {}
    for model in args.models:
        made = build(model, args.out, Source(layout=args.layout), args.transform)
        report[str(model)] = {k: str(v) for k, v in made.items()}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
