"""Reverse-mode differentiation of an ONNX sub-graph, written as plain ONNX nodes.

Gradient-based CAMs (Grad-CAM and kin) need ``d logits[c] / d features``.  onnxruntime
implements neither ``ai.onnx.preview.training.Gradient`` nor (any more) a training build,
so this module writes the backward pass itself, as ordinary default-domain nodes at the
model's own opset: whatever runs the model runs its gradient, on any execution provider.

* `cut_head` extracts the head: the sub-graph computing the logits from a feature tensor
  ``target`` (given a free batch axis; a fixed-batch export keeps its batch), plus the
  "frontier", the other non-constant tensors the head reads that do not depend on ``target``
  (a skip connection around the target layer, or a graph input read only through ``Shape``).
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

Rules (gradients for the data inputs; inputs that do not depend on ``wrt`` get none), one
module per family, each ending in its own ``RULES`` table that `RULES` merges below:

* `shape`: Identity, Cast, Dropout (inference), Flatten, Reshape, Squeeze, Unsqueeze
  (``Reshape(g, Shape(x))``), Transpose, Concat, Split, Slice (any steps), Gather and
  GatherElements (repeated indices need opset 16), Expand, Pad (mode constant; pads
  constant or computed, negative pads crop);
* `arithmetic`, with numpy broadcasting: Add, Sub, Mul, Div, Pow, Neg, Sum, Mean, Max, Min
  (ties share), Where, PRelu (slope too); the axes to sum are constants, found from the
  dims; an axis symbolic dims leave open is summed, and the run-time sizes select the sum;
* `activation`: Relu, LeakyRelu, Elu, Sigmoid, HardSigmoid, HardSwish, Tanh, Clip, Erf,
  Gelu (both approximations), Softplus, Softsign, Mish, Abs, Exp, Log, Sqrt, Reciprocal,
  Softmax and LogSoftmax (2-D coercion before opset 13);
* `linear`: Gemm (alpha, beta, transA, transB, broadcast C), MatMul (batched, 1-D),
  Einsum (no ellipsis; each operand's letters distinct and shared), Conv (any kernel,
  strides, pads, dilations, groups, auto_pad; bias; ConvTranspose with output_padding, or
  crop/pad at run time when spatial sizes are dynamic and auto_pad is NOTSET/VALID);
* `normalization`: BatchNormalization (inference form), LayerNormalization (any axis);
* `pooling`, with reductions: GlobalAveragePool, GlobalMaxPool, AveragePool (pads, strides,
  dilations, ceil_mode, count_include_pad; static spatial sizes), MaxPool (via its
  Indices; overlapping windows need opset 16), ReduceMean, ReduceSum, ReduceMax,
  ReduceMin, ReduceL1, ReduceL2, ReduceSumSquare, ReduceLogSumExp (axes constant);
* `quantization`, by the clipped straight-through estimator (onnxruntime's FakeQuantGrad):
  QuantizeLinear, DequantizeLinear (per tensor or per axis), DynamicQuantizeLinear,
  MatMulInteger, ConvInteger; integer tensors they produce, and moves of those (Reshape,
  Split, Gather, Slice...), carry float gradients, and other
  integer kernels (QLinear*, fused ``com.microsoft`` ops) are refused in one line naming the
  methods that need no gradient.

Refused: opsets below 11; ops not listed, with subgraphs or outside the default domain;
parameters (Conv weights, normalization scales and statistics) that depend on ``wrt``;
training-mode Dropout and BatchNormalization; Pad modes other than constant; reduction
axes given as computed tensors; symbolic broadcasting before opset 13; Conv with SAME
auto_pad, and AveragePool, on dynamic spatial sizes.

Layout: `_graph` (opset check, the shape-inferred `_Index`, `cut_head`), `_emit` (the
node `_Emitter`, the `_Context` a rule sees, shared helpers), `_backward` (the reverse
walk over a rule table), and the family modules.  A new family (quantization,
attention) is one more module ending in ``RULES`` and one more entry in `_FAMILIES`.
"""

from __future__ import annotations

import onnx

from . import activation, arithmetic, linear, normalization, pooling, quantization, shape
from ._backward import add_backward as _add_backward
from ._graph import MIN_OPSET, cut_head

__all__ = ["cut_head", "add_backward", "gradient_model", "RULES", "MIN_OPSET"]

# The rule families, merged in this order; an op in two families is an error.
_FAMILIES = (shape, arithmetic, activation, linear, normalization, pooling, quantization)


def merge_rules(families) -> dict:
    """One ``{op_type: rule}`` table from the families' ``RULES``; raises on an op defined twice.

    >>> sorted(merge_rules([normalization]))
    ['BatchNormalization', 'LayerNormalization']
    >>> merge_rules([shape, shape])
    Traceback (most recent call last):
    ...
    RuntimeError: gradient rule for 'Identity' defined twice: in backends.backprop.shape and backends.backprop.shape
    """
    merged, owner = {}, {}
    for family in families:
        for op, rule in family.RULES.items():
            if op in merged:
                raise RuntimeError(f"gradient rule for {op!r} defined twice: in {owner[op]} and {family.__name__}")
            merged[op], owner[op] = rule, family.__name__
    return merged


RULES = merge_rules(_FAMILIES)


def add_backward(model: onnx.ModelProto, wrt, of: str, *, seed: str = "cam_seed",
                 grad=None) -> onnx.ModelProto:
    """Append the vector-Jacobian product ``d sum(seed * of) / d wrt`` to a copy of `model`.

    With several `wrt` tensors one reverse pass gives all their gradients (a transformer's
    attention probabilities in every layer, for GAE): each is the total derivative of
    ``sum(seed * of)`` with respect to that tensor, the gradient its readers send back,
    also when one `wrt` is computed from another.

    Parameters
    ----------
    model : onnx.ModelProto
        Opset >= 11.  Not modified.
    wrt : str or sequence of str
        Graph inputs or internal tensors.
    of : str
        A tensor depending on each of `wrt`.
    seed : str
        Name of the new input, with `of`'s type and shape.
    grad : str or sequence of str, optional
        Names of the new outputs, one per `wrt` and with its shape (default ``cam_grad``
        for one `wrt`, ``cam_grad_0``, ``cam_grad_1``, ... for a sequence).

    Returns
    -------
    onnx.ModelProto
        The model's outputs, then the gradients in the order of `wrt`.

    Raises
    ------
    NotCamCompatible
        If `of` does not depend on a `wrt`, or a node on a path between them has no rule
        (the message names the op and the node).
    """
    return _add_backward(model, wrt, of, rules=RULES, seed=seed, grad=grad)


def gradient_model(model: onnx.ModelProto, target: str, logits: str, *, seed: str = "cam_seed",
                   grad: str = "cam_grad") -> onnx.ModelProto:
    """The head from `target` to `logits` with the gradient of ``sum(seed * logits)``.

    Inputs: `target` (its batch axis as `cut_head` leaves it), the frontier tensors of
    `cut_head`, then `seed` (shaped like `logits`).  Outputs: `logits`, then `grad` (shaped like `target`).

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
