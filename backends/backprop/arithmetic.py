"""Gradient rules for elementwise arithmetic with numpy broadcasting.

Add, Sub, Mul, Div, Pow, Neg, Sum, Mean, Max, Min (ties share), Where, PRelu (slope too);
the axes to sum are constants, found from the dims; an axis symbolic dims leave open is
summed, and the run-time sizes select the sum or the gradient (`_Context.unbroadcast`).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations


def _binary(c, grad_a, grad_b, positions=(0, 1)):
    """Gradients of two broadcast operands (at `positions`), summed back to their shapes."""
    out, y_dims = {}, c.dims(c.y())
    for i, fn in zip(positions, (grad_a, grad_b)):
        if c.active(i):
            out[i] = c.unbroadcast(fn(), y_dims, c.x(i), peers=c.others(i))
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
    return {i: c.unbroadcast(c.g(), y_dims, x, peers=c.others(i)) for i, x in enumerate(c.node.input) if c.active(i)}


def _mean(c):
    e, y_dims = c.e, c.dims(c.y())
    g = e.div(c.g(), e.scalar(len(c.node.input), c.y()))
    return {i: c.unbroadcast(g, y_dims, x, peers=c.others(i)) for i, x in enumerate(c.node.input) if c.active(i)}


def _max_min(c):
    """Ties share the gradient evenly (torch.maximum)."""
    e, y, y_dims = c.e, c.y(), c.dims(c.y())
    masks = [e.mask(e.op("Equal", [x, y]), y) for x in c.node.input]
    count = masks[0] if len(masks) == 1 else e.typed(e.op("Sum", masks), y)
    g = e.div(c.g(), count)
    return {i: c.unbroadcast(e.mul(g, masks[i]), y_dims, x, peers=c.others(i))
            for i, x in enumerate(c.node.input) if c.active(i)}


def _where(c):
    e, g, zero = c.e, c.g(), c.e.scalar(0, c.y())
    return _binary(c, lambda: e.where(c.x(0), g, zero, g), lambda: e.where(c.x(0), zero, g, g), positions=(1, 2))


def _prelu(c):
    e, x, slope, g = c.e, c.x(0), c.x(1), c.g()
    positive = e.op("Greater", [x, e.scalar(0, x)])
    out = {}
    if c.active(0):
        out[0] = e.where(positive, g, e.mul(g, slope), g)
    if c.active(1):
        out[1] = c.unbroadcast(e.where(positive, e.scalar(0, x), e.mul(g, x), g), c.dims(x), slope,
                               peers=c.others(1))
    return out


RULES = {
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Pow": _pow,
    "Neg": _neg,
    "Sum": _sum,
    "Mean": _mean,
    "Max": _max_min,
    "Min": _max_min,
    "Where": _where,
    "PRelu": _prelu,
}
