"""The seam between the array core and a runtime: one small Protocol.

A backend runs model-ready inputs and returns the feature tensor that feeds the
global average pooling together with the logits; it also describes the affine
head (weights and bias) that maps pooled features to logits.  `camcore` never
imports a backend module at import time: `camcore.load` looks the backend up by
name in a small registry (see `register_backend`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from .errors import CamError

__all__ = ["TensorSpec", "Head", "Backend", "register_backend", "get_backend"]


@dataclass(frozen=True)
class TensorSpec:
    """A graph tensor: name, shape (ints, or str/None for dynamic axes) and numpy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype


@dataclass(frozen=True, eq=False)
class Head:
    """What was found in a model: the feature tensor, the pooling and the affine head.

    Attributes
    ----------
    weights : (C, K) float32 ndarray
        Effective classifier from pooled features to logits.
    bias : (C,) float32 ndarray
    feature, logits : str
        Tensor names of the feature map that feeds the pooling and of the logits.
    layout : {"NCHW", "NHWC"}
        Layout of the feature tensor.
    pooling : str
        Op type of the global average pooling node.
    pooling_node, pooling_detail : str
        Its node name, and how it pools (e.g. ``"ReduceMean over H and W (axes 1, 2)"``).
    input : TensorSpec
        The image input.  `inputs` lists every graph input (multi-input models).
    feature_shape : tuple
        Inferred shape of the feature tensor, in its own layout (dynamic axes as str/None).
    scoring : {"softmax", "sigmoid"}
        How scores are made from logits: sigmoid when the graph ends in Sigmoid.
    output : str
        The model output the head was traced from.
    """

    weights: np.ndarray
    bias: np.ndarray
    feature: str
    logits: str
    layout: str
    pooling: str
    input: TensorSpec
    inputs: tuple = ()
    feature_shape: tuple = ()
    scoring: str = "softmax"
    output: str = ""
    extra: dict = field(default_factory=dict)
    pooling_node: str = ""
    pooling_detail: str = ""

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    @property
    def channels(self) -> int:
        return int(self.weights.shape[1])


@runtime_checkable
class Backend(Protocol):
    """What `Explainer` needs from a runtime."""

    head: Head

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch of model-ready inputs.

        Returns ``(features, logits)``: features ``(N, K, h, w)`` or ``(N, h, w, K)``
        as `head.layout` says, and logits ``(N, C)`` (pre-activation).
        """
        ...


# name -> "module:attribute" or a factory; a factory is called as
# factory(model, providers=..., feature=..., logits=...) and returns a Backend.
_REGISTRY: dict[str, Any] = {"onnxruntime": "backends.ort_session:OrtBackend"}


def register_backend(name: str, factory: Callable[..., Backend] | str) -> None:
    """Register a backend factory (or a ``"module:attr"`` string) under `name`."""
    _REGISTRY[name] = factory


def get_backend(name: str) -> Callable[..., Backend]:
    """Return the factory registered under `name` (also from ``camcore.backends`` entry points)."""
    target = _REGISTRY.get(name)
    if target is None:
        for ep in entry_points(group="camcore.backends"):
            if ep.name == name:
                target = ep.value
                break
    if target is None:
        known = sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group="camcore.backends")})
        raise CamError(f"unknown backend {name!r}; known backends: {', '.join(known)}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target
