"""onnxruntime backend: runs a model with its feature tensor exposed as an extra output."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from camcore.backend import Head
from camcore.errors import CamError, InvalidInput, missing_dependency

from . import onnx_graph

__all__ = ["OrtBackend", "import_onnxruntime", "resolve_providers", "make_session"]

_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def import_onnxruntime():
    """Import onnxruntime, or raise `MissingDependency` naming the extras."""
    try:
        import onnxruntime
    except ImportError:
        raise missing_dependency("onnxruntime", "cpu", "gpu") from None
    return onnxruntime


def provider_name(name: str) -> str:
    """Full onnxruntime provider name for a name or an alias (``"cpu"``, ``"cuda"``, ``"tensorrt"``)."""
    return _ALIASES.get(name.lower(), name) if isinstance(name, str) else name


def resolve_providers(providers=None) -> list:
    """Validate `providers` (names or ``(name, options)`` pairs) against this onnxruntime.

    The default is CUDA then CPU when CUDA is available, otherwise CPU.
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if providers is None:
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    resolved = []
    for entry in providers:
        name, options = (entry if isinstance(entry, tuple) else (entry, None))
        name = provider_name(name)
        if name not in ort.get_all_providers():
            raise CamError(f"unknown provider {name!r}; onnxruntime knows {', '.join(ort.get_all_providers())}")
        if name not in available:
            hint = " (install camcore[gpu] instead of camcore[cpu])" if name != "CPUExecutionProvider" else ""
            raise CamError(f"provider {name!r} is not available here{hint}; available: {', '.join(available)}")
        resolved.append((name, dict(options)) if options is not None else name)
    return resolved


def make_session(model, providers=None, *, options=None):
    """An ``onnxruntime.InferenceSession`` for an ``onnx.ModelProto``, errors as `CamError`."""
    ort = import_onnxruntime()
    providers = resolve_providers(providers)
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:
        raise CamError(f"onnxruntime cannot create a session: {str(exc).splitlines()[0]}") from None


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + ")"


class OrtBackend:
    """Runs an ONNX model under onnxruntime and returns ``(features, logits)``.

    Parameters
    ----------
    model : path or onnx.ModelProto
    providers : list, optional
        onnxruntime providers: names or ``(name, options)`` pairs.
    feature, logits : str, optional
        Tensor-name overrides (see `onnx_graph.find_head`).
    output : str, optional
        The model output to explain (default: the first).
    """

    def __init__(self, model, *, providers=None, feature=None, logits=None, output=None,
                 session_options=None):
        import_onnxruntime()
        proto, self.folder = onnx_graph.load_model(model)
        self.model = proto
        self.head: Head = onnx_graph.find_head(proto, feature=feature, logits=logits, output=output)
        exposed = onnx_graph.expose_outputs(proto, [self.head.feature, self.head.logits])
        self.session = make_session(exposed, providers, options=session_options)
        self._fetch = [self.head.feature, self.head.logits]
        self.head = self._with_concrete_feature_shape(self.head)

    def _with_concrete_feature_shape(self, head: Head) -> Head:
        """Fill the feature shape that shape inference left symbolic, by one batch-1 run.

        Only for inputs of static size (apart from the batch axis); other models keep
        symbolic dims, since the feature size follows the input size.
        """
        shape = head.feature_shape
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            return head
        if any(not isinstance(d, int) for spec in head.inputs for d in spec.shape[1:]):
            return head
        feed = {spec.name: np.zeros((1, *spec.shape[1:]), spec.dtype) for spec in head.inputs}
        (features,) = self.session.run([head.feature], feed)
        return dataclasses.replace(head, feature_shape=(shape[0] if shape else "N", *features.shape[1:]))

    @property
    def providers(self) -> list:
        return self.session.get_providers()

    def check_inputs(self, inputs) -> dict:
        """Return the feed dict, or raise `InvalidInput` naming what the model expects."""
        specs = self.head.inputs
        if not isinstance(inputs, Mapping):
            if len(specs) != 1:
                raise InvalidInput(f"inputs must be a dict for this model; it takes {[s.name for s in specs]}")
            inputs = {specs[0].name: inputs}
        missing = [s.name for s in specs if s.name not in inputs]
        unknown = [n for n in inputs if n not in {s.name for s in specs}]
        if missing or unknown:
            raise InvalidInput(f"inputs must be {[s.name for s in specs]}, got {list(inputs)}")
        feed = {}
        for spec in specs:
            arr = np.asarray(inputs[spec.name])
            static_ok = arr.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, arr.shape))
            if arr.dtype != spec.dtype or not static_ok:
                raise InvalidInput(
                    f"input {spec.name!r} must be {spec.dtype} with shape {_shape_text(spec.shape)}, "
                    f"got {arr.dtype} with shape {arr.shape}")
            feed[spec.name] = arr
        return feed

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feed = self.check_inputs(inputs)
        try:
            features, logits = self.session.run(self._fetch, feed)
        except Exception as exc:
            raise CamError(f"onnxruntime failed: {str(exc).splitlines()[0]}") from None
        return features, logits.reshape(len(logits), -1)
