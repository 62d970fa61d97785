"""Fixture zoo: tiny ONNX classifiers in every exporter style the ONNX backend must handle.

Each builder returns a `ZooModel`: the model plus its ground truth, computed in NumPy from
the builder's own parameters.  A compatible model records the feature tensor that feeds the
global average pooling, the pre-activation logits tensor, the layout, the pooling op and the
effective affine head ``logits = mean_xy(features) @ weights.T + bias``.  A refused model
records a substring that the refusal message must contain.

`CASES` maps names to builders of compatible models, `REFUSED` to builders of models that
CAM must refuse.  Builders are deterministic: the RNG is seeded from the case name.

Naming conventions the backend tests can rely on:

- ``feature`` is the input of the pooling node (for ``nhwc_transpose_gap`` that is the
  NCHW output of the Transpose; its NHWC input ``features`` is an equivalent answer);
- ``logits`` is the ``(N, C)`` pre-activation tensor nearest the output: walking back from
  it through Identity/Cast/Flatten/Reshape/Squeeze reaches tensors holding the same values.
"""

from __future__ import annotations

import dataclasses
import zlib
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ZooModel", "CASES", "REFUSED", "NUM_CLASSES", "CHANNELS", "hot_spot_input", "vector_classifier"]

NUM_CLASSES = 5
CHANNELS = 8
IN_CHANNELS = 3

# Opset from which these ops take `axes` as an input instead of an attribute.
_AXES_INPUT_OPSET = {"Squeeze": 13, "Unsqueeze": 13, "ReduceMean": 18, "ReduceMax": 18}


@dataclasses.dataclass(frozen=True, eq=False)
class ZooModel:
    """A zoo model and its ground truth.

    Attributes
    ----------
    name : str
    model : onnx.ModelProto
        Holds all tensor data in memory, also when ``external_data`` is set.
    layout : {"NCHW", "NHWC"}
        Layout of the ``feature`` tensor.
    feature : str or None
        Input of the pooling node (None when the model has no pooling).
    logits : str
        Pre-activation ``(N, C)`` logits tensor.
    pooling : str or None
        Op type of the pooling node.
    weights : (C, K) float32 ndarray or None
        Effective affine head from pooled features to logits (None when refused).
    bias : (C,) float32 ndarray or None
    scoring : {"softmax", "sigmoid"}
    input_name : str
    input_shape : tuple of int
        Concrete shape to feed.
    input_dtype : numpy dtype
    refuse : str or None
        Substring the refusal message must contain; None for a compatible model.
    external_data : bool
        `save` writes the initializers to a separate ``<name>.onnx.data`` file.
    other_input_shapes : tuple of tuple of int
        Further concrete shapes to feed (models with symbolic dims).
    location_preserving : bool
        Features are hot exactly where the input is (see `hot_spot_input`).
    atol, rtol : float
        Tolerances for comparing logits with the ground truth (looser for float16).
    """

    name: str
    model: onnx.ModelProto
    layout: str
    feature: str | None
    logits: str
    pooling: str | None
    weights: np.ndarray | None
    bias: np.ndarray | None
    scoring: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    refuse: str | None = None
    external_data: bool = False
    other_input_shapes: tuple[tuple[int, ...], ...] = ()
    location_preserving: bool = False
    atol: float = 1e-4
    rtol: float = 1e-4

    def random_input(self, seed: int = 0, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Standard-normal input of `shape` (default `input_shape`) in the model's dtype."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal(shape or self.input_shape).astype(self.input_dtype)

    def save(self, directory: str | Path) -> Path:
        """Write ``<name>.onnx`` (and ``<name>.onnx.data`` if external) into `directory`."""
        path = Path(directory) / f"{self.name}.onnx"
        if not self.external_data:
            onnx.save_model(self.model, path)
            return path
        # save_model externalises the proto in place: work on a copy.
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{self.name}.onnx.data", size_threshold=1024)
        return path


def hot_spot_input(zoo_model: ZooModel, y: int, x: int) -> np.ndarray:
    """Input of a location-preserving model whose features are non-zero only at (y, x)."""
    if not zoo_model.location_preserving:
        raise ValueError(f"{zoo_model.name} does not preserve location")
    image = np.zeros(zoo_model.input_shape, dtype=zoo_model.input_dtype)
    if zoo_model.layout == "NCHW":
        image[:, :, y, x] = 1
    else:
        image[:, y, x, :] = 1
    return image


def _expose_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """Copy of `model` with the tensors `names` appended as graph outputs (test-side only)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    infos = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            if name not in infos:
                raise KeyError(f"no inferred type for tensor {name!r}")
            copy.graph.output.append(infos[name])
            present.add(name)
    return copy


class _Graph:
    """Accumulates nodes and initializers with deterministic names."""

    def __init__(self, name: str, opset: int, dtype):
        self.opset = opset
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def param(self, name: str, shape, *, scale: float = 1.0, positive: bool = False, dtype=None):
        """Random initializer; returns its stored values as float64 (fp16 rounding included)."""
        values = (self.rng.uniform(0.5, 1.5, shape) if positive
                  else self.rng.normal(0.0, scale, shape))
        array = values.astype(dtype or self.dtype)
        self.const(name, array, array.dtype)
        return array.astype(np.float64)

    def op(self, op_type: str, inputs, output: str | None = None, **attrs) -> str:
        node_name = f"{op_type.lower()}_{len(self.nodes)}"
        output = output or node_name
        node = helper.make_node(op_type, list(inputs), [output], name=node_name, **attrs)
        self.nodes.append(node)
        return output

    def constant_node(self, value, output: str, dtype=None) -> str:
        """Tensor produced by a Constant node (Caffe2-style weights), not an initializer."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), output)
        return self.op("Constant", [], output, value=tensor)

    def axes_op(self, op_type: str, x: str, axes, output: str | None = None, **attrs) -> str:
        if self.opset >= _AXES_INPUT_OPSET[op_type]:
            axes_name = self.const(f"{op_type.lower()}_{len(self.nodes)}_axes", axes, np.int64)
            return self.op(op_type, [x, axes_name], output, **attrs)
        return self.op(op_type, [x], output, axes=list(axes), **attrs)

    def flat(self, x: str, rank: int) -> str:
        return x if rank == 2 else self.op("Flatten", [x], axis=1)


def _backbone(g: _Graph, x: str, *, layout: str, channels: int, se: bool, hot_spot: bool) -> str:
    """Conv + Relu (NCHW compute; NHWC models transpose around it, as tf2onnx does)."""
    if layout == "NHWC":
        x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    if hot_spot:
        # 1x1 conv, positive weights, no bias: features are non-zero only where the input is.
        g.param("conv_w", (channels, IN_CHANNELS, 1, 1), positive=True)
        x = g.op("Conv", [x, "conv_w"])
    else:
        g.param("conv_w", (channels, IN_CHANNELS, 3, 3), scale=0.5)
        g.param("conv_b", (channels,), scale=0.2)
        x = g.op("Conv", [x, "conv_w", "conv_b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    last = layout == "NCHW" and not se
    x = g.op("Relu", [x], "features" if last else None)
    if se:
        # Squeeze-excitation: its pooling is inside the backbone and must not be chosen.
        squeezed = g.op("GlobalAveragePool", [x])
        g.param("se_w1", (2, channels, 1, 1), scale=0.5)
        g.param("se_w2", (channels, 2, 1, 1), scale=0.5)
        gate = g.op("Relu", [g.op("Conv", [squeezed, "se_w1"])])
        gate = g.op("Sigmoid", [g.op("Conv", [gate, "se_w2"])])
        x = g.op("Mul", [x, gate], "features" if layout == "NCHW" else None)
    if layout == "NHWC":
        x = g.op("Transpose", [x], "features", perm=[0, 2, 3, 1])
    return x


def _pool(g: _Graph, f: str, kind: str, *, layout: str, hw, channels: int):
    """Returns (pooled, rank, feature name, layout of feature, pooling op, head input size)."""
    spatial = [2, 3] if layout == "NCHW" else [1, 2]
    if kind == "gap":
        return g.op("GlobalAveragePool", [f], "pooled"), 4, f, layout, "GlobalAveragePool", channels
    if kind in ("mean_keep", "mean_drop"):
        keep = int(kind == "mean_keep")
        pooled = g.axes_op("ReduceMean", f, spatial, "pooled", keepdims=keep)
        return pooled, 4 if keep else 2, f, layout, "ReduceMean", channels
    if kind == "avgpool_full":
        pooled = g.op("AveragePool", [f], "pooled", kernel_shape=list(hw))
        return pooled, 4, f, layout, "AveragePool", channels
    if kind.startswith("avgpool_padded"):
        # GoogLeNet as converted from Caffe2: a 7x7 kernel, pads (0, 0, 1, 1), over a 6x6 map.
        pooled = g.op("AveragePool", [f], "pooled", kernel_shape=[hw[0] + 1, hw[1] + 1], pads=[0, 0, 1, 1],
                      count_include_pad=int(kind.endswith("include")))
        return pooled, 4, f, layout, "AveragePool", channels
    if kind == "mean_cast_axes":
        # tf2onnx with its optimizers off: ReduceMean's axes come from Cast(int32 initializer).
        axes = g.op("Cast", [g.const("axes_i32", spatial, np.int32)], to=TensorProto.INT64)
        pooled = g.op("ReduceMean", [f, axes], "pooled", keepdims=0)
        return pooled, 2, f, layout, "ReduceMean", channels
    if kind == "transpose_gap":
        t = g.op("Transpose", [f], "features_nchw", perm=[0, 3, 1, 2])
        return g.op("GlobalAveragePool", [t], "pooled"), 4, t, "NCHW", "GlobalAveragePool", channels
    # Refused poolings below.
    if kind == "gmp":
        return g.op("GlobalMaxPool", [f], "pooled"), 4, f, layout, "GlobalMaxPool", channels
    if kind == "reducemax":
        pooled = g.axes_op("ReduceMax", f, spatial, "pooled", keepdims=0)
        return pooled, 2, f, layout, "ReduceMax", channels
    if kind == "avgpool_partial":
        half = [hw[0] // 2, hw[1] // 2]
        pooled = g.op("AveragePool", [f], "pooled", kernel_shape=half, strides=half)
        return pooled, 4, f, layout, "AveragePool", channels * 4
    if kind == "none":
        return f, 4, None, layout, None, channels * hw[0] * hw[1]
    raise ValueError(f"unknown pooling {kind!r}")


def _gemm(g: _Graph, x: str, k: int, out: str):
    fc_w = g.param("fc_w", (NUM_CLASSES, k))
    fc_b = g.param("fc_b", (NUM_CLASSES,), scale=0.5)
    g.op("Gemm", [x, "fc_w", "fc_b"], out, transB=1)
    return fc_w, fc_b


def _batchnorm(g: _Graph, x: str, k: int):
    gamma = g.param("bn_scale", (k,), positive=True)
    beta = g.param("bn_bias", (k,), scale=0.5)
    mean = g.param("bn_mean", (k,), scale=0.5)
    var = g.param("bn_var", (k,), positive=True)
    eps = 1e-3
    y = g.op("BatchNormalization", [x, "bn_scale", "bn_bias", "bn_mean", "bn_var"], epsilon=eps)
    scale = gamma / np.sqrt(var + eps)
    return y, scale, beta - mean * scale


def _head(g: _Graph, x: str, rank: int, k: int, kind: str, out: str = "logits"):
    """Writes the head into `out`; returns the ground-truth (W, b), or (None, None) if refused."""
    c = NUM_CLASSES
    if kind == "gemm":
        return _gemm(g, g.flat(x, rank), k, out)
    if kind == "gemm_tb0":
        mat = g.param("fc_w", (k, c))
        vec = g.param("fc_b", (c,), scale=0.5)
        g.op("Gemm", [g.flat(x, rank), "fc_w", "fc_b"], out, transB=0, alpha=0.5, beta=1.5)
        return 0.5 * mat.T, 1.5 * vec
    if kind == "matmul_add":
        mat = g.param("dense_kernel", (k, c))
        vec = g.param("dense_bias", (c,), scale=0.5)
        g.op("Add", [g.op("MatMul", [g.flat(x, rank), "dense_kernel"]), "dense_bias"], out)
        return mat.T, vec
    if kind in ("conv_flatten", "conv_squeeze"):
        conv = g.param("cls_w", (c, k, 1, 1))
        vec = g.param("cls_b", (c,), scale=0.5)
        y = g.op("Conv", [x, "cls_w", "cls_b"], "class_map")
        if kind == "conv_flatten":
            g.op("Flatten", [y], out, axis=1)
        else:
            g.axes_op("Squeeze", y, [2, 3], out)
        return conv[:, :, 0, 0], vec
    if kind in ("bn4d", "bn2d"):
        if kind == "bn2d":
            x = g.flat(x, rank)
        y, scale, shift = _batchnorm(g, x, k)
        fc_w, fc_b = _gemm(g, g.flat(y, 4 if kind == "bn4d" else 2), k, out)
        return fc_w * scale, fc_w @ shift + fc_b
    if kind == "dropout":
        y = g.op("Dropout", [g.flat(x, rank), g.const("dropout_ratio", 0.3, np.float32)])
        return _gemm(g, y, k, out)
    if kind == "mul_div":
        y = g.op("Mul", [g.flat(x, rank), g.const("pre_scale", 2.0)])
        fc_w, fc_b = _gemm(g, y, k, "logits_scaled")
        g.op("Div", ["logits_scaled", g.const("temperature", 4.0)], out)
        return fc_w * 2.0 / 4.0, fc_b / 4.0
    if kind == "cast_fp16":
        y = g.op("Cast", [g.flat(x, rank)], to=TensorProto.FLOAT16)
        fc_w = g.param("fc_w", (c, k), dtype=np.float16)
        fc_b = g.param("fc_b", (c,), scale=0.5, dtype=np.float16)
        g.op("Gemm", [y, "fc_w", "fc_b"], "logits_fp16", transB=1)
        g.op("Cast", ["logits_fp16"], out, to=TensorProto.FLOAT)
        return fc_w, fc_b
    if kind == "reshape_const":
        y = g.op("Reshape", [x, g.const("flat_shape", [-1, k], np.int64)])
        return _gemm(g, y, k, out)
    if kind == "reshape_batch2":
        # torch's dynamo exporter at a static batch of 2: `view(2, -1)`.
        y = g.op("Reshape", [x, g.const("flat_shape", [2, k], np.int64)])
        return _gemm(g, y, k, out)
    if kind == "reshape_shape":
        # PaddlePaddle / torch `x.view(x.size(0), -1)`: the target shape is computed in-graph.
        n = g.op("Gather", [g.op("Shape", [x]), g.const("batch_index", 0, np.int64)], axis=0)
        n = g.axes_op("Unsqueeze", n, [0])
        shape = g.op("Concat", [n, g.const("minus_one", [-1], np.int64)], axis=0)
        y = g.op("Reshape", [x, shape])
        mat = g.param("linear_w", (k, c))
        vec = g.param("linear_b", (c,), scale=0.5)
        g.op("Add", [g.op("MatMul", [y, "linear_w"]), "linear_b"], out)
        return mat.T, vec
    if kind == "constant_nodes":
        mat = g.rng.normal(0.0, 1.0, (c, k)).astype(g.dtype)
        vec = g.rng.normal(0.0, 0.5, c).astype(g.dtype)
        g.op("Gemm", [g.flat(x, rank), g.constant_node(mat, "fc_w"), g.constant_node(vec, "fc_b")],
             out, transB=1)
        return mat.astype(np.float64), vec.astype(np.float64)
    if kind == "constantofshape":
        # Caffe2-style: weights are node outputs built from Constant / ConstantOfShape.
        base = g.rng.normal(0.0, 1.0, (c, k)).astype(g.dtype)
        vec = g.rng.normal(0.0, 1.0, c).astype(g.dtype)
        fill = numpy_helper.from_array(np.array([0.1], g.dtype), "fill")
        half = numpy_helper.from_array(np.array([0.5], g.dtype), "half")
        w_shape = g.constant_node([c, k], "w_shape", np.int64)
        b_shape = g.constant_node([c], "b_shape", np.int64)
        mat = g.op("Add", [g.constant_node(base, "w_base"),
                           g.op("ConstantOfShape", [w_shape], "w_fill", value=fill)], "fc_w")
        bias = g.op("Mul", [g.op("ConstantOfShape", [b_shape], "b_half", value=half),
                            g.constant_node(vec, "b_base")], "fc_b")
        g.op("Gemm", [g.flat(x, rank), mat, bias], out, transB=1)
        return base.astype(np.float64) + np.float64(np.float32(0.1)), 0.5 * vec.astype(np.float64)
    if kind == "squeeze":
        return _gemm(g, g.axes_op("Squeeze", x, [2, 3]), k, out)
    # Refused heads below.
    if kind == "mlp":
        g.param("fc1_w", (6, k))
        g.param("fc1_b", (6,), scale=0.5)
        hidden = g.op("Relu", [g.op("Gemm", [g.flat(x, rank), "fc1_w", "fc1_b"], transB=1)])
        g.param("fc2_w", (c, 6))
        g.param("fc2_b", (c,), scale=0.5)
        g.op("Gemm", [hidden, "fc2_w", "fc2_b"], out, transB=1)
        return None, None
    if kind == "conv_hardswish":
        g.param("conv_head_w", (6, k, 1, 1))
        g.param("conv_head_b", (6,), scale=0.5)
        g.param("cls_w", (c, 6, 1, 1))
        g.param("cls_b", (c,), scale=0.5)
        y = g.op("HardSwish", [g.op("Conv", [x, "conv_head_w", "conv_head_b"])])
        y = g.op("Conv", [y, "cls_w", "cls_b"], "class_map")
        g.op("Flatten", [y], out, axis=1)
        return None, None
    raise ValueError(f"unknown head {kind!r}")


def _ending(g: _Graph, logits: str, kind: str) -> tuple[str, str]:
    """Returns (output name, scoring)."""
    if kind == "none":
        return logits, "softmax"
    if kind == "softmax":
        return g.op("Softmax", [logits], "prob", axis=1), "softmax"
    if kind == "sigmoid":
        return g.op("Sigmoid", [logits], "prob"), "sigmoid"
    if kind == "logsoftmax":
        return g.op("LogSoftmax", [logits], "log_prob", axis=1), "softmax"
    if kind == "identity":
        return g.op("Identity", [g.op("Softmax", [logits], axis=1)], "prob"), "softmax"
    raise ValueError(f"unknown ending {kind!r}")


def _build(name: str, *, opset: int = 13, layout: str = "NCHW", pooling: str = "gap",
           head: str = "gemm", ending: str = "softmax", dtype=np.float32, se: bool = False,
           hw=(8, 8), channels: int = CHANNELS, batch: int | str = 2, dynamic_hw: bool = False,
           other_shapes=(), outputs: str = "prob", hot_spot: bool = False,
           external: bool = False, refuse: str | None = None) -> ZooModel:
    g = _Graph(name, opset, dtype)
    elem = helper.np_dtype_to_tensor_dtype(g.dtype)
    h, w = ("H", "W") if dynamic_hw is True else (-1, -1) if dynamic_hw == "minus_one" else hw
    dims = [batch, IN_CHANNELS, h, w] if layout == "NCHW" else [batch, h, w, IN_CHANNELS]
    input_name = "input_1" if layout == "NHWC" else "input"

    f = _backbone(g, input_name, layout=layout, channels=channels, se=se, hot_spot=hot_spot)
    pooled, rank, feature, feature_layout, pool_op, k = _pool(
        g, f, pooling, layout=layout, hw=hw, channels=channels)
    weights, bias = _head(g, pooled, rank, k, head)
    if weights is not None and pooling == "avgpool_padded_include":
        weights = weights * (hw[0] * hw[1]) / ((hw[0] + 1) * (hw[1] + 1))  # the padding counts
    out, scoring = _ending(g, "logits", ending)

    def value_info(tensor, size):
        return helper.make_tensor_value_info(tensor, elem, [batch, size])

    if outputs == "prob":
        graph_outputs = [value_info(out, NUM_CLASSES)]
    elif outputs == "logits_prob":
        graph_outputs = [value_info("logits", NUM_CLASSES), value_info(out, NUM_CLASSES)]
    elif outputs == "prob_embedding":
        g.op("Flatten", [pooled], "embedding", axis=1)
        graph_outputs = [value_info(out, NUM_CLASSES), value_info("embedding", channels)]
    else:
        raise ValueError(f"unknown outputs {outputs!r}")

    graph_input = helper.make_tensor_value_info(input_name, elem, dims)
    graph = helper.make_graph(g.nodes, name, [graph_input], graph_outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="camcore-zoo",
                              ir_version=helper.find_min_ir_version_for(opsets))
    sizes = {"N": 2, "C": IN_CHANNELS, "H": hw[0], "W": hw[1]}
    concrete = tuple(d if isinstance(d, int) and d > 0 else sizes[axis] for d, axis in zip(dims, layout))
    return ZooModel(
        name=name, model=model, layout=feature_layout, feature=feature, logits="logits",
        pooling=pool_op,
        weights=None if refuse else weights.astype(np.float32),
        bias=None if refuse else bias.astype(np.float32),
        scoring=scoring, input_name=input_name, input_shape=concrete, input_dtype=g.dtype,
        refuse=refuse, external_data=external, other_input_shapes=tuple(other_shapes),
        location_preserving=hot_spot,
        # float16 compute keeps ~3 significant digits (onnxruntime's CPU provider may fold
        # the casts of cast_fp16_head away, a GPU provider does not).
        atol=1e-2 if g.dtype == np.float16 or head == "cast_fp16" else 1e-4,
        rtol=1e-2 if g.dtype == np.float16 or head == "cast_fp16" else 1e-4,
    )


def _cases(**specs) -> dict[str, Callable[[], ZooModel]]:
    return {name: partial(_build, name, **kw) for name, kw in specs.items()}


CASES: dict[str, Callable[[], ZooModel]] = _cases(
    # Pooling variants (PyTorch-style Flatten + Gemm head unless noted).
    gap_gemm={},
    reducemean_attr_keepdims1=dict(pooling="mean_keep"),
    reducemean_attr_keepdims0=dict(pooling="mean_drop"),
    reducemean_input_keepdims1=dict(pooling="mean_keep", opset=18),
    reducemean_input_keepdims0=dict(pooling="mean_drop", opset=18, head="matmul_add"),
    avgpool_full_map=dict(pooling="avgpool_full", hw=(9, 7)),
    avgpool_padded_exclude_pad=dict(pooling="avgpool_padded_exclude", hw=(6, 6)),
    avgpool_padded_include_pad=dict(pooling="avgpool_padded_include", hw=(6, 6)),
    reducemean_cast_axes_opset18=dict(pooling="mean_cast_axes", opset=18, head="matmul_add"),
    nhwc_reducemean_cast_axes_opset18=dict(pooling="mean_cast_axes", opset=18, head="matmul_add",
                                           layout="NHWC", hw=(9, 7)),
    se_block_backbone=dict(se=True),
    # Head variants.
    gemm_transb0_alpha_beta=dict(head="gemm_tb0"),
    matmul_add=dict(head="matmul_add"),
    conv1x1_flatten=dict(head="conv_flatten"),
    conv1x1_squeeze=dict(head="conv_squeeze", ending="none"),
    batchnorm_4d=dict(head="bn4d"),
    batchnorm_2d=dict(head="bn2d", pooling="mean_drop"),
    dropout=dict(head="dropout"),
    scalar_mul_div=dict(head="mul_div"),
    cast_fp16_head=dict(head="cast_fp16"),
    reshape_const=dict(head="reshape_const"),
    reshape_computed_shape=dict(head="reshape_shape"),
    reshape_static_batch2=dict(head="reshape_batch2"),
    constant_node_weights=dict(head="constant_nodes"),
    constantofshape_weights=dict(head="constantofshape"),
    squeeze_axes_attr_opset11=dict(head="squeeze", opset=11),
    squeeze_axes_input_opset13=dict(head="squeeze"),
    # Endings.
    sigmoid=dict(ending="sigmoid"),
    logsoftmax=dict(ending="logsoftmax"),
    no_activation=dict(ending="none"),
    softmax_identity=dict(ending="identity"),
    # Layouts (tf2onnx).
    nhwc_reducemean=dict(layout="NHWC", pooling="mean_drop", head="matmul_add", hw=(9, 7)),
    nhwc_transpose_gap=dict(layout="NHWC", pooling="transpose_gap", hw=(9, 7)),
    # Outputs, dtype, shapes, storage.
    two_outputs_logits_prob=dict(outputs="logits_prob"),
    two_outputs_prob_embedding=dict(outputs="prob_embedding"),
    fp16_model=dict(dtype=np.float16),
    dynamic_batch=dict(batch="N", other_shapes=[(1, 3, 8, 8), (5, 3, 8, 8)]),
    dynamic_batch_hw=dict(batch="N", dynamic_hw=True, hw=(8, 8),
                          other_shapes=[(1, 3, 9, 7), (3, 3, 16, 12)]),
    # paddle2onnx: every dynamic axis declared as dim_value -1.
    paddle_minus_one_dims=dict(batch=-1, dynamic_hw="minus_one", hw=(8, 8), head="reshape_shape",
                               other_shapes=[(1, 3, 9, 7), (5, 3, 16, 12)]),
    external_data=dict(channels=64, external=True),
    # Orientation: features are hot exactly where the input is.
    hot_spot_nchw=dict(hot_spot=True, hw=(9, 7), batch=1),
    hot_spot_nhwc=dict(hot_spot=True, hw=(9, 7), batch=1, layout="NHWC", pooling="mean_drop",
                       head="matmul_add"),
)

def vector_classifier() -> onnx.ModelProto:
    """A classifier of (N, 16) vectors: no feature map at all, so no method can explain it."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((NUM_CLASSES, 16)).astype(np.float32), "fc_w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc_w"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["prob"], axis=1)],
        "vector_classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", NUM_CLASSES])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


# CAM refuses these; the gradient methods explain them (the reason names what CAM lacks).
REFUSED: dict[str, Callable[[], ZooModel]] = _cases(
    fc_only=dict(pooling="none", refuse="no global average pooling"),
    avgpool_partial=dict(pooling="avgpool_partial", refuse="no global average pooling"),
    mlp_head=dict(head="mlp", refuse="Relu"),
    conv_hardswish_after_pool=dict(head="conv_hardswish", opset=14, ending="none",
                                   refuse="HardSwish"),
    global_max_pool=dict(pooling="gmp", refuse="GlobalMaxPool"),
    reducemax=dict(pooling="reducemax", refuse="ReduceMax"),
)
