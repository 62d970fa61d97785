"""What gradient rules are written with: `_Emitter` appends ``cam_``-named nodes in the
forms the opset allows, `_Context` is what one rule sees (its node, output gradients,
types), plus the helpers several families share (axes, Conv/pool windows).

A rule is ``rule(c: _Context) -> {input index: gradient tensor name}``; it calls
``c.refuse(why)`` (`NotCamCompatible`) for anything it does not handle.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from camcore.errors import NotCamCompatible

from .._proto import attr, axes_input_opset, node_label, text_attr
from ._graph import _FLOAT_TYPES, _Index

# ScatterElements' reduction="add" (needed where selections may repeat an index).
_SCATTER_ADD_OPSET = 16


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

    def grad_elem(self, name: str) -> int:
        """The element type of a gradient shaped like `name`: its own type, or, for an integer
        tensor that carries a gradient (see `quantization`), the float type of the pass."""
        elem = self.elem(name)
        if elem in _FLOAT_TYPES:
            return elem
        return self.default_type if self.default_type in _FLOAT_TYPES else onnx.TensorProto.FLOAT

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
        """`name`, a gradient or a value computed for one, typed like `like` (float where
        `like` is an integer tensor)."""
        self.types[name] = self.grad_elem(like)
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
        return self.typed(self.op("Cast", [cond], to=self.grad_elem(like)), like)

    def reshape(self, x, shape):
        return self.typed(self.op("Reshape", [x, shape]), x)

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1):
        axes = [int(a) for a in axes]
        if self.opset >= axes_input_opset(op_type):
            out = self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)
        else:
            out = self.op(op_type, [x], axes=axes, keepdims=keepdims)
        return self.typed(out, x)

    def unsqueeze(self, x: str, axes):
        axes = [int(a) for a in axes]
        if self.opset >= axes_input_opset("Unsqueeze"):
            return self.typed(self.op("Unsqueeze", [x, self.ints(axes)]), x)
        return self.typed(self.op("Unsqueeze", [x], axes=axes), x)

    def count(self, big: str, small: str, like: str):
        """numel(big) / numel(small) as a scalar of `like`'s type."""
        ratio = self.op("Div", [self.op("Size", [big]), self.op("Size", [small])])
        return self.typed(self.op("Cast", [ratio], to=self.grad_elem(like)), like)

    def zeros_like(self, x: str):
        """A zero gradient shaped like `x`."""
        value = numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.grad_elem(x))))
        return self.typed(self.op("ConstantOfShape", [self.shape(x)], value=value), x)

    def scatter(self, x: str, selected: str, g: str, *, add: bool):
        """Gradient of a selection: `g` scattered into zeros shaped like `x` at the flat
        indices `selected` (the selection applied to ``arange(x.size)``)."""
        value = numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.grad_elem(x))))
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


class _Context:
    """What a rule sees: the node, its output gradients, types and the emitter."""

    def __init__(self, e: _Emitter, node, grads_out: list, useful: set):
        self.e, self.node, self.grads_out, self.useful = e, node, grads_out, useful

    def refuse(self, why: str):
        raise NotCamCompatible(f"no gradient rule for {node_label(self.node)}: {why}")

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

    def others(self, i: int) -> list:
        """Dims of the node's inputs other than input `i` (None where a rank is unknown): the
        operands an elementwise op broadcasts input `i` with."""
        return [self.e.ix.dims(x) for k, x in enumerate(self.node.input) if k != i and x]

    def unbroadcast(self, g: str, g_dims: tuple, like: str, like_dims: tuple | None = None, *,
                    peers: list | None = None) -> str:
        """Sum `g` (shaped `g_dims`) over the axes that numpy broadcasting added to `like`.

        `peers` are the dims of the operands `like` was broadcast with (None: unknown).  An
        axis of `like` whose size is not known to be 1 is summed only if some operand may
        stretch it: where every peer has a 1, the same symbol, or no axis there, the output's
        size is `like`'s, whatever the names shape inference gave them (tf2onnx declares a
        symbol of its own on each output).  Every sum has constant axes (OpenVINO's ONNX
        reader needs them): an axis the shapes leave open, of size 1 or `g`'s at run time, is
        summed anyway, and ``Where`` keeps the sum or `g` by the run-time sizes, then a
        ``Slice`` to `like`'s size keeps one row of the sum or all of `g`.
        """
        e = self.e
        x_dims = like_dims if like_dims is not None else self.dims(like)
        lead = len(g_dims) - len(x_dims)
        axes, open_axes = list(range(lead)), []
        for j, d in enumerate(x_dims):
            o = g_dims[lead + j]
            if d == 1:
                if o != 1:
                    axes.append(lead + j)
            elif not (isinstance(d, int) or (d is not None and d == o)
                      or _kept(d, lead + j, len(g_dims), peers)):
                open_axes.append(j)
        s = e.reduce("ReduceSum", g, axes, keepdims=1) if axes else g
        if open_axes:
            x_shape = e.shape(like)
            for j in open_axes:
                size = e.op("Slice", [x_shape, e.ints([j]), e.ints([j + 1])])
                same = e.op("Equal", [size, e.op("Slice", [e.shape(s), e.ints([lead + j]), e.ints([lead + j + 1])])])
                both = e.where(same, s, e.reduce("ReduceSum", s, [lead + j], keepdims=1), s)
                s = e.typed(e.op("Slice", [both, e.ints([0]), size, e.ints([lead + j])]), s)
        if not axes and not open_axes:
            return g
        return e.reshape(s, e.shape(like)) if lead else s


def _kept(d, axis: int, rank: int, peers: list | None) -> bool:
    """Whether no peer can stretch `axis` (of a rank-`rank` broadcast result) past size `d`:
    each has a 1 there, the same symbol as `d`, or no such axis (right-aligned)."""
    if peers is None:
        return False
    for p in peers:
        if p is None:
            return False
        k = axis - (rank - len(p))
        if k >= 0 and not (p[k] == 1 or (d is not None and p[k] == d)):
            return False
    return True


def _normalize_axes(c: _Context, axes, rank: int) -> list:
    out = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
    if any(not 0 <= a < rank for a in out):
        c.refuse(f"axes {list(axes)} out of range for rank {rank}")
    return out


def _window(c, x_dims):
    """Kernel, strides, dilations, explicit pads, input and output sizes of a Conv/pool node.

    The output sizes follow onnxruntime (and torch): with ceil_mode, a window that would
    start in the end padding is dropped (onnx shape inference may count one more).
    """
    node, n = c.node, len(x_dims) - 2
    k = attr(node, "kernel_shape")
    if k is None:
        k = c.static(c.dims(c.x(1))[2:], "the kernel")
    s = list(attr(node, "strides", [1] * n))
    d = list(attr(node, "dilations", [1] * n))
    spatial = c.static(x_dims[2:], "the input's spatial axes")
    auto_pad = text_attr(node, "auto_pad", "NOTSET")
    extent = [(k[i] - 1) * d[i] + 1 for i in range(n)]
    if auto_pad == "NOTSET":
        pads = list(attr(node, "pads", [0] * 2 * n))
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
    ceil_mode = attr(node, "ceil_mode", 0)
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
