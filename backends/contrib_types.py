"""Types of the tensors that onnx's shape inference cannot see: outputs of runtime-specific ops.

onnxruntime's offline optimization (``ORT_ENABLE_EXTENDED`` and above, saved with
``optimized_model_filepath``) writes fused ``com.microsoft`` nodes (FusedConv, FusedGemm, ...)
and no ``value_info`` for their outputs.  onnx's shape inference does not know that domain, so
every tensor downstream of a fused node stays untyped, and cutting or exposing one fails.
onnxruntime knows its own ops: it infers their types (and symbolic shapes) when it builds a
session, so one session with the untyped tensors exposed as outputs tells them all.
"""

from __future__ import annotations

import onnx
from onnx import helper, shape_inference

from camcore.errors import CamError

__all__ = ["complete_types"]

_ONNX_DOMAINS = ("", "ai.onnx")
_ORT_ELEM_TYPES = {
    "tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(bfloat16)": onnx.TensorProto.BFLOAT16,
    "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(int16)": onnx.TensorProto.INT16, "tensor(int8)": onnx.TensorProto.INT8,
    "tensor(uint8)": onnx.TensorProto.UINT8, "tensor(uint16)": onnx.TensorProto.UINT16,
    "tensor(bool)": onnx.TensorProto.BOOL,
}


def _untyped(model: onnx.ModelProto) -> list:
    """Node outputs with no type after onnx's shape inference, in graph order."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    g = inferred.graph
    typed = {vi.name for vi in (*g.value_info, *g.input, *g.output) if vi.type.tensor_type.elem_type}
    typed |= {t.name for t in g.initializer}
    return [o for node in g.node for o in node.output if o and o not in typed]


def complete_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy with ``value_info`` for the outputs of its non-ONNX-domain ops and what follows.

    Only models with nodes outside the ONNX domain and untyped tensors are changed: the
    types come from an onnxruntime session built (not run) on a copy exposing them, with
    graph optimizations off.  Tensors onnxruntime cannot type either stay untyped.

    Raises
    ------
    CamError
        onnxruntime cannot load the model.
    """
    if all(node.domain in _ONNX_DOMAINS for node in model.graph.node):
        return model
    missing = _untyped(model)
    if not missing:
        return model
    from .ort_session import import_onnxruntime

    ort = import_onnxruntime()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in missing if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CamError(f"onnxruntime cannot load the model to type its fused ops: {str(exc).splitlines()[0]}") from None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(missing)
    for info in session.get_outputs():
        elem = _ORT_ELEM_TYPES.get(info.type)
        if info.name not in wanted or elem is None:
            continue
        dims = [d if isinstance(d, int) else (d or None) for d in info.shape] if info.shape is not None else None
        out.graph.value_info.append(helper.make_tensor_value_info(info.name, elem, dims))
    return out
