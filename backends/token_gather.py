"""Read one token early: a head that gathers one token of ``(N, T, C)`` computes the per-token ops
before the Gather on that token alone.

Under CLS pooling the head reads ``tokens[:, i]`` (``Gather(axis=1)``, a scalar index) of the last
block's output; everything between the last attention and that Gather (the residual Adds, the
LayerNorms, the MLP's MatMuls and activations) acts on each token by itself, so
``Gather(f(x)) = f(Gather(x))``.  `push_token_gather` moves such Gathers up through those ops
(a pure graph transform returning a copy; new tensors and nodes are named ``cam_tok_*``), so the
head runs the MLP on one token instead of ``T``, forward and backward: for the head runs of
Grad-CAM's gradients and of Recipro-CAM's masked copies, which is most of their cost.

A node is crossed when its output is read by nothing but Gathers of the same token, it is not a
graph output, and it is per-token along axis 1: an elementwise op whose other operands are
constants without a token axis (rank <= 1) or tensors of the same ``(N, T, ...)`` shape (gathered
too); ``LayerNormalization`` over the last axis; ``MatMul`` by a constant matrix.  The values are
unchanged (up to float rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._proto import attr, copy_model
from .onnx_graph import _Graph

__all__ = ["push_token_gather"]

_UNARY = {"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Sqrt", "Exp", "Neg", "Identity", "Cast", "HardSwish",
          "LeakyRelu", "Softplus", "Abs", "Reciprocal", "Elu", "Mish", "HardSigmoid"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}


def _token_index(g: _Graph, node) -> int | None:
    """The scalar index of a ``Gather(axis=1)`` of a 3-D tensor, else None."""
    if node.op_type != "Gather" or (attr(node, "axis", 0) or 0) != 1 or len(g.shape(node.input[0])) != 3:
        return None
    value = g.constant(node.input[1])
    if value is None or np.ndim(value) != 0:
        return None
    return int(value)


def push_token_gather(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where each one-token ``Gather(axis=1)`` is moved above the per-token ops
    it reads (see the module's docstring); `model` itself when there is nothing to move.
    """
    out = copy_model(model)
    moved = False
    for _ in range(256):  # one node crossed per pass; a head has a few dozen
        if not _push_once(out):
            break
        moved = True
    return out if moved else model


def _push_once(model: onnx.ModelProto) -> bool:
    g = _Graph.build(model)
    outputs = {o.name for o in model.graph.output}
    nodes = list(model.graph.node)
    for gather in nodes:
        index = _token_index(g, gather)
        if index is None:
            continue
        x = gather.input[0]
        producer = g.producer.get(x)
        if producer is None or x in outputs or len(producer.output) != 1:
            continue
        readers = g.consumers.get(x, [])
        if not all(_token_index(g, r) == index and r.input[0] == x for r in readers):
            continue
        shape = g.shape(x)
        token_inputs = _per_token_inputs(g, producer, shape)
        if token_inputs is None:
            continue
        # the producer, on the gathered token; its readers (Gathers of the same token) read it
        new_nodes, new_inits = [], []
        idx_name = f"cam_tok_idx_{index}"
        if not any(t.name == idx_name for t in model.graph.initializer):
            new_inits.append(numpy_helper.from_array(np.array(index, np.int64), idx_name))
        inputs = list(producer.input)
        for i in token_inputs:
            gathered = f"cam_tok_{inputs[i]}_{index}"
            if g.producer.get(gathered) is None and not any(n.output and n.output[0] == gathered
                                                             for n in new_nodes):
                new_nodes.append(helper.make_node("Gather", [inputs[i], idx_name], [gathered], axis=1,
                                                  name=f"cam_tok_gather_{inputs[i]}_{index}"))
            inputs[i] = gathered
        result = f"cam_tok_at_{x}_{index}"
        moved = helper.make_node(producer.op_type, inputs, [result], name=f"cam_tok_{producer.name or x}_{index}",
                                 domain=producer.domain)
        moved.attribute.extend(producer.attribute)
        if moved.op_type == "LayerNormalization" and attr(producer, "axis", -1) == 2:
            del moved.attribute[:]
            moved.attribute.extend(a for a in producer.attribute if a.name != "axis")
            moved.attribute.append(helper.make_attribute("axis", -1))
        new_nodes.append(moved)
        reader_outputs = {r.output[0] for r in readers}
        order = []
        for node in nodes:  # (the index's nodes are copies from shape inference: matched by output)
            if node.output and node.output[0] == x:
                order.extend(new_nodes)
            elif node.output and node.output[0] in reader_outputs:
                order.append(helper.make_node("Identity", [result], list(node.output), name=node.name))
            else:
                order.append(node)
        del model.graph.node[:]
        model.graph.node.extend(_sorted(order, model))
        model.graph.initializer.extend(new_inits)
        return True
    return False


def _per_token_inputs(g: _Graph, node, shape: tuple):
    """Indices of `node`'s inputs to gather when it is per-token along axis 1 of `shape`, else None."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(shape) != 3:
        return None
    if op in _UNARY:
        return [0] if g.shape(node.input[0]) == shape else None
    if op == "LayerNormalization":
        axis = attr(node, "axis", -1)
        if axis not in (-1, 2) or g.shape(node.input[0]) != shape or len(node.output) != 1:
            return None
        return [0]
    if op == "MatMul":
        b = g.constant(node.input[1])
        s = g.shape(node.input[0])
        if len(s) != 3 or s[:2] != shape[:2] or b is None or np.ndim(b) != 2:
            return None
        return [0]
    if op in _BINARY:
        picked = []
        for i, name in enumerate(node.input):
            s = g.shape(name)
            if s == shape:
                picked.append(i)
            elif g.constant(name) is not None and np.ndim(g.constant(name)) <= 1:
                continue
            else:
                return None
        return picked or None
    return None


def _sorted(nodes, model: onnx.ModelProto) -> list:
    """`nodes` in a topological order, the given order kept where it already is one (a reused
    Gather may sit after a new reader)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, out = list(nodes), []
    while pending:
        for k, node in enumerate(pending):
            if all(i in ready for i in node.input):
                out.append(node)
                ready.update(node.output)
                del pending[k]
                break
        else:
            out.extend(pending)  # a cycle cannot come from moving Gathers; leave the rest for the checker
            break
    return out
