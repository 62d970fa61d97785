"""OpenVINO backend: `GraphBackend` on the OpenVINO adapter (`OvRuntime`).

OpenVINO reads the same ONNX graphs (``Core.read_model`` on the serialized model),
compiles them for a device (``Core.compile_model``) and runs them through one
``InferRequest`` per compiled model.  Precision: ``None`` keeps the device's own
default (on CPUs with AVX512-BF16 or AMX that is bf16: the model as deployed);
``"f32"``, ``"bf16"`` and ``"f16"`` set ``INFERENCE_PRECISION_HINT``.  Every compiled
model gets ``PERFORMANCE_HINT=LATENCY``: camcore runs one request at a time
(`Explainer.explain_images` runs its chunks one after another, reading and writing
images in other threads), and the latency hint gives that one request all the cores.
"""

from __future__ import annotations

import threading

import numpy as np

from camcore.errors import CamError, missing_dependency

from .graph_backend import GraphBackend
from .runtime import PRECISIONS

__all__ = ["OvBackend", "OvRuntime", "import_openvino"]

# OpenVINO element types -> camcore's precision names.
_PRECISION_NAMES = {"f32": "f32", "bf16": "bf16", "f16": "f16", "float32": "f32", "bfloat16": "bf16",
                    "float16": "f16"}


def import_openvino():
    """Import openvino, or raise `MissingDependency` naming the extra."""
    try:
        import openvino
    except ImportError:
        raise missing_dependency("openvino", "openvino") from None
    return openvino


def _first_line(exc: Exception) -> str:
    """OpenVINO's message in one line: the failed op and its reason when its ONNX reader names them
    (its first line is only a source location)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith("Conversion is failed for") or "Node:" in line]
    if named:
        return "; ".join(dict.fromkeys(named[::-1]))
    lines = [line for line in lines if not line.startswith("Exception from")] or lines
    return lines[0] if lines else type(exc).__name__


class _OvCompiled:
    """A compiled OpenVINO model behind `backends.runtime.Compiled`."""

    def __init__(self, compiled):
        self.compiled_model = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: one run at a time
        self._ports = {}

    def _port(self, name):
        if name not in self._ports:
            try:
                self._ports[name] = self.compiled_model.output(name)
            except Exception:
                raise CamError(f"openvino: the compiled model has no output {name!r}") from None
        return self._ports[name]

    def run(self, fetch, feed) -> list:
        ports = [self._port(name) for name in fetch]
        with self._lock:
            try:
                # Shared both ways (no copy in, none out of `infer`); the request's output
                # tensors are reused by the next run, so each fetched one is copied once, here.
                results = self._request.infer(dict(feed), share_inputs=True, share_outputs=True)
                return [np.array(results[port], copy=True) for port in ports]
            except Exception as exc:
                raise CamError(f"openvino failed: {_first_line(exc)}") from None


class OvRuntime:
    """The OpenVINO adapter (`backends.runtime.Runtime`).

    Parameters
    ----------
    device : str
        An OpenVINO device name (``"CPU"``, ``"GPU"``, ``"NPU"``, ``"AUTO"``...).
    precision : {None, "f32", "bf16", "f16"}
        None keeps the device's default; the others set ``INFERENCE_PRECISION_HINT``.
    config : dict, optional
        More ``compile_model`` properties (they override the defaults above).
    """

    name = "openvino"

    def __init__(self, device: str = "CPU", *, precision=None, config=None):
        ov = import_openvino()
        if precision is not None and precision not in PRECISIONS:
            raise CamError(f"precision must be None (the device's default) or one of {', '.join(PRECISIONS)}, "
                           f"got {precision!r}")
        if not isinstance(device, str) or not device:
            raise CamError(f"device must be an OpenVINO device name such as 'CPU', got {device!r}")
        self.core = ov.Core()
        self.version = ov.__version__
        available = self.core.available_devices
        base = device.split(".")[0].split(":")[0].upper()
        if base not in {"AUTO", "MULTI", "HETERO", "BATCH"} and not any(d.startswith(device) for d in available):
            raise CamError(f"OpenVINO device {device!r} is not available here; available: {', '.join(available)}")
        self.device = device
        self.requested_precision = precision
        self.config = {"PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        self.config.update(config or {})

    def compile(self, model, *, role: str = "model") -> _OvCompiled:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        try:
            read = self.core.read_model(data)
        except Exception as exc:
            raise CamError(f"openvino cannot read the model: {_first_line(exc)}") from None
        try:
            compiled = self.core.compile_model(read, self.device, self.config)
        except Exception as exc:
            raise CamError(f"openvino cannot compile the model for {self.device}: {_first_line(exc)}") from None
        return _OvCompiled(compiled)

    def precision(self, compiled: _OvCompiled) -> str:
        """The precision read back from the compiled model (``INFERENCE_PRECISION_HINT``)."""
        try:
            value = compiled.compiled_model.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # a device without the property: the requested one, else unknown
            return self.requested_precision or "default"
        text = str(getattr(value, "get_type_name", lambda: value)())
        return _PRECISION_NAMES.get(text, text)


class OvBackend(GraphBackend):
    """Runs an ONNX model under OpenVINO and returns ``(features, logits)``.

    Same graphs, same analysis cache as `OrtBackend`; see `GraphBackend`.

    Parameters
    ----------
    model : path or onnx.ModelProto
    device : str
        OpenVINO device (default ``"CPU"``).
    precision : {None, "f32", "bf16", "f16"}
        None: the device's default (bf16 on CPUs with AVX512-BF16 or AMX).
    feature, logits, output : str, optional
        As for `OrtBackend`.
    providers : None or ["cpu"]
        Accepted for a uniform `camcore.load`: onnxruntime providers do not apply.
    config : dict, optional
        More OpenVINO ``compile_model`` properties.

    Attributes
    ----------
    precision : str
        What ran, read back from the compiled model (``"f32"``, ``"bf16"``, ``"f16"``).
    device : str
    """

    def __init__(self, model, *, device=None, precision=None, providers=None, feature=None, logits=None,
                 output=None, config=None, size=None):
        if providers not in (None, [], ()):
            raise CamError(f"providers are onnxruntime's; with backend='openvino' use device= "
                           f"(e.g. 'CPU', 'GPU'), got providers={providers!r}")
        runtime = OvRuntime(device or "CPU", precision=precision, config=config)
        self.device = runtime.device
        super().__init__(model, runtime, feature=feature, logits=logits, output=output, size=size)

    @property
    def providers(self) -> list:
        return [f"openvino:{self.device}"]
