"""Fused CAM graphs: a copy of a model that computes its own class activation maps.

The fused model keeps every original output and adds three, computed from the
logits and the feature tensor that `onnx_graph.find_head` located:

* ``cam_classes`` ``(N, k)`` int64: TopK on the logits (largest, sorted);
* ``cam_scores`` ``(N, k)`` float32: softmax probabilities of those classes
  (``exp(logit - logsumexp(logits))``), or their sigmoid for multi-label heads;
* ``cam_maps`` ``(N, k, h, w)`` float32, or ``(N, k, H, W)`` with a `size`:
  Gather of the recovered classifier weights at the classes, a batched MatMul
  with the features, then optionally a half-pixel bilinear resize (two MatMuls
  with `camcore.upsample`'s interpolation matrices when the sizes are static,
  else Resize with mode linear and half_pixel coordinates) and per-map min-max
  normalization.

The classifier weights are stored as a new float32 initializer (the head
recovered by probing), so every affine head works, not only a Gemm.  The
model's opset and IR version are kept: op forms follow the opset, and an op
that the opset lacks raises `CamError` instead of silently upgrading.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from camcore._validate import check_size
from camcore.errors import CamError, InvalidInput
from camcore.maps import resize_matrix

from . import onnx_graph
from .ort_session import OrtBackend

__all__ = ["fuse", "OUTPUTS"]

OUTPUTS = ("cam_classes", "cam_scores", "cam_maps")

# Oldest opset whose op forms this module emits (broadcasting arithmetic, Cast's `to`).
_MIN_OPSET = 7
# Where is needed for normalization (constant and NaN maps become zeros).
_WHERE_OPSET = 9
# Resize with coordinate_transformation_mode="half_pixel" (needed for dynamic spatial sizes only).
_RESIZE_OPSET = 11
# Opset from which a reduction takes `axes` as an input instead of an attribute.
_AXES_INPUT_OPSET = {"ReduceSum": 13, "ReduceMin": 18, "ReduceMax": 18, "ReduceLogSumExp": 18}


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise CamError("the model imports no default-domain ONNX opset")


class _Builder:
    """Appends ``cam_``-prefixed nodes and initializers in the forms the opset allows."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value, dtype=np.int64) -> str:
        name = f"cam_{name}"
        if all(t.name != name for t in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, name: str, *, outputs=None, **attrs) -> str:
        name = f"cam_{name}"
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def reduce(self, op_type: str, x: str, axes, name: str) -> str:
        if self.opset >= _AXES_INPUT_OPSET[op_type]:
            return self.op(op_type, [x, self.const(f"{name}_axes", axes)], name, keepdims=1)
        return self.op(op_type, [x], name, axes=list(axes), keepdims=1)

    def clip01(self, x: str, name: str) -> str:
        if self.opset >= 11:
            bounds = [self.const("zero", 0.0, np.float32), self.const("one", 1.0, np.float32)]
            return self.op("Clip", [x, *bounds], name)
        return self.op("Clip", [x], name, min=0.0, max=1.0)

    def as_float(self, x: str, elem_type, name: str) -> str:
        if elem_type == TensorProto.FLOAT:
            return x
        return self.op("Cast", [x], name, to=TensorProto.FLOAT)

    def rename_last(self, tensor: str, name: str) -> None:
        """Let the last node write `tensor` as ``cam_<name>`` (a graph output, without an Identity copy)."""
        node = self.nodes[-1]
        if list(node.output) != [tensor]:
            raise RuntimeError(f"{tensor!r} is not the output of the last added node")
        node.output[0] = f"cam_{name}"


def _validate(top_k, size, normalize, num_classes: int, opset: int):
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
        raise InvalidInput(f"top_k must be an int in [1, {num_classes}] (the model's classes), got {top_k!r}")
    if size is not None and not (isinstance(size, str) and size == "input"):
        if isinstance(size, str):
            raise InvalidInput(f"size must be None, 'input' or a pair (H, W) of positive ints, got {size!r}")
        size = check_size(size)
    if not isinstance(normalize, (bool, np.bool_)):
        raise InvalidInput(f"normalize must be a bool, got {normalize!r}")
    needs = [(_MIN_OPSET, "fusing")]
    if normalize:
        needs.append((_WHERE_OPSET, "normalize=True (Where)"))
    for least, what in needs:
        if opset < least:
            raise CamError(
                f"{what} needs ONNX opset >= {least}, the model has opset {opset}; "
                "convert it first (onnx.version_converter.convert_version)"
            )
    return int(top_k), size, bool(normalize)


def _input_spatial_axes(spec) -> list:
    """Axes of H and W in the image input, from its channel axis (1, 3 or 4 channels)."""
    shape = spec.shape
    if len(shape) != 4:
        raise CamError(f"size='input' needs a 4-D image input, {spec.name!r} has shape {shape}")
    if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return [2, 3]
    if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return [1, 2]
    raise CamError(f"cannot tell the channel axis of input {spec.name!r} with shape {shape}; "
                   "pass size=(H, W)")


def _class_maps(b: _Builder, head, g) -> tuple[str, list]:
    """``(N, k, h, w)`` float32 CAMs of the classes in ``cam_classes``, and ``[h, w]``."""
    rows = b.op("Gather", [b.const("weights", head.weights, np.float32), "cam_classes"], "rows", axis=0)
    features = b.as_float(head.feature, g.elem_type(head.feature), "features_float")
    if head.layout == "NCHW":
        flat = b.op("Reshape", [features, b.const("flat_shape", [0, 0, -1])], "features_flat")
        maps = b.op("MatMul", [rows, flat], "maps_flat")  # (N, k, K) @ (N, K, hw)
        hw_axes = [2, 3]
    else:
        flat = b.op("Reshape", [features, b.const("flat_shape", [0, -1, head.channels])], "features_flat")
        rows_t = b.op("Transpose", [rows], "rows_t", perm=[0, 2, 1])
        per_pixel = b.op("MatMul", [flat, rows_t], "maps_hwk")  # (N, hw, K) @ (N, K, k)
        maps = b.op("Transpose", [per_pixel], "maps_flat", perm=[0, 2, 1])
        hw_axes = [1, 2]
    hw = b.op("Gather", [b.op("Shape", [features], "feature_shape"), b.const("hw_axes", hw_axes)],
              "feature_hw", axis=0)
    shape = b.op("Concat", [b.const("keep_nk", [0, 0]), hw], "maps_shape", axis=0)
    return b.op("Reshape", [maps, shape], "maps_raw"), [head.feature_shape[i] for i in hw_axes]


def _zero_non_finite(b: _Builder, maps: str) -> str:
    """Maps holding NaN or inf become zeros, as in `camcore.normalize`.

    onnxruntime's ReduceMin/ReduceMax skip NaN but a sum does not; this runs at
    feature resolution, where it is cheap.
    """
    zero = b.const("zero", 0.0, np.float32)
    poison = b.reduce("ReduceSum", b.op("Mul", [maps, zero], "times_zero"), [2, 3], "poison")
    finite = b.op("Not", [b.op("IsNaN", [poison], "non_finite")], "finite")
    return b.op("Where", [finite, maps, zero], "maps_finite")


def _min_max(b: _Builder, maps: str, stats: str) -> str:
    """``(maps - min) / (max - min)`` with min and max per map over the last two axes of `stats`.

    A constant map divides by +inf and becomes zeros.
    """
    lo = b.reduce("ReduceMin", stats, [2, 3], "min")
    span = b.op("Sub", [b.reduce("ReduceMax", stats, [2, 3], "max"), lo], "span")
    positive = b.op("Greater", [span, b.const("zero", 0.0, np.float32)], "span_positive")
    divisor = b.op("Where", [positive, span, b.const("inf", np.inf, np.float32)], "divisor")
    return b.op("Div", [b.op("Sub", [maps, lo], "shifted"), divisor], "maps_normalized")


def _extreme_rows(r: np.ndarray) -> np.ndarray:
    """Rows of an interpolation matrix ``r`` among which every resized map's extremes lie.

    The output samples whose source position falls in one interval ``[j, j + 1)``
    (same first tap) are linear in that position, so along this axis their
    extremes are the first or the last of them.
    """
    first_tap = np.argmax(r != 0, axis=1)
    starts = np.flatnonzero(np.diff(first_tap, prepend=-1))
    ends = np.append(starts[1:] - 1, len(r) - 1)
    return np.unique(np.concatenate([starts, ends]))


def _resize_static(b: _Builder, maps: str, src_hw, dst_hw, normalize: bool) -> str:
    """Half-pixel bilinear resize with `camcore.upsample`'s own matrices: ``R_H @ maps @ R_W^T``.

    Several times faster than onnxruntime's CPU Resize.  With `normalize`, the
    min and max of the resized maps are read from the few rows and columns that
    can hold them (`_extreme_rows`), and the min-max scaling is applied before
    interpolating (the rows of both matrices sum to 1), so no full-size pass is
    added but a Clip to [0, 1] against float rounding.
    """
    ry, rx = (resize_matrix(n_out, n_in, "bilinear", "<f4") for n_out, n_in in zip(dst_hw, src_hw))
    if normalize:
        sy, sx = _extreme_rows(ry), _extreme_rows(rx)
        probe = b.op("MatMul", [b.const("extreme_rows", ry[sy], np.float32), maps], "probe_rows")
        probe = b.op("MatMul", [probe, b.const("extreme_cols", rx[sx].T, np.float32)], "probe")
        maps = _min_max(b, maps, probe)
    maps = b.op("MatMul", [b.const("resize_rows", ry, np.float32), maps], "maps_rows")  # (N, k, H, w)
    maps = b.op("MatMul", [maps, b.const("resize_cols", rx.T, np.float32)], "maps_resized")
    # Scaling before interpolating can leave [0, 1] by float rounding (~1e-7): clip it back.
    return b.clip01(maps, "maps_clipped") if normalize else maps


def _resize_dynamic(b: _Builder, maps: str, image: str | None, target, opset: int) -> str:
    """Resize (linear, half_pixel) to `target`: the image's spatial `axes` when `image` is given."""
    if opset < _RESIZE_OPSET:
        raise CamError(f"size with dynamic spatial dimensions needs Resize with half_pixel coordinates, "
                       f"ONNX opset >= {_RESIZE_OPSET}; the model has opset {opset}; convert it first "
                       "(onnx.version_converter.convert_version)")
    if image is not None:
        shape = b.op("Shape", [image], "input_shape")
        target = b.op("Gather", [shape, b.const("input_hw", target)], "target_hw", axis=0)
    else:
        target = b.const("target_hw", target)
    nk = b.op("Gather", [b.op("Shape", [maps], "small_shape"), b.const("nk_axes", [0, 1])], "nk", axis=0)
    sizes = b.op("Concat", [nk, target], "sizes", axis=0)
    empty = b.const("empty", np.zeros(0), np.float32)  # roi and scales: unused when sizes are given
    return b.op("Resize", [maps, empty, empty, sizes], "maps_resized", mode="linear",
                coordinate_transformation_mode="half_pixel")


def fuse(model=None, *, top_k: int = 1, size=None, normalize: bool = True) -> onnx.ModelProto:
    """Return a copy of a GAP classifier that also outputs its top-k classes, scores and CAMs.

    Op sequence added to the graph (all names start with ``cam_``)::

        logits -> [Cast] -> [Flatten] -> TopK ---------------> cam_classes
                                      \\-> ReduceLogSumExp -> Sub -> Exp
                                          (or Sigmoid) ------> cam_scores
        cam_weights (C, K) -Gather(cam_classes)-> (N, k, K)
        features -> [Cast] -> Reshape -> MatMul -> Reshape -> (N, k, h, w)
          [normalize: ReduceSum(x * 0) -> IsNaN -> Where: maps holding NaN/inf -> 0]
          no size:      [normalize: ReduceMin, ReduceMax -> (x - min) / (max - min)]
          static size:  [normalize: min, max from R_H[rows] @ x @ R_W[cols]^T, then scale x]
                        -> MatMul(R_H, .) -> MatMul(., R_W^T) [normalize: Clip to [0, 1]]
          dynamic size: Resize(linear, half_pixel) -> [normalize: as without size]
          -> cam_maps

    Parameters
    ----------
    model : path, onnx.ModelProto or None
        A CAM-compatible classifier; None means the embedded default
        (EfficientNet-Lite0).  It is not modified.
    top_k : int
        Number of classes per item, in ``[1, C]``.
    size : None, (H, W) or "input"
        Resize the maps (bilinear, half-pixel centers, as `camcore.upsample`)
        to ``(H, W)``, or to the spatial size of the image input at run time
        (dynamic-size models included).  None keeps the feature resolution.
    normalize : bool
        Scale each map to [0, 1] by min-max over its last two axes, as
        `camcore.normalize`; constant maps and maps holding NaN become zeros.

    Returns
    -------
    onnx.ModelProto
        Same opset and IR version, every original output kept, plus
        ``cam_classes (N, k)`` int64, ``cam_scores (N, k)`` float32 and
        ``cam_maps (N, k, h, w)`` float32 (``(N, k, H, W)`` with `size`).

    Raises
    ------
    NotCamCompatible
        The model is refused, exactly as `camcore.load` refuses it.
    InvalidInput
        A bad `top_k`, `size` or `normalize`.
    CamError
        An unreadable model, an opset too old for a requested op, or a model
        that already holds ``cam_`` tensors of the names added here.

    Examples
    --------
    >>> fused = fuse(top_k=3, size="input")
    >>> [o.name for o in fused.graph.output]
    ['logits', 'cam_classes', 'cam_scores', 'cam_maps']
    >>> def dims(output):
    ...     return [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim]
    >>> dims(fused.graph.output[-1])
    ['batch', 3, 224, 224]
    >>> dims(fuse(normalize=False).graph.output[-1])
    ['batch', 1, 7, 7]
    """
    if model is None:
        from camcore import default_model

        model = default_model.path()
    # The same loading, head discovery and refusals as camcore.load; the backend also makes
    # the feature shape concrete where shape inference left it symbolic.
    backend = OrtBackend(model, providers=["CPUExecutionProvider"])
    proto, head = backend.model, backend.head
    opset = _opset(proto)
    top_k, size, normalize = _validate(top_k, size, normalize, head.num_classes, opset)
    g = onnx_graph._Graph.build(proto)
    b = _Builder(opset)

    # Logits (N, C) float32.
    logits = b.as_float(head.logits, g.elem_type(head.logits), "logits_float")
    if len(g.shape(head.logits)) != 2:
        logits = b.op("Flatten", [logits], "logits_flat", axis=1)
    topk_inputs, topk_attrs = [logits], {"axis": 1}
    if opset >= 10:
        topk_inputs.append(b.const("k", [top_k]))
    else:
        topk_attrs["k"] = top_k
    if opset >= 11:
        topk_attrs.update(largest=1, sorted=1)
    values = b.op("TopK", topk_inputs, "topk", outputs=["cam_topk_values", "cam_classes"], **topk_attrs)
    if head.scoring == "sigmoid":
        b.op("Sigmoid", [values], "scores")
    else:
        lse = b.reduce("ReduceLogSumExp", logits, [1], "logsumexp")
        b.op("Exp", [b.op("Sub", [values, lse], "log_scores")], "scores")

    maps, out_hw = _class_maps(b, head, g)
    if normalize:
        maps = _zero_non_finite(b, maps)
    if size is None:
        if normalize:
            maps = _min_max(b, maps, maps)
    else:
        axes = _input_spatial_axes(head.input) if size == "input" else None
        target_hw = [head.input.shape[i] for i in axes] if axes else list(size)
        if all(isinstance(d, int) for d in (*out_hw, *target_hw)):
            maps = _resize_static(b, maps, out_hw, target_hw, normalize)
        else:
            maps = _resize_dynamic(b, maps, head.input.name if axes else None, axes or size, opset)
            if normalize:
                maps = _min_max(b, maps, maps)
        out_hw = target_hw
    b.rename_last(maps, "maps")

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    added = {t for n in b.nodes for t in n.output} | {t.name for t in b.initializers}
    taken = added & (set(g.types) | set(g.producer) | {n.name for n in proto.graph.node})
    if taken:
        raise CamError(f"the model already has tensors or nodes named {sorted(taken)}; was it fused already?")
    out.graph.node.extend(b.nodes)
    out.graph.initializer.extend(b.initializers)
    if out.ir_version < 4:  # IR < 4: every initializer must also be a graph input
        out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in b.initializers)
    batch = head.input.shape[0] if head.input.shape else None
    out.graph.output.extend([
        helper.make_tensor_value_info("cam_classes", TensorProto.INT64, [batch, top_k]),
        helper.make_tensor_value_info("cam_scores", TensorProto.FLOAT, [batch, top_k]),
        helper.make_tensor_value_info("cam_maps", TensorProto.FLOAT, [batch, top_k, *out_hw]),
    ])
    return out
