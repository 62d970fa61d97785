"""The head of a GAP + linear model in NumPy, shared by the tests' fake backends."""

import numpy as np


def gap_linear_head(features, weights, bias, layout="NCHW", seeds=None):
    """``Backend.run_head`` of ``logits = mean_xy(features) @ weights.T + bias``.

    With `seeds` ``(M, k, C)``: the gradient of each ``seeds[m, j] . logits[m]`` is
    ``seeds[m, j] @ weights / (h * w)`` at every pixel.
    """
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    if seeds is None:
        return features.mean(axis=axes) @ weights.T + bias
    h, w = (features.shape[a] for a in axes)
    per_channel = (seeds @ weights / (h * w)).astype(features.dtype)  # (M, k, K)
    expand = per_channel[..., None, None] if layout == "NCHW" else per_channel[:, :, None, None, :]
    return np.broadcast_to(expand, (*seeds.shape[:2], *features.shape[1:])).copy()


# ----------------------------------------------------------------- runtimes

# Every backend-level suite runs on each of these (the `backend_name` fixture of tests/conftest.py).
BACKENDS = ("onnxruntime", "openvino")


def load_on(backend, model=None, **kwargs):
    """`camcore.load` on `backend`: OpenVINO at f32 (for equality checks), without onnxruntime's providers."""
    import camcore

    if backend != "onnxruntime":
        kwargs.pop("providers", None)
        kwargs.setdefault("precision", "f32")
    return camcore.load(model, backend=backend, **kwargs)


class ReferenceRuntime:
    """A third runtime in a few lines: onnx's reference evaluator behind `backends.runtime.Runtime`.

    It shows what an adapter takes (compile and run ONNX, nothing else): `GraphBackend`
    on it explains models with every method.
    """

    name = "onnx-reference"

    def __init__(self):
        import onnx

        self.version = onnx.__version__
        self.compiled = []

    def compile(self, model, *, role="model"):
        import onnx
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(onnx.load_from_string(model))
        self.compiled.append(role)

        class Compiled:
            def run(self, fetch, feed):
                return [np.array(a) for a in evaluator.run(list(fetch), dict(feed))]

        return Compiled()

    def precision(self, compiled):
        return "f32"


def run_time_reduce_axes(model) -> list:
    """The ReduceSums of `model` whose axes are computed at run time (broadcasting the shapes
    leave open): OpenVINO's ONNX reader needs a ReduceSum's axes of known length."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "ReduceSum" and len(n.input) > 1 and n.input[1] and n.input[1] not in constants]
