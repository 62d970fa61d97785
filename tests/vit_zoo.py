"""Tiny vision transformers built with `onnx.helper`: every token pooling camcore must read.

`vit(pooling=..., prefix=..., grid=...)` builds ``Conv`` patch embedding -> ``Reshape`` ->
``Transpose`` -> prefix tokens concatenated in front -> position embedding -> `blocks` pre-norm
blocks (LayerNormalization, one-head attention with its Softmax ``(N, 1, T, T)``, residual Add;
LayerNormalization, ReLU MLP, residual Add) -> final LayerNormalization -> the pooling -> Gemm.
Tensor names are fixed so that tests can name the truth: ``block{i}_in`` (input of block i),
``block{i}_out``, ``final_norm`` (the final norm's output), ``attn{i}`` (attention probabilities).
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

POOLINGS = ("cls", "cls_dist_mean", "token_mean", "token_mean_no_prefix", "cls_concat_mean")


class _G:
    def __init__(self, seed: int):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def const(self, value, name=None, dtype=np.float32) -> str:
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def weight(self, *shape, scale=0.5) -> str:
        return self.const(self.rng.standard_normal(shape) * scale)

    def op(self, op, inputs, out=None, **attrs) -> str:
        self.n += 1
        out = out or f"t{self.n}_{op.lower()}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{self.n}_{op}", **attrs))
        return out

    def ln(self, x, c, out=None) -> str:
        return self.op("LayerNormalization", [x, self.const(1 + 0.1 * self.rng.standard_normal(c)),
                                              self.const(0.1 * self.rng.standard_normal(c))], out, axis=-1)


def vit(*, pooling="cls", prefix=1, grid=(2, 3), channels=8, classes=5, blocks=2, patch=2, seed=None,
        final_norm=True, qkv="separate"):
    """A tiny ViT ``ModelProto`` (input ``x`` ``(N, 3, gh*patch, gw*patch)``, output ``logits``).

    ``qkv="separate"`` projects the query, key and value with a MatMul each, one head; ``"split"``
    and ``"gather"`` as timm does, two heads: one fused ``x W + b`` reshaped to
    ``(N, T, 3, heads, d)``, transposed to ``(3, N, heads, T, d)`` and split (``Split`` + ``Squeeze``,
    or a ``Gather`` per part).
    """
    gh, gw = grid
    c = channels
    g = _G(zlib.crc32(f"{pooling}-{prefix}-{grid}-{seed}".encode()))
    x = "x"
    emb = g.op("Conv", [x, g.weight(c, 3, patch, patch), g.weight(c)], "patch_embed",
               kernel_shape=[patch, patch], strides=[patch, patch])
    flat = g.op("Reshape", [emb, g.const([0, c, -1], dtype=np.int64)])
    patches = g.op("Transpose", [flat], "patches", perm=[0, 2, 1])
    tokens = patches
    if prefix:
        batch = g.op("Gather", [g.op("Shape", [patches]), g.const(0, dtype=np.int64)], axis=0)
        shape = g.op("Concat", [g.op("Unsqueeze", [batch, g.const([0], dtype=np.int64)]),
                                g.const([prefix, c], dtype=np.int64)], axis=0)
        lead = g.op("Expand", [g.weight(1, prefix, c, scale=1.0), shape])
        tokens = g.op("Concat", [lead, patches], axis=1)
    t = prefix + gh * gw
    h = g.op("Add", [tokens, g.weight(1, t, c)], "block0_in")
    for i in range(blocks):
        if i:
            h = g.op("Identity", [h], f"block{i}_in")
        a = g.ln(h, c)
        if qkv == "separate":
            q, k, v = (g.op("MatMul", [a, g.weight(c, c)]) for _ in range(3))
            s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])]), g.const(c ** -0.5)])
            s4 = g.op("Unsqueeze", [s, g.const([1], dtype=np.int64)])
            p = g.op("Softmax", [s4], f"attn{i}", axis=-1)
            o = g.op("MatMul", [g.op("MatMul", [g.op("Squeeze", [p, g.const([1], dtype=np.int64)]), v]),
                                g.weight(c, c)])
        else:
            heads = 2
            fused = g.op("Add", [g.weight(3 * c), g.op("MatMul", [a, g.weight(c, 3 * c)])])
            parts = g.op("Transpose", [g.op("Reshape", [fused, g.const([0, t, 3, heads, c // heads],
                                                                        dtype=np.int64)])], perm=[2, 0, 3, 1, 4])
            if qkv == "split":
                split = g.op("Split", [parts, g.const([1, 1, 1], dtype=np.int64)], axis=0)
                g.nodes[-1].output[:] = [f"{split}_{j}" for j in range(3)]
                q, k, v = (g.op("Squeeze", [f"{split}_{j}", g.const([0], dtype=np.int64)]) for j in range(3))
            else:
                q, k, v = (g.op("Gather", [parts, g.const(j, dtype=np.int64)], axis=0) for j in range(3))
            s = g.op("MatMul", [g.op("Mul", [q, g.const((c // heads) ** -0.5)]),
                                g.op("Transpose", [k], perm=[0, 1, 3, 2])])
            p = g.op("Softmax", [s], f"attn{i}", axis=-1)
            merged = g.op("Transpose", [g.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
            o = g.op("MatMul", [g.op("Reshape", [merged, g.const([0, t, c], dtype=np.int64)]), g.weight(c, c)])
        h1 = g.op("Add", [h, o], f"block{i}_mid")
        m = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [g.ln(h1, c), g.weight(c, 2 * c)])]), g.weight(2 * c, c)])
        h = g.op("Add", [h1, m], f"block{i}_out")
    z = g.ln(h, c, "final_norm") if final_norm else h

    def gemm(v, k, out=None):
        return g.op("Gemm", [v, g.weight(classes, k), g.weight(classes)], out, transB=1)

    def token(i):
        return g.op("Gather", [z, g.const(i, dtype=np.int64)], axis=1)

    def mean(start):
        part = z if start == 0 else g.op("Slice", [z, g.const([start], dtype=np.int64),
                                                   g.const([t], dtype=np.int64), g.const([1], dtype=np.int64)])
        return g.op("ReduceMean", [part], axes=[1], keepdims=0)

    if pooling == "cls":
        logits = gemm(token(0), c, "logits")
    elif pooling == "cls_dist_mean":
        logits = g.op("Div", [g.op("Add", [gemm(token(0), c), gemm(token(1), c)]), g.const(2.0)], "logits")
    elif pooling == "token_mean":
        logits = gemm(mean(0), c, "logits")
    elif pooling == "token_mean_no_prefix":
        logits = gemm(mean(prefix), c, "logits")
    elif pooling == "cls_concat_mean":
        logits = gemm(g.op("Concat", [token(0), mean(prefix)], axis=1), 2 * c, "logits")
    else:
        raise ValueError(pooling)
    graph = helper.make_graph(
        g.nodes, f"vit_{pooling}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, gh * patch, gw * patch])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
