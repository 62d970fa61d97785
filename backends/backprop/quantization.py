"""Gradient rules for int8 ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, ConvInteger.

Rounding has a zero gradient almost everywhere, so a quantized graph is differentiated
with the clipped straight-through estimator, as onnxruntime's own training rules do it
(``FakeQuant``/``FakeQuantGrad``, the gradient of the QDQ pairs of quantization-aware
training): the gradient passes where the value is inside the quantization range and is
zero where it was clipped,

    d y / d x = 1[q_min <= round(x / s) + z <= q_max]      for y = DQ(Q(x)).

Each op gets its part of that product, with the scale ``s`` and zero point ``z`` held
constant (they are parameters, or, for DynamicQuantizeLinear, statistics of the batch):

* QuantizeLinear ``q = clip(round(x / s) + z)``: ``dx = dq / s * mask`` (per-tensor or
  per-axis ``s``);
* DequantizeLinear ``y = (q - z) s``: ``dq = dy * s``;
* DynamicQuantizeLinear: ``dx = dy / y_scale`` (its range covers the whole input, so
  nothing is clipped); its ``y_scale`` and ``y_zero_point`` outputs pass no gradient;
* MatMulInteger ``y = (a - za) (b - zb)``: ``da = dy (b - zb)^T``, ``db = (a - za)^T dy``;
* ConvInteger ``y = conv(x - zx, w - zw)``: ``dx`` as for Conv with weights ``w - zw``;
* Cast from an integer tensor (MatMulInteger's int32 product to float): the gradient
  passes unchanged, in float (the `shape` family's Cast rule);
* ops that only move or select an integer tensor's values (Reshape, Transpose, Squeeze,
  Split, Gather, Slice, Concat, Expand...; QOperator transformers unpack their fused QKV
  product so, in uint8): the `shape` family's rules, the gradient in float.

Gradients of integer tensors are float tensors.  The estimator is exact inside the range
for the composite ``DQ(Q(x))`` seen from ``x`` up to rounding (the test checks it against
finite differences of the unrounded function).  Refused: 4-bit and float8 types, block
quantization (``block_size``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .._proto import attr as _attr
from ._emit import _normalize_axes
from .linear import _conv

__all__ = ["RULES", "carries_gradient", "integer_rule", "NO_GRADIENT_METHODS"]

# Ops whose first output, an integer tensor, still carries a gradient.
_QUANTIZED = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
# Ops that move or select an integer tensor's values without computing new ones (a Reshape
# between a QuantizeLinear and its DequantizeLinear; in QOperator transformers, the fused QKV
# product's Reshape -> Split/Gather -> Transpose on uint8 between QLinear ops): each of their
# outputs carries the gradient when a data input does.  Their rules are the `shape` family's.
_MOVES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Split", "Slice", "Gather",
          "GatherElements", "Concat", "Expand"}
_INT_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
               TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767)}
_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _broadcast_param(c, param: str, x: str, axis_attr: str = "axis") -> str:
    """A per-axis scale or zero point reshaped to broadcast against `x` (scalars as they are)."""
    e = c.e
    dims = e.ix.dims(param)
    if dims is None or len(dims) == 0 or (len(dims) == 1 and dims[0] == 1):
        return param
    rank = c.rank(x)
    axis = _normalize_axes(c, [_attr(c.node, axis_attr, 1)], rank)[0]
    shape = [-1] + [1] * (rank - axis - 1)
    return e.op("Reshape", [param, e.ints(shape)])


def _check_plain(c):
    if _attr(c.node, "block_size", 0):
        c.refuse("block quantization (block_size) is not handled")


def _quantize_linear(c):
    """dx = dq / s where round(x / s) + z lies in the output type's range, else 0."""
    _check_plain(c)
    e, x = c.e, c.x()
    if not c.active(0):
        return {}
    elem = e.ix.elem_type(c.y())
    if elem is None and c.x(2):
        elem = e.ix.elem_type(c.x(2))
    if elem is None:
        elem = _attr(c.node, "output_dtype", 0) or TensorProto.UINT8
    if elem not in _INT_RANGES:
        c.refuse(f"output type {helper.tensor_dtype_to_string(elem)} is not handled")
    lo, hi = _INT_RANGES[elem]
    scale = _broadcast_param(c, c.x(1), x)
    value = e.op("Round", [e.op("Div", [x, scale])])
    if c.x(2):
        zero = e.op("Cast", [_broadcast_param(c, c.x(2), x)], to=e.elem(x))
        value = e.op("Add", [value, zero])
    dtype = helper.tensor_dtype_to_np_dtype(e.elem(x))
    below = e.op("Less", [value, e.const(np.asarray(lo, dtype))])
    above = e.op("Greater", [value, e.const(np.asarray(hi, dtype))])
    inside = e.op("Cast", [e.op("Not", [e.op("Or", [below, above])])], to=e.elem(x))
    return {0: e.typed(e.op("Mul", [e.op("Div", [c.g(), scale]), inside]), x)}


def _dequantize_linear(c):
    """dq = dy * s (float: the gradient of an integer tensor)."""
    _check_plain(c)
    if c.active(1) or c.active(2):
        c.refuse("the scale or zero point depends on the differentiated tensor")
    e = c.e
    scale = _broadcast_param(c, c.x(1), c.x())
    return {0: e.typed(e.op("Mul", [c.g(), scale]), c.y())}


def _dynamic_quantize_linear(c):
    """dx = dy / y_scale; y_scale and y_zero_point are held constant (no gradient)."""
    e = c.e
    if c.g(0) is None:
        return {0: e.zeros_like(c.x())}
    return {0: e.typed(e.op("Div", [c.g(0), c.y(1)]), c.x())}


def _centered(c, i: int, zero: int, *, per_row_of_4d: bool = False) -> str:
    """``float(input i) - float(its zero point)`` in the gradient's float type."""
    e = c.e
    to = e.elem(c.g()) if e.elem(c.g()) in _FLOAT else TensorProto.FLOAT
    value = e.op("Cast", [c.x(i)], to=to)
    if c.x(zero):
        z = e.op("Cast", [c.x(zero)], to=to)
        dims = e.ix.dims(c.x(zero))
        if per_row_of_4d and dims and len(dims) == 1 and dims[0] != 1:
            z = e.op("Reshape", [z, e.ints([-1, 1, 1, 1])])
        value = e.op("Sub", [value, z])
    e.types[value] = to
    return value


def _matmul_integer(c):
    """da = dy (b - zb)^T, db = (a - za)^T dy (2-D b, the quantizer's form)."""
    e, out = c.e, {}
    if c.active(2) or c.active(3):
        c.refuse("a zero point depends on the differentiated tensor")
    b_dims = c.dims(c.x(1))
    if len(b_dims) != 2:
        c.refuse(f"b must be 2-D, got rank {len(b_dims)}")
    if c.active(0):
        b = _centered(c, 1, 3)
        out[0] = e.typed(e.op("MatMul", [c.g(), e.op("Transpose", [b], perm=[1, 0])]), c.y())
    if c.active(1):
        a = _centered(c, 0, 2)
        a_dims = c.dims(c.x(0))
        if len(a_dims) != 2:
            c.refuse("the gradient of b needs a 2-D a")
        out[1] = e.typed(e.op("MatMul", [e.op("Transpose", [a], perm=[1, 0]), c.g()]), c.y())
    return out


class _FloatConv:
    """What `_conv` reads of a context, for ``Conv(x, w - zw)`` standing in for a ConvInteger."""

    def __init__(self, c, weight: str, kernel):
        self._c, self.e = c, c.e
        attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
        attrs.setdefault("kernel_shape", list(kernel))
        self.node = helper.make_node("Conv", [c.x(0), weight], list(c.node.output), name=c.node.name, **attrs)

    def __getattr__(self, name):
        return getattr(self._c, name)

    def x(self, i: int = 0) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def active(self, i: int) -> bool:
        return i == 0 and self._c.active(0)


def _conv_integer(c):
    """dx as for Conv with float weights ``w - zw``, in float."""
    if c.active(1) or c.active(2) or c.active(3):
        c.refuse("the weights or zero points depend on the differentiated tensor")
    w_dims = c.static(c.dims(c.x(1)), "the weights")
    weight = _centered(c, 1, 3, per_row_of_4d=True)
    got = _conv(_FloatConv(c, weight, w_dims[2:]))
    if 0 in got:
        c.e.types[got[0]] = c.e.types[weight]
    return got


RULES = {
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer,
}


def carries_gradient(node, active) -> list:
    """The integer outputs of `node` that carry a gradient, given the `active` tensors.

    add_backward follows only float tensors; a quantized graph's values also flow
    through the integer outputs of `_QUANTIZED` ops (the first one: DynamicQuantizeLinear's
    scale and zero point are held constant) and of moves applied to them.
    """
    if node.op_type in _QUANTIZED and node.input and node.input[0] in active:
        return list(node.output[:1])
    if node.op_type in _MOVES and node.input:
        data = node.input if node.op_type == "Concat" else node.input[:1]
        if any(i in active for i in data):
            return [o for o in node.output if o]
    return []


# Said when a gradient would have to pass through an integer kernel without a rule.
NO_GRADIENT_METHODS = "cam (on a GAP + affine head), eigencam, ablationcam, scorecam, reciprocam"


def _integer_kernel(c):
    c.refuse(f"an integer kernel has no gradient here; methods that need none: {NO_GRADIENT_METHODS}")


def integer_rule(node):
    """A rule refusing `node` when it is an integer kernel without a rule, else None.

    The QOperator kernels that `backends.quant_graph.qoperator_as_qdq` does not rewrite, and
    onnxruntime's fused integer ops (``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``...),
    are refused in one line naming the methods that need no gradient, in any domain.
    """
    op = node.op_type
    if op not in RULES and (op.startswith("QLinear") or (op.startswith("Q") and op[1:2].isupper())
                            or "Integer" in op or "Quantize" in op):
        return _integer_kernel
    return None
