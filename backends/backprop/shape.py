"""Gradient rules for shape ops.

Identity, Cast, Dropout (inference), Flatten, Reshape, Squeeze, Unsqueeze (``Reshape(g,
Shape(x))``), Transpose, Concat, Split, Slice (any steps), Gather and GatherElements
(repeated indices need opset 16), Expand, Pad (mode constant; pads constant or computed,
negative pads crop).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations

import numpy as np

from .._proto import attr, text_attr
from ._emit import _SCATTER_ADD_OPSET, _normalize_axes
from ._graph import _FLOAT_TYPES

_INT64_MAX = np.iinfo(np.int64).max


def _pass_through(c):
    return {0: c.e.reshape(c.g(), c.e.shape(c.x()))}


def _identity(c):
    return {0: c.g()}


def _cast(c):
    if c.e.ix.elem_type(c.x()) not in _FLOAT_TYPES | {None}:
        # An integer tensor that carries a gradient (MatMulInteger's int32 product, see the
        # `quantization` family): the gradient passes on unchanged, in float.
        return {0: c.g()}
    return {0: c.e.typed(c.e.op("Cast", [c.g()], to=c.e.elem(c.x())), c.x())}


def _dropout(c):
    if c.x(2):
        mode = c.const_input(2, "training_mode")
        if bool(np.asarray(mode).reshape(-1)[0]):
            c.refuse("training_mode is on")
    return {0: c.g()}


def _transpose(c):
    rank = c.rank(c.x())
    perm = attr(c.node, "perm", list(range(rank))[::-1])
    return {0: c.e.typed(c.e.op("Transpose", [c.g()], perm=[int(i) for i in np.argsort(perm)]), c.g())}


def _concat(c):
    e = c.e
    axis = _normalize_axes(c, [attr(c.node, "axis")], c.rank(c.y()))[0]
    out, start = {}, e.ints([0])
    for i, name in enumerate(c.node.input):
        end = e.op("Add", [start, e.op("Gather", [e.shape(name), e.ints([axis])], axis=0)])
        if c.active(i):
            out[i] = e.typed(e.op("Slice", [c.g(), start, end, e.ints([axis])]), c.g())
        start = end
    return out


def _split(c):
    e = c.e
    axis = _normalize_axes(c, [attr(c.node, "axis", 0)], c.rank(c.x()))[0]
    parts = [c.g(i) or e.zeros_like(y) for i, y in enumerate(c.node.output)]
    return {0: e.typed(e.op("Concat", parts, axis=axis), c.x())}


def _slice(c):
    e = c.e
    selected = e.op("Slice", [e.flat_indices(c.x()), *c.node.input[1:]])
    return {0: e.scatter(c.x(), selected, c.g(), add=False)}


def _gather(c):
    e = c.e
    op = c.node.op_type
    axis = attr(c.node, "axis", 0)
    if op == "Gather":
        padded = _gather_run(c, axis)
        if padded is not None:
            return {0: padded}
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


def _gather_run(c, axis: int):
    """A Gather of a constant run of consecutive indices ``[s, s + m)`` on an axis of static size:
    its gradient is `g` zero-padded on that axis (no index tensor, no scatter)."""
    e = c.e
    indices = e.ix.constant(c.x(1))
    dims = c.dims(c.x())
    axis = _normalize_axes(c, [axis], len(dims))[0]
    size = dims[axis]
    if indices is None or np.ndim(indices) > 1 or not isinstance(size, int) or e.opset < 11:
        return None
    flat = np.where(indices < 0, indices + size, indices).reshape(-1)
    if not flat.size or (flat != np.arange(flat[0], flat[0] + flat.size)).any() or flat[-1] >= size:
        return None
    g = c.g() if np.ndim(indices) == 1 else e.unsqueeze(c.g(), [axis])
    pads = np.zeros(2 * len(dims), np.int64)
    pads[axis], pads[len(dims) + axis] = flat[0], size - 1 - flat[-1]
    return e.typed(e.op("Pad", [g, e.ints(pads)]), c.x())


def _expand(c):
    return {0: c.unbroadcast(c.g(), c.dims(c.y()), c.x())}


def _pad(c):
    """Crop the padding off the gradient; zero-pad where Pad cropped (negative pads)."""
    e = c.e
    if text_attr(c.node, "mode", "constant") != "constant":
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


RULES = {
    "Identity": _identity,
    "Cast": _cast,
    "Dropout": _dropout,
    "Flatten": _pass_through,
    "Reshape": _pass_through,
    "Squeeze": _pass_through,
    "Unsqueeze": _pass_through,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather,
    "Expand": _expand,
    "Pad": _pad,
}
