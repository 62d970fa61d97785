"""Shared by the export scripts (each runs in its framework's venv): seeds, the affinity check,
the ONNX facts of an export and the files it leaves (``NAME.onnx``, ``NAME.npz``, ``NAME.json``).

Only NumPy and onnx are imported here, so every framework venv can use it.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

BATCH = 2


def seed(name: str) -> int:
    """A fixed seed per export name."""
    return zlib.crc32(name.encode())


def randomize_torch(model) -> None:
    """Random biases, norm affines and BatchNorm running stats of a torch model, so exporters cannot
    fold them away (torch is imported here: the Keras and Paddle exporters run without it)."""
    import torch

    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "weight", None), torch.Tensor) and isinstance(m, norms):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.normal_(0.0, 0.1)


def is_affine(head, features: np.ndarray, rng: np.random.Generator, rtol: float = 1e-4) -> bool:
    """Whether ``head`` (features -> logits) is affine: ``head(a) + head(b) == head(a + b) + head(0)``.

    ``a`` and ``b`` are random maps at the scale of the real ``features``; float64 arithmetic
    on the float32 results, compared relative to the largest logit.
    """
    scale = float(np.abs(features).mean()) or 1.0
    a = (rng.standard_normal(features.shape) * scale).astype(features.dtype)
    b = (rng.standard_normal(features.shape) * scale).astype(features.dtype)
    zero = np.zeros_like(features)
    outs = [np.asarray(head(v), dtype=np.float64) for v in (a, b, a + b, zero)]
    lhs, rhs = outs[0] + outs[1], outs[2] + outs[3]
    tol = rtol * max(np.abs(o).max() for o in outs)
    return bool(np.abs(lhs - rhs).max() <= tol)


def check_cam_identity(features: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                       logits: np.ndarray, layout: str) -> float:
    """Max error of ``mean_xy(features) @ W.T + b`` against the framework's logits, relative to
    max |logit| per row; raises if over 1e-4 (the oracle would contradict itself)."""
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    pooled = features.astype(np.float64).mean(axes)
    predicted = pooled @ weights.T.astype(np.float64) + bias
    err = float((np.abs(predicted - logits).max(1) / np.abs(logits).max(1)).max())
    if err > 1e-4:
        raise RuntimeError(f"framework classifier does not reproduce its logits: rel err {err:.2e}")
    return err


def _dims(value_info) -> list:
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None))
    return out


def onnx_facts(path: Path) -> dict:
    """What the exported file declares: opset, input, op types and the patterns worth noting."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: _dims(v) for v in [*inferred.value_info, *inferred.input]}
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    image = next(i for i in g.input if i.name not in inits)
    ops = sorted({n.op_type for n in g.node})
    patterns = []
    shape = _dims(image)
    if any(d == -1 for d in shape):
        patterns.append("input dim_value -1")
    if any(isinstance(d, str) for d in shape):
        patterns.append("input dim_param " + ",".join(d for d in shape if isinstance(d, str)))
    if any(d is None for d in shape):
        patterns.append("input dim unset")
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            patterns.append(n.op_type)
        elif n.op_type in ("ReduceMean", "ReduceMax"):
            if "axes" in attrs:
                patterns.append(f"{n.op_type} axes attr {list(attrs['axes'])}")
            elif len(n.input) > 1:
                src = n.input[1]
                if src in inits:
                    patterns.append(f"{n.op_type} axes initializer {numpy_helper.to_array(inits[src]).tolist()}")
                elif src in producer:
                    p = producer[src]
                    how = p.op_type
                    if p.op_type == "Cast" and p.input[0] in inits:
                        how = f"Cast({numpy_helper.to_array(inits[p.input[0]]).dtype} initializer " \
                              f"{numpy_helper.to_array(inits[p.input[0]]).tolist()})"
                    patterns.append(f"{n.op_type} axes from {how}")
        elif n.op_type in ("AveragePool", "MaxPool"):
            pads = list(attrs.get("pads", []))
            kernel = list(attrs.get("kernel_shape", []))
            spatial = shapes.get(n.input[0], [])[2:]
            # Only the pools whose window covers the whole map: the global ones.
            if len(spatial) == 2 and all(isinstance(s, int) and s <= k for s, k in zip(spatial, kernel)):
                patterns.append(f"{n.op_type} kernel {kernel} pads {pads} over {spatial}"
                                + (f" auto_pad {attrs['auto_pad'].decode()}" if "auto_pad" in attrs else ""))
    out = g.output[0].name
    if out in producer and producer[out].op_type == "Softmax":
        patterns.append("ends in Softmax")
    # Order-preserving dedup: the same pattern from many blocks is noted once.
    patterns = list(dict.fromkeys(patterns))
    return {"opset": opset, "input": {"name": image.name, "shape": shape}, "ops": ops, "patterns": patterns}


def write(out: Path, framework: str, name: str, *, exporter: str, layout: str, affine: bool,
          pooling: str, arrays: dict, refuse_ops=(), notes: str = "") -> dict:
    """Check the export against its declared facts and write ``NAME.npz`` and ``NAME.json``."""
    facts = onnx_facts(out / f"{name}.onnx")
    missing = [op for op in refuse_ops if op not in facts["ops"]]
    if missing:
        raise RuntimeError(f"{name}: refuse_ops {missing} are not in the exported graph {facts['ops']}")
    # Without a spatial pooling (class token) camcore finds no pooling to name an op at.
    if (affine and refuse_ops) or (not affine and not refuse_ops and pooling != "token"):
        raise RuntimeError(f"{name}: a non-affine model needs refuse_ops, an affine one none")
    if affine:
        check_cam_identity(arrays["features"], arrays["weights"], arrays["bias"], arrays["logits"], layout)
    np.savez(out / f"{name}.npz", **arrays)
    entry = {
        "name": name, "file": f"{framework}/{name}.onnx", "framework": framework, "exporter": exporter,
        "opset": facts["opset"], "input": facts["input"], "layout": layout, "affine": affine,
        "pooling": pooling, "refuse_ops": list(refuse_ops), "patterns": facts["patterns"],
        "feature_shape": list(arrays["features"].shape), "num_classes": int(arrays["logits"].shape[1]),
        "notes": notes,
    }
    (out / f"{name}.json").write_text(json.dumps(entry, indent=1))
    return entry


def main(models: dict, export, framework: str) -> None:
    """``--list`` prints the export names; otherwise export the given names into ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    if args.list:
        print(json.dumps(sorted(models)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or sorted(models):
        export(name, models[name], args.out)
        print(f"exported {framework}/{name}", flush=True)
