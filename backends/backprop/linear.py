"""Gradient rules for linear ops.

Gemm (alpha, beta, transA, transB, broadcast C), MatMul (batched, 1-D), Einsum (no ellipsis;
each operand's letters distinct and shared), Conv (any kernel, strides, pads, dilations,
groups, auto_pad; bias; ConvTranspose with output_padding, or crop/pad at run time when
spatial sizes are dynamic and auto_pad is NOTSET/VALID), Attention (opset 23, 4-D, no mask).

Each rule maps a `_Context` to ``{input index: gradient}``; `RULES` ends the module.
"""

from __future__ import annotations

from .._proto import attr, text_attr
from ._emit import _window
from ._graph import _broadcast_dims


def _gemm(c):
    e, a, b, g = c.e, c.x(0), c.x(1), c.g()
    alpha, beta = attr(c.node, "alpha", 1.0), attr(c.node, "beta", 1.0)
    ta, tb = attr(c.node, "transA", 0), attr(c.node, "transB", 0)
    out = {}
    if c.active(0):
        args = ([g, b], {"transB": 1 - tb}) if not ta else ([b, g], {"transA": tb, "transB": 1})
        out[0] = e.typed(e.op("Gemm", args[0], alpha=alpha, **args[1]), a)
    if c.active(1):
        args = ([a, g], {"transA": 1 - ta}) if not tb else ([g, a], {"transA": 1, "transB": ta})
        out[1] = e.typed(e.op("Gemm", args[0], alpha=alpha, **args[1]), b)
    if c.active(2):
        gc = g if beta == 1 else e.mul(g, e.scalar(beta, g))
        ad, bd = c.e.ix.dims(a), c.e.ix.dims(b)  # C broadcasts with the product, (M, N)
        product = (ad[1] if ta else ad[0], bd[0] if tb else bd[1]) if ad and bd and len(ad) == len(bd) == 2 else None
        out[2] = c.unbroadcast(gc, c.dims(c.y()), c.x(2), peers=[product])
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
        d = c.unbroadcast(d, (*batch, a2d[-2], a2d[-1]), a2, a2d, peers=[(*b2d[:-2], 1, 1)])
        out[0] = d if a2 == a else e.reshape(d, e.shape(a))
    if c.active(1):
        d = e.typed(e.op("MatMul", [_swap_last(e, a2, len(a2d)), g2]), b)
        d = c.unbroadcast(d, (*batch, b2d[-2], b2d[-1]), b2, b2d, peers=[(*a2d[:-2], 1, 1)])
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
    group = attr(c.node, "group", 1)
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
    kernel = attr(node, "kernel_shape") or c.dims(c.x(1))[2:]
    auto_pad = text_attr(node, "auto_pad", "NOTSET")
    return (group == 1 and isinstance(x_dims[1], int) and kernel is not None and list(kernel) == [1] * n
            and list(attr(node, "strides", [1] * n)) == [1] * n
            and not any(attr(node, "pads", [0] * 2 * n))
            and auto_pad in ("NOTSET", "VALID"))


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
    auto_pad = text_attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        c.refuse(f"auto_pad={auto_pad!r} needs static spatial sizes, got {x_dims}")
    begin = list(attr(node, "pads", [0] * 2 * n))[:n] if auto_pad == "NOTSET" else [0] * n
    attrs = {"kernel_shape": list(attr(node, "kernel_shape"))} if attr(node, "kernel_shape") else {}
    full = e.op("ConvTranspose", [c.g(), c.x(1)], strides=list(attr(node, "strides", [1] * n)),
                dilations=list(attr(node, "dilations", [1] * n)), pads=begin + [0] * n, group=group, **attrs)
    spatial_axes = e.ints(range(2, rank))
    size = e.op("Slice", [e.shape(x), e.ints([2]), e.ints([rank])])
    cropped = e.op("Slice", [full, e.ints([0] * n), size, spatial_axes])
    missing = e.op("Sub", [size, e.op("Slice", [e.op("Shape", [cropped]), e.ints([2]), e.ints([rank])])])
    pads = e.op("Concat", [e.ints([0] * (rank + 2)), missing], axis=0)
    return e.typed(e.op("Pad", [cropped, pads]), x)


def _einsum(c):
    """d A = einsum(out, others -> A): each operand's letters must be distinct and appear
    in the output or another operand (no ellipsis)."""
    equation = text_attr(c.node, "equation").replace(" ", "")
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


def _attention(c):
    """Attention (opset 23), the scaled dot-product form torch exports for SDPA: 4-D ``Q (N, h, Tq, d)``,
    ``K (N, h, Tk, d)``, ``V (N, h, Tk, dv)``, no mask, not causal, no softcap, no cache.

    ``P = softmax(s Q K^T)``, ``Y = P V``; with ``G = dY``: ``dV = P^T G``, ``dP = G V^T``,
    ``dS = P (dP - rowsum(dP P))``, ``dQ = s dS K``, ``dK = s dS^T Q``.  P is recomputed.
    """
    e, node = c.e, c.node
    q, k, v, g = c.x(0), c.x(1), c.x(2), c.g()
    extra = [i for i in node.input[3:] if i]
    if extra or any(c.g(i) is not None for i in range(1, len(node.output))):
        c.refuse("only Attention without a mask, a past key/value cache or extra outputs has a gradient rule")
    if attr(node, "is_causal", 0) or attr(node, "softcap", 0.0):
        c.refuse("only non-causal Attention without softcap has a gradient rule")
    qd, kd = c.dims(q), c.dims(k)
    if len(qd) != 4 or len(kd) != 4 or qd[1] != kd[1]:
        c.refuse("only 4-D Attention with as many key/value heads as query heads has a gradient rule")
    scale = attr(node, "scale", None)
    if scale is None:
        (d,) = c.static(qd[-1:], "the head size")
        scale = 1.0 / float(d) ** 0.5

    def t(x):
        return e.op("Transpose", [x], perm=[0, 1, 3, 2])

    p = e.op("Softmax", [e.mul(e.op("MatMul", [q, t(k)]), e.scalar(scale, q))], axis=-1)
    out = {}
    if c.active(2):
        out[2] = e.op("MatMul", [t(p), g])
    if c.active(0) or c.active(1):
        dp = e.op("MatMul", [g, t(v)])
        ds = e.mul(p, e.sub(dp, e.reduce("ReduceSum", e.mul(dp, p), [3], keepdims=1)))
        if c.active(0):
            out[0] = e.mul(e.op("MatMul", [ds, k]), e.scalar(scale, q))
        if c.active(1):
            out[1] = e.mul(e.op("MatMul", [t(ds), q]), e.scalar(scale, k))
    return out


RULES = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Einsum": _einsum,
    "Conv": _conv,
    "Attention": _attention,
}
