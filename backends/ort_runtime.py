"""Making onnxruntime sessions, in one place: the import, provider names and validation.

Imports no other `backends` module: graph analysis (`onnx_graph`'s probes) and the
`OrtBackend` (`ort_session`) both use it, and `onnx_graph` needs nothing from `ort_session`.
"""

from __future__ import annotations

from camcore.errors import CamError, missing_dependency

__all__ = ["import_onnxruntime", "provider_name", "resolve_providers", "make_session"]

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
    """An ``onnxruntime.InferenceSession`` for an ``onnx.ModelProto`` (or its bytes), errors as `CamError`."""
    ort = import_onnxruntime()
    providers = resolve_providers(providers)
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:
        raise CamError(f"onnxruntime cannot create a session: {str(exc).splitlines()[0]}") from None
