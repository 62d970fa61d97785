"""Gradient rules for activations.

Relu, LeakyRelu, Elu, Sigmoid, HardSigmoid, HardSwish, Tanh, Clip, Erf, Gelu (both
approximations), Softplus, Softsign, Mish, Abs, Exp, Log, Sqrt, Reciprocal, Softmax and
LogSoftmax (2-D coercion before opset 13).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations

import math

from camcore.errors import NotCamCompatible

from .._proto import attr, node_label, text_attr
from ._emit import _normalize_axes


def _unary(fn):
    def rule(c):
        return {0: fn(c.e, c.x(), c.y(), c.g(), c.node)}
    return rule


def _relu(e, x, y, g, node):
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.scalar(0, x), g)


def _leaky_relu(e, x, y, g, node):
    alpha = attr(node, "alpha", 0.01)
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.mul(g, e.scalar(alpha, x)), g)


def _elu(e, x, y, g, node):
    alpha = attr(node, "alpha", 1.0)
    return e.where(e.op("Greater", [x, e.scalar(0, x)]), g, e.mul(g, e.add(y, e.scalar(alpha, x))), g)


def _hard_sigmoid(e, x, y, g, node):
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
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
    approximate = text_attr(node, "approximate", "none")
    if approximate == "tanh":
        k, a = math.sqrt(2 / math.pi), 0.044715
        x2 = e.mul(x, x)
        t = e.unary("Tanh", e.mul(e.scalar(k, x), e.add(x, e.mul(e.scalar(a, x), e.mul(x2, x)))))
        du = e.mul(e.scalar(k, x), e.add(e.scalar(1, x), e.mul(e.scalar(3 * a, x), x2)))
        d = e.add(e.mul(e.scalar(0.5, x), e.add(e.scalar(1, x), t)),
                  e.mul(e.mul(e.scalar(0.5, x), x), e.mul(e.sub(e.scalar(1, x), e.mul(t, t)), du)))
        return e.mul(g, d)
    if approximate != "none":
        raise NotCamCompatible(f"no gradient rule for {node_label(node)}: approximate={approximate!r}")
    cdf = e.mul(e.scalar(0.5, x), e.add(e.scalar(1, x), e.unary("Erf", e.mul(x, e.scalar(1 / math.sqrt(2), x)))))
    pdf = e.mul(e.scalar(1 / math.sqrt(2 * math.pi), x),
                e.unary("Exp", e.mul(e.mul(x, x), e.scalar(-0.5, x))))
    return e.mul(g, e.add(cdf, e.mul(x, pdf)))


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


def _softmax_axes(c) -> list:
    """Before opset 13 (Log)Softmax normalizes over all axes from `axis` on (2-D coercion)."""
    rank = c.rank(c.x())
    if c.e.opset < 13:
        axis = _normalize_axes(c, [attr(c.node, "axis", 1)], rank)[0]
        return list(range(axis, rank))
    return _normalize_axes(c, [attr(c.node, "axis", -1)], rank)


def _softmax(c):
    e, y, g = c.e, c.y(), c.g()
    s = e.reduce("ReduceSum", e.mul(g, y), _softmax_axes(c), keepdims=1)
    return {0: e.mul(y, e.sub(g, s))}


def _log_softmax(c):
    e, y, g = c.e, c.y(), c.g()
    s = e.reduce("ReduceSum", g, _softmax_axes(c), keepdims=1)
    return {0: e.sub(g, e.mul(e.unary("Exp", y), s))}


RULES = {
    "Relu": _unary(_relu),
    "LeakyRelu": _unary(_leaky_relu),
    "Elu": _unary(_elu),
    "Sigmoid": _unary(_sigmoid),
    "HardSigmoid": _unary(_hard_sigmoid),
    "HardSwish": _unary(_hard_swish),
    "Tanh": _unary(_tanh),
    "Clip": _clip,
    "Erf": _unary(_erf),
    "Gelu": _unary(_gelu),
    "Softplus": _unary(_softplus),
    "Softsign": _unary(_softsign),
    "Mish": _unary(_mish),
    "Abs": _unary(_abs),
    "Exp": _unary(_exp),
    "Log": _unary(_log),
    "Sqrt": _unary(_sqrt),
    "Reciprocal": _unary(_reciprocal),
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
}
