"""Read the pooled tokens early: a head that gathers a few tokens of ``(N, T, C)`` computes what
lies before those Gathers on those tokens alone.

Under CLS pooling the head reads ``tokens[:, 0]`` (``Gather(axis=1)``, a scalar index) of the last
block's output (DeiT reads tokens 0 and 1).  Everything between the last attention and those
Gathers (the residual Adds, the LayerNorms, the MLP) acts on each token by itself, and the last
attention's output row of a token depends on the other tokens only through the keys and values:
``softmax(q_i K^T / s) V`` for query ``i``.  So ``Gather(f(x)) = f(Gather(x))`` for all of them, and
`push_token_gather` moves the Gathers up (a pure graph transform returning a copy; new tensors and
nodes are named ``cam_tok_*``) until they reach a tensor something else also reads (in a ViT, the
LayerNorm output feeding the query, key and value projections, or the fused QKV product).  The head
then runs the MLP, the attention scores and the attention-weighted sum on one query instead of
``T``, forward and backward: for the head runs of Grad-CAM's gradients and of Recipro-CAM's masked
copies, which is most of their cost.  The values are unchanged (up to float rounding).

The scalar Gathers become one *pick*, ``Gather(x, axis=a, indices=[i, ...])`` (1-D: the axis is kept,
of length ``m``), read by a scalar Gather per original token.  A pick crosses a node when the node
has one output, read by nothing but picks of the same axis and indices, and is one of:

* elementwise (unary, or binary with operands broadcast against the picked axis; a constant
  operand is picked in NumPy), ``LayerNormalization`` / ``Softmax`` over other axes;
* ``MatMul`` picked on the row axis of its first operand;
* ``Transpose``, ``Squeeze``, ``Unsqueeze`` (the axis renumbered), and ``Reshape`` that keeps the
  picked axis whole (shapes from shape inference; only the batch may be dynamic).

``Shape`` of a tensor whose dims are known but for the batch is first written as
``Concat(batch, dims)``, so a shape computation does not hold a whole-token tensor alive.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._proto import attr, copy_model, opset
from .onnx_graph import _Graph

__all__ = ["push_token_gather"]

_UNARY = {"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Sqrt", "Exp", "Neg", "Identity", "Cast", "HardSwish",
          "LeakyRelu", "Softplus", "Abs", "Reciprocal", "Elu", "Mish", "HardSigmoid"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
_MAX_PASSES = 512  # one node crossed per pass; the last block of a transformer has a few dozen


def push_token_gather(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where the token Gathers of its pooling are moved above the ops they can
    cross (see the module's docstring); `model` itself when nothing moves.
    """
    out = copy_model(model)
    if not _as_picks(out):
        return model
    _static_shapes(out)
    _split_fused_projections(out)
    for _ in range(_MAX_PASSES):
        if not _push_once(out):
            break
    _drop_dead_nodes(out)
    return out


# --------------------------------------------------------------------------- picks


def _token_index(g: _Graph, node) -> int | None:
    """The scalar index of a ``Gather(axis=1)`` of a 3-D tensor, else None."""
    if node.op_type != "Gather" or (attr(node, "axis", 0) or 0) != 1 or len(g.shape(node.input[0])) != 3:
        return None
    value = g.constant(node.input[1])
    if value is None or np.ndim(value) != 0:
        return None
    return int(value) % g.shape(node.input[0])[1] if isinstance(g.shape(node.input[0])[1], int) else int(value)


def _pick(g: _Graph, node) -> tuple | None:
    """``(axis, indices)`` of a pick (a Gather with a constant 1-D index on a non-batch axis), else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return None
    rank = len(g.shape(node.input[0]))
    value = g.constant(node.input[1])
    if not rank or value is None or np.ndim(value) != 1 or not len(value):
        return None
    axis = (attr(node, "axis", 0) or 0) % rank
    return (axis, tuple(int(v) for v in value)) if axis else None


def _key(axis: int, indices: tuple) -> str:
    return f"{axis}_{'_'.join(map(str, indices))}"


def _idx_name(indices: tuple) -> str:
    return f"cam_tok_idx_{'_'.join(map(str, indices))}"


def _as_picks(model: onnx.ModelProto) -> bool:
    """Replace the head's scalar token Gathers of each tensor by one pick and scalar Gathers of it."""
    g = _Graph.build(model)
    outputs = {o.name for o in model.graph.output}
    groups = {}
    for node in model.graph.node:
        index = _token_index(g, node)
        if index is not None:
            groups.setdefault(node.input[0], []).append((node, index))
    replaced, inits = {}, []
    for x, gathers in groups.items():
        readers = g.consumers.get(x, [])
        if x in outputs or g.producer.get(x) is None or len(readers) != len(gathers):
            continue  # something else reads every token
        indices = tuple(sorted({i for _, i in gathers}))
        key = _key(1, indices)
        picked, idx = f"cam_tok_{x}_{key}", _idx_name(indices)
        if idx not in {t.name for t in [*model.graph.initializer, *inits]}:
            inits.append(numpy_helper.from_array(np.array(indices, np.int64), idx))
        pick = helper.make_node("Gather", [x, idx], [picked], name=f"cam_tok_pick_{x}_{key}", axis=1)
        for k, (node, index) in enumerate(gathers):
            pos = f"cam_tok_pos_{indices.index(index)}"
            if pos not in {t.name for t in [*model.graph.initializer, *inits]}:
                inits.append(numpy_helper.from_array(np.array(indices.index(index), np.int64), pos))
            scalar = helper.make_node("Gather", [picked, pos], list(node.output), name=node.name, axis=1)
            replaced[id(node)] = [pick, scalar] if k == 0 else [scalar]
    if not replaced:
        return False
    nodes = [n for node in model.graph.node for n in replaced.get(id(node), [node])]
    del model.graph.node[:]
    model.graph.node.extend(_sorted(nodes, model))
    model.graph.initializer.extend(inits)
    return True


def _push_once(model: onnx.ModelProto) -> bool:
    g = _Graph.build(model)
    outputs = {o.name for o in model.graph.output}
    names = {t.name for t in model.graph.initializer}
    for gather in list(model.graph.node):
        pick = _pick(g, gather)
        if pick is None:
            continue
        x = gather.input[0]
        producer = g.producer.get(x)
        if producer is None or x in outputs or len(producer.output) != 1:
            continue
        readers = g.consumers.get(x, [])
        if not all(r.input[0] == x and _pick(g, r) == pick for r in readers):
            continue
        crossing = _crossing(g, producer, *pick, opset(model))
        if crossing is None:
            continue
        axis, indices = pick
        key = _key(axis, indices)
        new_nodes, new_inits = [], []
        inputs = list(producer.input)
        for i, value in crossing.constants.items():
            name = f"cam_tok_{inputs[i]}_{key}"
            if name not in names:
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
                names.add(name)
            inputs[i] = name
        for i, in_axis in crossing.picks.items():
            in_key = _key(in_axis, indices)
            picked, idx = f"cam_tok_{inputs[i]}_{in_key}", _idx_name(indices)
            if idx not in names:
                new_inits.append(numpy_helper.from_array(np.array(indices, np.int64), idx))
                names.add(idx)
            if g.producer.get(picked) is None and not any(picked in n.output for n in new_nodes):
                new_nodes.append(helper.make_node("Gather", [inputs[i], idx], [picked], axis=in_axis,
                                                  name=f"cam_tok_pick_{inputs[i]}_{in_key}"))
            inputs[i] = picked
        result = f"cam_tok_at_{x}_{key}"
        moved = helper.make_node(producer.op_type, inputs, [result], name=f"cam_tok_{producer.name or x}_{key}",
                                 domain=producer.domain)
        moved.attribute.extend(producer.attribute)
        new_nodes.append(moved)
        reader_outputs = {r.output[0] for r in readers}
        order = []
        for node in model.graph.node:
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


class _Crossing:
    """How a pick crosses a node: the inputs to pick (input index -> axis) and the constant
    inputs replaced by their picked values (input index -> array)."""

    def __init__(self, picks: dict, constants: dict | None = None):
        self.picks, self.constants = picks, constants or {}


def _crossing(g: _Graph, node, axis: int, indices: tuple, version: int) -> _Crossing | None:
    """How a pick on `axis` of `node`'s output crosses it, or None where it cannot."""
    op = node.op_type
    y = g.shape(node.output[0])
    rank = len(y)
    if node.domain not in ("", "ai.onnx") or not rank or not isinstance(y[axis], int):
        return None
    if op in _UNARY:
        return _Crossing({0: axis}) if len(g.shape(node.input[0])) == rank else None
    if op == "LayerNormalization":
        if len(node.output) != 1 or axis >= attr(node, "axis", -1) % rank:
            return None
        return _Crossing({0: axis})
    if op in ("Softmax", "LogSoftmax"):
        norm = attr(node, "axis", -1 if version >= 13 else 1) % rank
        # opset < 13 normalizes over every axis from `norm` on
        return _Crossing({0: axis}) if axis != norm and (version >= 13 or axis < norm) else None
    if op in _BINARY:
        return _binary(g, node, axis, indices, y)
    if op == "MatMul":
        a = g.shape(node.input[0])
        return _Crossing({0: axis}) if rank >= 2 and len(a) == rank and axis == rank - 2 else None
    if op == "Transpose":
        perm = attr(node, "perm", None) or list(range(rank))[::-1]
        return _Crossing({0: perm[axis]})
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(g, node)
        if axes is None:
            return None
        if op == "Squeeze":
            rank_in = len(g.shape(node.input[0]))
            kept = [i for i in range(rank_in) if i not in {a % rank_in for a in axes}]
            return _Crossing({0: kept[axis]})
        axes = {a % rank for a in axes}
        return None if axis in axes else _Crossing({0: axis - sum(a < axis for a in axes)})
    if op == "Reshape":
        return _reshape(g, node, axis, indices, y)
    return None


def _binary(g: _Graph, node, axis: int, indices: tuple, y: tuple) -> _Crossing | None:
    picks, constants = {}, {}
    for i, name in enumerate(node.input):
        value = g.constant(name)
        s = np.shape(value) if value is not None else g.shape(name)
        if value is None and not s:
            return None  # rank unknown
        at = axis - (len(y) - len(s))
        if at < 0 or s[at] == 1:
            continue  # broadcast along the picked axis
        if s[at] != y[axis]:
            return None
        if value is not None:
            constants[i] = np.take(value, indices, axis=at)
        else:
            picks[i] = at
    return _Crossing(picks, constants) if picks else None


def _axes(g: _Graph, node):
    if len(node.input) > 1 and node.input[1]:
        value = g.constant(node.input[1])
        return None if value is None else [int(a) for a in np.ravel(value)]
    axes = attr(node, "axes", None)
    return None if axes is None else list(axes)


def _reshape(g: _Graph, node, axis: int, indices: tuple, y: tuple) -> _Crossing | None:
    """A Reshape that keeps the picked axis whole: picked on the matching input axis, with a new shape."""
    x = g.shape(node.input[0])
    if attr(node, "allowzero", 0) or not x or axis < 1 or x[0] != y[0] or x[0] is None:
        return None
    if not all(isinstance(d, int) for d in (*x[1:], *y[1:])):
        return None
    before = int(np.prod(y[1:axis]))
    for b in range(1, len(x)):
        if int(np.prod(x[1:b])) == before and x[b] == y[axis] and int(np.prod(x[b + 1:])) == int(np.prod(y[axis + 1:])):
            break
    else:
        return None
    shape = [0, *y[1:]]
    shape[axis] = len(indices)
    return _Crossing({0: b}, {1: np.array(shape, np.int64)})


# --------------------------------------------------------------------------- fused projections


def _split_fused_projections(model: onnx.ModelProto) -> None:
    """Write a fused query-key-value projection as one projection per part, in place.

    timm computes ``qkv = x W + b`` ``(N, T, 3C)``, reshapes it to ``(N, T, 3, heads, d)``,
    moves the 3 to the front and splits it (``Split`` + ``Squeeze``, or ``Gather`` per part).
    Part ``i`` is ``x W[:, i C:(i + 1) C] + b[i C:(i + 1) C]``, reshaped and transposed the
    same way: written so, the query is a chain of its own, which a pick can cross down to ``x``
    (the head then projects one query, not ``T``).
    """
    g = _Graph.build(model)
    replace, inits = {}, []
    for node in model.graph.node:
        parts = _fused_parts(g, node)
        if parts is None:
            continue
        matmul, add, reshape, transpose, outs, n, readers = parts
        w = g.constant(matmul.input[1])
        bias = None if add is None else g.constant(next(i for i in add.input if i != matmul.output[0]))
        y = g.shape(reshape.output[0])
        order = list(attr(transpose, "perm"))
        width = w.shape[1] // n
        perm = [a - (a > order[0]) for a in order[1:]]  # the part axis order[0] gone
        shape = [0, *[d for i, d in enumerate(y) if i and i != order[0]]]
        base = f"cam_tok_part_{matmul.output[0]}"
        shape_name = f"{base}_shape"
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
        chain = []
        for i, out in enumerate(outs):
            wi, prod = f"{base}_w{i}", f"{base}_mm{i}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w[:, i * width:(i + 1) * width]), wi))
            chain.append(helper.make_node("MatMul", [matmul.input[0], wi], [prod], name=prod))
            if bias is not None:
                bi, prod_b = f"{base}_b{i}", f"{base}_add{i}"
                inits.append(numpy_helper.from_array(np.ascontiguousarray(bias[i * width:(i + 1) * width]), bi))
                chain.append(helper.make_node("Add", [prod, bi], [prod_b], name=prod_b))
                prod = prod_b
            heads = f"{base}_heads{i}"
            chain += [helper.make_node("Reshape", [prod, shape_name], [heads], name=heads),
                      helper.make_node("Transpose", [heads], [out], name=f"{base}_part{i}", perm=perm)]
        # (the index's nodes are copies from shape inference: matched by their first output)
        replace[transpose.output[0]] = chain
        replace.update({r.output[0]: [] for r in readers})
    if not replace:
        return
    nodes = [n for node in model.graph.node for n in replace.get(node.output[0] if node.output else None, [node])]
    model.graph.initializer.extend(inits)
    del model.graph.node[:]
    model.graph.node.extend(_sorted(nodes, model))
    _drop_dead_nodes(model)


def _fused_parts(g: _Graph, matmul):
    """``(MatMul, Add or None, Reshape, Transpose, part outputs, n, nodes splitting the parts)`` of a
    fused projection, else None."""
    if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
        return None
    w = g.constant(matmul.input[1])
    x = g.shape(matmul.input[0])
    if w is None or np.ndim(w) != 2 or len(x) < 2 or g.constant(matmul.input[0]) is not None:
        return None

    def sole_reader(name):
        readers = g.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    add, top = None, matmul.output[0]
    reader = sole_reader(top)
    if reader is not None and reader.op_type == "Add":
        other = next((i for i in reader.input if i != top), None)
        value = None if other is None else g.constant(other)
        if value is None or np.shape(value) != (w.shape[1],):
            return None
        add, top, reader = reader, reader.output[0], sole_reader(reader.output[0])
    if reader is None or reader.op_type != "Reshape" or attr(reader, "allowzero", 0):
        return None
    reshape = reader
    y = g.shape(reshape.output[0])
    lead = len(x) - 1  # (N, T, K) -> (N, T, n, heads, d): the leading dims kept
    if (len(y) != lead + 3 or tuple(y[:lead]) != tuple(x[:lead]) or x[0] is None
            or not all(isinstance(d, int) for d in y[1:]) or int(np.prod(y[lead:])) != w.shape[1]):
        return None
    transpose = sole_reader(reshape.output[0])
    if transpose is None or transpose.op_type != "Transpose" or attr(transpose, "perm", None) is None:
        return None
    perm = list(attr(transpose, "perm"))
    n = y[lead]
    if perm[0] != lead or n < 2:
        return None
    readers = list(g.consumers.get(transpose.output[0], []))
    outs = [None] * n
    if len(readers) == 1 and readers[0].op_type == "Split":
        split = readers[0]
        sizes = _axes(g, split) if len(split.input) > 1 else attr(split, "split", None)
        if ((attr(split, "axis", 0) or 0) != 0 or len(split.output) != n
                or (sizes is not None and list(sizes) != [1] * n)):
            return None
        for i, part in enumerate(split.output):
            squeeze = sole_reader(part)
            axes = None if squeeze is None or squeeze.op_type != "Squeeze" else _axes(g, squeeze)
            if axes is None or [a % (len(y)) for a in axes] != [0]:
                return None
            outs[i] = squeeze.output[0]
            readers.append(squeeze)
    else:
        for r in readers:
            index = g.constant(r.input[1]) if r.op_type == "Gather" and r.input[0] == transpose.output[0] else None
            if index is None or np.ndim(index) != 0 or (attr(r, "axis", 0) or 0) != 0 or outs[int(index) % n]:
                return None
            outs[int(index) % n] = r.output[0]
    if any(o is None for o in outs):
        return None
    return matmul, add, reshape, transpose, outs, n, readers


# --------------------------------------------------------------------------- graph upkeep


def _static_shapes(model: onnx.ModelProto) -> None:
    """Write ``Shape(x)`` of a tensor whose dims are known but for the batch (a graph input's first
    dim) as ``Concat(Shape(input)[:1], dims)``, in place."""
    g = _Graph.build(model)
    batch_of = {}
    for vi in model.graph.input:
        d = g.shape(vi.name)
        if d and isinstance(d[0], str):
            batch_of.setdefault(d[0], vi.name)
    nodes, inits, changed = [], [], False
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        d = g.shape(node.input[0]) if node.op_type == "Shape" else ()
        source = batch_of.get(d[0]) if d and isinstance(d[0], str) else None
        if source is None or not all(isinstance(v, int) for v in d[1:]) or node.input[0] == source:
            nodes.append(node)
            continue
        rank = len(d)
        start, end = attr(node, "start", 0), attr(node, "end", rank)
        span = range(rank)[slice(start, end)]
        rest = np.array([d[i] for i in span if i], np.int64)
        changed = True
        out = node.output[0]
        if 0 not in span:
            inits.append(numpy_helper.from_array(rest, out))
            continue
        dims_name, batch = f"cam_tok_dims_{out}", f"cam_tok_batch_{source}"
        inits.append(numpy_helper.from_array(rest, dims_name))
        if batch not in names:
            names.add(batch)
            whole = f"cam_tok_shape_{source}"
            begin, stop = f"cam_tok_zero_{source}", f"cam_tok_one_{source}"
            inits += [numpy_helper.from_array(np.array([0], np.int64), begin),
                      numpy_helper.from_array(np.array([1], np.int64), stop)]
            nodes += [helper.make_node("Shape", [source], [whole], name=whole),
                      helper.make_node("Slice", [whole, begin, stop], [batch], name=batch)]
        nodes.append(helper.make_node("Concat", [batch, dims_name], [out], name=node.name or out, axis=0))
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(_sorted(nodes, model, extra=inits))
        model.graph.initializer.extend(inits)


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove, in place, the nodes no graph output depends on, and initializers no node reads."""
    producer = {o: n for n in model.graph.node for o in n.output}
    live, stack = set(), [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in live]
    read = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
    inits = [t for t in model.graph.initializer if t.name in read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def _sorted(nodes, model: onnx.ModelProto, extra=()) -> list:
    """`nodes` in a topological order, the given order kept where it already is one (a reused
    pick may sit after a new reader)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ready |= {t.name for t in extra}
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
