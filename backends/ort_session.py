"""onnxruntime backend: runs a model with its feature tensor exposed as an extra output."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from camcore.backend import Head
from camcore.errors import CamError, InvalidInput, NotCamCompatible, missing_dependency

from . import onnx_graph

__all__ = ["OrtBackend", "find_any_head", "import_onnxruntime", "resolve_providers", "make_session"]

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
        self.head: Head = find_any_head(proto, feature=feature, logits=logits, output=output)
        exposed = onnx_graph.expose_outputs(proto, [self.head.feature, self.head.logits])
        self._providers = providers
        self.session = make_session(exposed, providers, options=session_options)
        self._fetch = [self.head.feature, self.head.logits]
        self._head_sessions = {}
        self.head = self._with_concrete_shapes(self.head)

    def _with_concrete_shapes(self, head: Head) -> Head:
        """Fill what shape inference left unknown (feature dims, C, K) by one batch-1 run.

        The feature shape is filled only for inputs of static size (apart from the batch
        axis), since otherwise the feature size follows the input size; C and K are read
        from a run at 224 pixels per dynamic axis when inference did not give them.
        """
        shape = head.feature_shape
        known = len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
        static = all(isinstance(d, int) for spec in head.inputs for d in spec.shape[1:])
        if (known or not static) and head.num_classes and head.channels:
            return head
        feed = {spec.name: np.zeros([d if isinstance(d, int) else (1 if axis == 0 else 224)
                                     for axis, d in enumerate(spec.shape)], spec.dtype) for spec in head.inputs}
        features, logits = self.session.run(self._fetch, feed)
        changes = {"num_classes": int(np.prod(logits.shape[1:])),
                   "channels": int(features.shape[1 if head.layout == "NCHW" else 3])}
        if static and not known:
            changes["feature_shape"] = (shape[0] if shape else "N", *features.shape[1:])
        return dataclasses.replace(head, **changes) if head.weights is None else \
            dataclasses.replace(head, feature_shape=changes.get("feature_shape", shape))

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

    def _head_session(self, gradients: bool):
        """The head alone (feature tensor -> logits), with the backward pass when asked; built once."""
        if gradients not in self._head_sessions:
            from . import backprop

            head, frontier = backprop.cut_head(onnx_graph.fold_constants(self.model), self.head.feature,
                                               self.head.logits)
            if gradients:
                head = backprop.add_backward(head, self.head.feature, self.head.logits, seed=_SEED, grad=_GRAD)
            session = make_session(head, self._providers)
            specs = {i.name: i for i in session.get_inputs()}
            self._head_sessions[gradients] = (session, [specs[name] for name in frontier],
                                              specs.get(_SEED))
        return self._head_sessions[gradients]

    def run_head(self, features: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
        """Run the head alone on any batch of feature maps; see `camcore.Backend.run_head`.

        Frontier inputs of the head are read only through ``Shape`` (a batch size for a
        Reshape): they get zeros of the right batch size.  A model exported with a fixed
        batch size runs in chunks of that size, the last one padded.
        """
        session, frontier, seed_spec = self._head_session(seeds is not None)
        fetch = [_GRAD] if seeds is not None else [self.head.logits]
        fixed = self.head.input.shape[0] if self.head.input.shape else None
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(features), 1)
        parts = []
        for start in range(0, len(features), step):
            part = features[start:start + step]
            n = len(part)
            pad = step - n if isinstance(fixed, int) and fixed > 0 else 0
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            feed = {self.head.feature: np.ascontiguousarray(part)}
            for spec in frontier:
                dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
                feed[spec.name] = np.zeros([len(part), *dims[1:]], _ORT_DTYPES.get(spec.type, np.float32))
            if seeds is not None:
                seed = seeds[start:start + step]
                if pad:
                    seed = np.concatenate([seed, np.zeros((pad, seed.shape[1]), seed.dtype)])
                rank = len(seed_spec.shape) if seed_spec.shape else 2
                feed[_SEED] = seed.astype(_ORT_DTYPES.get(seed_spec.type, np.float32)).reshape(
                    len(seed), -1, *[1] * (rank - 2))
            try:
                (out,) = session.run(fetch, feed)
            except Exception as exc:
                raise CamError(f"onnxruntime failed on the head: {str(exc).splitlines()[0]}") from None
            parts.append(out[:n] if seeds is not None else out.reshape(len(part), -1)[:n])
        return np.concatenate(parts)


_SEED, _GRAD = "cam_seed", "cam_grad"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def find_any_head(model, *, feature=None, logits=None, output=None) -> Head:
    """The CAM head when the model has one, else the target layer of the gradient methods.

    Raises `NotCamCompatible` only when neither can be found, with both reasons.
    """
    try:
        return onnx_graph.find_head(model, feature=feature, logits=logits, output=output)
    except NotCamCompatible as refusal:
        try:
            return onnx_graph.find_target(model, feature=feature, logits=logits, output=output,
                                          cam_refusal=str(refusal))
        except NotCamCompatible as exc:
            raise NotCamCompatible(f"{refusal}; no target layer for gradient methods either: {exc}") from None
