"""Reverse-mode differentiation of an ONNX sub-graph, written as plain ONNX nodes.

Gradient-based CAMs (Grad-CAM and kin) need ``d logits[c] / d features``.  onnxruntime
implements neither ``ai.onnx.preview.training.Gradient`` nor (any more) a training build,
so this module writes the backward pass itself, as ordinary default-domain nodes at the
model's own opset: whatever runs the model runs its gradient, on any execution provider.

* `cut_head` extracts the head: the sub-graph computing the logits from a feature tensor
  ``target`` (given a free batch axis), plus the "frontier", the other non-constant tensors
  the head reads that do not depend on ``target`` (a skip connection around the target
  layer, or a graph input read only through ``Shape``).
* `add_backward` appends the vector-Jacobian product ``d sum(seed * of) / d wrt`` to a
  copy of a model: ``seed`` becomes a new input shaped like ``of``, the gradient (shaped
  like ``wrt``) a new output.  Each node on a path from ``wrt`` to ``of`` is differentiated
  by a rule in `RULES`; contributions to a tensor read by several nodes are summed.
* `gradient_model` chains both.  The intended use: run the backbone once to get the
  features ``(N, K, h, w)`` (and the frontier tensors), repeat them k times along the
  batch axis (``N * k`` rows) and run the head-only gradient model once with one-hot seeds
  (row ``i * k + j`` selects the j-th class of image i): the top-k classes then cost one
  head pass, not k backbone passes.  Frontier inputs read only through ``Shape`` take a
  dummy of the right batch size.

Tensors that do not depend on ``wrt`` are held constant (a partial derivative), so a
frontier tensor contributes nothing.  Grad-CAM: Selvaraju et al., "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization", ICCV 2017.

A node without a rule, or an attribute combination a rule does not handle, raises
`NotCamCompatible` naming the op and the node: never a wrong gradient.  Nondifferentiable
points follow torch (ReLU'(0) = 0, MaxPool routes to the first maximum, ReduceMax and
GlobalMaxPool split the gradient evenly among ties).

Rules (gradients for the data inputs; inputs that do not depend on ``wrt`` get none):

* shape: Identity, Cast, Dropout (inference), Flatten, Reshape, Squeeze, Unsqueeze
  (``Reshape(g, Shape(x))``), Transpose, Concat, Split, Slice (any steps), Gather and
  GatherElements (repeated indices need opset 16), Expand, Pad (mode constant; pads
  constant or computed, negative pads crop);
* arithmetic with numpy broadcasting: Add, Sub, Mul, Div, Pow, Neg, Sum, Mean, Max, Min
  (ties share), Where, PRelu (slope too); the axes to sum are found from static dims, or
  at run time from opset 13 when dims are symbolic;
* activations: Relu, LeakyRelu, Elu, Sigmoid, HardSigmoid, HardSwish, Tanh, Clip, Erf,
  Gelu (both approximations), Softplus, Softsign, Mish, Abs, Exp, Log, Sqrt, Reciprocal,
  Softmax and LogSoftmax (2-D coercion before opset 13);
* linear: Gemm (alpha, beta, transA, transB, broadcast C), MatMul (batched, 1-D),
  Einsum (no ellipsis; each operand's letters distinct and shared), Conv (any kernel,
  strides, pads, dilations, groups, auto_pad; bias; ConvTranspose with output_padding, or
  crop/pad at run time when spatial sizes are dynamic and auto_pad is NOTSET/VALID);
* normalization: BatchNormalization (inference form), LayerNormalization (any axis);
* pooling and reductions: GlobalAveragePool, GlobalMaxPool, AveragePool (pads, strides,
  dilations, ceil_mode, count_include_pad; static spatial sizes), MaxPool (via its
  Indices; overlapping windows need opset 16), ReduceMean, ReduceSum, ReduceMax,
  ReduceMin, ReduceL1, ReduceL2, ReduceSumSquare, ReduceLogSumExp (axes constant).

Refused: opsets below 11; ops not listed, with subgraphs or outside the default domain;
parameters (Conv weights, normalization scales and statistics) that depend on ``wrt``;
training-mode Dropout and BatchNormalization; Pad modes other than constant; reduction
axes given as computed tensors; symbolic broadcasting before opset 13; Conv with SAME
auto_pad, and AveragePool, on dynamic spatial sizes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from camcore.errors import InvalidInput, NotCamCompatible

from .onnx_graph import _attr

__all__ = ["cut_head", "add_backward", "gradient_model", "RULES", "MIN_OPSET"]

# Oldest opset handled: Clip's bounds, Pad's pads and Slice's starts as inputs, Range,
# ScatterElements and float Equal all exist from 11.
MIN_OPSET = 11
# Opset from which an op takes `axes` as an input instead of an attribute.
_AXES_INPUT_OPSET = {"ReduceSum": 13, "Unsqueeze": 13, "Squeeze": 13}
_AXES_INPUT_OPSET_DEFAULT = 18  # the other reductions
# ScatterElements' reduction="add" (needed where selections may repeat an index).
_SCATTER_ADD_OPSET = 16
_SHAPE_ONLY = {"Shape", "Size"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INT64_MAX = np.iinfo(np.int64).max


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise NotCamCompatible("the model imports no default-domain ONNX opset")


def _check_opset(model: onnx.ModelProto) -> int:
    if not isinstance(model, onnx.ModelProto):
        raise InvalidInput(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise NotCamCompatible(f"gradients need ONNX opset >= {MIN_OPSET}; the model has opset {opset} "
                               f"(onnx.version_converter.convert_version can upgrade it)")
    return opset


def _unknown_nonpositive_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose declared dims <= 0 (paddle2onnx's -1 for dynamic axes) are unknown."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
    return out


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    model = _unknown_nonpositive_dims(model)
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph inference rejects keeps the types it declares
        return model


def _dims(type_proto) -> tuple | None:
    """Dims of a tensor type: int, dim_param str, or None for unknown; None when the rank is unknown."""
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def _node_label(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


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
    """Producers, types and constants of one shape-inferred graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = _infer(model)
        g = self.model.graph
        self.types = {vi.name: vi.type for vi in [*g.value_info, *g.input, *g.output]}
        self.initializers = {t.name: t for t in g.initializer}
        for t in g.initializer:
            self.types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
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
            elem = self.elem_type(out) or (_attr(node, "to") if node.op_type == "Cast" else
                                           self.elem_type(node.input[1 if node.op_type == "Where" else 0]))
            self.types[out] = helper.make_tensor_type_proto(
                elem or 0, [d if d is not None else f"cam_{out}_{i}" for i, d in enumerate(dims)])

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def dims(self, name: str) -> tuple | None:
        return _dims(self.types[name]) if name in self.types else None

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


_SAME_SHAPE = {"Identity", "Cast", "Dropout", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Relu", "LeakyRelu", "Elu",
               "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Erf", "Gelu", "Softplus", "Softsign", "Mish",
               "Abs", "Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization"}
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
        return (a[1] if _attr(node, "transA", 0) else a[0], b[0] if _attr(node, "transB", 0) else b[1])
    if op == "MatMul" and all(d is not None and len(d) >= 2 for d in in_dims[:2]):
        a, b = in_dims
        return (*_broadcast_dims(a[:-2], b[:-2]), a[-2], b[-1])
    if op == "Flatten" and in_dims[0] is not None:
        return None, None
    return None


# --------------------------------------------------------------------------- cut_head


def cut_head(model: onnx.ModelProto, target: str, logits: str) -> tuple[onnx.ModelProto, list[str]]:
    """The sub-graph computing `logits` from `target`, and its frontier.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    target : str
        The feature tensor, e.g. ``(N, K, h, w)``.  It becomes the first input of the head,
        with a free batch axis.
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
    for name in (target, logits):
        if not ix.exists(name):
            raise NotCamCompatible(f"tensor '{name}' is not in the model")
    if ix.dims(target) is None or ix.elem_type(target) is None:
        raise NotCamCompatible(f"cannot infer the type and rank of target '{target}'")
    nodes = list(ix.model.graph.node)
    descendants = {target}
    for node in nodes:
        if any(i in descendants for i in node.input) or _subgraph_inputs(node) & descendants:
            descendants.update(o for o in node.output if o)
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
        if node.op_type in _SHAPE_ONLY and name not in descendants:
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

    work = onnx.ModelProto()
    work.CopyFrom(ix.model)
    for name in [target, *frontier_list, logits]:
        if name not in ix.types:  # Extractor needs a type for every cut tensor
            work.graph.value_info.append(helper.make_tensor_value_info(name, ix.elem_type(target), None))
    head = Extractor(work).extract_model([target, *frontier_list], [logits])

    # Free the batch axis of the target and of frontier tensors that share it; drop the
    # inferred internal shapes (they hold the old batch size).
    batch = ix.dims(target)[0] if ix.dims(target) else None
    free = "cam_batch"
    for vi in head.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if vi.name in shape_only:
                dim.Clear()
                dim.dim_param = f"cam_{vi.name}_{i}"
            elif i == 0 and (vi.name == target or (batch is not None and (dim.dim_value or dim.dim_param) == batch)):
                dim.Clear()
                dim.dim_param = free
    del head.graph.value_info[:]
    head.graph.output[0].type.tensor_type.ClearField("shape")
    head.ir_version = model.ir_version
    inferred = _Index(head).types.get(logits)
    if inferred is not None and inferred.tensor_type.HasField("shape"):
        head.graph.output[0].type.CopyFrom(inferred)
    return _pooled_convs_as_gemm(head), frontier_list


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
                or _attr(node, "group", 1) != 1 or any(_attr(node, "pads", [0] * 4))
                or list(_attr(node, "strides", [1, 1])) != [1, 1]):
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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    return out


def _static_tensors(ix: _Index) -> set:
    """Tensors computed only from constants and shapes (Shape/Size outputs)."""
    static = set(ix.initializers)
    for node in ix.model.graph.node:
        if node.op_type in _SHAPE_ONLY or node.op_type == "Constant" or (
                all(i in static for i in node.input if i) and node.input and not _subgraph_inputs(node)):
            static.update(o for o in node.output if o)
    return static


def _read_as_data(ix: _Index, name: str, seen: set) -> bool:
    """Whether a head node other than Shape/Size reads `name`."""
    for node in ix.model.graph.node:
        if node.op_type in _SHAPE_ONLY or not any(o in seen for o in node.output):
            continue
        if name in node.input:
            return True
    return False


# --------------------------------------------------------------------------- emitter


class _Emitter:
    """Appends ``cam_``-named nodes and initializers in the forms the opset allows."""

    def __init__(self, ix: _Index, opset: int, default_type: int):
        self.ix, self.opset, self.default_type = ix, opset, default_type
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.types: dict[str, int] = {}
        self._used = set(ix.types) | set(ix.producer) | {n.name for n in ix.model.graph.node}
        self._count = 0
        self._consts: dict = {}
        self._shapes: dict = {}

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"cam_{hint}_{self._count}"
            if name not in self._used:
                self._used.add(name)
                return name

    def elem(self, name: str) -> int:
        return self.types.get(name) or self.ix.elem_type(name) or self.default_type

    def op(self, op_type: str, inputs, *, n_out: int = 1, hint: str | None = None, attributes=(), **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs)
        node.attribute.extend(attributes)
        self.nodes.append(node)
        return outs if n_out > 1 else outs[0]

    def const(self, value: np.ndarray) -> str:
        value = np.array(value, order="C")  # ascontiguousarray would make scalars 1-D
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant of `like`'s element type."""
        return self.const(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(self.elem(like))))

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def shape(self, x: str) -> str:
        if x not in self._shapes:
            self._shapes[x] = self.op("Shape", [x])
        return self._shapes[x]

    def typed(self, name: str, like: str) -> str:
        self.types[name] = self.elem(like)
        return name

    # arithmetic, results typed like their first operand
    def mul(self, a, b):
        return self.typed(self.op("Mul", [a, b]), a)

    def div(self, a, b):
        return self.typed(self.op("Div", [a, b]), a)

    def add(self, a, b):
        return self.typed(self.op("Add", [a, b]), a)

    def sub(self, a, b):
        return self.typed(self.op("Sub", [a, b]), a)

    def unary(self, op_type, a, **attrs):
        return self.typed(self.op(op_type, [a], **attrs), a)

    def where(self, cond, a, b, like):
        return self.typed(self.op("Where", [cond, a, b]), like)

    def mask(self, cond, like):
        """A bool tensor cast to `like`'s element type."""
        return self.typed(self.op("Cast", [cond], to=self.elem(like)), like)

    def reshape(self, x, shape):
        return self.typed(self.op("Reshape", [x, shape]), x)

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1):
        axes = [int(a) for a in axes]
        if self.opset >= _AXES_INPUT_OPSET.get(op_type, _AXES_INPUT_OPSET_DEFAULT):
            out = self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)
        else:
            out = self.op(op_type, [x], axes=axes, keepdims=keepdims)
        return self.typed(out, x)

    def unsqueeze(self, x: str, axes):
        axes = [int(a) for a in axes]
        if self.opset >= _AXES_INPUT_OPSET["Unsqueeze"]:
            return self.typed(self.op("Unsqueeze", [x, self.ints(axes)]), x)
        return self.typed(self.op("Unsqueeze", [x], axes=axes), x)

    def count(self, big: str, small: str, like: str):
        """numel(big) / numel(small) as a scalar of `like`'s type."""
        ratio = self.op("Div", [self.op("Size", [big]), self.op("Size", [small])])
        return self.typed(self.op("Cast", [ratio], to=self.elem(like)), like)

    def zeros_like(self, x: str):
        value = numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.elem(x))))
        return self.typed(self.op("ConstantOfShape", [self.shape(x)], value=value), x)

    def scatter(self, x: str, selected: str, g: str, *, add: bool):
        """Gradient of a selection: `g` scattered into zeros shaped like `x` at the flat
        indices `selected` (the selection applied to ``arange(x.size)``)."""
        value = numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.elem(x))))
        flat = self.op("ConstantOfShape", [self.op("Reshape", [self.op("Size", [x]), self.ints([1])])], value=value)
        attrs = {"reduction": "add"} if add else {}
        minus_one = self.ints([-1])
        out = self.op("ScatterElements", [flat, self.op("Reshape", [selected, minus_one]),
                                          self.op("Reshape", [g, minus_one])], axis=0, **attrs)
        return self.typed(self.op("Reshape", [out, self.shape(x)]), x)

    def flat_indices(self, x: str):
        """``arange(x.size)`` shaped like `x`."""
        r = self.op("Range", [self.ints(0), self.op("Size", [x]), self.ints(1)])
        return self.op("Reshape", [r, self.shape(x)])


# --------------------------------------------------------------------------- rules


class _Context:
    """What a rule sees: the node, its output gradients, types and the emitter."""

    def __init__(self, e: _Emitter, node, grads_out: list, useful: set):
        self.e, self.node, self.grads_out, self.useful = e, node, grads_out, useful

    def refuse(self, why: str):
        raise NotCamCompatible(f"no gradient rule for {self.node.op_type} at node '{_node_label(self.node)}': {why}")

    def g(self, i: int = 0):
        return self.grads_out[i] if i < len(self.grads_out) else None

    def x(self, i: int = 0) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def y(self, i: int = 0) -> str:
        return self.node.output[i]

    def active(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] in self.useful

    def dims(self, name: str) -> tuple:
        d = self.e.ix.dims(name)
        if d is None:
            self.refuse(f"the rank of '{name}' is unknown")
        return d

    def rank(self, name: str) -> int:
        return len(self.dims(name))

    def static(self, dims, what: str) -> list:
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            self.refuse(f"{what} must have static sizes, got {dims}")
        return [int(d) for d in dims]

    def const_input(self, i: int, what: str):
        if not self.x(i):
            return None
        value = self.e.ix.constant(self.x(i))
        if value is None:
            self.refuse(f"{what} must be a constant")
        return value

    def unbroadcast(self, g: str, g_dims: tuple, like: str, like_dims: tuple | None = None) -> str:
        """Sum `g` (shaped `g_dims`) over the axes that numpy broadcasting added to `like`."""
        e = self.e
        x_dims = like_dims if like_dims is not None else self.dims(like)
        lead = len(g_dims) - len(x_dims)
        axes, ambiguous = list(range(lead)), False
        for j, d in enumerate(x_dims):
            o = g_dims[lead + j]
            if d == 1:
                if o != 1:
                    axes.append(lead + j)
            elif not (isinstance(d, int) or (d is not None and d == o)):
                ambiguous = True
        if ambiguous:
            if e.opset < _AXES_INPUT_OPSET["ReduceSum"]:
                self.refuse(f"cannot tell which axes of '{like}' were broadcast before opset 13")
            x_shape = e.shape(like)
            if lead:
                x_shape = e.op("Concat", [e.ints([1] * lead), x_shape], axis=0)
            differs = e.op("Not", [e.op("Equal", [x_shape, e.op("Shape", [g])])])
            axes_t = e.op("Reshape", [e.op("NonZero", [differs]), e.ints([-1])])
            s = e.typed(e.op("ReduceSum", [g, axes_t], keepdims=1, noop_with_empty_axes=1), g)
            return e.reshape(s, e.shape(like))
        if not axes:
            return g
        s = e.reduce("ReduceSum", g, axes, keepdims=1)
        return e.reshape(s, e.shape(like)) if lead else s


def _broadcast_dims(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(q if p == 1 else p if q == 1 or p == q else None for p, q in zip(a, b))


def _normalize_axes(c: _Context, axes, rank: int) -> list:
    out = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
    if any(not 0 <= a < rank for a in out):
        c.refuse(f"axes {list(axes)} out of range for rank {rank}")
    return out


def _pass_through(c):
    return {0: c.e.reshape(c.g(), c.e.shape(c.x()))}


def _identity(c):
    return {0: c.g()}


def _cast(c):
    return {0: c.e.typed(c.e.op("Cast", [c.g()], to=c.e.elem(c.x())), c.x())}


def _dropout(c):
    if c.x(2):
        mode = c.const_input(2, "training_mode")
        if bool(np.asarray(mode).reshape(-1)[0]):
            c.refuse("training_mode is on")
    return {0: c.g()}


def _transpose(c):
    rank = c.rank(c.x())
    perm = _attr(c.node, "perm", list(range(rank))[::-1])
    return {0: c.e.typed(c.e.op("Transpose", [c.g()], perm=[int(i) for i in np.argsort(perm)]), c.g())}


def _concat(c):
    e = c.e
    axis = _normalize_axes(c, [_attr(c.node, "axis")], c.rank(c.y()))[0]
    out, start = {}, e.ints([0])
    for i, name in enumerate(c.node.input):
        end = e.op("Add", [start, e.op("Gather", [e.shape(name), e.ints([axis])], axis=0)])
        if c.active(i):
            out[i] = e.typed(e.op("Slice", [c.g(), start, end, e.ints([axis])]), c.g())
        start = end
    return out


def _split(c):
    e = c.e
    axis = _normalize_axes(c, [_attr(c.node, "axis", 0)], c.rank(c.x()))[0]
    parts = [c.g(i) or e.zeros_like(y) for i, y in enumerate(c.node.output)]
    return {0: e.typed(e.op("Concat", parts, axis=axis), c.x())}


def _slice(c):
    e = c.e
    selected = e.op("Slice", [e.flat_indices(c.x()), *c.node.input[1:]])
    return {0: e.scatter(c.x(), selected, c.g(), add=False)}


def _gather(c):
    e = c.e
    op = c.node.op_type
    axis = _attr(c.node, "axis", 0)
    selected = e.op(op, [e.flat_indices(c.x()), c.x(1)], axis=axis)
    if e.opset >= _SCATTER_ADD_OPSET:
        return {0: e.scatter(c.x(), selected, c.g(), add=True)}
    indices, size = e.ix.constant(c.x(1)), c.dims(c.x())[_normalize_axes(c, [axis], c.rank(c.x()))[0]]
    unique = False
    if indices is not None and op == "Gather" and isinstance(size, int):
        flat = np.where(indices < 0, indices + size, indices).reshape(-1)
        unique = len(np.unique(flat)) == flat.size
    if not unique:
        c.refuse(f"indices that may repeat need ScatterElements reduction (opset {_SCATTER_ADD_OPSET})")
    return {0: e.scatter(c.x(), selected, c.g(), add=False)}


def _expand(c):
    return {0: c.unbroadcast(c.g(), c.dims(c.y()), c.x())}


def _pad(c):
    """Crop the padding off the gradient; zero-pad where Pad cropped (negative pads)."""
    e = c.e
    if _attr(c.node, "mode", b"constant") not in (b"constant", "constant"):
        c.refuse("only mode='constant' is handled")
    rank = c.rank(c.x())
    axes = c.const_input(3, "axes") if len(c.node.input) > 3 else None
    # pads follow the order of `axes` (not sorted)
    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)] if axes is not None else list(range(rank))
    pads = e.ix.constant(c.x(1))
    if pads is not None and (np.asarray(pads) >= 0).all():
        pads = np.asarray(pads, dtype=np.int64).reshape(-1)
        begin, end = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
        begin[axes], end[axes] = pads[:len(axes)], pads[len(axes):]
        ends = [-int(p) if p > 0 else _INT64_MAX for p in end]
        return {0: e.typed(e.op("Slice", [c.g(), e.ints(begin), e.ints(ends), e.ints(range(rank))]), c.g())}
    # Pads of unknown sign, known at run time: spread them over all axes (a zero for the others).
    n, padded = len(axes), e.op("Concat", [c.x(1), e.ints([0])], axis=0)
    begin = e.op("Gather", [padded, e.ints([axes.index(a) if a in axes else 2 * n for a in range(rank)])], axis=0)
    end = e.op("Gather", [padded, e.ints([axes.index(a) + n if a in axes else 2 * n for a in range(rank)])], axis=0)
    zero = e.ints(0)
    grown_begin = e.op("Where", [e.op("Less", [begin, zero]), zero, begin])
    grown_end = e.op("Where", [e.op("Less", [end, zero]), zero, end])
    cropped = e.op("Slice", [c.g(), grown_begin, e.op("Sub", [e.shape(c.y()), grown_end]), e.ints(range(rank))])
    cut = e.op("Concat", [e.op("Sub", [grown_begin, begin]), e.op("Sub", [grown_end, end])], axis=0)
    return {0: e.typed(e.op("Pad", [cropped, cut]), c.g())}


# elementwise arithmetic with broadcasting

def _binary(c, grad_a, grad_b, positions=(0, 1)):
    """Gradients of two broadcast operands (at `positions`), summed back to their shapes."""
    out, y_dims = {}, c.dims(c.y())
    for i, fn in zip(positions, (grad_a, grad_b)):
        if c.active(i):
            out[i] = c.unbroadcast(fn(), y_dims, c.x(i))
    return out


def _add(c):
    return _binary(c, c.g, c.g)


def _sub(c):
    return _binary(c, c.g, lambda: c.e.unary("Neg", c.g()))


def _mul(c):
    e = c.e
    return _binary(c, lambda: e.mul(c.g(), c.x(1)), lambda: e.mul(c.g(), c.x(0)))


def _div(c):
    e = c.e
    return _binary(c, lambda: e.div(c.g(), c.x(1)),
                   lambda: e.unary("Neg", e.mul(c.g(), e.div(c.y(), c.x(1)))))


def _pow(c):
    e = c.e
    x, p = c.x(0), c.x(1)
    if e.elem(p) != e.elem(x):
        p = e.typed(e.op("Cast", [p], to=e.elem(x)), x)
    return _binary(c, lambda: e.mul(c.g(), e.mul(p, e.typed(e.op("Pow", [x, e.sub(p, e.scalar(1, p))]), x))),
                   lambda: e.typed(e.op("Cast", [e.mul(e.mul(c.g(), c.y()), e.unary("Log", x))],
                                        to=e.elem(c.x(1))), c.x(1)))


def _neg(c):
    return {0: c.e.unary("Neg", c.g())}


def _sum(c):
    y_dims = c.dims(c.y())
    return {i: c.unbroadcast(c.g(), y_dims, x) for i, x in enumerate(c.node.input) if c.active(i)}


def _mean(c):
    e, y_dims = c.e, c.dims(c.y())
    g = e.div(c.g(), e.scalar(len(c.node.input), c.y()))
    return {i: c.unbroadcast(g, y_dims, x) for i, x in enumerate(c.node.input) if c.active(i)}


def _max_min(c):
    """Ties share the gradient evenly (torch.maximum)."""
    e, y, y_dims = c.e, c.y(), c.dims(c.y())
    masks = [e.mask(e.op("Equal", [x, y]), y) for x in c.node.input]
    count = masks[0] if len(masks) == 1 else e.typed(e.op("Sum", masks), y)
    g = e.div(c.g(), count)
    return {i: c.unbroadcast(e.mul(g, masks[i]), y_dims, x) for i, x in enumerate(c.node.input) if c.active(i)}


def _where(c):
    e, g, zero = c.e, c.g(), c.e.scalar(0, c.y())
    return _binary(c, lambda: e.where(c.x(0), g, zero, g), lambda: e.where(c.x(0), zero, g, g), positions=(1, 2))


# elementwise unary

def _unary(fn):
    def rule(c):
        return {0: fn(c.e, c.x(), c.y(), c.g(), c.node)}
    return rule


def _relu(e, x, y, g, node):
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.scalar(0, x), g)


def _leaky_relu(e, x, y, g, node):
    alpha = _attr(node, "alpha", 0.01)
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.mul(g, e.scalar(alpha, x)), g)


def _elu(e, x, y, g, node):
    alpha = _attr(node, "alpha", 1.0)
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.mul(g, e.add(y, e.scalar(alpha, x))), g)


def _hard_sigmoid(e, x, y, g, node):
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    t = e.add(e.mul(x, e.scalar(alpha, x)), e.scalar(beta, x))
    inside = e.op("And", [e.op("Greater", [t, e.scalar(0, x)]), e.op("Less", [t, e.scalar(1, x)])])
    return e.where(inside, e.mul(g, e.scalar(alpha, x)), e.scalar(0, x), g)


def _hard_swish(e, x, y, g, node):
    """torch: 0 below -3, g * (x / 3 + 1/2) on [-3, 3], g above."""
    slope = e.mul(g, e.add(e.div(x, e.scalar(3, x)), e.scalar(0.5, x)))
    upper = e.where(e.op("Greater", [x, e.scalar(3, x)]), g, slope, g)
    return e.where(e.op("Less", [x, e.scalar(-3, x)]), e.scalar(0, x), upper, g)


def _sigmoid(e, x, y, g, node):
    return e.mul(g, e.mul(y, e.sub(e.scalar(1, y), y)))


def _tanh(e, x, y, g, node):
    return e.mul(g, e.sub(e.scalar(1, y), e.mul(y, y)))


def _exp(e, x, y, g, node):
    return e.mul(g, y)


def _log(e, x, y, g, node):
    return e.div(g, x)


def _sqrt(e, x, y, g, node):
    return e.mul(g, e.div(e.scalar(0.5, y), y))


def _reciprocal(e, x, y, g, node):
    return e.unary("Neg", e.mul(g, e.mul(y, y)))


def _abs(e, x, y, g, node):
    return e.mul(g, e.unary("Sign", x))


def _softplus(e, x, y, g, node):
    return e.mul(g, e.unary("Sigmoid", x))


def _softsign(e, x, y, g, node):
    d = e.add(e.scalar(1, x), e.unary("Abs", x))
    return e.div(g, e.mul(d, d))


def _erf(e, x, y, g, node):
    return e.mul(g, e.mul(e.scalar(2 / math.sqrt(math.pi), x), e.unary("Exp", e.unary("Neg", e.mul(x, x)))))


def _mish(e, x, y, g, node):
    t = e.unary("Tanh", e.unary("Softplus", x))
    d = e.add(t, e.mul(e.mul(x, e.unary("Sigmoid", x)), e.sub(e.scalar(1, x), e.mul(t, t))))
    return e.mul(g, d)


def _gelu(e, x, y, g, node):
    approximate = _attr(node, "approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "tanh":
        k, a = math.sqrt(2 / math.pi), 0.044715
        x2 = e.mul(x, x)
        t = e.unary("Tanh", e.mul(e.scalar(k, x), e.add(x, e.mul(e.scalar(a, x), e.mul(x2, x)))))
        du = e.mul(e.scalar(k, x), e.add(e.scalar(1, x), e.mul(e.scalar(3 * a, x), x2)))
        d = e.add(e.mul(e.scalar(0.5, x), e.add(e.scalar(1, x), t)),
                  e.mul(e.mul(e.scalar(0.5, x), x), e.mul(e.sub(e.scalar(1, x), e.mul(t, t)), du)))
        return e.mul(g, d)
    if approximate != "none":
        raise NotCamCompatible(f"no gradient rule for Gelu at node '{_node_label(node)}': approximate={approximate!r}")
    cdf = e.mul(e.scalar(0.5, x), e.add(e.scalar(1, x), e.unary("Erf", e.mul(x, e.scalar(1 / math.sqrt(2), x)))))
    pdf = e.mul(e.scalar(1 / math.sqrt(2 * math.pi), x),
                e.unary("Exp", e.mul(e.mul(x, x), e.scalar(-0.5, x))))
    return e.mul(g, e.add(cdf, e.mul(x, pdf)))


def _prelu(c):
    e, x, slope, g = c.e, c.x(0), c.x(1), c.g()
    positive = e.op("Greater", [x, e.scalar(0, x)])
    out = {}
    if c.active(0):
        out[0] = e.where(positive, g, e.mul(g, slope), g)
    if c.active(1):
        out[1] = c.unbroadcast(e.where(positive, e.scalar(0, x), e.mul(g, x), g), c.dims(x), slope)
    return out


def _clip(c):
    """Gradient passes where min <= x <= max (torch.clamp)."""
    e, x = c.e, c.x()
    conds = []
    if c.x(1):
        conds.append(e.op("Not", [e.op("Less", [x, c.x(1)])]))
    if c.x(2):
        conds.append(e.op("Not", [e.op("Greater", [x, c.x(2)])]))
    if not conds:
        return {0: c.g()}
    inside = conds[0] if len(conds) == 1 else e.op("And", conds)
    return {0: e.where(inside, c.g(), e.scalar(0, x), x)}


# linear algebra

def _gemm(c):
    e, a, b, g = c.e, c.x(0), c.x(1), c.g()
    alpha, beta = _attr(c.node, "alpha", 1.0), _attr(c.node, "beta", 1.0)
    ta, tb = _attr(c.node, "transA", 0), _attr(c.node, "transB", 0)
    out = {}
    if c.active(0):
        args = ([g, b], {"transB": 1 - tb}) if not ta else ([b, g], {"transA": tb, "transB": 1})
        out[0] = e.typed(e.op("Gemm", args[0], alpha=alpha, **args[1]), a)
    if c.active(1):
        args = ([a, g], {"transA": 1 - ta}) if not tb else ([g, a], {"transA": 1, "transB": ta})
        out[1] = e.typed(e.op("Gemm", args[0], alpha=alpha, **args[1]), b)
    if c.active(2):
        gc = g if beta == 1 else e.mul(g, e.scalar(beta, g))
        out[2] = c.unbroadcast(gc, c.dims(c.y()), c.x(2))
    return out


def _swap_last(e, x, rank):
    perm = list(range(rank))
    perm[-2:] = perm[-1], perm[-2]
    return e.typed(e.op("Transpose", [x], perm=perm), x)


def _matmul(c):
    """numpy matmul: 1-D operands are promoted to matrices, batch axes broadcast."""
    e, a, b, g = c.e, c.x(0), c.x(1), c.g()
    ad, bd = c.dims(a), c.dims(b)
    a2, a2d = (e.reshape(a, e.ints([1, -1])), (1, ad[0])) if len(ad) == 1 else (a, ad)
    b2, b2d = (e.reshape(b, e.ints([-1, 1])), (bd[0], 1)) if len(bd) == 1 else (b, bd)
    batch = _broadcast_dims(a2d[:-2], b2d[:-2])
    g2d = (*batch, a2d[-2], b2d[-1])
    if len(ad) > 1 and len(bd) > 1:
        g2 = g
    else:
        g2 = e.reshape(g, _promoted_shape(c, g2d, len(ad) == 1, len(bd) == 1))
    out = {}
    if c.active(0):
        d = e.typed(e.op("MatMul", [g2, _swap_last(e, b2, len(b2d))]), a)
        d = c.unbroadcast(d, (*batch, a2d[-2], a2d[-1]), a2, a2d)
        out[0] = d if a2 == a else e.reshape(d, e.shape(a))
    if c.active(1):
        d = e.typed(e.op("MatMul", [_swap_last(e, a2, len(a2d)), g2]), b)
        d = c.unbroadcast(d, (*batch, b2d[-2], b2d[-1]), b2, b2d)
        out[1] = d if b2 == b else e.reshape(d, e.shape(b))
    return out


def _promoted_shape(c, g2d, a_vector: bool, b_vector: bool) -> str:
    """Shape of the gradient of a matmul with 1-D operands promoted to matrices."""
    e = c.e
    g_shape = e.shape(c.y())
    if a_vector and b_vector:
        return e.ints([1, 1])
    if a_vector:  # y (..., N) -> (..., 1, N)
        rank = len(g2d) - 1
        return e.op("Concat", [e.op("Slice", [g_shape, e.ints([0]), e.ints([rank - 1])]), e.ints([1]),
                               e.op("Slice", [g_shape, e.ints([rank - 1]), e.ints([rank])])], axis=0)
    return e.op("Concat", [g_shape, e.ints([1])], axis=0)  # y (..., M) -> (..., M, 1)


def _window(c, x_dims):
    """Kernel, strides, dilations, explicit pads, input and output sizes of a Conv/pool node.

    The output sizes follow onnxruntime (and torch): with ceil_mode, a window that would
    start in the end padding is dropped (onnx shape inference may count one more).
    """
    node, n = c.node, len(x_dims) - 2
    k = _attr(node, "kernel_shape")
    if k is None:
        k = c.static(c.dims(c.x(1))[2:], "the kernel")
    s = list(_attr(node, "strides", [1] * n))
    d = list(_attr(node, "dilations", [1] * n))
    spatial = c.static(x_dims[2:], "the input's spatial axes")
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    extent = [(k[i] - 1) * d[i] + 1 for i in range(n)]
    if auto_pad == "NOTSET":
        pads = list(_attr(node, "pads", [0] * 2 * n))
    elif auto_pad == "VALID":
        pads = [0] * 2 * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * n
        for i in range(n):
            total = max(0, (-(-spatial[i] // s[i]) - 1) * s[i] + extent[i] - spatial[i])
            small, large = total // 2, total - total // 2
            pads[i], pads[n + i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    else:
        c.refuse(f"auto_pad={auto_pad!r}")
    ceil_mode = _attr(node, "ceil_mode", 0)
    out = []
    for i in range(n):
        span = spatial[i] + pads[i] + pads[n + i] - extent[i]
        size = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
        if ceil_mode and (size - 1) * s[i] >= spatial[i] + pads[i]:
            size -= 1
        if size < 1:
            c.refuse(f"empty output for input size {spatial[i]}")
        out.append(size)
    return list(k), s, d, pads, spatial, out


def _conv(c):
    """Input gradient: ConvTranspose with the same weights, cropped or padded to the input size."""
    e, x, g = c.e, c.x(), c.g()
    x_dims = c.dims(x)
    out = {}
    if c.active(1):
        c.refuse("the weights depend on the differentiated tensor")
    if c.active(2):
        out[2] = e.reduce("ReduceSum", g, [0, *range(2, len(x_dims))], keepdims=0)
    if not c.active(0):
        return out
    group = _attr(c.node, "group", 1)
    if _pointwise(c, x_dims, group):
        out[0] = _pointwise_conv_input_grad(c, x_dims)
    elif all(isinstance(v, int) for v in x_dims[2:]):
        k, s, d, pads, spatial, size = _window(c, x_dims)
        n = len(k)
        begin, end, output_padding = pads[:n], [0] * n, [0] * n
        for i in range(n):
            covered = s[i] * (size[i] - 1) + (k[i] - 1) * d[i] + 1 - begin[i]
            if covered >= spatial[i]:
                end[i] = covered - spatial[i]
            else:
                output_padding[i] = spatial[i] - covered
        out[0] = e.typed(e.op("ConvTranspose", [g, c.x(1)], kernel_shape=k, strides=s, dilations=d,
                              pads=begin + end, output_padding=output_padding, group=group), x)
    else:
        out[0] = _conv_dynamic(c, x_dims, group)
    return out


def _pointwise(c, x_dims, group) -> bool:
    """A 1x1 Conv with stride 1, no padding, one group and a known input channel count."""
    node, n = c.node, len(x_dims) - 2
    kernel = _attr(node, "kernel_shape") or c.dims(c.x(1))[2:]
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    return (group == 1 and isinstance(x_dims[1], int) and kernel is not None and list(kernel) == [1] * n
            and list(_attr(node, "strides", [1] * n)) == [1] * n
            and not any(_attr(node, "pads", [0] * 2 * n))
            and (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) in ("NOTSET", "VALID"))


def _pointwise_conv_input_grad(c, x_dims):
    """The input gradient of a pointwise Conv is one MatMul over channels, ``g W``.

    onnxruntime's CPU ConvTranspose runs one small GEMM per image; a MatMul over all
    the batch's pixels at once is several times faster (MobileNetV3's head conv: its
    input gradient at 80 rows took 46 ms as ConvTranspose).
    """
    e, x, g = c.e, c.x(), c.g()
    rank = len(x_dims)
    weights = e.op("Reshape", [c.x(1), e.ints([-1, x_dims[1]])])  # (C_out, C_in)
    if all(d == 1 for d in x_dims[2:]):  # after global pooling: (N, C_out, 1, 1)
        flat = e.op("Reshape", [g, e.ints([0, -1])])
        return e.typed(e.op("Reshape", [e.op("MatMul", [flat, weights]), e.shape(x)]), x)
    last = e.op("Transpose", [g], perm=[0, *range(2, rank), 1])
    moved = e.op("MatMul", [last, weights])
    return e.typed(e.op("Transpose", [moved], perm=[0, rank - 1, *range(1, rank - 1)]), x)


def _conv_dynamic(c, x_dims, group):
    """Spatial sizes known only at run time: ConvTranspose without end padding, then crop
    its end to the input size, or zero-pad the end positions no window reached."""
    e, x, node = c.e, c.x(), c.node
    rank, n = len(x_dims), len(x_dims) - 2
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        c.refuse(f"auto_pad={auto_pad!r} needs static spatial sizes, got {x_dims}")
    begin = list(_attr(node, "pads", [0] * 2 * n))[:n] if auto_pad == "NOTSET" else [0] * n
    attrs = {"kernel_shape": list(_attr(node, "kernel_shape"))} if _attr(node, "kernel_shape") else {}
    full = e.op("ConvTranspose", [c.g(), c.x(1)], strides=list(_attr(node, "strides", [1] * n)),
                dilations=list(_attr(node, "dilations", [1] * n)), pads=begin + [0] * n, group=group, **attrs)
    spatial_axes = e.ints(range(2, rank))
    size = e.op("Slice", [e.shape(x), e.ints([2]), e.ints([rank])])
    cropped = e.op("Slice", [full, e.ints([0] * n), size, spatial_axes])
    missing = e.op("Sub", [size, e.op("Slice", [e.op("Shape", [cropped]), e.ints([2]), e.ints([rank])])])
    pads = e.op("Concat", [e.ints([0] * (rank + 2)), missing], axis=0)
    return e.typed(e.op("Pad", [cropped, pads]), x)


def _average_pool_matrix(k, s, d, pb, pe, size_in, size_out, include_pad, dtype):
    """(out, in) matrix of one spatial axis of AveragePool: 1/count on each window."""
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for o in range(size_out):
        taps = o * s - pb + d * np.arange(k)
        valid = taps[(taps >= 0) & (taps < size_in)]
        count = np.count_nonzero(taps < size_in + pe) if include_pad else valid.size
        m[o, valid] = 1.0 / count if count else 0.0
    return m.astype(dtype)


def _average_pool(c):
    """Separable: one (in, out) matrix product per spatial axis."""
    e, x, g = c.e, c.x(), c.g()
    x_dims = c.dims(x)
    k, s, d, pads, spatial, size = _window(c, x_dims)
    n, rank = len(k), len(x_dims)
    include_pad = _attr(c.node, "count_include_pad", 0)
    dtype = helper.tensor_dtype_to_np_dtype(e.elem(x))
    for i in range(n):
        m = _average_pool_matrix(k[i], s[i], d[i], pads[i], pads[n + i], spatial[i], size[i], include_pad, dtype)
        axis = 2 + i
        if axis == rank - 1:
            g = e.typed(e.op("MatMul", [g, e.const(m)]), x)
        elif axis == rank - 2:
            g = e.typed(e.op("MatMul", [e.const(m.T), g]), x)
        else:
            perm = list(range(rank))
            perm[axis], perm[-1] = perm[-1], perm[axis]
            moved = e.typed(e.op("MatMul", [e.typed(e.op("Transpose", [g], perm=perm), x), e.const(m)]), x)
            g = e.typed(e.op("Transpose", [moved], perm=perm), x)
    return {0: g}


def _max_pool(c):
    """Routes the gradient to MaxPool's Indices (the first maximum, like torch)."""
    e, x, node = c.e, c.x(), c.node
    if len(node.output) > 1 and node.output[1] and not _attr(node, "storage_order", 0):
        indices = node.output[1]
    else:  # a twin node with row-major Indices
        attributes = [a for a in node.attribute if a.name != "storage_order"]
        _, indices = e.op("MaxPool", [x], n_out=2, attributes=attributes)
    k = _attr(node, "kernel_shape")
    s, d = _attr(node, "strides", [1] * len(k)), _attr(node, "dilations", [1] * len(k))
    overlap = any(si < (ki - 1) * di + 1 for ki, si, di in zip(k, s, d))
    if overlap and e.opset < _SCATTER_ADD_OPSET:
        c.refuse(f"overlapping windows need ScatterElements reduction (opset {_SCATTER_ADD_OPSET})")
    return {0: e.scatter(x, indices, c.g(), add=overlap)}


def _global_average_pool(c):
    e, x = c.e, c.x()
    g = e.div(c.g(), e.count(x, c.y(), x))
    return {0: e.typed(e.op("Expand", [g, e.shape(x)]), x)}


def _global_max_pool(c):
    e, x, y = c.e, c.x(), c.y()
    return {0: _tie_split(e, x, y, c.g(), range(2, c.rank(x)))}


def _tie_split(e, x, yk, gk, axes):
    """The gradient of a max/min reduction, shared evenly among the ties (torch.amax)."""
    mask = e.mask(e.op("Equal", [x, yk]), x)
    count = e.reduce("ReduceSum", mask, list(axes), keepdims=1)
    return e.mul(mask, e.div(gk, count))


def _reduce(c):
    e, x, y, node, op = c.e, c.x(), c.y(), c.node, c.node.op_type
    rank = c.rank(x)
    if op == "ReduceSum" and e.opset >= 13 or e.opset >= 18:
        axes = c.const_input(1, "axes")
    else:
        axes = _attr(node, "axes")
    if axes is not None and np.asarray(axes).size == 0:
        axes = None
    if axes is None:
        if _attr(node, "noop_with_empty_axes", 0):
            return {0: c.g()}
        axes = range(rank)
    axes = _normalize_axes(c, np.asarray(axes).reshape(-1), rank)
    keepdims = _attr(node, "keepdims", 1)
    gk = c.g() if keepdims else e.unsqueeze(c.g(), axes)
    yk = y if keepdims else e.unsqueeze(y, axes)
    if op == "ReduceSum":
        d = gk
    elif op == "ReduceMean":
        d = e.div(gk, e.count(x, y, x))
    elif op in ("ReduceMax", "ReduceMin"):
        return {0: _tie_split(e, x, yk, gk, axes)}
    elif op == "ReduceSumSquare":
        d = e.mul(e.mul(gk, e.scalar(2, x)), x)
    elif op == "ReduceL1":
        d = e.mul(gk, e.unary("Sign", x))
    elif op == "ReduceL2":  # x / ||x||, 0 where the norm is 0 (torch)
        ratio = e.where(e.op("Equal", [yk, e.scalar(0, x)]), e.scalar(0, x), e.div(gk, yk), x)
        d = e.mul(ratio, x)
    else:  # ReduceLogSumExp
        d = e.mul(gk, e.unary("Exp", e.sub(x, yk)))
    return {0: e.typed(e.op("Expand", [d, e.shape(x)]), x)}


def _softmax_axes(c) -> list:
    """Before opset 13 (Log)Softmax normalizes over all axes from `axis` on (2-D coercion)."""
    rank = c.rank(c.x())
    if c.e.opset < 13:
        axis = _normalize_axes(c, [_attr(c.node, "axis", 1)], rank)[0]
        return list(range(axis, rank))
    return _normalize_axes(c, [_attr(c.node, "axis", -1)], rank)


def _softmax(c):
    e, y, g = c.e, c.y(), c.g()
    s = e.reduce("ReduceSum", e.mul(g, y), _softmax_axes(c), keepdims=1)
    return {0: e.mul(y, e.sub(g, s))}


def _log_softmax(c):
    e, y, g = c.e, c.y(), c.g()
    s = e.reduce("ReduceSum", g, _softmax_axes(c), keepdims=1)
    return {0: e.sub(g, e.mul(e.unary("Exp", y), s))}


def _batch_norm(c):
    e, x = c.e, c.x()
    if _attr(c.node, "training_mode", 0) or len([o for o in c.node.output if o]) > 1:
        c.refuse("only the inference form is handled")
    rank = c.rank(x)
    eps = e.scalar(_attr(c.node, "epsilon", 1e-5), x)
    factor = e.div(c.x(1), e.unary("Sqrt", e.add(c.x(4), eps)))
    factor = e.reshape(factor, e.ints([-1] + [1] * (rank - 2)))
    return {0: e.mul(c.g(), factor)}


def _layer_norm(c):
    e, x = c.e, c.x()
    if c.g(1) or c.g(2):
        c.refuse("the Mean and InvStdDev outputs are differentiated")
    rank = c.rank(x)
    axes = list(range(_normalize_axes(c, [_attr(c.node, "axis", -1)], rank)[0], rank))
    centered = e.sub(x, e.reduce("ReduceMean", x, axes))
    var = e.reduce("ReduceMean", e.mul(centered, centered), axes)
    inv = e.unary("Reciprocal", e.unary("Sqrt", e.add(var, e.scalar(_attr(c.node, "epsilon", 1e-5), x))))
    xhat = e.mul(centered, inv)
    gh = e.mul(c.g(), c.x(1))
    inner = e.sub(e.sub(gh, e.reduce("ReduceMean", gh, axes)),
                  e.mul(xhat, e.reduce("ReduceMean", e.mul(gh, xhat), axes)))
    return {0: e.mul(inv, inner)}


def _einsum(c):
    """d A = einsum(out, others -> A): each operand's letters must be distinct and appear
    in the output or another operand (no ellipsis)."""
    equation = _attr(c.node, "equation")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "." in equation:
        c.refuse("ellipsis is not handled")
    terms, _, result = equation.partition("->")
    terms = terms.split(",")
    if "->" not in equation:  # implicit output: the letters used once, sorted
        letters = "".join(terms)
        result = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    out = {}
    for i, term in enumerate(terms):
        if not c.active(i):
            continue
        others = [t for j, t in enumerate(terms) if j != i]
        if len(set(term)) != len(term) or not set(term) <= set(result + "".join(others)):
            c.refuse(f"operand {i} ({term!r}) has a repeated letter or one summed over it alone")
        inputs = [c.g(), *(x for j, x in enumerate(c.node.input) if j != i)]
        out[i] = c.e.typed(c.e.op("Einsum", inputs, equation=f"{','.join([result, *others])}->{term}"), c.x(i))
    return out


RULES = {
    "Identity": _identity, "Cast": _cast, "Dropout": _dropout,
    "Flatten": _pass_through, "Reshape": _pass_through, "Squeeze": _pass_through, "Unsqueeze": _pass_through,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather, "Expand": _expand, "Pad": _pad,
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Pow": _pow, "Neg": _neg,
    "Sum": _sum, "Mean": _mean, "Max": _max_min, "Min": _max_min, "Where": _where,
    "Relu": _unary(_relu), "LeakyRelu": _unary(_leaky_relu), "PRelu": _prelu, "Elu": _unary(_elu),
    "Sigmoid": _unary(_sigmoid), "HardSigmoid": _unary(_hard_sigmoid), "HardSwish": _unary(_hard_swish),
    "Tanh": _unary(_tanh), "Clip": _clip, "Erf": _unary(_erf), "Gelu": _unary(_gelu),
    "Softplus": _unary(_softplus), "Softsign": _unary(_softsign), "Mish": _unary(_mish),
    "Exp": _unary(_exp), "Log": _unary(_log), "Sqrt": _unary(_sqrt), "Reciprocal": _unary(_reciprocal),
    "Abs": _unary(_abs),
    "Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum, "Conv": _conv,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool,
    "AveragePool": _average_pool, "MaxPool": _max_pool,
    "ReduceMean": _reduce, "ReduceSum": _reduce, "ReduceMax": _reduce, "ReduceMin": _reduce,
    "ReduceL1": _reduce, "ReduceL2": _reduce, "ReduceSumSquare": _reduce, "ReduceLogSumExp": _reduce,
    "Softmax": _softmax, "LogSoftmax": _log_softmax,
}


# --------------------------------------------------------------------------- add_backward


def add_backward(model: onnx.ModelProto, wrt: str, of: str, *, seed: str = "cam_seed",
                 grad: str | None = None) -> onnx.ModelProto:
    """Append the vector-Jacobian product ``d sum(seed * of) / d wrt`` to a copy of `model`.

    Parameters
    ----------
    model : onnx.ModelProto
        Opset >= 11.  Not modified.
    wrt : str
        A graph input or an internal tensor.
    of : str
        A tensor depending on `wrt`.
    seed : str
        Name of the new input, with `of`'s type and shape.
    grad : str, optional
        Name of the new output, with `wrt`'s shape (default ``cam_grad``).

    Returns
    -------
    onnx.ModelProto
        The model's outputs, then `grad`.

    Raises
    ------
    NotCamCompatible
        If `of` does not depend on `wrt`, or a node on a path between them has no rule
        (the message names the op and the node).
    """
    grad = grad or "cam_grad"
    opset = _check_opset(model)
    ix = _Index(model)
    for name in (wrt, of):
        if not ix.exists(name):
            raise NotCamCompatible(f"tensor '{name}' is not in the model")
    for name in (seed, grad):
        if ix.exists(name):
            raise NotCamCompatible(f"tensor name '{name}' is already used in the model")
    if of not in ix.types or ix.elem_type(of) is None:
        raise NotCamCompatible(f"cannot infer the type of '{of}'")
    nodes = list(ix.model.graph.node)

    from .quant_rules import RULES as _QUANT_RULES, carries_gradient, integer_rules  # issue 20 (phase A hunk)

    active = {wrt}
    for node in nodes:
        if any(i in active for i in node.input) or _subgraph_inputs(node) & active:
            active.update(o for o in node.output
                          if o and o != wrt and ix.elem_type(o) in _FLOAT_TYPES | {None})
            active.update(o for o in carries_gradient(node, active) if o != wrt)
    if of not in active:
        raise NotCamCompatible(f"'{of}' does not depend on '{wrt}'")
    useful, path = {of}, []
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            path.append(node)
            useful.update(i for i in [*node.input, *_subgraph_inputs(node)] if i in active)

    e = _Emitter(ix, opset, ix.elem_type(wrt) or ix.elem_type(of))
    contributions = {of: [seed]}
    e.types[seed] = ix.elem_type(of)

    def total(name):
        parts = contributions.get(name)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else e.typed(e.op("Sum", parts), name)

    for node in path:  # reverse topological order
        grads_out = [total(o) if o else None for o in node.output]
        if all(g is None for g in grads_out):
            continue
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        rule = integer_rules(node, ix.elem_type) or _QUANT_RULES.get(node.op_type) or rule  # issue 20
        if rule is None or _subgraph_inputs(node):
            raise NotCamCompatible(f"no gradient rule for {node.op_type} at node '{_node_label(node)}'")
        ctx = _Context(e, node, grads_out, useful)
        got = rule(ctx)
        for i, name in enumerate(node.input):
            if name not in useful:
                continue
            if i not in got:
                ctx.refuse(f"input {i} ('{name}') depends on '{wrt}'")
            contributions.setdefault(name, []).append(got[i])

    final = total(wrt) or e.zeros_like(wrt)
    e.nodes.append(helper.make_node("Identity", [final], [grad], name=grad))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    # The model's own declaration of `of` if any (onnx shape inference miscounts some
    # ceil_mode pools), else the inferred type.
    clean = _unknown_nonpositive_dims(model).graph
    declared = {vi.name: vi.type for vi in [*clean.value_info, *clean.input, *clean.output]}
    seed_type = onnx.TypeProto()
    seed_type.CopyFrom(declared.get(of) or ix.types[of])
    g.input.append(helper.make_value_info(seed, seed_type))
    grad_type = ix.types.get(wrt) or helper.make_tensor_type_proto(e.elem(wrt), None)
    g.output.append(helper.make_value_info(grad, grad_type))
    g.node.extend(e.nodes)
    g.initializer.extend(e.initializers)
    return out


def gradient_model(model: onnx.ModelProto, target: str, logits: str, *, seed: str = "cam_seed",
                   grad: str = "cam_grad") -> onnx.ModelProto:
    """The head from `target` to `logits` with the gradient of ``sum(seed * logits)``.

    Inputs: `target` (free batch axis), the frontier tensors of `cut_head`, then `seed`
    (shaped like `logits`).  Outputs: `logits`, then `grad` (shaped like `target`).

    Examples
    --------
    >>> import numpy as np, onnx
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
    ...      helper.make_node("Flatten", ["p"], ["f"]),
    ...      helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1)],
    ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
    ...     [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [w])
    >>> m = gradient_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "x", "logits")
    >>> [i.name for i in m.graph.input], [o.name for o in m.graph.output]
    (['x', 'cam_seed'], ['logits', 'cam_grad'])
    """
    head, _ = cut_head(model, target, logits)
    return add_backward(head, target, logits, seed=seed, grad=grad)
