"""Quantized ONNX graphs (onnxruntime's int8 formats) seen as float graphs, for the analysis.

onnxruntime's quantization tools write three kinds of int8 graph:

* QDQ (``quantize_static``, QuantFormat.QDQ): float ops between QuantizeLinear/DequantizeLinear
  pairs;
* QOperator (QuantFormat.QOperator): integer ops (QLinearConv, QLinearMatMul, and the
  ``com.microsoft`` QLinearAdd, QLinearGlobalAveragePool, QGemm, ...) on uint8/int8 tensors;
* dynamic (``quantize_dynamic``): DynamicQuantizeLinear feeding MatMulInteger/ConvInteger.

Two pure transforms (each returns a copy, new tensors named ``cam_...``):

* `qoperator_as_qdq` writes each QLinear op as DequantizeLinear -> float op -> QuantizeLinear,
  the form onnxruntime itself fuses back into the integer op.  The quantized tensors keep
  their names; the dequantized input of an op is ``cam_<tensor>_dq``.  The pooling and the
  feature map are then float ops and tensors that the head finder and the gradient rules read.
* `dequantized` removes the activation quantization: a QuantizeLinear -> DequantizeLinear
  pair on a computed tensor becomes an Identity, DynamicQuantizeLinear passes its input
  through (scale 1, zero point 0), and MatMulInteger/ConvInteger become float MatMul/Conv on
  ``q - zero_point``.  Weights stay as their dequantized values.  The classifier head of
  this graph is exactly affine, ``logits = W_dq @ pooled + b_dq``: the CAM weights are the
  dequantized classifier.

The quantized model itself computes ``W_dq @ Q(pooled) + b_dq`` where ``Q`` rounds the
pooled vector to its quantization step ``s`` (and, in QDQ/QOperator graphs, rounds the
logits to theirs, ``s_out``).  So CAM on a quantized head is exact up to
``|logits - (maps.mean((-2, -1)) + bias)| <= |W_dq| @ (s / 2) + s_out / 2`` per class,
while the pooled values stay inside the quantization range (`cam_bound` computes it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["is_quantized", "qoperator_as_qdq", "dequantized", "runnable", "cam_bound", "quant_range",
           "before_output_quantization", "output_quantization_bypassed", "QLINEAR_OPS",
           "QUANTIZED_OPS"]

_MS = "com.microsoft"
# QOperator ops written back as DequantizeLinear -> float op -> QuantizeLinear.
QLINEAR_OPS = {
    ("", "QLinearConv"), ("", "QLinearMatMul"), (_MS, "QGemm"), (_MS, "QLinearAdd"), (_MS, "QLinearMul"),
    (_MS, "QLinearGlobalAveragePool"), (_MS, "QLinearAveragePool"), (_MS, "QLinearSigmoid"),
    (_MS, "QLinearLeakyRelu"), (_MS, "QLinearConcat"), (_MS, "QLinearSoftmax"),
}
# Every op whose presence makes a graph "quantized".
QUANTIZED_OPS = {op for _, op in QLINEAR_OPS} | {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
}


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether any node of the main graph is one of `QUANTIZED_OPS`."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph camcore runs and analyses: `qoperator_as_qdq` of a QOperator model, else `model` itself.

    onnxruntime fuses the DQ -> op -> Q triples back into the same integer kernels, so the
    logits are those of the deployed graph (tests/test_quantized.py checks they are equal);
    the float feature map the pooling reads becomes a tensor that can be fetched.
    """
    if any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in QLINEAR_OPS for n in model.graph.node):
        return qoperator_as_qdq(model)
    return model


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _copy_with_nodes(model: onnx.ModelProto, nodes: list, initializers=()) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    # Types of rewritten tensors changed (int -> float): let inference find them again.
    del out.graph.value_info[:]
    if not any(o.domain in ("", "ai.onnx") for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("", 13))
    return out


# --------------------------------------------------------------------------- QOperator -> QDQ


class _Writer:
    """Emits the replacement nodes of one graph, sharing each dequantized tensor."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes: list = []
        self.initializers: list = []
        self.constants = {t.name: t for t in model.graph.initializer}
        self.used = {o for n in model.graph.node for o in n.output} | set(self.constants) | \
            {i.name for i in model.graph.input}
        self._dq: dict = {}
        self.params: dict = {}  # quantized tensor -> (scale, zero point)

    def name(self, hint: str) -> str:
        name, i = f"cam_{hint}", 1
        while name in self.used:
            i += 1
            name = f"cam_{hint}_{i}"
        self.used.add(name)
        return name

    def dq(self, x: str, scale: str, zero_point: str, axis: int | None = None) -> str:
        key = (x, scale, zero_point, axis)
        if key not in self._dq:
            out = self.name(f"{x}_dq")
            attrs = {"axis": axis} if axis is not None else {}
            self.nodes.append(helper.make_node("DequantizeLinear", [x, scale, zero_point] if zero_point else [x, scale],
                                               [out], name=out, **attrs))
            self._dq[key] = out
        return self._dq[key]

    def q(self, x: str, scale: str, zero_point: str, y: str):
        self.params[y] = (scale, zero_point)
        self.nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero_point] if zero_point else [x, scale],
                                           [y], name=self.name(f"{y}_q")))

    def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def per_channel_axis(self, scale: str, axis: int) -> int | None:
        """`axis` when `scale` is a vector of several values, else None (per tensor)."""
        t = self.constants.get(scale)
        return axis if t is not None and int(np.prod(t.dims)) > 1 else None

    def bias(self, b: str, a_scale: str, w_scale: str, alpha: float = 1.0) -> str:
        """An int32 bias of scale ``a_scale * w_scale`` (zero point 0) as a float tensor."""
        scale = self.op("Mul", [a_scale, w_scale], f"{b}_scale")
        if alpha != 1.0:
            scale = self.op("Mul", [scale, self.const(np.float32(alpha), f"{b}_alpha")], f"{b}_scale_alpha")
        return self.op("Mul", [self.op("Cast", [b], f"{b}_float", to=TensorProto.FLOAT), scale], f"{b}_dq")

    def const(self, value, hint: str) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def _rewrite_qlinear(w: _Writer, node) -> bool:
    """Write one QLinear op as DQ -> float op -> Q; False when it is not one."""
    if (node.domain if node.domain != "ai.onnx" else "", node.op_type) not in QLINEAR_OPS:
        return False
    op, i, attrs, y = node.op_type, list(node.input) + [""] * 9, _attrs(node), node.output[0]
    if op == "QLinearConv":
        x = w.dq(i[0], i[1], i[2])
        weight = w.dq(i[3], i[4], i[5], w.per_channel_axis(i[4], 0))
        inputs = [x, weight] + ([w.bias(i[8], i[1], i[4])] if i[8] else [])
        w.q(w.op("Conv", inputs, f"{y}_float", **attrs), i[6], i[7], y)
    elif op == "QLinearMatMul":
        a, b = w.dq(i[0], i[1], i[2]), w.dq(i[3], i[4], i[5], w.per_channel_axis(i[4], 1))
        w.q(w.op("MatMul", [a, b], f"{y}_float"), i[6], i[7], y)
    elif op == "QGemm":
        trans_b, alpha = attrs.get("transB", 0), attrs.get("alpha", 1.0)
        a = w.dq(i[0], i[1], i[2])
        b = w.dq(i[3], i[4], i[5], w.per_channel_axis(i[4], 0 if trans_b else 1))
        inputs = [a, b] + ([w.bias(i[6], i[1], i[4], alpha)] if i[6] else [])
        gemm_attrs = {k: v for k, v in attrs.items() if k in ("alpha", "transA", "transB")}
        out = w.op("Gemm", inputs, f"{y}_float", **gemm_attrs)
        if i[7]:
            w.q(out, i[7], i[8], y)
        else:  # QGemm without y_scale outputs float
            w.nodes.append(helper.make_node("Identity", [out], [y], name=w.name(f"{y}_id")))
    elif op in ("QLinearAdd", "QLinearMul"):
        a, b = w.dq(i[0], i[1], i[2]), w.dq(i[3], i[4], i[5])
        w.q(w.op(op[len("QLinear"):], [a, b], f"{y}_float"), i[6], i[7], y)
    elif op in ("QLinearGlobalAveragePool", "QLinearAveragePool"):
        x = w.dq(i[0], i[1], i[2])
        channels_last = attrs.pop("channels_last", 0)
        if channels_last:
            x = w.op("Transpose", [x], f"{i[0]}_nchw", perm=[0, 3, 1, 2])
        float_op = op[len("QLinear"):]
        pooled = w.op(float_op, [x], f"{y}_float", **attrs)
        if channels_last:
            pooled = w.op("Transpose", [pooled], f"{y}_nhwc", perm=[0, 2, 3, 1])
        w.q(pooled, i[3], i[4], y)
    elif op == "QLinearSigmoid":
        w.q(w.op("Sigmoid", [w.dq(i[0], i[1], i[2])], f"{y}_float"), i[3], i[4], y)
    elif op == "QLinearSoftmax":  # a transformer's attention probabilities
        x = w.dq(i[0], i[1], i[2])
        axis = attrs.get("axis", -1)
        if attrs.get("opset", 13) < 13 and axis != -1:
            # Softmax before opset 13 normalizes the 2-D view that `axis` splits off
            flat = w.op("Softmax", [w.op("Flatten", [x], f"{y}_2d", axis=axis)], f"{y}_2d_softmax", axis=-1)
            probs = w.op("Reshape", [flat, w.op("Shape", [x], f"{y}_shape")], f"{y}_float")
        else:
            probs = w.op("Softmax", [x], f"{y}_float", axis=axis)
        w.q(probs, i[3], i[4], y)
    elif op == "QLinearLeakyRelu":
        w.q(w.op("LeakyRelu", [w.dq(i[0], i[1], i[2])], f"{y}_float", alpha=attrs.get("alpha", 0.01)),
            i[3], i[4], y)
    else:  # QLinearConcat(y_scale, y_zero_point, (x, x_scale, x_zero_point)...)
        parts = [w.dq(*node.input[k:k + 3]) for k in range(2, len(node.input), 3)]
        w.q(w.op("Concat", parts, f"{y}_float", axis=attrs["axis"]), i[0], i[1], y)
    return True


_INTEGER_POOLS = {"MaxPool", "GlobalMaxPool"}


def _shared_dequantization(w: _Writer, node) -> bool | None:
    """One float tensor per dequantized int8 tensor: a DequantizeLinear of the graph that repeats
    one already written becomes an Identity of it, and one written first is reused by the
    rewritten ops.  Otherwise a transformer's residual stream would have two float copies (the
    Add's and the next block's), and a gradient at one would miss the branch that reads the other.
    True: replaced; False: kept (and reused); None: not a shareable DequantizeLinear."""
    i = list(node.input) + [""]
    if _attrs(node).get("block_size", 0):
        return None
    key = (i[0], i[1], i[2], w.per_channel_axis(i[1], _attrs(node).get("axis", 1)))
    if key in w._dq:
        w.nodes.append(helper.make_node("Identity", [w._dq[key]], [node.output[0]], name=w.name(f"{node.output[0]}_id")))
        return True
    w._dq[key] = node.output[0]
    w.nodes.append(node)
    return False


def qoperator_as_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every QOperator op (`QLINEAR_OPS`) as DQ -> float op -> Q.

    The quantized tensors keep their names and values (up to rounding ties: onnxruntime
    fuses these triples back into its integer kernels); the float tensor an op reads is
    ``cam_<quantized name>_dq``.  A MaxPool or GlobalMaxPool run on an integer tensor
    (which QOperator graphs keep) is written the same way, with its input's parameters.  A model without such ops is returned as a plain copy.

    Examples
    --------
    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> s = numpy_helper.from_array(np.float32(0.1), "s"); z = numpy_helper.from_array(np.uint8(128), "z")
    >>> node = helper.make_node("QLinearGlobalAveragePool", ["x", "s", "z", "s", "z"], ["y"], domain="com.microsoft")
    >>> g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 3, 3])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], [s, z])
    >>> m = qoperator_as_qdq(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
    ...                                                          helper.make_opsetid("com.microsoft", 1)]))
    >>> [n.op_type for n in m.graph.node]
    ['DequantizeLinear', 'GlobalAveragePool', 'QuantizeLinear']
    """
    w = _Writer(model)
    changed = False
    for node in model.graph.node:
        if _rewrite_qlinear(w, node):
            changed = True
        elif node.op_type in _INTEGER_POOLS and node.input[0] in w.params:
            # A max pooling run on the integer tensor itself (it commutes with the
            # quantization): read the float map, requantize with the same parameters.
            scale, zero = w.params[node.input[0]]
            out = w.op(node.op_type, [w.dq(node.input[0], scale, zero)], f"{node.output[0]}_float", **_attrs(node))
            w.q(out, scale, zero, node.output[0])
            changed = True
        elif node.op_type == "DequantizeLinear" and (shared := _shared_dequantization(w, node)) is not None:
            changed = changed or shared
        else:
            if node.op_type == "QuantizeLinear":
                w.params[node.output[0]] = tuple((list(node.input) + [""])[1:3])
            elif node.op_type in _MOVES and node.input and node.input[0] in w.params:
                w.params[node.output[0]] = w.params[node.input[0]]
            w.nodes.append(node)
    if not changed:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    return _copy_with_nodes(model, w.nodes, w.initializers)


# --------------------------------------------------------------------------- float view


def _same_tensor(consts: dict, a: str, b: str) -> bool:
    if a == b:
        return True
    if a in consts and b in consts:
        x, y = numpy_helper.to_array(consts[a]), numpy_helper.to_array(consts[b])
        return x.shape == y.shape and bool(np.array_equal(x, y))
    return not a and not b


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy of a quantized model: activation quantization removed, weights dequantized.

    * ``DequantizeLinear(QuantizeLinear(x))`` with the same per-tensor scale and zero point,
      on a tensor ``x`` computed from the inputs, becomes ``Clip(x, lo, hi)`` with the
      pair's range (onnxruntime drops a Relu or Clip that this range makes redundant), or
      ``Identity(x)`` where ``x`` is an average pooling's output (then only rounding is
      removed: the CAM bound);
    * ``DynamicQuantizeLinear(x)`` gives ``(x, 1, 0)``;
    * ``MatMulInteger(a, b, za, zb)`` and ``ConvInteger(x, w, zx, zw)`` become ``MatMul`` and
      ``Conv`` of ``a - za``, ``b - zb`` (in float).

    QOperator ops are first written as QDQ (`qoperator_as_qdq`).  The output keeps the
    names of every tensor the model had; what it computes is the model with exact
    (unrounded) activations, the weights at their dequantized values.
    """
    model = qoperator_as_qdq(model)
    consts = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    w = _Writer(model)
    computed = {i.name for i in model.graph.input} - set(consts)
    for node in model.graph.node:
        if any(i in computed for i in node.input):
            computed.update(node.output)
    # Dequantized constants (weights) become float initializers, known to the checks below.
    folded = {n.output[0]: t for n in model.graph.node if n.op_type == "DequantizeLinear"
              for t in [_constant_dequantized(consts, n)] if t is not None}
    w.initializers.extend(folded.values())
    consts = {**consts, **folded}
    nodes = w.nodes  # rewrites and kept nodes, in graph order
    for node in model.graph.node:
        op, i = node.op_type, list(node.input) + [""] * 4
        chain, q = _through_moves(producer, node.input[0]) if op == "DequantizeLinear" else ([], None)
        bounds = _pair_bounds(consts, q, node) if q is not None and q.input[0] in computed else None
        if bounds is not None:
            x, y = q.input[0], node.output[0]
            for move in chain:  # Reshape/Flatten/... of the quantized tensor, redone in float
                x = w.op(move.op_type, [x, *move.input[1:]], f"{move.output[0]}_float", **_attrs(move))
            if _after_pooling(producer, consts, q.input[0]) or bounds[0] < 0 < bounds[1]:
                # Rounding only: averages of dequantized values, or a two-sided range
                # (the logits'), where clipping means saturation outside calibration.
                nodes.append(helper.make_node("Identity", [x], [y], name=w.name(f"{y}_id")))
            else:  # a one-sided range may stand for a Relu onnxruntime dropped as redundant
                lo, hi = (w.const(np.float32(v), f"{y}_{side}") for v, side in zip(bounds, ("min", "max")))
                nodes.append(helper.make_node("Clip", [x, lo, hi], [y], name=w.name(f"{y}_clip")))
        elif op == "DequantizeLinear" and node.output[0] in folded:
            pass  # a weight: now a float initializer
        elif op == "DynamicQuantizeLinear":
            y, scale, zero = (list(node.output) + ["", ""])[:3]
            nodes.append(helper.make_node("Identity", [node.input[0]], [y], name=w.name(f"{y}_id")))
            if scale:
                nodes.append(helper.make_node("Constant", [], [scale], name=w.name(f"{scale}_one"),
                                              value=numpy_helper.from_array(np.ones((), np.float32))))
            if zero:
                nodes.append(helper.make_node("Constant", [], [zero], name=w.name(f"{zero}_zero"),
                                              value=numpy_helper.from_array(np.zeros((), np.uint8))))
        elif op in ("MatMulInteger", "ConvInteger"):
            a = _centered(w, i[0], i[2])
            b = _centered(w, i[1], i[3], reshape_4d=op == "ConvInteger")
            float_op = "MatMul" if op == "MatMulInteger" else "Conv"
            nodes.append(helper.make_node(float_op, [a, b], [node.output[0]], name=w.name(f"{node.output[0]}_float"),
                                          **_attrs(node)))
        else:
            nodes.append(node)
    return _copy_with_nodes(model, nodes, w.initializers)


def _constant_dequantized(consts: dict, node):
    """The value of a DequantizeLinear of initializers as a float initializer, else None.

    onnxruntime would otherwise fuse ``DequantizeLinear(weights) -> MatMul`` into an integer
    kernel that quantizes the other operand, and the float view would not be float.
    """
    names = [i for i in node.input if i]
    if not all(i in consts for i in names) or _attrs(node).get("block_size", 0):
        return None
    x = numpy_helper.to_array(consts[names[0]])
    if x.dtype.kind not in "iu":
        return None
    scale = numpy_helper.to_array(consts[names[1]]).astype(np.float64)
    zero = numpy_helper.to_array(consts[names[2]]).astype(np.float64) if len(names) > 2 else np.zeros(())
    if scale.ndim == 1 and scale.size > 1:
        axis = _attrs(node).get("axis", 1) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.size > 1 else zero
    value = ((x.astype(np.float64) - zero) * scale).astype(numpy_helper.to_array(consts[names[1]]).dtype)
    return numpy_helper.from_array(value, node.output[0])


_POOLS = {"GlobalAveragePool", "AveragePool", "ReduceMean"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "DequantizeLinear", "QuantizeLinear"}


def _after_pooling(producer: dict, consts: dict, x: str) -> bool:
    """Whether `x` is an average pooling's output, through reshapes, Q/DQ pairs and products
    with positive constants (paddle writes inference Dropout as such a Mul)."""
    node = producer.get(x)
    while node is not None and (node.op_type in _RESHAPES or _positive_scaling(consts, node)):
        node = producer.get(node.input[0])
    return node is not None and node.op_type in _POOLS


def _positive_scaling(consts: dict, node) -> bool:
    """A Mul or Div of its first input by a positive constant."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2 or node.input[1] not in consts:
        return False
    return bool(np.all(numpy_helper.to_array(consts[node.input[1]]) > 0))


_MOVES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


def _through_moves(producer: dict, x: str) -> tuple[list, object]:
    """``(moves, q)``: the reshape-like nodes between `x` and the QuantizeLinear that
    produced it (in graph order), else ``([], None)``."""
    chain, node = [], producer.get(x)
    while node is not None and node.op_type in _MOVES:
        chain.append(node)
        node = producer.get(node.input[0])
    if node is None or node.op_type != "QuantizeLinear":
        return [], None
    return chain[::-1], node


def _pair_bounds(consts: dict, q, dq) -> tuple | None:
    """``(lo, hi)``, the float range of a QuantizeLinear -> DequantizeLinear pair with the
    same per-tensor constant scale and zero point, else None."""
    if q.op_type != "QuantizeLinear" or any(a.name == "block_size" and a.i for a in q.attribute):
        return None
    qi, di = list(q.input) + ["", ""], list(dq.input) + ["", ""]
    if not (_same_tensor(consts, qi[1], di[1]) and _same_tensor(consts, qi[2], di[2])) or qi[1] not in consts:
        return None
    scale = numpy_helper.to_array(consts[qi[1]])
    if scale.size != 1:
        return None
    if qi[2]:
        if qi[2] not in consts:
            return None
        zero = numpy_helper.to_array(consts[qi[2]])
    else:
        zero = np.zeros((), np.uint8)
    if zero.dtype.kind not in "iu" or zero.size != 1:
        return None  # float8 and 4-bit types: not handled
    info = np.iinfo(zero.dtype)
    s, z = float(scale.ravel()[0]), float(zero.ravel()[0])
    return (info.min - z) * s, (info.max - z) * s


def _centered(w: _Writer, x: str, zero_point: str, reshape_4d: bool = False) -> str:
    """``float(x) - float(zero_point)`` (zero point per output channel for a 4-D weight)."""
    xf = w.op("Cast", [x], f"{x}_float", to=TensorProto.FLOAT)
    if not zero_point:
        return xf
    zf = w.op("Cast", [zero_point], f"{zero_point}_float", to=TensorProto.FLOAT)
    if reshape_4d:
        zf = w.op("Reshape", [zf, w.const(np.array([-1, 1, 1, 1], np.int64), f"{zero_point}_shape")],
                  f"{zero_point}_4d")
    return w.op("Sub", [xf, zf], f"{x}_centered")


def quant_range(model: onnx.ModelProto, tensor: str, *, downstream: bool) -> tuple | None:
    """``(step, lo, hi)`` of the constant per-tensor quantization applied to `tensor`: by the
    QuantizeLinear reading it (`downstream`) or the DequantizeLinear producing it, through
    reshapes; None when there is none (float, dynamic or per-axis)."""
    consts = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for n in (consumers.get(t, []) if downstream else [producer[t]] if t in producer else []):
            if n.op_type == ("QuantizeLinear" if downstream else "DequantizeLinear"):
                bounds = _pair_bounds(consts, _as_quantize(n), n)
                if bounds is not None:
                    return float(numpy_helper.to_array(consts[n.input[1]]).ravel()[0]), *bounds
            if n.op_type in _MOVES:
                stack.extend(n.output if downstream else n.input[:1])
    return None


def _as_quantize(node):
    """A QuantizeLinear with `node`'s scale and zero point (for `_pair_bounds`)."""
    return helper.make_node("QuantizeLinear", list(node.input), ["cam_unused"])


def cam_bound(model: onnx.ModelProto, weights: np.ndarray, pooled: str, logits: str) -> np.ndarray:
    """``(C,)``: how far a QDQ/QOperator model's logits may be from the CAM identity.

    The model computes ``W_dq @ Q(pooled) + b``, with ``Q`` rounding each pooled value to its
    step ``s`` (error at most ``s / 2`` inside the range), then rounds the logits to their
    step ``s_out``.  CAM uses the exact mean, so per class ``c``
    ``|logits_c - (mean(map_c) + b_c)| <= sum_k |W_ck| s / 2 + s_out / 2``, while the
    pooled values and the logits stay inside their quantization ranges (`quant_range`):
    those are calibrated on sample images, and an image unlike them saturates them, by
    any amount (`camcore.drift` shows it).  Steps missing from the graph (a float pooled
    vector or float logits) count as 0.

    Parameters
    ----------
    model : onnx.ModelProto
        The graph camcore runs (`runnable`).
    weights : (C, K) ndarray
        The CAM weights (``Head.weights``).
    pooled, logits : str
        The pooled tensor (``Head.extra["pooled"]``) and the logits tensor.
    """
    s = (quant_range(model, pooled, downstream=True) or (0.0,))[0]
    s_out = (quant_range(model, logits, downstream=False) or (0.0,))[0]
    return np.abs(np.asarray(weights, np.float64)).sum(axis=1) * s / 2 + s_out / 2


def before_output_quantization(model: onnx.ModelProto, logits: str) -> str:
    """The float tensor an output's final QuantizeLinear -> DequantizeLinear pair reads, else `logits`.

    Gradient methods differentiate this tensor: the output pair only rounds and saturates
    the reported logits (to the range calibrated on sample images), and under the clipped
    straight-through estimator a saturated logit, often the top class of an image more
    confident than the calibration set, would give an all-zero map.  Only a pair with the
    same scale and zero point, through reshapes, is looked through.
    """
    consts = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(logits)
    while node is not None and node.op_type in _MOVES:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return logits
    chain, q = _through_moves(producer, node.input[0])
    if q is None or chain or _pair_bounds(consts, q, node) is None:
        return logits
    between = producer.get(logits)
    return q.input[0] if between is node else logits


def _constant_affine(consts, node) -> bool:
    """A Mul, Div, Add or Sub of a computed first input by a constant: DeiT's ``(head + head_dist) / 2``."""
    return (node.op_type in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2
            and node.input[1] in consts and node.input[0] not in consts)


_LINEAR_COMBINATIONS = {"Add", "Sub", "Sum", "Mean"}


def output_quantization_bypassed(model: onnx.ModelProto, logits: str) -> tuple:
    """``(model', of)``: the graph whose `of` a gradient method differentiates for `logits`.

    As `before_output_quantization`, and where the logits are computed from the outputs of
    QuantizeLinear -> DequantizeLinear pairs by reshapes, products and sums with constants and
    sums of such terms (DeiT with its teacher writes ``logits = DQ(Q(DQ(Q(head)) + DQ(Q(head_dist)))) / 2``),
    a copy
    whose nodes after each pair read the pair's float input: the logits up to those pairs'
    rounding and saturation.  A saturated pair there would otherwise stop the gradient of the
    classes the calibration photos did not reach (often the top class: measured on DeiT
    distilled, 5 to 10 % of its two heads' outputs outside their range on the calibration
    photos themselves).  Otherwise `model` itself.
    """
    of = before_output_quantization(model, logits)
    if of != logits:
        return model, of
    consts = {t.name: t for t in model.graph.initializer}
    constant = set(consts) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired: list = []  # (node reading a pair's output, input index, the pair's float input)

    def walk(tensor: str, reader, index: int, depth: int = 0):
        node = producer.get(tensor)
        if node is None or depth > 64:
            return
        if node.op_type == "DequantizeLinear":
            chain, q = _through_moves(producer, node.input[0])
            if reader is not None and q is not None and not chain and _pair_bounds(consts, q, node) is not None:
                rewired.append((reader, index, q.input[0]))
                walk(q.input[0], reader, index, depth + 1)  # pairs nested under this one
        elif node.op_type in _MOVES or _constant_affine(constant, node):
            walk(node.input[0], node, 0, depth + 1)
        elif node.op_type in _LINEAR_COMBINATIONS and not any(i in constant for i in node.input):
            for k, name in enumerate(node.input):
                walk(name, node, k, depth + 1)

    walk(logits, None, 0)
    if not rewired:
        return model, logits
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for reader, index, name in rewired:
        for n in out.graph.node:
            if n.name == reader.name and list(n.output) == list(reader.output):
                n.input[index] = name
    return out, logits
