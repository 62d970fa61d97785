"""Gradient rules for pooling and reductions.

GlobalAveragePool, GlobalMaxPool, AveragePool (pads, strides, dilations, ceil_mode,
count_include_pad; static spatial sizes), MaxPool (via its Indices; overlapping windows need
opset 16), ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceL1, ReduceL2, ReduceSumSquare,
ReduceLogSumExp (axes constant).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from .._proto import attr
from ._emit import _SCATTER_ADD_OPSET, _normalize_axes, _window


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
    include_pad = attr(c.node, "count_include_pad", 0)
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
    if len(node.output) > 1 and node.output[1] and not attr(node, "storage_order", 0):
        indices = node.output[1]
    else:  # a twin node with row-major Indices
        attributes = [a for a in node.attribute if a.name != "storage_order"]
        _, indices = e.op("MaxPool", [x], n_out=2, attributes=attributes)
    k = attr(node, "kernel_shape")
    s, d = attr(node, "strides", [1] * len(k)), attr(node, "dilations", [1] * len(k))
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
        axes = attr(node, "axes")
    if axes is not None and np.asarray(axes).size == 0:
        axes = None
    if axes is None:
        if attr(node, "noop_with_empty_axes", 0):
            return {0: c.g()}
        axes = range(rank)
    axes = _normalize_axes(c, np.asarray(axes).reshape(-1), rank)
    keepdims = attr(node, "keepdims", 1)
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


RULES = {
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "ReduceMean": _reduce,
    "ReduceSum": _reduce,
    "ReduceMax": _reduce,
    "ReduceMin": _reduce,
    "ReduceL1": _reduce,
    "ReduceL2": _reduce,
    "ReduceSumSquare": _reduce,
    "ReduceLogSumExp": _reduce,
}
