"""ONNX graph analysis: find the global average pooling, the feature tensor and the affine head.

The head is not pattern-matched.  We walk back from an output to the logits,
find the last global *average* pooling the logits depend on, cut the graph at
the pooled tensor and read the affine map ``logits = W @ pooled + b`` back by
feeding probes (zeros and unit vectors), then check it on random vectors.  Any
chain of affine ops (Gemm with alpha/beta/transB, MatMul+Add, 1x1 Conv,
BatchNormalization, scalar Mul/Div, Dropout, Casts, computed Reshapes, weights
made by nodes) is handled without per-pattern code.

Every function that edits a graph returns a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference

from camcore.backend import Head, TensorSpec
from camcore.errors import CamError, NotCamCompatible

from ._proto import SHAPE_ONLY, attr, copy_model, dims, node_label, text_attr, value_types
from .contrib_ops import complete_types  # types of fused com.microsoft ops (onnxruntime's offline optimization)

__all__ = [
    "load_model",
    "read_model",
    "find_head",
    "find_target",
    "candidate_layers",
    "fold_constants",
    "sole_average_pool",
    "expose_outputs",
    "graph_inputs",
    "np_dtype",
]

# Walked through between an output and the logits tensor.
_PASS_THROUGH = {"Identity", "Cast", "Flatten", "Reshape", "Squeeze", "Unsqueeze"}
_ACTIVATIONS = {"Softmax": "softmax", "LogSoftmax": "softmax", "Sigmoid": "sigmoid"}
_AVERAGE_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool"}
_MAX_POOLS = {"GlobalMaxPool", "ReduceMax", "MaxPool", "GlobalLpPool"}
# Ops that keep a head affine in the pooled tensor (products of two pooled-dependent
# tensors are caught by the numerical check).
_AFFINE_OPS = {
    "Add", "BatchNormalization", "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape",
    "Conv", "Div", "Dropout", "Einsum", "Expand", "Flatten", "Gather", "Gemm", "Identity",
    "MatMul", "Mul", "Neg", "Pad", "ReduceMean", "ReduceSum", "Reshape", "Shape", "Size",
    "Slice", "Split", "Squeeze", "Sub", "Sum", "Tile", "Transpose", "Unsqueeze",
}
_INTEGER_TYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                  onnx.TensorProto.UINT16}
_PROBE_BATCH = 512
# Constant subgraphs larger than this are not folded (shape arithmetic is a few nodes).
_MAX_FOLD_NODES = 64


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


# --------------------------------------------------------------------------- loading


def load_model(model) -> tuple[onnx.ModelProto, Path | None]:
    """Read a model from a path or copy a ``ModelProto``; external data is loaded safely.

    External-data files are read from the model's own folder only: a location that is
    absolute or escapes that folder is refused.

    Returns
    -------
    model : onnx.ModelProto
        A copy the caller may edit.
    folder : Path or None
        The model's folder (None for an in-memory model).
    """
    proto, folder, _ = read_model(model)
    return proto, folder


def read_model(model, data: bytes | None = None) -> tuple[onnx.ModelProto, Path | None, bool]:
    """`load_model`, also telling whether the model had external data.

    Parameters
    ----------
    model : path or onnx.ModelProto
    data : bytes, optional
        The file's bytes when the caller already read them (`model` is then the path
        they came from, for messages and external data).

    Returns
    -------
    model : onnx.ModelProto
    folder : Path or None
    external : bool
        Some tensors were read from external-data files (once loaded, the proto no
        longer says so).
    """
    from onnx import external_data_helper as edh

    if isinstance(model, onnx.ModelProto):
        proto = copy_model(model)
        if any(edh.uses_external_data(t) for t in edh._get_all_tensors(proto)):
            raise CamError("the in-memory model refers to external data; pass the .onnx path instead")
        return complete_types(proto), None, False
    if not isinstance(model, (str, os.PathLike)):
        raise CamError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if data is None and not path.is_file():
        raise CamError(f"model file not found: {path}")
    try:
        if data is None:
            proto = onnx.load_model(str(path), load_external_data=False)
        else:  # the format onnx.load_model would infer from the file name
            fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
            proto = onnx.load_model_from_string(data, format=fmt or "protobuf")
    except Exception as exc:
        raise CamError(f"cannot read {path}: not a valid ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise CamError(f"cannot read {path}: not a valid ONNX model (empty graph)")
    folder = path.resolve().parent
    external = False
    for tensor in edh._get_all_tensors(proto):
        if not edh.uses_external_data(tensor):
            continue
        external = True
        info = edh.ExternalDataInfo(tensor)
        target = (folder / info.location).resolve()
        if os.path.isabs(info.location) or folder not in target.parents:
            raise CamError(
                f"external data of tensor {tensor.name!r} points outside the model folder: {info.location!r}"
            )
        if not target.is_file():
            raise CamError(f"external data file missing for tensor {tensor.name!r}: {target}")
    try:
        edh.load_external_data_for_model(proto, str(folder))
    except Exception as exc:
        raise CamError(f"cannot load the external data of {path}: {exc}") from None
    return complete_types(proto), folder, external


# --------------------------------------------------------------------------- graph helpers


@dataclass
class _Graph:
    """Index of one (shape-inferred) graph."""

    model: onnx.ModelProto
    producer: dict
    consumers: dict
    order: dict
    types: dict
    constants: dict
    folded: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> "_Graph":
        try:
            inferred = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # a graph inference rejects is still analysed, with fewer types known
            inferred = model
        g = inferred.graph
        producer, consumers, order = {}, {}, {}
        for i, node in enumerate(g.node):
            order[id(node)] = i
            for out in node.output:
                producer[out] = node
            for inp in node.input:
                consumers.setdefault(inp, []).append(node)
        constants = {t.name: t for t in g.initializer}
        return cls(inferred, producer, consumers, order, value_types(g), constants)

    def shape(self, name: str) -> tuple:
        return (dims(self.types[name]) or ()) if name in self.types else ()  # () for an unknown rank

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None else None

    def constant(self, name: str) -> np.ndarray | None:
        """Value of a tensor computed from constants alone, else None.

        Initializers are read directly; anything else (Constant nodes, and subgraphs of
        constants such as tf2onnx's ``Cast(int32 initializer)`` axes) is evaluated with
        `onnx.reference` on the subgraph that produces it.
        """
        if name in self.constants:
            return onnx.numpy_helper.to_array(self.constants[name])
        if name not in self.folded:
            self.folded[name] = self._fold(name)
        return self.folded[name]

    def _fold(self, name: str) -> np.ndarray | None:
        nodes = self.ancestors(name)
        if not nodes or len(nodes) > _MAX_FOLD_NODES:
            return None
        produced = {o for n in nodes for o in n.output}
        leaves = {i for n in nodes for i in n.input if i and i not in produced}
        if any(leaf not in self.constants for leaf in leaves):
            return None  # depends on a graph input
        from onnx.reference import ReferenceEvaluator

        graph = helper.make_graph(nodes, "cam_fold", [], [helper.make_empty_tensor_value_info(name)],
                                  [self.constants[leaf] for leaf in sorted(leaves)])
        folder = helper.make_model(graph, opset_imports=self.model.opset_import,
                                   ir_version=self.model.ir_version)
        try:
            (value,) = ReferenceEvaluator(folder).run(None, {})
        except Exception:  # an op the reference cannot run: the tensor is not read as constant
            return None
        return np.asarray(value)

    def ancestors(self, name: str, *, stop: str | None = None, shape_only_stops: bool = False):
        """Nodes the tensor `name` depends on, not walking past `stop`."""
        seen, stack, nodes = set(), [name], []
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor == stop:
                continue
            seen.add(tensor)
            node = self.producer.get(tensor)
            if node is None:
                continue
            nodes.append(node)
            if shape_only_stops and node.op_type in SHAPE_ONLY:
                continue
            stack.extend(i for i in node.input if i)
        unique = {id(n): n for n in nodes}
        return sorted(unique.values(), key=lambda n: self.order[id(n)])


def graph_inputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """The real inputs of a model (initializers excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    return tuple(
        TensorSpec(vi.name, dims(vi.type) or (), np_dtype(vi.type.tensor_type.elem_type))
        for vi in model.graph.input
        if vi.name not in initializers
    )


# --------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class _Pooling:
    node: onnx.NodeProto
    kind: str  # "average" or "max"
    layout: str
    keepdims: bool
    description: str  # how it pools, for `camcore inspect`
    scale: float = 1.0  # pooled = scale * mean_xy(features) (AveragePool counting its padding)


def _spatial_axes(g: _Graph, node) -> tuple | None:
    """``(axes, rank)`` of a ReduceMean/ReduceMax node, axes normalized; None if unknown."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.constant(node.input[1])
        if value is None:
            return None
        axes = value.ravel().tolist()
    rank = len(g.shape(node.input[0])) or 4
    if axes is None:
        return None if attr(node, "noop_with_empty_axes", 0) else (tuple(range(rank)), rank)
    return tuple(sorted(int(a) % rank for a in axes)), rank


def _window_pool(g: _Graph, node) -> str | None:
    """Describe a 2-D AveragePool/MaxPool whose single output window covers the whole map.

    Padding may make the window larger than the map (GoogLeNet from Caffe2: a 7x7 kernel
    with pads (0, 0, 1, 1) over a 6x6 map), and so may ``ceil_mode`` (the dynamo export of
    Hugging Face EfficientNet: a 640x640 kernel and stride, ``ceil_mode=1``, over a 7x7
    map: one window, cut at the map's end).  Whatever the kernel, padding or rounding, the
    pooling is global when it has one output window and that window starts at or before
    the map's first pixel and ends at or after its last.  Returns None for a local pooling.
    """
    kernel = tuple(attr(node, "kernel_shape", ()))
    if len(kernel) != 2:
        return None
    auto_pad = text_attr(node, "auto_pad", "NOTSET")
    pads = tuple(attr(node, "pads", None) or (0, 0, 0, 0))
    if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "VALID" and any(pads)):
        return None
    if any(d != 1 for d in attr(node, "dilations", None) or (1, 1)):
        return None  # a dilated window skips pixels
    spatial = g.shape(node.input[0])[2:]
    if len(spatial) != 2 or not all(isinstance(s, int) for s in spatial):
        # Unknown map size: only an unpadded kernel can be read as the whole map.
        return None if any(pads) else f"{node.op_type} {kernel[0]}x{kernel[1]} over the whole map"
    strides = tuple(attr(node, "strides", None) or (1, 1))
    ceil = bool(attr(node, "ceil_mode", 0))
    for axis, size in enumerate(spatial):
        begin, end = pads[axis], pads[axis + 2]
        span = size + begin + end - kernel[axis]
        # ONNX's output size; a negative span (kernel beyond the map) leaves one window only
        # when rounding up, and none (a model onnxruntime refuses) when rounding down.
        out = (-(-span // strides[axis]) if ceil else span // strides[axis]) + 1
        if out != 1 or kernel[axis] - begin < size:
            return None
    padded = f" with pads {pads}" if any(pads) else ""
    return f"{node.op_type} {kernel[0]}x{kernel[1]}{padded} over the whole {spatial[0]}x{spatial[1]} map"


def _pool_scale(g: _Graph, node) -> float:
    """``pooled / mean_xy(features)`` of a whole-map AveragePool, run on a map of ones.

    1 with ``count_include_pad=0``; with ``count_include_pad=1`` the padded cells count
    in the divisor, so the pooled value is a constant times the mean.  Running the node
    under onnxruntime gives exactly the divisor the model will run with.
    """
    if node.op_type != "AveragePool" or not (any(attr(node, "pads", None) or ()) or attr(node, "ceil_mode", 0)):
        return 1.0
    h, w = (tuple(g.shape(node.input[0])[2:]) + (None, None))[:2]
    if not (isinstance(h, int) and isinstance(w, int)):
        # A map of unknown size is read as whole only without padding (`_window_pool`); a
        # window that ceil_mode cuts at the map's end divides by the cells it covers.
        return 1.0
    from .ort_runtime import make_session

    elem = g.elem_type(node.input[0]) or onnx.TensorProto.FLOAT
    single = helper.make_node("AveragePool", ["x"], ["y"], name="cam_pool_scale",
                              **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph([single], "cam_pool_scale", [helper.make_tensor_value_info("x", elem, [1, 1, h, w])],
                              [helper.make_tensor_value_info("y", elem, None)])
    model = helper.make_model(graph, opset_imports=g.model.opset_import, ir_version=g.model.ir_version)
    (pooled,) = make_session(model, ["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 1, h, w), np_dtype(elem))})
    return float(np.asarray(pooled, np.float64).ravel()[0])


def _as_global_pool(g: _Graph, node) -> _Pooling | None:
    """Return the pooling description if `node` pools over the whole spatial map."""
    op = node.op_type
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        kind = "average" if op == "GlobalAveragePool" else "max"
        return _Pooling(node, kind, "NCHW", True, f"{op} over H and W")
    if op in ("ReduceMean", "ReduceMax"):
        found = _spatial_axes(g, node)
        if found is None:
            return None
        axes, rank = found
        if rank != 4:
            return None
        layout = {(2, 3): "NCHW", (1, 2): "NHWC"}.get(axes)
        if layout is None:
            return None
        kind = "average" if op == "ReduceMean" else "max"
        keepdims = bool(attr(node, "keepdims", 1))
        return _Pooling(node, kind, layout, keepdims, f"{op} over H and W (axes {axes[0]}, {axes[1]})")
    if op in ("AveragePool", "MaxPool"):
        description = _window_pool(g, node)
        if description is None:
            return None
        kind = "average" if op == "AveragePool" else "max"
        return _Pooling(node, kind, "NCHW", True, description)
    return None


# --------------------------------------------------------------------------- the head


def _walk_to_logits(g: _Graph, output: str) -> tuple[str, str]:
    """Walk back from `output` through activations and reshapes to the logits tensor."""
    tensor, scoring = output, None
    while True:
        node = g.producer.get(tensor)
        if node is None:
            break
        if node.op_type in _ACTIVATIONS:
            return node.input[0], _ACTIVATIONS[node.op_type]
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    return output, scoring or "softmax"


def _scoring_of(g: _Graph, logits: str) -> str:
    """'sigmoid' if the logits tensor feeds a Sigmoid (through pass-through ops)."""
    stack, seen = [logits], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for node in g.consumers.get(t, []):
            if node.op_type == "Sigmoid":
                return "sigmoid"
            if node.op_type in _PASS_THROUGH:
                stack.extend(node.output)
    return "softmax"


def _find_pooling(g: _Graph, logits: str, output: str, feature: str | None) -> _Pooling:
    if feature is not None:
        for node in g.consumers.get(feature, []):
            pooling = _as_global_pool(g, node)
            if pooling is not None and node.input[0] == feature:
                break
        else:
            raise NotCamCompatible(f"tensor {feature!r} does not feed a global pooling node")
    else:
        candidates = [p for p in (_as_global_pool(g, n) for n in g.ancestors(logits)) if p is not None]
        if not candidates:
            raise NotCamCompatible(f"no global average pooling on the path to output {output!r}")
        pooling = candidates[-1]  # the last one; earlier ones sit in SE blocks
    if pooling.kind == "max":
        raise NotCamCompatible(
            f"global max pooling ({node_label(pooling.node)}) does not satisfy the CAM identity"
        )
    return pooling


def _check_head_structure(g: _Graph, pooled: str, logits: str, output: str) -> list:
    """Nodes between the pooled tensor and the logits; refuse non-affine ops and bypasses."""
    nodes = g.ancestors(logits, stop=pooled)
    dependent = {pooled}
    for node in nodes:
        if node.op_type in SHAPE_ONLY:
            continue
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
            if node.op_type not in _AFFINE_OPS:
                raise NotCamCompatible(f"head after pooling is not affine: {node_label(node)}")
    if logits not in dependent:
        raise NotCamCompatible(f"output {output!r} does not depend on the pooled features {pooled!r}")
    # Value paths that reach a graph input without passing through the pooling.
    inputs = {vi.name for vi in g.model.graph.input} - set(g.constants)
    for node in g.ancestors(logits, stop=pooled, shape_only_stops=True):
        if node.op_type in SHAPE_ONLY:
            continue
        bypass = [i for i in node.input if i in inputs]
        if bypass:
            raise NotCamCompatible(
                f"logits depend on input {bypass[0]!r} other than through the global average pooling"
            )
    return nodes


def _probe_model(g: _Graph, pooled: str, logits: str, pooled_type) -> onnx.ModelProto:
    """The sub-graph pooled -> logits, with a free batch axis on the pooled input."""
    from onnx.utils import Extractor

    model = copy_model(g.model)
    # Extractor needs a type for every cut tensor; shape inference may not have found one.
    for name in (pooled, logits):
        if name not in g.types:
            model.graph.value_info.append(helper.make_value_info(name, pooled_type if name == pooled else
                                          helper.make_tensor_type_proto(pooled_type.tensor_type.elem_type, None)))
    extractor = Extractor(model)
    needed = _shape_frontier(g, pooled, logits)
    for name in needed:
        if name not in g.types:
            model.graph.value_info.append(helper.make_value_info(name, helper.make_tensor_type_proto(
                _elem_type_guess(g, name), None)))
    sub = extractor.extract_model([pooled, *needed], [logits])
    # Free the batch axis of the cut: probes come in batches.
    sub.graph.input[0].type.CopyFrom(pooled_type)
    # Inputs read only through Shape (e.g. the batch size) get free dims: tiny dummies feed them.
    for vi in sub.graph.input[1:]:
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            dim.Clear()
            dim.dim_param = f"shape_only_{i}"
    sub.ir_version = g.model.ir_version
    sub.graph.output[0].type.tensor_type.ClearField("shape")
    return sub


def _shape_frontier(g: _Graph, pooled: str, logits: str) -> list:
    """Tensors the head reads only through Shape/Size that are computed from the graph inputs.

    They are cut there and fed as dummies (computed reshapes read the batch size): the
    tensor read may sit behind any chain of nodes (a Cast of a float16 model's input, a
    normalization in front), not only be a graph input.
    """
    fed = {s.name for s in graph_inputs(g.model)}
    for node in g.model.graph.node:
        if any(i in fed for i in node.input):
            fed.update(node.output)
    dependent = {pooled}
    for node in g.ancestors(logits, stop=pooled):
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
    found = []
    for node in g.ancestors(logits, stop=pooled, shape_only_stops=True):
        read = node.input[0] if node.op_type in SHAPE_ONLY and node.input else None
        if read and read in fed and read not in dependent and read not in found:
            found.append(read)
    return found


def _recover_affine(run, pooled_shape: tuple, channel_axis: int, k: int, dtype: np.dtype, label: str,
                    fixed_batch: int = 1):
    """Read W (C, K) and b (C,) back from `run(pooled_batch) -> logits`, then verify.

    A head whose batch size is baked in (a Reshape to ``[B, K]``, as exporters write for
    a model traced at batch B) is probed B vectors at a time, the last group padded.
    """

    def evaluate(vectors: np.ndarray) -> np.ndarray:
        shape = [1] * len(pooled_shape)
        out = []
        for start in range(0, len(vectors), _PROBE_BATCH):
            chunk = vectors[start:start + _PROBE_BATCH]
            shape[0], shape[channel_axis] = len(chunk), k
            batch = np.moveaxis(chunk.reshape([len(chunk)] + [1] * (len(shape) - 2) + [k]), -1, channel_axis)
            try:
                result = run(np.ascontiguousarray(batch.reshape(shape), dtype=dtype))
            except CamError:
                b = fixed_batch
                padded = np.concatenate([batch, np.repeat(batch[-1:], -len(batch) % b, axis=0)])
                result = np.concatenate([run(np.ascontiguousarray(padded[i:i + b], dtype=dtype))
                                         for i in range(0, len(padded), b)])[:len(batch)]
            result = np.asarray(result, dtype=np.float64)
            if result.size % len(chunk):  # not one row of logits per probe (a batch axis folded away)
                raise NotCamCompatible(f"head after pooling does not keep the batch axis: {label}")
            out.append(result.reshape(len(chunk), -1))
        return np.concatenate(out)

    probes = np.vstack([np.zeros((1, k)), np.eye(k)])
    response = evaluate(probes)
    bias = response[0]
    weights = (response[1:] - bias).T
    rng = np.random.default_rng(0)
    tests = rng.standard_normal((8, k))
    predicted = tests @ weights.T + bias
    actual = evaluate(tests)
    scale = np.abs(tests) @ np.abs(weights).T + np.abs(bias)
    rtol = 2e-2 if dtype == np.float16 else 1e-4
    if not np.all(np.abs(actual - predicted) <= rtol * scale + rtol):
        raise NotCamCompatible(f"head after pooling is not affine: {label}")
    return weights.astype(np.float32), bias.astype(np.float32)


def _product_label(g: _Graph, nodes: list, pooled: str) -> str:
    """Name the first node that multiplies two pooled-dependent tensors."""
    dependent = {pooled}
    for node in nodes:
        hits = [i for i in node.input if i in dependent]
        if node.op_type in ("Mul", "Div", "MatMul", "Gemm", "Einsum") and len(hits) > 1:
            return node_label(node)
        if hits and node.op_type not in SHAPE_ONLY:
            dependent.update(node.output)
    return "the numerical probe found a nonlinear response"


def _resolve_logits(g: _Graph, feature, logits, output) -> tuple[str, str, str]:
    """Check the tensor-name overrides; return ``(output, logits, scoring)``."""
    names = [o.name for o in g.model.graph.output]
    if output is None:
        output = names[0] if names else None
    if output is None or output not in names:
        raise CamError(f"output {output!r} not found; the model's outputs are {sorted(names)}")
    known = set(g.producer) | {i.name for i in g.model.graph.input}
    for name, value in (("feature", feature), ("logits", logits)):
        if value is not None and value not in known:
            raise CamError(f"{name} tensor {value!r} not found in the graph")
    if logits is None:
        logits, scoring = _walk_to_logits(g, output)
    else:
        scoring = _scoring_of(g, logits)
    return output, logits, scoring


def find_head(model: onnx.ModelProto, *, feature: str | None = None, logits: str | None = None,
              output: str | None = None) -> Head:
    """Find the feature tensor, the pooling and the affine head of a GAP classifier.

    Parameters
    ----------
    model : onnx.ModelProto
        With its external data loaded (see `load_model`).
    feature, logits : str, optional
        Tensor-name overrides for ambiguous graphs.
    output : str, optional
        The output to explain (default: the first graph output).

    Returns
    -------
    Head
        ``weights`` ``(C, K)`` and ``bias`` ``(C,)`` float32 such that
        ``logits = weights @ mean_xy(features) + bias``.

    Raises
    ------
    NotCamCompatible
        With a one-line reason.
    """
    # issue 20: a quantized head is read on the float view (dequantized classifier).
    from .quant_graph import dequantized, is_quantized

    g = _Graph.build(dequantized(model) if is_quantized(model) else model)
    output, logits, scoring = _resolve_logits(g, feature, logits, output)
    pooling = _find_pooling(g, logits, output, feature)
    feature = pooling.node.input[0]
    pooled = pooling.node.output[0]
    head_nodes = _check_head_structure(g, pooled, logits, output)

    feature_shape = g.shape(feature)
    channel_axis_feature = 1 if pooling.layout == "NCHW" else 3
    k = feature_shape[channel_axis_feature] if len(feature_shape) == 4 else None
    if not isinstance(k, int):
        feature_shape = _feature_shape_by_running(model, feature)
        k = feature_shape[channel_axis_feature]
    if pooling.keepdims:
        pooled_shape = (1, k, 1, 1) if pooling.layout == "NCHW" else (1, 1, 1, k)
        channel_axis = channel_axis_feature
    else:
        pooled_shape, channel_axis = (1, k), 1
    elem = g.elem_type(feature) or onnx.TensorProto.FLOAT
    pooled_type = helper.make_tensor_type_proto(elem, ["probe_batch", *pooled_shape[1:]])
    probe = _probe_model(g, pooled, logits, pooled_type)
    run = _probe_runner(probe, pooled, g)
    batch = next((s.shape[0] for s in graph_inputs(model) if s.shape and isinstance(s.shape[0], int)), 1)
    weights, bias = _recover_affine(run, pooled_shape, channel_axis, k, np_dtype(elem),
                                    _product_label(g, head_nodes, pooled), fixed_batch=batch or 1)
    # The probe reads logits from the pooled tensor; CAM needs them from mean_xy(features).
    weights = (weights * _pool_scale(g, pooling.node)).astype(np.float32)

    inputs = graph_inputs(model)
    image_input = _image_input(g, inputs, feature)
    return Head(
        weights=weights, bias=bias, feature=feature, logits=logits, layout=pooling.layout,
        pooling=pooling.node.op_type, input=image_input, inputs=inputs,
        feature_shape=feature_shape, scoring=scoring, output=output, extra={"pooled": pooled},
        pooling_node=pooling.node.name or pooled, pooling_detail=pooling.description,
    )


# Ops whose 4-D inputs and outputs are NCHW by the ONNX spec.
_NCHW_OPS = {
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LRN", "MaxPool",
    "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "DepthToSpace",
    "SpaceToDepth", "MaxRoiPool", "QLinearConv",
}


def _layouts(g: _Graph) -> dict:
    """Layout ("NCHW" or "NHWC") of every 4-D tensor, propagated in graph order.

    Tensors read or written by spec-NCHW ops are NCHW; a Transpose permutes its input's
    layout; other ops pass on the layout of their first 4-D input.  Image inputs are read
    by where their 1 or 3 channels sit.
    """
    layouts = {}
    for spec in graph_inputs(g.model):
        if len(spec.shape) == 4:
            layouts[spec.name] = "NHWC" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "NCHW"
    for node in g.model.graph.node:
        four = [i for i in node.input if len(g.shape(i)) == 4]
        if node.op_type in _NCHW_OPS:
            layout = "NCHW"
            for i in four[:1]:
                layouts[i] = "NCHW"
        elif node.op_type == "Transpose" and four and four[0] in layouts:
            perm = attr(node, "perm", (3, 2, 1, 0))
            layout = "".join(layouts[four[0]][p] for p in perm)
        else:
            layout = next((layouts[i] for i in four if i in layouts), None)
        for out in node.output:
            if layout in ("NCHW", "NHWC") and len(g.shape(out)) == 4:
                layouts[out] = layout
    return layouts


def _spatial_size(shape: tuple, layout: str) -> int | None:
    hw = shape[2:4] if layout == "NCHW" else shape[1:3]
    return hw[0] * hw[1] if all(isinstance(d, int) for d in hw) else None


def _value_nodes(g: _Graph, logits: str, stop: str | None = None) -> list:
    """Nodes on value paths to `logits` (not through Shape/Size), fed by a graph input."""
    inputs = {s.name for s in graph_inputs(g.model)}
    nodes = [n for n in g.ancestors(logits, stop=stop, shape_only_stops=True) if n.op_type not in SHAPE_ONLY]
    fed, kept = set(inputs), []
    for node in nodes:
        if any(i in fed for i in node.input):
            fed.update(node.output)
            kept.append(node)
    return kept


def candidate_layers(model: onnx.ModelProto, *, logits: str | None = None, output: str | None = None) -> list:
    """The 4-D tensors the logits depend on, in graph order: ``(name, shape, layout)``.

    Any of them can be the target layer of the gradient and forward-only methods
    (``camcore.load(model, feature=name)``); dims are as inferred (None when dynamic).
    """
    g = _Graph.build(model)
    _, logits, _ = _resolve_logits(g, None, logits, output)
    return _candidates(g, logits)


def _candidates(g: _Graph, logits: str) -> list:
    layouts = _layouts(g)
    seen, found = set(), []
    for node in _value_nodes(g, logits):
        for out in node.output:
            # issue 20: integer tensors (int8 activations) are not feature maps
            if out in layouts and out not in seen and g.elem_type(out) not in _INTEGER_TYPES:
                seen.add(out)
                found.append((out, g.shape(out), layouts[out]))
    return found


def find_target(model: onnx.ModelProto, *, feature: str | None = None, logits: str | None = None,
                output: str | None = None, cam_refusal: str = "") -> Head:
    """Find the target layer for the gradient and forward-only methods (no affine head needed).

    The default is the tensor feeding the last global pooling (average or max) on the
    logits' path or, when there is none, the last 4-D tensor of spatial size above 1 on
    that path.  `feature` may name any 4-D tensor the logits depend on, provided every
    value path to the logits goes through it (a layer bypassed by a skip connection is
    refused: the gradient at it would miss the bypass).

    Returns
    -------
    Head
        With ``weights`` and ``bias`` None and `cam_refusal` recorded; `num_classes` and
        `channels` are 0 where shape inference could not tell them.
    """
    g = _Graph.build(model)
    output, logits, scoring = _resolve_logits(g, feature, logits, output)
    layouts = _layouts(g)
    pooling = None
    if feature is None:
        pools = [p for p in (_as_global_pool(g, n) for n in _value_nodes(g, logits)) if p is not None]
        if pools:
            pooling = pools[-1]
            feature = pooling.node.input[0]
        else:
            maps = [c for c in _candidates(g, logits) if (_spatial_size(c[1], c[2]) or 2) > 1]
            if not maps:
                raise NotCamCompatible(f"no 4-D feature map on the path to output {output!r}")
            feature = maps[-1][0]
    else:
        if feature not in {c[0] for c in _candidates(g, logits)}:
            raise NotCamCompatible(f"tensor {feature!r} is not a 4-D feature map that the logits {logits!r} depend on")
        pooling = next((p for p in (_as_global_pool(g, n) for n in g.consumers.get(feature, []))
                        if p is not None and p.node.input[0] == feature), None)
    layout = pooling.layout if pooling is not None else layouts.get(feature, "NCHW")
    inputs = {s.name for s in graph_inputs(g.model)}
    for node in _value_nodes(g, logits, stop=feature):
        bypass = [i for i in node.input if i in inputs]
        if bypass and feature not in inputs:
            raise NotCamCompatible(f"layer {feature!r} is bypassed: the logits depend on input {bypass[0]!r} "
                                   f"other than through it ({node_label(node)})")
    shape = g.shape(feature)
    channels = shape[1 if layout == "NCHW" else 3] if len(shape) == 4 else None
    classes = g.shape(logits)[-1] if g.shape(logits) else None
    specs = graph_inputs(model)
    return Head(
        weights=None, bias=None, feature=feature, logits=logits, layout=layout,
        pooling=pooling.node.op_type if pooling is not None else "", input=_image_input(g, specs, feature),
        inputs=specs, feature_shape=shape, scoring=scoring, output=output,
        pooling_node=(pooling.node.name or pooling.node.output[0]) if pooling is not None else "",
        pooling_detail=pooling.description if pooling is not None else "",
        num_classes=classes if isinstance(classes, int) else 0,
        channels=channels if isinstance(channels, int) else 0, cam_refusal=cam_refusal,
    )


def _feature_shape_by_running(model: onnx.ModelProto, feature: str) -> tuple:
    """Shape of `feature` from one run on zeros (shape inference did not find it).

    Dynamic input axes are set to 1 (batch) and 224 (others).
    """
    from .ort_runtime import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    feed = {s.name: np.zeros([d if isinstance(d, int) else (1 if axis == 0 else 224)
                              for axis, d in enumerate(s.shape)], s.dtype)
            for s in graph_inputs(model)}
    try:
        session = ort.InferenceSession(expose_outputs(model, [feature]).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        (features,) = session.run([feature], feed)
    except Exception as exc:
        raise NotCamCompatible(f"cannot infer the shape of feature tensor {feature!r}: "
                               f"{str(exc).splitlines()[0]}") from None
    if features.ndim != 4:
        raise NotCamCompatible(f"feature tensor {feature!r} must be 4-D, got shape {features.shape}")
    return ("N", *features.shape[1:])


def _image_input(g: _Graph, inputs, feature: str) -> TensorSpec:
    upstream = {i for n in g.ancestors(feature) for i in n.input}
    candidates = [s for s in inputs if s.name in upstream and len(s.shape) == 4] or \
                 [s for s in inputs if s.name in upstream] or list(inputs)
    if not candidates:
        raise NotCamCompatible("the model has no input")
    return candidates[0]


# onnxruntime's type strings of the tensors a head probe may be fed.
_ORT_TYPES = {f"tensor({name})": np.dtype(dtype) for name, dtype in (
    ("float", "float32"), ("float16", "float16"), ("double", "float64"), ("int64", "int64"),
    ("int32", "int32"), ("int8", "int8"), ("uint8", "uint8"), ("bool", "bool"))}


def _probe_runner(probe: onnx.ModelProto, pooled: str, g: _Graph):
    """A function pooled-batch -> logits running `probe` under onnxruntime (CPU)."""
    from .ort_runtime import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed batched probe is expected for fixed-batch heads
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CamError(f"cannot run the classifier head on its own: {str(exc).splitlines()[0]}") from None
    shape_only = [(vi.name, len(vi.shape), _ORT_TYPES.get(vi.type, np.float32))
                  for vi in session.get_inputs() if vi.name != pooled]

    def run(batch: np.ndarray) -> np.ndarray:
        # Shape-only inputs carry the batch size and nothing else.
        dummies = {name: np.zeros((len(batch),) + (1,) * (rank - 1), dtype) for name, rank, dtype in shape_only}
        try:
            return session.run(None, {pooled: batch, **dummies})[0]
        except Exception as exc:
            raise CamError(f"cannot run the classifier head on its own: {str(exc).splitlines()[0]}") from None

    return run


def sole_average_pool(model: onnx.ModelProto, feature: str) -> tuple[str, float] | None:
    """``(pooled, scale)`` when `feature` is read only by one whole-map average pooling.

    Then ``pooled = scale * mean_xy(feature)`` and ``d y / d feature`` is
    ``d y / d pooled * scale / (h w)`` at every pixel: gradients can be taken at the small
    pooled tensor.  None otherwise (other readers, max pooling, unknown layout).
    """
    g = _Graph.build(model)
    readers = g.consumers.get(feature, [])
    if len(readers) != 1 or feature in {o.name for o in model.graph.output}:
        return None
    pooling = _as_global_pool(g, readers[0])
    if pooling is None or pooling.kind != "average" or readers[0].input[0] != feature:
        return None
    return pooling.node.output[0], _pool_scale(g, pooling.node)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy where every non-Constant node computed from constants alone is an initializer.

    Shape arithmetic of constants (tf2onnx's ``Cast(int32 axes)``, Paddle's computed
    shapes) then reads as plain initializers, which shape inference and the gradient
    rules need.  Values come from `onnx.reference` (`_Graph.constant`).
    """
    g = _Graph.build(model)
    known = set(g.constants)
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type != "Constant" and node.input and all(i in known or not i for i in node.input):
            values = [g.constant(o) for o in node.output]
            if all(v is not None for v in values):
                folded.extend(onnx.numpy_helper.from_array(v, o) for v, o in zip(values, node.output))
                known.update(node.output)
                continue
        if node.op_type == "Constant" and g.constant(node.output[0]) is not None:
            known.add(node.output[0])
        kept.append(node)
    return copy_model(model, nodes=kept if folded else None, initializers=folded)


# --------------------------------------------------------------------------- editing


def expose_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """Return a copy of `model` with the tensors `names` added as graph outputs.

    Types come from shape inference; tensors that already are outputs are kept once.
    """
    g = _Graph.build(model)
    out = copy_model(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name in present:
            continue
        tensor_type = onnx.TypeProto()
        if name in g.types:
            tensor_type.CopyFrom(g.types[name])
        else:  # old graphs: the element type is enough for onnxruntime
            tensor_type = helper.make_tensor_type_proto(_elem_type_guess(g, name), None)
        out.graph.output.append(helper.make_value_info(name, tensor_type))
        present.add(name)
    return out


def _elem_type_guess(g: _Graph, name: str) -> int:
    """Element type of an untyped tensor: that of the first typed input of its producer."""
    node = g.producer.get(name)
    for i in (node.input if node is not None else []):
        if g.elem_type(i):
            return g.elem_type(i)
    raise CamError(f"cannot expose tensor {name!r}: its type is unknown")
