"""Gradient rules for normalization.

BatchNormalization (inference form), LayerNormalization (any axis).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations

from .._proto import attr
from ._emit import _normalize_axes


def _batch_norm(c):
    e, x = c.e, c.x()
    if attr(c.node, "training_mode", 0) or len([o for o in c.node.output if o]) > 1:
        c.refuse("only the inference form is handled")
    rank = c.rank(x)
    eps = e.scalar(attr(c.node, "epsilon", 1e-5), x)
    factor = e.div(c.x(1), e.unary("Sqrt", e.add(c.x(4), eps)))
    factor = e.reshape(factor, e.ints([-1] + [1] * (rank - 2)))
    return {0: e.mul(c.g(), factor)}


def _layer_norm(c):
    e, x = c.e, c.x()
    if c.g(1) or c.g(2):
        c.refuse("the Mean and InvStdDev outputs are differentiated")
    rank = c.rank(x)
    axes = list(range(_normalize_axes(c, [attr(c.node, "axis", -1)], rank)[0], rank))
    centered = e.sub(x, e.reduce("ReduceMean", x, axes))
    var = e.reduce("ReduceMean", e.mul(centered, centered), axes)
    inv = e.unary("Reciprocal", e.unary("Sqrt", e.add(var, e.scalar(attr(c.node, "epsilon", 1e-5), x))))
    xhat = e.mul(centered, inv)
    gh = e.mul(c.g(), c.x(1))
    inner = e.sub(e.sub(gh, e.reduce("ReduceMean", gh, axes)),
                  e.mul(xhat, e.reduce("ReduceMean", e.mul(gh, xhat), axes)))
    return {0: e.mul(inv, inner)}


RULES = {
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
}
