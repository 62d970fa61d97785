"""onnxruntime backend: `GraphBackend` on the onnxruntime adapter (`ort_runtime.OrtRuntime`)."""

from __future__ import annotations

from .graph_backend import GraphBackend, find_any_head
from .ort_runtime import OrtRuntime, import_onnxruntime, make_session, provider_name, resolve_providers

# Session making lives in `ort_runtime`, the graphs in `graph_backend`; re-exported here for existing imports.
__all__ = ["OrtBackend", "find_any_head", "import_onnxruntime", "resolve_providers", "make_session", "provider_name"]


class OrtBackend(GraphBackend):
    """Runs an ONNX model under onnxruntime and returns ``(features, logits)``.

    See `backends.graph_backend.GraphBackend` for the analysis (and its cache) and the
    head graphs; this class only picks the runtime.

    Parameters
    ----------
    model : path or onnx.ModelProto
    providers : list, optional
        onnxruntime providers: names or ``(name, options)`` pairs.
    feature, logits : str, optional
        Tensor-name overrides (see `onnx_graph.find_head`).
    output : str, optional
        The model output to explain (default: the first).
    session_options : onnxruntime.SessionOptions, optional
        For every session (default: onnxruntime's, with head sessions not spinning).
    precision : {None, "f32"}
        onnxruntime runs the model's own types; anything else is refused.
    device : None
        Accepted for a uniform `camcore.load`; onnxruntime picks devices by `providers`.

    Attributes
    ----------
    cache_hit : bool
        Whether the analysis came from the cache.
    session : onnxruntime.InferenceSession
        The forward session (the model with feature and logits exposed).
    """

    def __init__(self, model, *, providers=None, feature=None, logits=None, output=None,
                 session_options=None, precision=None, device=None):
        if device is not None:
            from camcore.errors import CamError

            raise CamError(f"device is for backend='openvino'; onnxruntime picks devices by providers "
                           f"(e.g. providers=['cuda']), got device={device!r}")
        self._providers, self._session_options = providers, session_options
        super().__init__(model, OrtRuntime(providers, session_options=session_options, precision=precision),
                         feature=feature, logits=logits, output=output)

    @property
    def session(self):
        return self.compiled.session

    @property
    def providers(self) -> list:
        return self.session.get_providers()
