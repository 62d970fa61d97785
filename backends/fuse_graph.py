"""Fused CAM graphs: a copy of a model that computes its own class activation maps.

The fused model keeps every original output and adds three, computed from the
logits and the feature tensor that `onnx_graph.find_head` located:

* ``cam_classes`` ``(N, k)`` int64: TopK on the logits (largest, sorted);
* ``cam_scores`` ``(N, k)`` float32: softmax probabilities of those classes
  (``exp(logit - max) / sum(exp(logits - max))``), or their sigmoid for multi-label heads;
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
from camcore.errors import CamError, InvalidInput, NotCamCompatible
from camcore.maps import resize_matrix
from camcore.methods import GRADIENT_METHODS

from . import _proto, onnx_graph
from .ort_session import OrtBackend

__all__ = ["fuse", "OUTPUTS"]

OUTPUTS = ("cam_classes", "cam_scores", "cam_maps")

# Oldest opset whose op forms this module emits (broadcasting arithmetic, Cast's `to`).
_MIN_OPSET = 7
# Where is needed for normalization (constant and NaN maps become zeros).
_WHERE_OPSET = 9
# Resize with coordinate_transformation_mode="half_pixel" (needed for dynamic spatial sizes only).
_RESIZE_OPSET = 11


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

    def reduce(self, op_type: str, x: str, axes, name: str, keepdims: int = 1) -> str:
        if self.opset >= _proto.axes_input_opset(op_type):
            return self.op(op_type, [x, self.const(f"{name}_axes", axes)], name, keepdims=keepdims)
        return self.op(op_type, [x], name, axes=list(axes), keepdims=keepdims)

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


def _resolve_method(method, head) -> str:
    """"auto" -> "cam" or "gradcam"; refuse CAM on a head that is not GAP + affine."""
    known = ("auto", "cam", *GRADIENT_METHODS)
    if method not in known:
        raise InvalidInput(f"method must be one of {', '.join(map(repr, known))} for a fused graph, got {method!r}")
    if method == "auto":
        return "cam" if head.affine else "gradcam"
    if method == "cam" and not head.affine:
        raise NotCamCompatible(head.cam_refusal)
    return method


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


def _repeat_items(b: _Builder, x: str, k: int, name: str) -> str:
    """``(N, ...)`` -> ``(N * k, ...)``, each item repeated k times in a row (item-major)."""
    if k == 1:
        return x
    unsqueezed = b.op("Unsqueeze", [x, b.const("axis1", [1])], f"{name}_unsq") if b.opset >= 13 else \
        b.op("Unsqueeze", [x], f"{name}_unsq", axes=[1])
    tail = b.op("Slice", [b.op("Shape", [x], f"{name}_shape"), b.const("start1", [1]), b.const("big", [1 << 62])],
                f"{name}_tail")
    expand = b.op("Concat", [b.const("start1", [1]), b.const("k", [k]), tail], f"{name}_expand_shape", axis=0)
    flat = b.op("Concat", [b.const("minus_one", [-1]), tail], f"{name}_flat_shape", axis=0)
    return b.op("Reshape", [b.op("Expand", [unsqueezed, expand], f"{name}_expanded"), flat], f"{name}_repeated")


def _gradient_maps(b: _Builder, head, g, folded: onnx.ModelProto, method: str, top_k: int) -> tuple[str, list]:
    """``(N, k, h, w)`` float32 maps of a gradient method for the classes in ``cam_classes``.

    `folded` is the model with its constants folded (`OrtBackend.folded_model`).

    The head (feature tensor -> logits) and its backward pass (`backprop.gradient_model`)
    are copied into the graph with a ``cam_grad_`` prefix and run on the features
    repeated k times with one-hot seeds, so the backbone runs once.
    """
    from . import backprop

    grad_model = backprop.gradient_model(folded, head.feature, head.logits, seed="cam_seed", grad="cam_grad")
    prefix = "cam_grad_"
    grad_model = onnx.compose.add_prefix(grad_model, prefix)
    features = _repeat_items(b, head.feature, top_k, "features")
    # Frontier tensors (read only through Shape) come from the forward pass, repeated alike.
    for vi in grad_model.graph.input:
        source = vi.name[len(prefix):]
        if source == "cam_seed":
            depth = b.const("depth", [head.num_classes])
            onehot = b.op("OneHot", [b.op("Reshape", ["cam_classes", b.const("minus_one", [-1])], "classes_flat"),
                                     depth, b.const("onehot_values", [0.0, 1.0], np.float32)], "onehot", axis=-1)
            seed_shape = b.op("Concat", [b.const("minus_one", [-1]),
                                         b.op("Slice", [b.op("Shape", [head.logits], "logits_shape"),
                                                        b.const("start1", [1]), b.const("big", [1 << 62])],
                                              "logits_tail")], "seed_shape", axis=0)
            seed = b.op("Reshape", [onehot, seed_shape], "seed_float")
            elem = vi.type.tensor_type.elem_type
            b.op("Cast", [seed], "seed", outputs=[vi.name], to=elem) if elem != TensorProto.FLOAT else \
                b.op("Identity", [seed], "seed", outputs=[vi.name])
        elif source == head.feature:
            b.op("Identity", [features], "features_in", outputs=[vi.name])
        else:
            b.op("Identity", [_repeat_items(b, source, top_k, f"frontier{len(b.nodes)}")], f"frontier_in{len(b.nodes)}",
                 outputs=[vi.name])
    b.nodes.extend(grad_model.graph.node)
    b.initializers.extend(grad_model.graph.initializer)
    grads = b.as_float(prefix + "cam_grad", g.elem_type(head.feature), "grads_float")
    f = b.as_float(features, g.elem_type(head.feature), "features_rep_float")
    channel, spatial = (1, [2, 3]) if head.layout == "NCHW" else (3, [1, 2])
    zero = b.const("zero", 0.0, np.float32)

    def channel_weighted(weights: str) -> str:  # relu(sum_k w_k A_k), weights keepdims over space
        return b.op("Relu", [b.reduce("ReduceSum", b.op("Mul", [weights, f], "weighted"), [channel],
                                      "map_sum", keepdims=0)], "map_relu")

    if method == "gradcam":
        maps = channel_weighted(b.reduce("ReduceMean", grads, spatial, "alpha"))
    elif method == "hirescam":
        maps = b.op("Relu", [b.reduce("ReduceSum", b.op("Mul", [grads, f], "gf"), [channel], "map_sum",
                                      keepdims=0)], "map_relu")
    elif method == "layercam":
        positive = b.op("Relu", [grads], "grads_positive")
        maps = b.op("Relu", [b.reduce("ReduceSum", b.op("Mul", [positive, f], "gf"), [channel], "map_sum",
                                      keepdims=0)], "map_relu")
    elif method == "xgradcam":
        total = b.reduce("ReduceSum", f, spatial, "f_total")
        weighted = b.reduce("ReduceSum", b.op("Mul", [grads, f], "gf"), spatial, "gf_total")
        nonzero = b.op("Not", [b.op("Equal", [total, zero], "total_zero")], "total_nonzero")
        safe = b.op("Where", [nonzero, total, b.const("one", 1.0, np.float32)], "total_safe")
        weights = b.op("Where", [nonzero, b.op("Div", [weighted, safe], "xg_ratio"), zero], "xg_weights")
        maps = channel_weighted(weights)
    elif method == "gradcam++":
        g2 = b.op("Mul", [grads, grads], "g2")
        g3 = b.op("Mul", [g2, grads], "g3")
        total = b.reduce("ReduceSum", f, spatial, "f_total")
        denominator = b.op("Add", [b.op("Mul", [g2, b.const("two", 2.0, np.float32)], "two_g2"),
                                   b.op("Mul", [total, g3], "total_g3")], "pp_denominator")
        nonzero = b.op("Not", [b.op("Equal", [denominator, zero], "denominator_zero")], "denominator_nonzero")
        safe = b.op("Where", [nonzero, denominator, b.const("one", 1.0, np.float32)], "denominator_safe")
        alpha = b.op("Where", [nonzero, b.op("Div", [g2, safe], "pp_ratio"), zero], "pp_alpha")
        weights = b.reduce("ReduceSum", b.op("Mul", [alpha, b.op("Relu", [grads], "grads_positive")], "pp_terms"),
                           spatial, "pp_weights")
        maps = channel_weighted(weights)
    else:
        raise AssertionError(method)  # validated by _resolve_method
    hw_axes = [2, 3] if head.layout == "NCHW" else [1, 2]
    hw = b.op("Gather", [b.op("Shape", [head.feature], "feature_shape"), b.const("hw_axes", hw_axes)],
              "feature_hw", axis=0)
    shape = b.op("Concat", [b.const("minus_one", [-1]), b.const("k", [top_k]), hw], "maps_shape", axis=0)
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


def fuse(model=None, *, top_k: int = 1, size=None, normalize: bool = True, method: str = "auto",
         feature: str | None = None) -> onnx.ModelProto:
    """Return a copy of a classifier that also outputs its top-k classes, scores and class maps.

    Op sequence added to the graph (all names start with ``cam_``)::

        logits -> [Cast] -> [Flatten] -> TopK ---------------> cam_classes
                                      \\-> Exp(top - max) / ReduceSum(Exp(logits - max))
                                          (or Sigmoid) ------> cam_scores
        method="cam":
          cam_weights (C, K) -Gather(cam_classes)-> (N, k, K)
          features -> [Cast] -> Reshape -> MatMul -> Reshape -> (N, k, h, w)
        gradient methods:
          features -> Unsqueeze -> Expand -> Reshape (N * k, ...)  \
          cam_classes -> OneHot -> seeds (N * k, C)                  -> head + its backward
          pass (backprop.gradient_model, nodes prefixed cam_grad_) -> gradients (N * k, ...)
          -> the method's weighting (ReduceMean, Mul, ReduceSum, Relu, ...) -> (N, k, h, w)
          [normalize: ReduceSum(x * 0) -> IsNaN -> Where: maps holding NaN/inf -> 0]
          no size:      [normalize: ReduceMin, ReduceMax -> (x - min) / (max - min)]
          static size:  [normalize: min, max from R_H[rows] @ x @ R_W[cols]^T, then scale x]
                        -> MatMul(R_H, .) -> MatMul(., R_W^T) [normalize: Clip to [0, 1]]
          dynamic size: Resize(linear, half_pixel) -> [normalize: as without size]
          -> cam_maps

    Parameters
    ----------
    model : path, onnx.ModelProto or None
        A classifier; None means the embedded default (EfficientNet-Lite0).  It is
        not modified.
    top_k : int
        Number of classes per item, in ``[1, C]``.
    size : None, (H, W) or "input"
        Resize the maps (bilinear, half-pixel centers, as `camcore.upsample`)
        to ``(H, W)``, or to the spatial size of the image input at run time
        (dynamic-size models included).  None keeps the feature resolution.
    normalize : bool
        Scale each map to [0, 1] by min-max over its last two axes, as
        `camcore.normalize`; constant maps and maps holding NaN become zeros.
    method : {"auto", "cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"}
        As in `camcore.Explainer.explain`: "auto" is "cam" on GAP + affine heads,
        else "gradcam", whose gradients are computed inside the fused graph.
    feature : str, optional
        The target layer (default: found as by `camcore.load`).

    Returns
    -------
    onnx.ModelProto
        Same opset and IR version, every original output kept, plus
        ``cam_classes (N, k)`` int64, ``cam_scores (N, k)`` float32 and
        ``cam_maps (N, k, h, w)`` float32 (``(N, k, H, W)`` with `size`).

    Raises
    ------
    NotCamCompatible
        The model is refused, exactly as `camcore.load` refuses it; or "cam" was
        asked of a head that is not GAP + affine; or the head has an op with no
        gradient rule.
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
    backend = OrtBackend(model, providers=["CPUExecutionProvider"], feature=feature)
    proto, head = backend.model, backend.head
    opset = _proto.opset(proto, error=CamError)
    method = _resolve_method(method, head)
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
        # exp(v - max) / sum(exp(logits - max)), not ReduceLogSumExp: OpenVINO 2026.4 reduces
        # ReduceLogSumExp with an axes attribute (opsets < 18) over every axis.
        top = b.reduce("ReduceMax", logits, [1], "logits_max")
        every = b.op("Exp", [b.op("Sub", [logits, top], "logits_shifted")], "exp_all")
        total = b.reduce("ReduceSum", every, [1], "exp_sum")
        b.op("Div", [b.op("Exp", [b.op("Sub", [values, top], "top_shifted")], "exp_top"), total], "scores")

    if method == "cam":
        maps, out_hw = _class_maps(b, head, g)
    else:
        maps, out_hw = _gradient_maps(b, head, g, backend.folded_model, method, top_k)
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
