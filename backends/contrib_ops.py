"""onnxruntime's own (``com.microsoft``) ops in saved graphs: their types, and their standard-ONNX form.

onnxruntime's offline optimization (``ORT_ENABLE_EXTENDED`` and above, saved with
``optimized_model_filepath``) writes fused ``com.microsoft`` nodes (FusedConv, FusedGemm, ...)
and no ``value_info`` for their outputs.  onnx's shape inference does not know that domain, so
every tensor downstream of a fused node stays untyped, and cutting or exposing one fails.
onnxruntime knows its own ops: it infers their types (and symbolic shapes) when it builds a
session, so one session with the untyped tensors exposed as outputs tells them all
(`complete_types`).  The gradient rules know standard ONNX ops only: `as_standard_ops` writes
each fused node back as the ops it fused (FusedConv as Conv, Add and its activation), the same
function, before a backward pass is built.
"""

from __future__ import annotations

import onnx
import numpy as np
from onnx import helper, numpy_helper, shape_inference

__all__ = ["complete_types", "as_standard_ops"]

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
    graph optimizations off.  Tensors onnxruntime cannot type stay untyped, and so does
    every tensor when onnxruntime is not installed or cannot load the model (another
    runtime's ops): what needs a type then says which one is missing.
    """
    if all(node.domain in _ONNX_DOMAINS for node in model.graph.node):
        return model
    missing = _untyped(model)
    if not missing:
        return model
    from camcore.errors import CamError

    from .ort_runtime import import_onnxruntime, make_session

    try:
        ort = import_onnxruntime()
    except CamError:  # not installed
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in missing if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = make_session(probe, ["CPUExecutionProvider"], options=options)
    except CamError:  # not onnxruntime's ops: left to the runtime that knows them
        return model
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


# --------------------------------------------------------------------------- fused ops, unfused


def _activation(kind: str, params: list, x: str, y: str, name: str, const) -> list:
    """Nodes computing ``y = kind(x)`` (onnxruntime's fused-activation names and parameters), or None."""
    if kind in ("Relu", "Tanh", "Sigmoid"):
        return [helper.make_node(kind, [x], [y], name=name)]
    if kind == "LeakyRelu":
        return [helper.make_node(kind, [x], [y], name=name, alpha=params[0] if params else 0.01)]
    if kind == "HardSigmoid":
        alpha, beta = (list(params) + [0.2, 0.5][len(params):])[:2]
        return [helper.make_node(kind, [x], [y], name=name, alpha=alpha, beta=beta)]
    if kind == "Clip" and len(params) == 2:
        return [helper.make_node("Clip", [x, const(params[0], "min"), const(params[1], "max")], [y], name=name)]
    return None


def _float_type(model: onnx.ModelProto, node) -> int:
    """The element type of a fused node's float inputs: that of its weight initializer, else float32."""
    inits = {t.name: t for t in model.graph.initializer}
    for name in node.input[1:2]:
        if name in inits:
            return inits[name].data_type
    return onnx.TensorProto.FLOAT


def as_standard_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where onnxruntime's fused nodes are written as standard ONNX ops.

    FusedConv becomes Conv (+ Add of its sum input) + its activation, FusedGemm Gemm + its
    activation, QuickGelu ``x * Sigmoid(alpha * x)``, Gelu and BiasGelu
    ``0.5 * x * (1 + Erf(x / sqrt 2))``, FusedMatMul ``alpha * op(A) @ op(B)`` (MatMul, Transposes of
    the last two axes, Mul), SkipLayerNormalization ``LayerNormalization(input + skip + bias)``
    (with the sum as its fourth output where the graph reads it).  Other nodes, and fused nodes with an activation
    this does not know, are kept (a backward pass then names them).  New tensors and nodes
    are named ``cam_unfused_<node index>_...``.

    Examples
    --------
    >>> node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", activation="Relu")
    >>> g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 1, 3, 3])],
    ...                       [helper.make_tensor_value_info("y", 1, None)],
    ...                       [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")])
    >>> [n.op_type for n in as_standard_ops(helper.make_model(g)).graph.node]
    ['Conv', 'Relu']
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, extra = [], []
    ranks = _ranks(model) if any(n.op_type == "FusedMatMul" for n in model.graph.node) else {}
    for index, node in enumerate(model.graph.node):
        if node.domain != "com.microsoft":
            nodes.append(node)
            continue
        prefix = f"cam_unfused_{index}"
        elem = _float_type(model, node)

        def const(value, suffix, prefix=prefix, elem=elem):
            tensor = numpy_helper.from_array(np.asarray(value, helper.tensor_dtype_to_np_dtype(elem)),
                                             f"{prefix}_{suffix}")
            extra.append(tensor)
            return tensor.name

        replaced = _unfuse(node, prefix, const, ranks)
        nodes.extend(replaced if replaced is not None else [node])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(extra)
    return out


def _ranks(model: onnx.ModelProto) -> dict:
    """tensor -> rank, where the model's value_info (`complete_types`) or onnx's inference tell it."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    ranks = {t.name: len(t.dims) for t in g.initializer}
    for vi in (*g.input, *g.output, *g.value_info, *model.graph.value_info):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _last_two_swapped(x: str, rank: int | None, name: str) -> object:
    """A Transpose of `x` swapping its last two axes (None when its rank is unknown)."""
    if rank is None or rank < 2:
        return None
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return helper.make_node("Transpose", [x], [name], name=name, perm=perm)


def _unfuse(node, prefix: str, const, ranks=None) -> list | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kind = attrs.pop("activation", b"")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    y = node.output[0]
    if node.op_type == "FusedConv":
        params = list(attrs.pop("activation_params", []))
        x, w, b, z = (list(node.input) + ["", "", ""])[:4]
        conv = f"{prefix}_conv"
        found = [helper.make_node("Conv", [x, w] + ([b] if b else []), [conv], name=conv, **attrs)]
        if z:
            found.append(helper.make_node("Add", [conv, z], [f"{prefix}_sum"], name=f"{prefix}_sum"))
            conv = f"{prefix}_sum"
        act = _activation(kind, params, conv, y, f"{prefix}_{kind.lower()}", const)
        return found + act if act is not None else None
    if node.op_type == "FusedGemm":
        params = [attrs.pop(k) for k in ("activation_alpha", "activation_beta") if k in attrs]
        attrs.pop("activation_gamma", None)
        gemm = f"{prefix}_gemm"
        act = _activation(kind, params, gemm, y, f"{prefix}_{kind.lower()}", const)
        return [helper.make_node("Gemm", list(node.input), [gemm], name=gemm, **attrs)] + act if act else None
    if node.op_type == "QuickGelu":
        x = node.input[0]
        scaled = helper.make_node("Mul", [x, const(attrs.get("alpha", 1.702), "alpha")], [f"{prefix}_ax"],
                                  name=f"{prefix}_ax")
        gate = helper.make_node("Sigmoid", [f"{prefix}_ax"], [f"{prefix}_gate"], name=f"{prefix}_gate")
        return [scaled, gate, helper.make_node("Mul", [x, f"{prefix}_gate"], [y], name=f"{prefix}_mul")]
    if node.op_type == "FusedMatMul":  # alpha * op(A) @ op(B), op a swap of the last two axes
        if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
            return None
        found, operands = [], []
        for x, flag, side in zip(node.input[:2], ("transA", "transB"), "ab"):
            if attrs.get(flag, 0):
                swap = _last_two_swapped(x, (ranks or {}).get(x), f"{prefix}_{side}_t")
                if swap is None:
                    return None
                found.append(swap)
                x = swap.output[0]
            operands.append(x)
        alpha = attrs.get("alpha", 1.0)
        product = y if alpha == 1.0 else f"{prefix}_matmul"
        found.append(helper.make_node("MatMul", operands, [product], name=f"{prefix}_matmul"))
        if alpha != 1.0:
            found.append(helper.make_node("Mul", [product, const(alpha, "alpha")], [y], name=f"{prefix}_alpha"))
        return found
    if node.op_type == "SkipLayerNormalization":
        # (input, skip, gamma[, beta[, bias]]) -> (output[, mean, inv_std_var, input + skip + bias])
        x, skip, gamma, beta, bias = (list(node.input) + ["", ""])[:5]
        outputs = list(node.output) + [""] * 3
        total = outputs[3] or f"{prefix}_sum"
        summed = f"{prefix}_skip" if bias else total
        found = [helper.make_node("Add", [x, skip], [summed], name=f"{prefix}_skip")]
        if bias:
            found.append(helper.make_node("Add", [summed, bias], [total], name=f"{prefix}_bias"))
        found.append(helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []),
                                      [y, *outputs[1:3]], name=f"{prefix}_norm", axis=-1,
                                      epsilon=attrs.get("epsilon", 1e-5)))
        while found[-1].output[-1] == "":  # no trailing empty optional outputs
            del found[-1].output[-1]
        return found
    if node.op_type in ("Gelu", "BiasGelu"):
        x, found = node.input[0], []
        if node.op_type == "BiasGelu":
            found.append(helper.make_node("Add", [x, node.input[1]], [f"{prefix}_biased"], name=f"{prefix}_bias"))
            x = f"{prefix}_biased"
        found += [
            helper.make_node("Div", [x, const(np.sqrt(2.0), "sqrt2")], [f"{prefix}_scaled"], name=f"{prefix}_div"),
            helper.make_node("Erf", [f"{prefix}_scaled"], [f"{prefix}_erf"], name=f"{prefix}_erf"),
            helper.make_node("Add", [f"{prefix}_erf", const(1.0, "one")], [f"{prefix}_plus1"], name=f"{prefix}_add"),
            helper.make_node("Mul", [x, f"{prefix}_plus1"], [f"{prefix}_prod"], name=f"{prefix}_mul"),
            helper.make_node("Mul", [f"{prefix}_prod", const(0.5, "half")], [y], name=f"{prefix}_half"),
        ]
        return found
    return None
