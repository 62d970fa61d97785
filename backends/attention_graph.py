"""A transformer's attention probabilities as model outputs, with their gradients in the graph.

Attention rollout and GAE (`camcore.methods.attention`) read each self-attention layer's
probabilities, the ``Softmax`` outputs ``(N, heads, T, T)`` (square over the tokens), and
GAE their gradients ``d sum(seed * logits) / d A_l``.  Both come from one model built
here by pure graph transforms that return a copy: the probabilities exposed as outputs,
and for GAE one backward pass from the logits to every layer's probabilities at once
(`backends.backprop.add_backward` with several ``wrt``), in plain ONNX nodes like every
other camcore gradient.

Exports that compute attention in one fused op (``Attention`` at opset 23,
``com.microsoft`` ``Attention``/``MultiHeadAttention``) have no probabilities to read;
`attention_probabilities` then raises a one-line `NotCamCompatible` saying so and naming
the methods that apply.
"""

from __future__ import annotations

import onnx

from camcore.errors import NotCamCompatible

from . import backprop
from .onnx_graph import _Graph, expose_outputs

__all__ = ["attention_probabilities", "attention_model", "refuse", "ATTENTION_SEED", "gradient_name"]

ATTENTION_SEED = "cam_attention_seed"
_FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention")
_OTHER_METHODS = "the feature methods apply (gradcam and its family, eigencam, ablationcam, scorecam, reciprocam)"


def gradient_name(tensor: str) -> str:
    """The output that holds the gradient at attention tensor `tensor`."""
    return f"cam_grad_{tensor}"


def attention_probabilities(model: onnx.ModelProto, tokens: int | None = None) -> tuple:
    """The self-attention probabilities of `model`: its ``Softmax`` outputs ``(N, heads, T, T)``.

    Parameters
    ----------
    model : onnx.ModelProto
    tokens : int, optional
        Keep only attention over this many tokens (the image's: ``prefix + gh * gw``).

    Returns
    -------
    tuple of str
        Tensor names, in graph order.

    Raises
    ------
    NotCamCompatible
        None found: the message says why (a fused attention op, windowed attention, none).
    """
    g = _Graph.build(model)
    found, other = [], []
    for node in model.graph.node:
        shape = g.shape(node.output[0]) if node.op_type == "Softmax" else ()
        if len(shape) != 4:
            continue
        square = shape[-1] == shape[-2] or not all(isinstance(d, int) for d in shape[-2:])
        if square and (tokens is None or not isinstance(shape[-1], int) or shape[-1] == tokens):
            found.append(node.output[0])
        else:
            other.append("x".join(str(d) for d in shape[-2:]))
    fused = sorted({n.op_type for n in model.graph.node if n.op_type in _FUSED})
    if other:
        refuse(f"{len(other)} of its attention layers are not over the image's {tokens} tokens "
               f"({', '.join(sorted(set(other)))}: windowed attention as in Swin, other stages' grids or "
               f"spatially reduced keys), so no rollout spans the image")
    if found:
        return tuple(found)
    if fused:
        refuse(f"the export computes attention in a fused {'/'.join(fused)} op, which keeps its probabilities inside")
    refuse("the graph has no Softmax over tokens (N, heads, T, T)")


def refuse(why: str):
    """Raise the one-line refusal of the attention methods, saying `why` and what applies instead."""
    raise NotCamCompatible(f"rollout and gae need every attention layer's probabilities over the image's tokens, "
                           f"and {why}; {_OTHER_METHODS}")


def attention_model(model: onnx.ModelProto, attention, logits: str, *, gradients: bool = False) -> onnx.ModelProto:
    """A copy of `model` that also outputs `attention` and, with `gradients`, their gradients.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    attention : sequence of str
        Attention-probability tensors (`attention_probabilities`).
    logits : str
        The logits tensor ``(N, C)``.
    gradients : bool
        Add the input `ATTENTION_SEED` (shaped like `logits`) and, for each tensor ``a`` of
        `attention`, the output ``gradient_name(a)``: ``d sum(seed * logits) / d a``.

    Returns
    -------
    onnx.ModelProto
        Outputs: the model's, then `logits` and `attention` (where not outputs already), then
        the gradients.

    Raises
    ------
    NotCamCompatible
        A node between the attention and the logits has no gradient rule.
    """
    attention = list(attention)
    out = expose_outputs(model, [logits, *attention])
    if gradients:
        out = backprop.add_backward(out, attention, logits, seed=ATTENTION_SEED,
                                    grad=[gradient_name(a) for a in attention])
    return out
