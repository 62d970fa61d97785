"""Vision-transformer analysis of an ONNX graph: how the head pools tokens, and where the map is.

Pure functions on an ``onnx.ModelProto`` (onnx's shape inference, ``onnx.reference`` for constant
folding; one onnxruntime run only when inference leaves a needed shape unknown).  From the logits
back we find the nodes that reduce the token axis of a ``(N, T, C)`` token tensor:

- ``Gather`` (or a one-token ``Slice``) on the token axis: one token (CLS; CLS and distillation
  tokens when two are read, as DeiT with its teacher averages two heads);
- ``ReduceMean`` over the token axis, of all tokens or of a ``Slice`` that drops the prefix tokens
  (also ``ReduceMean``/``GlobalAveragePool`` over the last axis of the transposed ``(N, C, T)``,
  as an exported ``AdaptiveAvgPool1d``);
- both, concatenated (DINOv2);
- ``ReduceMean`` over H and W of a channels-last ``(N, h, w, C)`` map in a graph with attention
  (Swin).

The patch grid ``(gh, gw)`` is read from a 4-D tensor of the graph whose spatial cells hold the
patch tokens (the patch-embedding ``Conv`` output, or the ``Reshape`` that builds the map of a
stage), the one nearest the pooled token tensor; never from a square root.  The prefix count is
``T - gh * gw``.  The residual stream (``Add(x, f(x))`` with ``f`` reading ``x``) gives the token
tensors that can be explained, the last block's input (the residual input of the last ``Add``
whose branch holds attention) and the final norm's input (the last residual ``Add``'s output).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from camcore.backend import Head
from camcore.errors import CamError, NotCamCompatible
from camcore.tokens import TokenLayout

from . import onnx_graph, quant_graph
from ._proto import attr as _attr
from ._proto import node_label as _node_label
from .onnx_graph import _Graph, _layouts, _resolve_logits, _value_nodes, graph_inputs

__all__ = ["analyse", "find_token_head", "image_input", "input_feed_shape", "split_at_block_norm"]

# At most this many tokens before the patches (CLS, distillation, registers).
_MAX_PREFIX = 32


# --------------------------------------------------------------------------- input size


def _first_conv_channels(model: onnx.ModelProto, name: str) -> int | None:
    """Input channels of the first Conv reading `name` (through elementwise ops), from its weight."""
    weights = {t.name: t for t in model.graph.initializer}
    frontier, seen = [name], set()
    consumers = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    while frontier:
        tensor = frontier.pop(0)
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node.op_type == "Conv" and node.input[0] == tensor and node.input[1] in weights:
                w = weights[node.input[1]]
                return int(w.dims[1]) * int(_attr(node, "group", 1) or 1)
            if node.op_type in ("Sub", "Div", "Mul", "Add", "Cast", "Identity", "Pad"):
                frontier.extend(node.output)
    return None


def image_input(model: onnx.ModelProto):
    """The 4-D graph input that the image goes to, and its layout; ``(None, None)`` when there is none."""
    for spec in graph_inputs(model):
        if len(spec.shape) != 4:
            continue
        shape = spec.shape
        if shape[1] in (1, 3) or _first_conv_channels(model, spec.name) is not None:
            return spec, "NCHW"
        if shape[3] in (1, 3):
            return spec, "NHWC"
        return spec, "NCHW"
    return None, None


def input_feed_shape(model: onnx.ModelProto, spec, size=None, *, batch: int = 1) -> list:
    """A concrete shape for input `spec`: its static dims, `size` (H, W) for dynamic spatial axes and
    the first convolution's input channels for a dynamic channel axis (optimum declares every axis
    dynamic).

    Raises
    ------
    CamError
        A spatial axis is dynamic and no `size` was given.
    """
    shape = list(spec.shape)
    if len(shape) != 4:
        return [d if isinstance(d, int) else batch if axis == 0 else 1 for axis, d in enumerate(shape)]
    _, layout = image_input(model)
    c_axis, hw_axes = (1, (2, 3)) if layout != "NHWC" else (3, (1, 2))
    out = [batch if not isinstance(shape[0], int) else shape[0], *shape[1:]]
    if not isinstance(shape[c_axis], int):
        channels = _first_conv_channels(model, spec.name)
        out[c_axis] = channels if channels is not None else 3
    if any(not isinstance(shape[a], int) for a in hw_axes):
        if size is None:
            raise CamError(f"input {spec.name!r} has dynamic height and width {tuple(shape[a] for a in hw_axes)}: "
                           f"give the input size (--size HxW, or a Preprocess with its size)")
        hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        for a, v in zip(hw_axes, hw):
            out[a] = shape[a] if isinstance(shape[a], int) else v
    return out


def _concretized(model: onnx.ModelProto, spec, shape) -> onnx.ModelProto:
    """A copy whose input `spec` has the concrete non-batch dims of `shape` (for shape inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name == spec.name:
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
                if axis > 0:
                    dim.Clear()
                    dim.dim_value = int(shape[axis])
    return out


# --------------------------------------------------------------------------- token reads


@dataclasses.dataclass(frozen=True)
class _Read:
    kind: str  # "token" or "mean"
    source: str  # the (N, T, C) tensor read
    start: int
    end: int  # tokens [start, end); a token read has end = start + 1
    node: onnx.NodeProto
    out: str  # the pooled tensor


def _const_ints(g: _Graph, name: str):
    if not name:
        return None
    value = g.constant(name)
    return None if value is None else [int(v) for v in np.asarray(value).ravel()]


def _reduce_axes(g: _Graph, node) -> tuple | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _const_ints(g, node.input[1])
    if axes is None:
        return None
    rank = len(g.shape(node.input[0]))
    return tuple(sorted(int(a) % rank for a in axes)) if rank else None


# Ops that keep each token where it is: int8 graphs put a QuantizeLinear -> DequantizeLinear pair
# (per tensor, or per channel) on the tensors between the blocks and the pooling.
_PER_VALUE = ("Identity", "Cast", "QuantizeLinear", "DequantizeLinear")


def _token_reads(g: _Graph, nodes) -> list:
    """Every node on the logits' value path that reduces the token axis of a rank-3 tensor."""
    slices, transposed, reads = {}, {}, []
    lifted = {}  # (N, C, 1, T) or (N, C, T, 1) views of transposed tokens -> (source, token axis)
    for node in nodes:
        op, x = node.op_type, node.input[0] if node.input else ""
        shape = g.shape(x)
        if x in transposed and op == "Unsqueeze":  # dynamo's AdaptiveAvgPool1d: a 2-D pool of (N, C, 1, T)
            axes = _attr(node, "axes") or (_const_ints(g, node.input[1]) if len(node.input) > 1 else None)
            if axes is not None and len(axes) == 1 and axes[0] % 4 in (2, 3):
                lifted[node.output[0]] = (transposed[x], 3 if axes[0] % 4 == 2 else 2)
            continue
        if x in lifted and op in _PER_VALUE:  # an int8 graph's Q/DQ pair between the view and its pool
            lifted[node.output[0]] = lifted[x]
            continue
        if x in lifted and op in ("ReduceMean", "GlobalAveragePool", "AveragePool"):
            source, axis = lifted[x]
            axes = (2, 3) if op != "ReduceMean" else _reduce_axes(g, node)
            t = g.shape(source)[1]
            if op == "AveragePool" and onnx_graph._window_pool(g, node) is None:
                continue
            if axes is not None and axis in axes and set(axes) <= {2, 3}:
                reads.append(_Read("mean", source, 0, t if isinstance(t, int) else None, node, node.output[0]))
            continue
        if len(shape) != 3:
            continue
        tokens = shape[1]
        if op == "Transpose" and tuple(_attr(node, "perm", ())) == (0, 2, 1):
            transposed[node.output[0]] = x
        elif op in _PER_VALUE and x in transposed:
            transposed[node.output[0]] = transposed[x]
        elif op == "Slice":
            starts, ends = _const_ints(g, node.input[1]), _const_ints(g, node.input[2])
            axes = _const_ints(g, node.input[3]) if len(node.input) > 3 else list(range(len(starts or ())))
            steps = _const_ints(g, node.input[4]) if len(node.input) > 4 else None
            if starts is None or ends is None or axes is None:
                continue
            axes = [a % 3 for a in axes]
            if 1 not in axes or (steps and steps[axes.index(1)] != 1):
                continue
            i = axes.index(1)
            start, end = _span(starts[i], ends[i], tokens)
            if start is None or (x in slices and slices[x][2] is not None and end is None):
                continue
            base = slices.get(x, (x, 0, None))
            slices[node.output[0]] = (base[0], base[1] + start, None if end is None else base[1] + end)
        elif op == "Split" and _attr(node, "axis", 0) % 3 == 1:
            sizes = _attr(node, "split") or (_const_ints(g, node.input[1]) if len(node.input) > 1 else None)
            if not sizes or len(sizes) != len(node.output):
                continue
            base, offset, _ = slices.get(x, (x, 0, None))
            for out, size in zip(node.output, sizes):
                slices[out] = (base, offset, offset + int(size))
                offset += int(size)
        elif op in ("LayerNormalization", *_PER_VALUE) and x in slices:
            slices[node.output[0]] = slices[x]  # per-token ops keep the token range they read
        elif op == "Gather" and _attr(node, "axis", 0) % 3 == 1:
            index = _const_ints(g, node.input[1])
            if index is None or len(index) != 1 or (index[0] < 0 and not isinstance(tokens, int)):
                continue
            i = index[0] + tokens if index[0] < 0 else index[0]
            source, offset = (slices[x][0], slices[x][1]) if x in slices else (x, 0)
            reads.append(_Read("token", source, offset + i, offset + i + 1, node, node.output[0]))
        elif op in ("ReduceMean", "GlobalAveragePool"):
            axes = (2,) if op == "GlobalAveragePool" else _reduce_axes(g, node)
            if axes == (1,) and x not in transposed:
                if x in slices:
                    source, start, end = slices[x]
                else:
                    source, start, end = x, 0, tokens if isinstance(tokens, int) else None
                reads.append(_Read("mean", source, start, end, node, node.output[0]))
            elif axes == (2,) and x in transposed:
                source = transposed[x]
                t = g.shape(source)[1]
                reads.append(_Read("mean", source, 0, t if isinstance(t, int) else None, node, node.output[0]))
        elif op in ("Squeeze", "Reshape", "Flatten") and x in slices:
            source, start, end = slices[x]
            if end is not None and end - start == 1 and len(g.shape(node.output[0])) == 2:
                reads.append(_Read("token", source, start, end, node, node.output[0]))
    return reads


def _span(start: int, end: int, tokens) -> tuple:
    """``[start, end)`` of a Slice on `tokens` tokens, clamped; end None for "to the last token"
    when the count is unknown; ``(None, None)`` when it cannot be told."""
    if isinstance(tokens, int):
        return tuple(max(0, min(v + tokens if v < 0 else v, tokens)) for v in (start, end))
    if start < 0 or end < 0:
        return None, None
    return start, None if end >= 2 ** 31 - 1 else end


# --------------------------------------------------------------------------- grid and stream


def _order_of(g: _Graph, tensor: str) -> int:
    node = g.producer.get(tensor)
    return g.order[id(node)] if node is not None else -1


def _grid_candidates(g: _Graph, nodes) -> list:
    """4-D maps that can hold patch tokens: ``(name, layout, rank)``; rank 0 for maps made by spatial
    ops (Conv, the image), 1 for a Reshape between a token sequence and a map."""
    layouts = _layouts(g)
    out = []
    for node in nodes:
        for name in node.output:
            if name in layouts:
                out.append((name, layouts[name], 0))
        if node.op_type == "Reshape":
            src, dst = g.shape(node.input[0]), g.shape(node.output[0])
            if len(src) == 3 and len(dst) == 4 and node.output[0] not in layouts:
                if dst[3] == src[2]:  # (N, h*w, C) -> (N, h, w, C)
                    out.append((node.output[0], "NHWC", 1))
            elif len(src) == 4 and len(dst) == 3 and node.input[0] not in layouts:
                if src[3] == dst[2]:  # (N, h, w, C) -> (N, h*w, C)
                    out.append((node.input[0], "NHWC", 1))
                elif src[1] == dst[1]:  # (N, C, h, w) -> (N, C, h*w)
                    out.append((node.input[0], "NCHW", 1))
    return list({c[0]: c for c in out}.values())


def _grid(g: _Graph, candidates, shapes: dict, source: str, tokens: int, channels: int, prefix: int | None):
    """``(gh, gw, tensor)`` of the map nearest `source` whose cells hold its patch tokens."""
    here = _order_of(g, source)
    found = []
    for name, layout, rank in candidates:
        shape = shapes.get(name) or g.shape(name)
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            continue
        c, h, w = (shape[1], *shape[2:]) if layout == "NCHW" else (shape[3], *shape[1:3])
        extra = tokens - h * w
        if channels is not None and c != channels and rank > 0:
            continue
        if (prefix is not None and extra != prefix) or not 0 <= extra <= _MAX_PREFIX:
            continue
        found.append((h == 1 or w == 1, extra, rank, abs(_order_of(g, name) - here), h, w, name))
    if not found:
        return None
    *_, h, w, name = min(found)
    return h, w, name


def _depends(g: _Graph, tensor: str, on: str) -> bool:
    """Whether `tensor` is computed from `on` (walking producers back, not before `on` is made)."""
    floor = _order_of(g, on)
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t == on:
            return True
        if t in seen:
            continue
        seen.add(t)
        node = g.producer.get(t)
        if node is None or g.order[id(node)] <= floor or node.op_type in ("Shape", "Size"):
            continue  # a value read only for its shape is no data dependency
        stack.extend(i for i in node.input if i)
    return False


def _fits(found: tuple, shape: tuple) -> bool:
    """Whether an inferred shape may be `shape` (same rank; unknown dims match; batch ignored)."""
    return len(found) == len(shape) and all(not isinstance(a, int) or not isinstance(b, int) or a == b
                                            for a, b in zip(found[1:], shape[1:]))


def _residual_adds(g: _Graph, nodes, shape: tuple) -> list:
    """``(node, residual, branch)`` of each ``Add(x, f(x))`` on the value path with outputs of `shape`."""
    found = []
    for node in nodes:
        if node.op_type != "Add" or len(node.input) != 2 or not _fits(g.shape(node.output[0]), shape):
            continue
        a, b = node.input
        if a in g.constants or b in g.constants or g.constant(a) is not None or g.constant(b) is not None:
            continue
        if not (_fits(g.shape(a), shape) and _fits(g.shape(b), shape)):
            continue
        if _reads(g, b, a):
            found.append((node, a, b))
        elif _reads(g, a, b):
            found.append((node, b, a))
    return found


def _reads(g: _Graph, branch: str, x: str) -> bool:
    """Whether `branch` is computed from `x`, or from the int8 tensor that `x` dequantizes (a
    QOperator graph: the Add and the branch each dequantize the stream on their own)."""
    if _depends(g, branch, x):
        return True
    node = g.producer.get(x)
    return node is not None and node.op_type == "DequantizeLinear" and _depends(g, branch, node.input[0])


def _final_norm_input(g: _Graph, source: str) -> str | None:
    """The input of the LayerNormalization that makes `source` (through reshapes), if one does."""
    tensor = source
    while True:
        node = g.producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "LayerNormalization":
            return node.input[0]
        if node.op_type not in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", *_PER_VALUE):
            return None
        tensor = node.input[0]


def _has_attention(g: _Graph, branch: str, residual: str) -> bool:
    node = g.producer.get(residual)
    if node is not None and node.op_type == "DequantizeLinear":
        residual = node.input[0]  # the int8 stream, which the branch may dequantize on its own (`_reads`)
    return any(n.op_type in ("Softmax", "Attention", "MultiHeadAttention")
               for n in g.ancestors(branch, stop=residual, shape_only_stops=True))


def _attention_probabilities(g: _Graph, nodes) -> tuple:
    out = []
    for node in nodes:
        if node.op_type != "Softmax":
            continue
        shape = g.shape(node.output[0])
        if len(shape) == 4 and (shape[-1] == shape[-2] or not isinstance(shape[-1], int)):
            out.append(node.output[0])
    return tuple(out)


# --------------------------------------------------------------------------- the analysis


@dataclasses.dataclass(frozen=True)
class TokenAnalysis:
    """What `analyse` found: the `TokenLayout`, and what the head needs."""

    layout: TokenLayout
    reads: tuple  # the _Read nodes of the pooling
    shape: tuple  # (N, T, C) of the source, or (N, h, w, C)
    graph: _Graph
    logits: str
    output: str
    scoring: str
    spec: object  # the image input's TensorSpec


def _run_shapes(model: onnx.ModelProto, names, spec, feed_shape) -> dict:
    """Shapes of `names` from one onnxruntime run on zeros at `feed_shape` (inference left them unknown)."""
    from .ort_runtime import make_session

    exposed = onnx_graph.expose_outputs(model, names)
    feed = {s.name: np.zeros(feed_shape if s.name == spec.name else
                             [d if isinstance(d, int) else 1 for d in s.shape], s.dtype)
            for s in graph_inputs(model)}
    session = make_session(exposed, ["CPUExecutionProvider"])
    try:
        values = session.run(list(names), feed)
    except Exception as exc:
        raise CamError(f"cannot run the model on a zero input of shape {tuple(feed_shape)} to read its token "
                       f"shapes: {str(exc).splitlines()[0]}") from None
    return {name: ("N", *v.shape[1:]) for name, v in zip(names, values)}


def _maybe_transformer(model: onnx.ModelProto) -> bool:
    """A cheap first look (no shape inference): a layer norm (fused, or as a ReduceMean over the last
    axis) or a MatMul of two computed tensors (attention's ``q @ k``).  A CNN has neither, and skips
    the token analysis."""
    constants = {t.name for t in model.graph.initializer}
    constants.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            return True
        if node.op_type == "ReduceMean" and list(_attr(node, "axes", None) or []) in ([-1], [2]):
            return True
        if node.op_type == "MatMul" and not any(i in constants for i in node.input[:2]):
            return True
    return False


def analyse(model: onnx.ModelProto, *, logits=None, output=None, size=None) -> TokenAnalysis | None:
    """Find how a vision transformer's head pools its tokens; None when the graph pools no tokens.

    Parameters
    ----------
    model : onnx.ModelProto
    logits, output : str, optional
        As in `onnx_graph.find_head`.
    size : int or (H, W), optional
        The input size, for a model whose spatial input axes are dynamic.

    Returns
    -------
    TokenAnalysis or None
    """
    spec, _ = image_input(model)
    if spec is None or not _maybe_transformer(model):
        return None
    static = all(isinstance(d, int) for d in spec.shape[1:])
    try:
        feed_shape = input_feed_shape(model, spec, size)
    except CamError:
        feed_shape = None  # only what inference tells without the size
    g = _Graph.build(_concretized(model, spec, feed_shape) if feed_shape and not static else model)
    output, logits, scoring = _resolve_logits(g, None, logits, output)
    nodes = _value_nodes(g, logits)
    reads = _token_reads(g, nodes)
    if not reads:
        return _analyse_channels_last(g, nodes, logits, output, scoring, spec, feed_shape)
    last = max(reads, key=lambda r: _order_of(g, r.source))
    reads = [r for r in reads if r.source == last.source]
    source = last.source
    shape = g.shape(source)
    if not all(isinstance(d, int) for d in shape[1:]):
        if feed_shape is None:
            raise CamError(f"the token count of {source!r} depends on the input size: give it (--size HxW)")
        shape = _run_shapes(model, [source], spec, feed_shape)[source]
    tokens, channels = shape[1], shape[2]
    reads = [dataclasses.replace(r, end=tokens) if r.end is None else r for r in reads]
    kind, prefix, detail = _pooling_kind(reads, tokens, source)
    candidates = _grid_candidates(g, nodes)
    found = _grid(g, candidates, {}, source, tokens, channels, prefix)
    if found is None:  # LeViT: the map of the stage is cut from the previous stage's (other channels)
        found = _grid(g, candidates, {}, source, tokens, None, prefix)
    if found is None and feed_shape is not None:  # inference left the maps' sizes unknown: run once
        names = [c[0] for c in candidates if not all(isinstance(d, int) for d in g.shape(c[0])[1:])]
        if names:
            shapes = _run_shapes(model, names, spec, feed_shape)
            found = _grid(g, candidates, shapes, source, tokens, channels, prefix) or \
                _grid(g, candidates, shapes, source, tokens, None, prefix)
    if found is None and feed_shape is None:
        raise CamError(f"the patch grid of the {tokens} tokens of {source!r} depends on the input size, which the "
                       f"model leaves dynamic: give it (--size HxW)")
    if found is None:
        raise NotCamCompatible(f"no patch grid found for the {tokens} tokens of {source!r}: no 4-D map in the "
                               f"graph holds {tokens - (prefix or 0)} patches")
    gh, gw, grid_tensor = found
    prefix = tokens - gh * gw
    layout = _layout(g, nodes, kind, prefix, (gh, gw), source, shape, detail, spec, feed_shape)
    return TokenAnalysis(layout, tuple(reads), tuple(shape), g, logits, output, scoring, spec)


def _pooling_kind(reads, tokens: int, source: str) -> tuple:
    """``(kind, prefix or None, detail)`` from the token reads of one source."""
    picked = sorted({r.start for r in reads if r.kind == "token" or r.end - r.start == 1})
    means = [r for r in reads if r.kind == "mean" and r.end - r.start > 1]
    where = f"of {source!r} ({tokens} tokens)"
    if len(means) > 1 or (means and means[0].end != tokens):
        spans = ", ".join(f"[{m.start}:{m.end}]" for m in means)
        raise NotCamCompatible(f"unknown token pooling: means over tokens {spans} {where}")
    mean = means[0] if means else None
    if mean is None:
        if picked == [0]:
            return "cls", None, f"token 0 (CLS) {where}"
        if picked == [0, 1]:
            return "cls_dist_mean", None, f"tokens 0 and 1 (CLS, distillation) {where}, each through its head"
        return "cls", None, f"tokens {picked} {where}"
    label = _node_label(mean.node)
    if picked:
        if picked != [0] or mean.start == 0:
            raise NotCamCompatible(f"unknown token pooling: tokens {picked} and a mean over "
                                   f"[{mean.start}:{mean.end}] {where}")
        return ("cls_concat_mean", mean.start,
                f"token 0 (CLS) concatenated with the mean of tokens [{mean.start}:{tokens}] ({label}) {where}")
    if mean.start > 0:
        return ("token_mean_no_prefix", mean.start,
                f"mean of tokens [{mean.start}:{tokens}], the first {mean.start} sliced off ({label}) {where}")
    return "token_mean", None, f"{label}: mean over all tokens {where}"


def _layout(g, nodes, kind, prefix, grid, source, shape, detail, spec, feed_shape) -> TokenLayout:
    stream_shape = tuple(shape)
    adds = _residual_adds(g, nodes, stream_shape)
    here = _order_of(g, source)
    before = [a for a in adds if g.order[id(a[0])] <= here]
    norm_input = _final_norm_input(g, source) or (before[-1][0].output[0] if before else source)
    attended = [a for a in before if _has_attention(g, a[2], a[1])]
    if attended:
        block_input = attended[-1][1]
    elif len(before) >= 2:  # no attention to read (focal modulation): two residual sub-layers a block
        block_input = before[-2][1]
    else:
        block_input = before[-1][1] if before else source
    stream = [a[1] for a in adds[:1]] + [a[0].output[0] for a in adds] + [source, block_input, norm_input]
    tensors = sorted(dict.fromkeys(t for t in stream if _fits(g.shape(t), stream_shape)),
                     key=lambda t: _order_of(g, t))
    size = ()
    _, image_layout = image_input(g.model)
    if feed_shape is not None:
        size = tuple(int(v) for v in (feed_shape[1:3] if image_layout == "NHWC" else feed_shape[2:4]))
    stride = (size[0] // grid[0], size[1] // grid[1]) if size else (1, 1)
    return TokenLayout(kind, int(prefix), tuple(int(v) for v in grid), stride, size, source, detail,
                       tuple((t, ("N", *stream_shape[1:])) for t in tensors),
                       block_input, norm_input, _attention_probabilities(g, nodes), image_layout or "NCHW")


def _analyse_channels_last(g, nodes, logits, output, scoring, spec, feed_shape) -> TokenAnalysis | None:
    """Swin: a ReduceMean over H and W of a channels-last map, in a graph with attention."""
    if not _attention_probabilities(g, nodes) and not any(len(g.shape(n.output[0])) == 3 for n in nodes
                                                         if n.op_type == "LayerNormalization"):
        return None
    pools = []
    for node in nodes:
        if node.op_type == "ReduceMean" and len(g.shape(node.input[0])) == 4 and _reduce_axes(g, node) == (1, 2):
            pools.append(node)
    if not pools:
        return None
    node = pools[-1]
    source = node.input[0]
    shape = g.shape(source)
    if not all(isinstance(d, int) for d in shape[1:]):
        if feed_shape is None:
            return None
        shape = _run_shapes(g.model, [source], spec, feed_shape)[source]
    h, w = shape[1:3]
    detail = f"{_node_label(node)}: mean over H and W of the channels-last map {source!r}"
    read = _Read("mean", source, 0, h * w, node, node.output[0])
    layout = _layout(g, nodes, "spatial_mean", 0, (h, w), source, tuple(shape), detail, spec, feed_shape)
    return TokenAnalysis(layout, (read,), tuple(shape), g, logits, output, scoring, spec)


# --------------------------------------------------------------------------- the head


def _affine_patch_mean(a: TokenAnalysis):
    """``(weights, bias)`` when the pooling is one mean over exactly the patch tokens feeding an affine
    head (CAM is then exact on the grid), else ``(None, reason)``."""
    layout = a.layout
    patch_mean = layout.pooling in ("spatial_mean", "token_mean_no_prefix") or (
        layout.pooling == "token_mean" and layout.prefix == 0)
    if not patch_mean or len(a.reads) != 1:
        if layout.pooling == "token_mean":
            return None, f"the mean over tokens includes {layout.prefix} prefix tokens, which have no place on the grid"
        return None, (f"no global average pooling over the patch tokens: the head pools tokens as "
                      f"{layout.pooling} ({layout.detail})")
    read = a.reads[0]
    g = a.graph
    if quant_graph.is_quantized(g.model):  # as for a CNN: the dequantized classifier (issue 20)
        g = _Graph.build(quant_graph.dequantized(g.model))
    pooled = read.out
    try:
        nodes = onnx_graph._check_head_structure(g, pooled, a.logits, a.output)
    except NotCamCompatible as exc:
        return None, str(exc)
    channels = a.shape[-1]
    pooled_shape = tuple(1 for _ in g.shape(pooled)[:-1]) + (channels,) if g.shape(pooled) else (1, channels)
    pooled_shape = (1, *pooled_shape[1:]) if len(pooled_shape) > 1 else (1, channels)
    elem = g.elem_type(pooled) or onnx.TensorProto.FLOAT
    pooled_type = helper.make_tensor_type_proto(elem, ["probe_batch", *pooled_shape[1:]])
    try:
        probe = onnx_graph._probe_model(g, pooled, a.logits, pooled_type)
        run = onnx_graph._probe_runner(probe, pooled, g)
        batch = a.spec.shape[0] if isinstance(a.spec.shape[0], int) else 1
        weights, bias = onnx_graph._recover_affine(run, pooled_shape, len(pooled_shape) - 1, channels,
                                                   onnx_graph.np_dtype(elem),
                                                   onnx_graph._product_label(g, nodes, pooled), fixed_batch=batch)
    except NotCamCompatible as exc:
        return None, str(exc)
    return (weights, bias), ""


def find_token_head(model: onnx.ModelProto, *, feature=None, logits=None, output=None, size=None) -> Head | None:
    """The `Head` of a vision transformer, or None when the graph pools no tokens (a CNN).

    The target (`Head.feature`) is, unless `feature` names another token tensor:

    - under CLS pooling (``cls``, ``cls_dist_mean``, ``cls_concat_mean``), the input of the last
      block.  The head reads the CLS token alone, and after the last block's attention nothing
      mixes tokens (the MLP, the norms and the residual are per token), so the gradient of the
      logits at the last block's *output* is exactly zero on every patch token;
    - under a mean over exactly the patch tokens feeding an affine head, the mean's input: CAM is
      exact there (``logits = W mean_grid(tokens) + b``), and Grad-CAM equals it;
    - under any other mean pooling, the input of the final norm (the last block's output).

    Raises
    ------
    NotCamCompatible
        `feature` is not one of the token tensors; a token pooling camcore cannot read.
    """
    a = analyse(model, logits=logits, output=output, size=size)
    if a is None:
        return None
    layout, g = a.layout, a.graph
    names = [t[0] for t in layout.tensors]
    if len(a.shape) == 4:  # Swin: the channels-last map is a CNN feature map with attention before it
        target = feature or (layout.source if feature is None else feature)
        try:
            head = onnx_graph.find_head(model, feature=target, logits=logits, output=output)
        except NotCamCompatible as refusal:
            target = feature or layout.norm_input
            if target not in names:
                head = onnx_graph.find_target(model, feature=target, logits=logits, output=output,
                                              cam_refusal=str(refusal))
                return dataclasses.replace(head, tokens=layout)
            # a residual-stream map whose layout the CNN analysis cannot follow (made by a Reshape)
            classes = g.shape(a.logits)[-1] if g.shape(a.logits) else 0
            return Head(weights=None, bias=None, feature=target, logits=a.logits, layout="NHWC",
                        pooling=a.reads[0].node.op_type, input=a.spec, inputs=graph_inputs(model),
                        feature_shape=("N", *a.shape[1:]), scoring=a.scoring, output=a.output,
                        pooling_node=a.reads[0].node.name or a.reads[0].out, pooling_detail=layout.detail,
                        num_classes=classes if isinstance(classes, int) else 0, channels=int(a.shape[-1]),
                        cam_refusal=str(refusal), tokens=layout)
        return dataclasses.replace(head, tokens=layout)
    if feature is not None and feature not in names:
        if feature in _layouts(g):
            return None  # a 4-D map made by spatial ops (the patch embedding): the CNN analysis takes it
        shown = ", ".join(repr(n) for n in names[-4:])
        raise NotCamCompatible(f"tensor {feature!r} is not a token tensor of shape {_shape_text(a.shape)} "
                               f"on the residual stream; the last ones are {shown} (camcore inspect lists them)")
    affine, reason = _affine_patch_mean(a)
    if feature is None:
        if affine is not None:
            feature = a.reads[0].source
        elif layout.pooling in ("cls", "cls_dist_mean", "cls_concat_mean"):
            feature = layout.block_input
        else:
            feature = layout.norm_input
    if affine is not None and feature != a.reads[0].source:
        affine, reason = None, f"CAM is exact only at the pooled tensor {a.reads[0].source!r}"
    weights, bias = affine if affine is not None else (None, None)
    specs = graph_inputs(model)
    classes = g.shape(a.logits)[-1] if g.shape(a.logits) else 0
    read = a.reads[-1]
    return Head(
        weights=weights, bias=bias, feature=feature, logits=a.logits, layout="NTC",
        pooling=read.node.op_type, input=a.spec, inputs=specs,
        feature_shape=(g.shape(feature)[0] if g.shape(feature) else "N", *a.shape[1:]),
        scoring=a.scoring, output=a.output, extra={"pooled": read.out} if weights is not None else {},
        pooling_node=read.node.name or read.out, pooling_detail=layout.detail,
        num_classes=classes if isinstance(classes, int) else 0, channels=int(a.shape[-1]),
        cam_refusal=reason, tokens=layout,
    )


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in shape) + ")"


# --------------------------------------------------------------------------- ViT Recipro-CAM after the norm


def split_at_block_norm(head: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """The head from `target` with the first LayerNorm of the block it enters taken out.

    OpenVINO XAI's ViT Recipro-CAM masks the last block's input twice: in the residual stream
    and after the block's first ``LayerNormalization`` (the attention branch's input).  A
    masked copy of the tokens through that norm is not the masked norm (the norm rescales each
    token), so both tensors are fed: the head gets the norm's output as a second input.

    Parameters
    ----------
    head : onnx.ModelProto
        The head alone, ``target`` its first input (`backprop.cut_head`).  Not modified.
    target : str
        The token tensor ``(N, T, C)`` that the head starts from.

    Returns
    -------
    split : onnx.ModelProto
        A copy of `head` without the norm, whose inputs are ``target``, the norm's output, then
        the frontier.
    norm : onnx.ModelProto
        The norm alone: ``target`` -> its output (to normalize unmasked tokens).
    name : str
        The norm's output.

    Raises
    ------
    NotCamCompatible
        When `target` is not read by exactly one ``LayerNormalization`` and by the residual
        stream (a decomposed norm, or a tensor that enters no block).
    """
    graph = head.graph
    readers = [n for n in graph.node if target in n.input]
    norms = [n for n in readers if n.op_type == "LayerNormalization" and n.input[0] == target]
    if len(norms) != 1 or len(readers) < 2:
        found = ", ".join(sorted(n.op_type for n in readers)) or "nothing"
        raise NotCamCompatible(f"masking after the norm needs {target!r} to enter a block: read by one "
                               f"LayerNormalization and the residual stream, it is read by {found}")
    norm = norms[0]
    name = norm.output[0]
    start = next(i for i in graph.input if i.name == target)
    out = onnx.ModelProto()
    out.CopyFrom(head)
    del out.graph.node[:]
    out.graph.node.extend(n for n in graph.node if n is not norm)
    normalized = helper.make_tensor_value_info(name, start.type.tensor_type.elem_type,
                                               [d.dim_param or d.dim_value for d in start.type.tensor_type.shape.dim])
    inputs = [start, normalized] + [i for i in graph.input if i.name != target]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    del out.graph.value_info[:]
    params = [t for t in graph.initializer if t.name in norm.input[1:]]
    if len(params) != len([i for i in norm.input[1:] if i]):
        raise NotCamCompatible(f"the LayerNormalization reading {target!r} has non-constant scale or bias")
    alone = helper.make_graph([norm], "cam_block_norm", [start], [helper.make_tensor_value_info(
        name, start.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in start.type.tensor_type.shape.dim])],
        params)
    norm_model = helper.make_model(alone, opset_imports=list(head.opset_import))
    norm_model.ir_version = head.ir_version
    return out, norm_model, name
