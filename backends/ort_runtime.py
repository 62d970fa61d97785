"""Making onnxruntime sessions, in one place: the import, provider names and validation.

Imports no other `backends` module: graph analysis (`onnx_graph`'s probes) and the
`OrtBackend` (`ort_session`) both use it, and `onnx_graph` needs nothing from `ort_session`.
"""

from __future__ import annotations

from camcore.errors import CamError, missing_dependency

__all__ = ["import_onnxruntime", "provider_name", "resolve_providers", "make_session", "OrtRuntime"]

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


class _OrtCompiled:
    """An onnxruntime session behind `backends.runtime.Compiled`; `session` is the session itself."""

    def __init__(self, session):
        self.session = session

    def run(self, fetch, feed) -> list:
        try:
            return self.session.run(list(fetch), dict(feed))
        except Exception as exc:
            raise CamError(f"onnxruntime failed: {str(exc).splitlines()[0]}") from None


class OrtRuntime:
    """The onnxruntime adapter (`backends.runtime.Runtime`): sessions on `providers`.

    onnxruntime runs each op at the model's own types: `precision` may only be None
    or ``"f32"`` (use OpenVINO, or a converted model, for lower precisions).
    Head and gradient sessions made with the default options do not spin: their idle
    threads would compete with the forward session's for the cores (on 2 CPU cores
    that doubled Grad-CAM's overhead).
    """

    name = "onnxruntime"

    def __init__(self, providers=None, *, session_options=None, precision=None):
        ort = import_onnxruntime()
        if precision not in (None, "f32"):
            raise CamError(f"precision must be None or 'f32' on onnxruntime (it runs the model's own types), "
                           f"got {precision!r}; use backend='openvino' for bf16 or f16")
        self.version = ort.__version__
        self.providers = resolve_providers(providers)
        self.session_options = session_options

    def compile(self, model, *, role: str = "model") -> _OrtCompiled:
        options = self.session_options
        if options is None and role != "model":
            options = import_onnxruntime().SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return _OrtCompiled(make_session(model, self.providers, options=options))

    def precision(self, compiled) -> str:
        return "f32"
