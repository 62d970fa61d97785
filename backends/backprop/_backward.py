"""The reverse pass: walk the nodes between `wrt` and `of` backwards, apply each node's
rule from a rule table, and sum the contributions to tensors read several times.
"""

from __future__ import annotations

import onnx
from onnx import helper

from camcore.errors import NotCamCompatible

from .._proto import copy_model, node_label
from ._emit import _Context, _Emitter
from ._graph import _FLOAT_TYPES, _check_opset, _descendants, _Index, _subgraph_inputs, _unknown_nonpositive_dims
from .quantization import carries_gradient, integer_rule


def add_backward(model: onnx.ModelProto, wrt, of: str, *, rules: dict, seed: str = "cam_seed",
                 grad=None) -> onnx.ModelProto:
    """`backends.backprop.add_backward` (documented there) over the rule table `rules`
    (``{op_type: rule}``)."""
    several = not isinstance(wrt, str)
    wrts = list(wrt) if several else [wrt]
    if several:
        grads = list(grad) if grad is not None else [f"cam_grad_{i}" for i in range(len(wrts))]
    else:
        grads = [grad or "cam_grad"]
    if not wrts or len(grads) != len(wrts) or len(set(wrts)) != len(wrts) or len(set(grads)) != len(grads):
        raise NotCamCompatible(f"add_backward takes distinct tensors to differentiate with one distinct gradient "
                               f"name each, got wrt={wrts} and grad={grads}")
    opset = _check_opset(model)
    ix = _Index(model, resolve_batch=True)  # sums over axes the shapes tell: constants, fewer ops
    ix.require(*wrts, of)
    for name in (seed, *grads):
        if ix.exists(name):
            raise NotCamCompatible(f"tensor name '{name}' is already used in the model")
    if of not in ix.types or ix.elem_type(of) is None:
        raise NotCamCompatible(f"cannot infer the type of '{of}'")
    nodes = list(ix.model.graph.node)

    # Float tensors carry the gradient, and the integer outputs of quantization ops (a
    # QuantizeLinear's int8 result feeding its DequantizeLinear, see `quantization`).
    active = set()
    for w in wrts:
        reached = _descendants(nodes, w, lambda o: o != w and ix.elem_type(o) in _FLOAT_TYPES | {None},
                               carries_gradient)
        if of not in reached:
            raise NotCamCompatible(f"'{of}' does not depend on '{w}'")
        active |= reached
    useful, path = {of}, []
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            path.append(node)
            useful.update(i for i in [*node.input, *_subgraph_inputs(node)] if i in active)

    e = _Emitter(ix, opset, ix.elem_type(wrts[0]) or ix.elem_type(of))
    contributions = {of: [seed]}
    e.types[seed] = ix.elem_type(of)
    totals = {}

    def total(name):
        # Summed once: a tensor differentiated (wrt) and also passed through is read twice.
        if name not in totals:
            parts = contributions.get(name)
            totals[name] = None if not parts else parts[0] if len(parts) == 1 else \
                e.typed(e.op("Sum", parts), name)
        return totals[name]

    for node in path:  # reverse topological order
        grads_out = [total(o) if o else None for o in node.output]
        if all(g is None for g in grads_out):
            continue
        rule = integer_rule(node) or (rules.get(node.op_type) if node.domain in ("", "ai.onnx") else None)
        if rule is None or _subgraph_inputs(node):
            raise NotCamCompatible(f"no gradient rule for {node_label(node)}")
        ctx = _Context(e, node, grads_out, useful)
        got = rule(ctx)
        for i, name in enumerate(node.input):
            if name not in useful:
                continue
            if i not in got:
                ctx.refuse(f"input {i} ('{name}') depends on '{wrt}'")
            contributions.setdefault(name, []).append(got[i])

    for w, g_name in zip(wrts, grads):
        final = total(w) or e.zeros_like(w)
        e.nodes.append(helper.make_node("Identity", [final], [g_name], name=g_name))

    out = copy_model(model)
    g = out.graph
    # The model's own declaration of `of` if any (onnx shape inference miscounts some
    # ceil_mode pools), else the inferred type.
    clean = _unknown_nonpositive_dims(model).graph
    declared = {vi.name: vi.type for vi in [*clean.value_info, *clean.input, *clean.output]}
    seed_type = onnx.TypeProto()
    seed_type.CopyFrom(declared.get(of) or ix.types[of])
    g.input.append(helper.make_value_info(seed, seed_type))
    for w, g_name in zip(wrts, grads):
        grad_type = ix.types.get(w) or helper.make_tensor_type_proto(e.elem(w), None)
        g.output.append(helper.make_value_info(g_name, grad_type))
    g.node.extend(e.nodes)
    g.initializer.extend(e.initializers)
    return out
