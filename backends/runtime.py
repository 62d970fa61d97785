"""The runtime seam: what a runtime adapter does, and nothing more.

A runtime compiles ONNX models (bytes) and runs them: it owns devices or providers,
precision and threads, never graph logic.  Which graphs run (the model with its
feature and logits exposed, the head, the backward graph) is decided once, in
`backends.graph_backend`, for every runtime.  onnxruntime (`backends.ort_runtime`)
and OpenVINO (`backends.ov_session`) are the two adapters; a third one (TensorRT
directly, or onnxruntime with a plugin execution provider) implements these two
Protocols and is registered by name with `camcore.register_backend`.

Imports no other `backends` module.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Runtime", "Compiled", "PRECISIONS"]

# Precision names shared by the adapters: `precision=None` is the runtime's own default.
PRECISIONS = ("f32", "bf16", "f16")


@runtime_checkable
class Compiled(Protocol):
    """One compiled ONNX model."""

    def run(self, fetch: Sequence[str], feed: Mapping[str, np.ndarray]) -> list:
        """Run on `feed` (input name -> array) and return the `fetch` outputs, as arrays the caller owns."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """Compiles ONNX models for one device at one precision.

    Attributes
    ----------
    name : str
        The backend name (``"onnxruntime"``, ``"openvino"``).
    version : str
        The runtime's version.
    """

    name: str
    version: str

    def compile(self, model: bytes, *, role: str = "model") -> Compiled:
        """Compile serialized ONNX `model`; `role` is ``"model"``, ``"head"`` or ``"gradients"``.

        Raises `camcore.CamError` when the runtime refuses the model.
        """
        ...

    def precision(self, compiled: Compiled) -> str:
        """The precision `compiled` runs at (``"f32"``, ``"bf16"``, ``"f16"``, or the model's own)."""
        ...
