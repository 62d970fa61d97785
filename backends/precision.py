"""A float16 graph computed in float32: for the backward pass of a float16 model's head.

A model converted to float16 (onnxconverter-common, with or without ``keep_io_types``) runs its
head in float16.  Its gradient graph needs ops that onnxruntime's CPU provider lacks in float16
(``ScatterElements`` with ``reduction="add"``, the rule of Gather), and float16 sums of many
small products lose most of their digits.  The head's function is fixed by its float16
weights, which float32 holds exactly; computing it, and its gradient, in float32 gives that
function's gradient without float16 rounding.

Where the float16 forward itself must stay (a whole float16 vision transformer, whose attention
probabilities GAE reads with their gradients), `float32_scatter_adds` computes only the
reducing scatters, which the CPU provider lacks in float16, in float32 between Casts.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["has_float16", "as_float32", "float32_scatter_adds"]

# Attributes naming an element type: float16 there becomes float32.
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


def has_float16(model: onnx.ModelProto) -> bool:
    """Whether any input, output, initializer or Cast of the main graph is float16."""
    g = model.graph
    return (any(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in (*g.input, *g.output))
            or any(t.data_type == TensorProto.FLOAT16 for t in g.initializer)
            or any(n.op_type == "Cast" and helper.get_attribute_value(a) == TensorProto.FLOAT16
                   for n in g.node for a in n.attribute if a.name == "to"))


def _value_info(values) -> None:
    for vi in values:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT


def _tensor(tensor: TensorProto) -> TensorProto:
    if tensor.data_type != TensorProto.FLOAT16:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name)


def _graph(graph: onnx.GraphProto) -> None:
    _value_info(graph.input)
    _value_info(graph.output)
    _value_info(graph.value_info)
    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_tensor(tensor))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                attribute.t.CopyFrom(_tensor(attribute.t))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _graph(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    _graph(sub)
            elif (attribute.name == _TYPE_ATTRIBUTES.get(node.op_type) and attribute.type == onnx.AttributeProto.INT
                  and attribute.i == TensorProto.FLOAT16):
                attribute.i = TensorProto.FLOAT


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every float16 tensor, type and Cast target is float32.

    Examples
    --------
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    >>> w = numpy_helper.from_array(__import__("numpy").array([0.5, 2], "float16"), "w")
    >>> m = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w]))
    >>> f = as_float32(m)
    >>> f.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT, f.graph.initializer[0].data_type == 1
    (True, True)
    >>> m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16  # the input is not modified
    True
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _graph(out.graph)
    return out


_SCATTERS = ("ScatterElements", "ScatterND")


def float32_scatter_adds(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every reducing ``ScatterElements``/``ScatterND`` on float16 data
    is computed in float32: its data and updates are Cast to float32, its output back to float16.

    The sums are then rounded to float16 once, not at every added term; everything else in the
    graph keeps its type.  Nodes are named ``cam_f32_<node name or index>_...``.

    Examples
    --------
    >>> import numpy as np
    >>> d = helper.make_tensor_value_info("d", TensorProto.FLOAT16, [3])
    >>> u = helper.make_tensor_value_info("u", TensorProto.FLOAT16, [2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3])
    >>> i = numpy_helper.from_array(np.array([0, 0], np.int64), "i")
    >>> node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], reduction="add")
    >>> m = helper.make_model(helper.make_graph([node], "g", [d, u], [y], [i]),
    ...                       opset_imports=[helper.make_opsetid("", 18)])
    >>> [n.op_type for n in float32_scatter_adds(m).graph.node]
    ['Cast', 'Cast', 'ScatterElements', 'Cast']
    """
    from onnx import shape_inference

    out = onnx.ModelProto()
    out.CopyFrom(model)
    scatters = [n for n in model.graph.node if n.op_type in _SCATTERS
                and any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]
    if not scatters:
        return out
    try:
        g = shape_inference.infer_shapes(model).graph
    except Exception:
        g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    nodes = []
    for index, node in enumerate(model.graph.node):
        if not any(node is s for s in scatters) or types.get(node.input[0]) != TensorProto.FLOAT16:
            nodes.append(node)
            continue
        prefix = f"cam_f32_{node.name or index}"
        data, indices, updates = node.input[:3]
        wide = []
        for x, tag in ((data, "data"), (updates, "updates")):
            nodes.append(helper.make_node("Cast", [x], [f"{prefix}_{tag}"], name=f"{prefix}_{tag}", to=TensorProto.FLOAT))
            wide.append(f"{prefix}_{tag}")
        scatter = onnx.NodeProto()
        scatter.CopyFrom(node)
        del scatter.input[:]
        scatter.input.extend([wide[0], indices, wide[1]])
        scatter.output[0] = f"{prefix}_sum"
        scatter.name = f"{prefix}_sum"
        nodes.append(scatter)
        nodes.append(helper.make_node("Cast", [f"{prefix}_sum"], [node.output[0]], name=f"{prefix}_out",
                                      to=TensorProto.FLOAT16))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
