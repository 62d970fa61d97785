"""The graph side of the backward pass: the opset check, a shape-inferred index of one
graph, and `cut_head` (the head sub-graph from a feature tensor to the logits).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from camcore.errors import InvalidInput, NotCamCompatible

from .._proto import SHAPE_ONLY, attr, copy_model, dims, value_types
from .._proto import opset as model_opset

# Oldest opset handled: Clip's bounds, Pad's pads and Slice's starts as inputs, Range,
# ScatterElements and float Equal all exist from 11.
MIN_OPSET = 11
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _check_opset(model: onnx.ModelProto) -> int:
    if not isinstance(model, onnx.ModelProto):
        raise InvalidInput(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise NotCamCompatible(f"gradients need ONNX opset >= {MIN_OPSET}; the model has opset {opset} "
                               f"(onnx.version_converter.convert_version can upgrade it)")
    return opset


def _unknown_nonpositive_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose declared dims <= 0 (paddle2onnx's -1 for dynamic axes) are unknown."""
    out = copy_model(model)
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
    return out


def _infer(model: onnx.ModelProto, resolve_batch: bool = False) -> onnx.ModelProto:
    model = _unknown_nonpositive_dims(model)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph inference rejects keeps the types it declares
        return model
    return _batch_resolved(inferred) if resolve_batch else inferred


# Two batch sizes the inputs' batch symbol is set to, to tell what onnx's symbolic inference cannot.
_PROBES = (7, 13)


def _batch_resolved(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (shape-inferred) with the dims its inputs' batch symbol decides made known.

    onnx's inference cannot divide by a symbol: after a Reshape to ``(batch, -1, heads, d)``
    (TorchScript's attention) the token axis gets a symbol of its own, and so do tensors
    that only have the batch's size.  Two more inferences with the batch symbol set to each
    of `_PROBES` tell them: a dim with one value in both is that static size, one equal to
    the probe in each is the batch.  Done only where every input has the same symbol first.
    """
    g = model.graph
    constants = {t.name for t in g.initializer}
    firsts = set()
    for vi in g.input:
        if vi.name in constants:
            continue
        shape = vi.type.tensor_type.shape if vi.type.tensor_type.HasField("shape") else None
        firsts.add(shape.dim[0].dim_param if shape is not None and len(shape.dim) else "")
    if len(firsts) != 1 or not next(iter(firsts)):
        return model
    (batch,) = firsts
    known = {d.dim_param for vi in g.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    values = [*g.value_info, *g.output]
    if not any(not d.dim_value and d.dim_param not in known for vi in values for d in vi.type.tensor_type.shape.dim):
        return model
    probes = []
    for size in _PROBES:
        probe = copy_model(model)
        del probe.graph.value_info[:]
        for vi in [*probe.graph.input, *probe.graph.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == batch:
                    d.dim_value = size
                elif d.dim_param and d.dim_param not in known:
                    d.Clear()
        try:
            probe = shape_inference.infer_shapes(probe, data_prop=True)
        except Exception:
            return model
        probes.append({vi.name: vi.type.tensor_type.shape.dim for vi in [*probe.graph.value_info, *probe.graph.output]
                       if vi.type.tensor_type.HasField("shape")})
    for vi in values:
        dims = vi.type.tensor_type.shape.dim
        a, b = (p.get(vi.name) for p in probes)
        if a is None or b is None or not len(a) == len(b) == len(dims):
            continue
        for d, x, y in zip(dims, a, b):
            if d.dim_value or d.dim_param in known or not (x.dim_value and y.dim_value):
                continue
            if x.dim_value == y.dim_value:
                d.Clear()
                d.dim_value = x.dim_value
            elif (x.dim_value, y.dim_value) == _PROBES:
                d.Clear()
                d.dim_param = batch
    return model


def _subgraph_inputs(node) -> set:
    """Names a node's subgraphs read (outer-scope references included)."""
    names = set()
    for a in node.attribute:
        for graph in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for sub in graph.node:
                names.update(sub.input)
                names.update(_subgraph_inputs(sub))
    return names


class _Index:
    """Producers, types and constants of one shape-inferred graph; with `resolve_batch`, the dims
    its inputs' batch decides resolved too (`_batch_resolved`: two more inferences)."""

    def __init__(self, model: onnx.ModelProto, *, resolve_batch: bool = False):
        self.model = _infer(model, resolve_batch)
        g = self.model.graph
        self.types = value_types(g)
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {out: node for node in g.node for out in node.output if out}
        self.inputs = [vi.name for vi in g.input if vi.name not in self.initializers]
        self._complete_shapes()

    def _complete_shapes(self):
        """Dims onnx inference leaves unknown where the ops still tell them, e.g. after a
        Reshape to ``Concat(Shape(x)[0], -1)``.  An unknown dim becomes a symbol of its
        own, which ops that keep it (broadcasting with 1, MatMul) pass on."""
        for node in self.model.graph.node:
            out = node.output[0] if node.output else ""
            known = self.dims(out) if out else ()
            if not out or (known is not None and None not in known):
                continue
            guess = _guess_dims(node, [self.dims(i) if i else None for i in node.input])
            if known is None and guess is None:
                continue
            if guess is not None and known is not None and len(guess) == len(known):
                guess = tuple(k if k is not None else d for k, d in zip(known, guess))
            dims = known if guess is None or (known is not None and len(guess) != len(known)) else guess
            elem = self.elem_type(out) or (attr(node, "to") if node.op_type == "Cast" else
                                           self.elem_type(node.input[1 if node.op_type == "Where" else 0]))
            self.types[out] = helper.make_tensor_type_proto(
                elem or 0, [d if d is not None else f"cam_{out}_{i}" for i, d in enumerate(dims)])

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def dims(self, name: str) -> tuple | None:
        """`_proto.dims`, except that a 0 stays a size: `_infer` already made every
        declared dim <= 0 unknown, so a 0 left is a real empty axis (an empty
        initializer, the Shape of a scalar)."""
        t = self.types.get(name)
        found = dims(t) if t is not None else None
        if found is None:
            return None
        return tuple(0 if d.HasField("dim_value") and d.dim_value == 0 else v
                     for d, v in zip(t.tensor_type.shape.dim, found))

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    return np.asarray(helper.get_attribute_value(a))
        return None

    def exists(self, name: str) -> bool:
        return name in self.producer or name in self.types or name in self.initializers

    def require(self, *names: str) -> None:
        """Raise `NotCamCompatible` for the first of `names` the graph does not have."""
        for name in names:
            if not self.exists(name):
                raise NotCamCompatible(f"tensor '{name}' is not in the model")


def _descendants(nodes, start: str, follow=bool, carry=None) -> set:
    """`start` and the tensors computed from it, in one pass over `nodes` (graph order);
    an output for which `follow` is false is left out, unless ``carry(node, found)`` names it."""
    found = {start}
    for node in nodes:
        if any(i in found for i in node.input) or _subgraph_inputs(node) & found:
            found.update(o for o in node.output if o and follow(o))
            if carry is not None:
                found.update(o for o in carry(node, found) if o != start)
    return found


_SAME_SHAPE = {"Identity", "Cast", "Dropout", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Relu", "LeakyRelu", "Elu",
               "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Erf", "Gelu", "Softplus", "Softsign", "Mish",
               "Abs", "Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization",
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu"}


def _guess_dims(node, in_dims: list) -> tuple | None:
    """Output dims of a node from its inputs' dims (None where unknown); None if unsure."""
    op = node.op_type
    if op in _SAME_SHAPE:
        return in_dims[0]
    if op in _BROADCASTING and all(d is not None for d in in_dims):
        out = ()
        for d in in_dims:
            out = _broadcast_dims(out, d)
        return out
    if op == "Reshape" and in_dims[1] is not None and len(in_dims[1]) == 1 and isinstance(in_dims[1][0], int):
        return (None,) * in_dims[1][0]
    if op == "Gemm" and all(d is not None and len(d) == 2 for d in in_dims[:2]):
        a, b = in_dims[0], in_dims[1]
        return (a[1] if attr(node, "transA", 0) else a[0], b[0] if attr(node, "transB", 0) else b[1])
    if op in ("MatMul", "MatMulInteger") and all(d is not None and len(d) >= 2 for d in in_dims[:2]):
        a, b = in_dims[:2]
        return (*_broadcast_dims(a[:-2], b[:-2]), a[-2], b[-1])
    if op == "Flatten" and in_dims[0] is not None:
        return None, None
    return None


def _broadcast_dims(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(q if p == 1 else p if q == 1 or p == q else None for p, q in zip(a, b))


def cut_head(model: onnx.ModelProto, target: str, logits: str) -> tuple[onnx.ModelProto, list[str]]:
    """The sub-graph computing `logits` from `target`, and its frontier.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    target : str
        The feature tensor, e.g. ``(N, K, h, w)``.  It becomes the first input of the head,
        with a free batch axis, unless every input of `model` declares the same static batch
        as `target` (a fixed-batch export, run in chunks of that batch): that batch is kept.
    logits : str
        The output of the head.

    Returns
    -------
    head : onnx.ModelProto
        Inputs ``target`` then the frontier; one output, ``logits``.
    frontier : list of str
        Non-constant tensors the head reads that do not depend on `target`, in graph order
        (graph inputs first).  One read only through ``Shape``/``Size`` gets free dims:
        its values are never read, only its shape (e.g. feed zeros of the shape the
        backbone saw, with the head's batch size).

    Raises
    ------
    NotCamCompatible
        If `logits` does not depend on `target`.
    """
    from onnx.utils import Extractor

    _check_opset(model)
    ix = _Index(model)
    ix.require(target, logits)
    if ix.dims(target) is None or ix.elem_type(target) is None:
        raise NotCamCompatible(f"cannot infer the type and rank of target '{target}'")
    nodes = list(ix.model.graph.node)
    descendants = _descendants(nodes, target)
    if logits not in descendants:
        raise NotCamCompatible(f"logits '{logits}' do not depend on target '{target}'")

    static = _static_tensors(ix)
    frontier, shape_read, seen, stack = set(), set(), set(), [logits]
    while stack:
        name = stack.pop()
        if name in seen or name == target or not name or name in ix.initializers:
            continue
        seen.add(name)
        node = ix.producer.get(name)
        if node is None or (name not in descendants and name not in static):
            frontier.add(name)
            continue
        if node.op_type in SHAPE_ONLY and name not in descendants:
            shape_read.add(node.input[0])
            stack.append(node.input[0])
            continue
        stack.extend(node.input)
        stack.extend(_subgraph_inputs(node))
    frontier -= {target}
    shape_only = {n for n in shape_read if not _read_as_data(ix, n, seen)}

    order = {name: (i, 0) for i, name in enumerate(ix.inputs)}
    for i, node in enumerate(nodes):
        for j, out in enumerate(node.output):
            order.setdefault(out, (len(ix.inputs) + i, j))
    frontier_list = sorted(frontier, key=lambda n: order.get(n, (-1, 0)))

    work = copy_model(ix.model)
    for name in [target, *frontier_list, logits]:
        if name not in ix.types:  # Extractor needs a type for every cut tensor
            work.graph.value_info.append(helper.make_tensor_value_info(name, ix.elem_type(target), None))
    head = Extractor(work).extract_model([target, *frontier_list], [logits])

    # Free the batch axis of the target and of frontier tensors that share it; drop the
    # inferred internal shapes (they hold the old batch size).  A model exported with a fixed
    # batch keeps it: it runs in chunks of that batch anyway, and a free symbol meeting the
    # static batch inside (a dynamo export's Reshapes) would leave broadcasting open.
    batch = ix.dims(target)[0] if ix.dims(target) else None
    free = batch if _fixed_batch(ix) == batch else "cam_batch"
    for vi in head.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if vi.name in shape_only:
                dim.Clear()
                dim.dim_param = f"cam_{vi.name}_{i}"
            elif i == 0 and (vi.name == target or (batch is not None and (dim.dim_value or dim.dim_param) == batch)):
                dim.Clear()
                if isinstance(free, int):
                    dim.dim_value = free
                else:
                    dim.dim_param = free
    del head.graph.value_info[:]
    head.graph.output[0].type.tensor_type.ClearField("shape")
    head.ir_version = model.ir_version
    inferred = _Index(head).types.get(logits)
    if inferred is not None and inferred.tensor_type.HasField("shape"):
        head.graph.output[0].type.CopyFrom(inferred)
    return _pooled_convs_as_gemm(head), frontier_list


def _fixed_batch(ix: _Index) -> int | None:
    """The batch size every graph input declares as a static first axis, else None."""
    firsts = {(ix.dims(name) or (None,))[0] if ix.dims(name) else None for name in ix.inputs}
    (first,) = firsts if len(firsts) == 1 else (None,)
    return first if isinstance(first, int) and first > 0 else None


def _pooled_convs_as_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write each pointwise Conv on a 1x1 map (a head's conv after global pooling) as Flatten + Gemm.

    The same function, several times faster: onnxruntime's CPU Conv reorders such a
    batch into its blocked layout and runs one small product per image, where one Gemm
    serves the whole batch (MobileNetV3's head conv: 26 ms against about 4 ms at 80
    rows).  Gradients then flow through the Flatten, Gemm and Reshape rules.
    """
    ix = _Index(model)
    nodes, initializers, changed = [], [], False
    for node in model.graph.node:
        dims = ix.dims(node.input[0]) if node.op_type == "Conv" else None
        weight = ix.initializers.get(node.input[1]) if dims else None
        if (weight is None or len(dims) != 4 or list(dims[2:]) != [1, 1] or list(weight.dims[2:]) != [1, 1]
                or attr(node, "group", 1) != 1 or any(attr(node, "pads", [0] * 4))
                or list(attr(node, "strides", [1, 1])) != [1, 1]):
            nodes.append(node)
            continue
        changed = True
        name = node.name or node.output[0]
        w2d = numpy_helper.from_array(numpy_helper.to_array(weight).reshape(weight.dims[0], -1), f"cam_{name}_w2d")
        initializers.append(w2d)
        shape = numpy_helper.from_array(np.array([-1, weight.dims[0], 1, 1], np.int64), f"cam_{name}_shape")
        initializers.append(shape)
        flat, product = f"cam_{name}_flat", f"cam_{name}_gemm"
        nodes += [helper.make_node("Flatten", [node.input[0]], [flat], name=flat, axis=1),
                  helper.make_node("Gemm", [flat, w2d.name, *node.input[2:3]], [product], name=product, transB=1),
                  helper.make_node("Reshape", [product, shape.name], list(node.output[:1]), name=f"cam_{name}_4d")]
    if not changed:
        return model
    return copy_model(model, nodes=nodes, initializers=initializers)


def _static_tensors(ix: _Index) -> set:
    """Tensors computed only from constants and shapes (Shape/Size outputs)."""
    static = set(ix.initializers)
    for node in ix.model.graph.node:
        if node.op_type in SHAPE_ONLY or node.op_type == "Constant" or (
                all(i in static for i in node.input if i) and node.input and not _subgraph_inputs(node)):
            static.update(o for o in node.output if o)
    return static


def _read_as_data(ix: _Index, name: str, seen: set) -> bool:
    """Whether a head node other than Shape/Size reads `name`."""
    for node in ix.model.graph.node:
        if node.op_type in SHAPE_ONLY or not any(o in seen for o in node.output):
            continue
        if name in node.input:
            return True
    return False
