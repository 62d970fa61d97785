"""ONNX protobuf helpers shared by the graph modules: attributes, dims, opset, node labels.

Each exists once here; `onnx_graph`, `backprop` and `fuse_graph` read protos through them.
"""

from __future__ import annotations

import onnx
from onnx import helper

from camcore.errors import NotCamCompatible

__all__ = ["attr", "text_attr", "dims", "value_types", "opset", "axes_input_opset", "node_name", "node_label",
           "copy_model", "SHAPE_ONLY"]

# Ops that read only the shape of their input, never its values.
SHAPE_ONLY = frozenset({"Shape", "Size"})

# Opset from which an op takes `axes` as an input instead of an attribute; the other
# reductions (ReduceMean, ReduceMax, ...) switch at 18.
_AXES_INPUT_OPSET = {"ReduceSum": 13, "Unsqueeze": 13, "Squeeze": 13}
_AXES_INPUT_OPSET_REDUCE = 18


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node` (``helper.get_attribute_value``), else `default`.

    >>> attr(helper.make_node("Flatten", ["x"], ["y"], axis=2), "axis")
    2
    >>> attr(helper.make_node("LeakyRelu", ["x"], ["y"]), "alpha", 0.01)
    0.01
    """
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def text_attr(node: onnx.NodeProto, name: str, default: str | None = None) -> str | None:
    """A string attribute as `str` (onnx returns bytes).

    >>> text_attr(helper.make_node("Pad", ["x", "p"], ["y"], mode="edge"), "mode", "constant")
    'edge'
    """
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def dims(type_proto: onnx.TypeProto) -> tuple | None:
    """Declared dims of a tensor type: an int for a fixed axis, a str (``dim_param``) or
    None for a dynamic one; None when the rank itself is unknown.

    Exporters write dynamic axes in several ways: a ``dim_param``, nothing, or (older
    PaddlePaddle exports) ``dim_value: -1``; so a ``dim_value <= 0`` is dynamic too.
    A caller that knows a 0 is a real empty axis reads ``dim_value`` itself.

    >>> dims(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [-1, 3, "h", None]))
    (None, 3, 'h', None)
    >>> dims(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)) is None
    True
    """
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(
        (d.dim_value if d.dim_value > 0 else None) if d.HasField("dim_value") else (d.dim_param or None)
        for d in tt.shape.dim
    )


def value_types(graph: onnx.GraphProto) -> dict:
    """``{name: TypeProto}`` of a graph's value_info, inputs, outputs, then initializers
    (a declared type wins over an initializer's)."""
    types = {vi.name: vi.type for vi in [*graph.value_info, *graph.input, *graph.output]}
    for t in graph.initializer:
        types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def opset(model: onnx.ModelProto, *, error: type[Exception] = NotCamCompatible) -> int:
    """The model's default-domain opset; raises `error` when it imports none.

    >>> opset(helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 13)]))
    13
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise error("the model imports no default-domain ONNX opset")


def axes_input_opset(op_type: str) -> int:
    """Opset from which `op_type` (Squeeze, Unsqueeze or a Reduce*) takes `axes` as an input.

    >>> axes_input_opset("ReduceSum"), axes_input_opset("ReduceMean")
    (13, 18)
    """
    return _AXES_INPUT_OPSET.get(op_type, _AXES_INPUT_OPSET_REDUCE)


def node_name(node: onnx.NodeProto) -> str:
    """The node's name, else its first output, else its op type."""
    return node.name or (node.output[0] if node.output else node.op_type)


def node_label(node: onnx.NodeProto) -> str:
    """How messages name a node: its op and name.

    >>> node_label(helper.make_node("Relu", ["x"], ["y"]))
    "Relu at node 'y'"
    """
    return f"{node.op_type} at node {node_name(node)!r}"


def copy_model(model: onnx.ModelProto, *, nodes=None, initializers=()) -> onnx.ModelProto:
    """A deep copy of `model`; with `nodes`, its graph's nodes replaced by them, and
    `initializers` appended."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if nodes is not None:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    return out
