"""The seam between the array core and a runtime: one small Protocol.

A backend runs model-ready inputs and returns the target feature tensor (by
default the one that feeds the global pooling) together with the logits; it runs
the head (feature tensor -> logits) on its own, with gradients, for the gradient
and forward-only methods; and it describes the head it found (`Head`), with the
affine classifier (weights and bias) when CAM applies.  `camcore` never
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
from .tokens import TokenLayout

__all__ = ["TensorSpec", "Head", "Backend", "register_backend", "get_backend"]


@dataclass(frozen=True)
class TensorSpec:
    """A graph tensor: name, shape (ints, or str/None for dynamic axes) and numpy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype


@dataclass(frozen=True, eq=False)
class Head:
    """What was found in a model: the target layer, the pooling and, for CAM, the affine head.

    Attributes
    ----------
    weights : (C, K) float32 ndarray or None
        Effective classifier from pooled features to logits; None when the head after the
        target layer is not GAP + affine (then only gradient and forward-only methods work).
    bias : (C,) float32 ndarray or None
    feature, logits : str
        Tensor names of the target layer (by default the feature map that feeds the
        global pooling) and of the logits.
    layout : {"NCHW", "NHWC"}
        Layout of the feature tensor.
    pooling : str
        Op type of the global pooling node ("" when the target feeds none).
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
    num_classes, channels : int
        C and K (read from `weights` when given).
    cam_refusal : str
        Why CAM cannot explain this model ("" when `weights` is set).
    tokens : TokenLayout or None
        For a vision transformer: how the head pools its tokens, the prefix tokens, the patch
        grid, the token tensors, the last block's input, the final norm's input and the
        attention probabilities (see `camcore.tokens.TokenLayout`).  The feature tensor is then
        ``(N, T, C)`` with ``layout="NTC"`` (maps on the patch grid, prefix tokens dropped), or a
        channels-last map ``(N, h, w, C)`` with ``layout="NHWC"`` (Swin).  None for a CNN.
    """

    weights: np.ndarray | None
    bias: np.ndarray | None
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
    num_classes: int = 0
    channels: int = 0
    cam_refusal: str = ""
    tokens: TokenLayout | None = None

    def __post_init__(self):
        if self.weights is not None:
            object.__setattr__(self, "num_classes", int(self.weights.shape[0]))
            object.__setattr__(self, "channels", int(self.weights.shape[1]))

    @property
    def affine(self) -> bool:
        """True when CAM applies: GAP + affine head, `weights` and `bias` known."""
        return self.weights is not None


@runtime_checkable
class Backend(Protocol):
    """What `Explainer` needs from a runtime: a forward pass, and the head on its own.

    A backend may also offer ``run_attention(inputs, seeds=None, *, tokens=None)``: a vision
    transformer's attention probabilities ``(N, heads, T, T)`` per layer and, with ``seeds``
    ``(N, k, C)``, their gradients ``(N, k, heads, T, T)`` (see
    `backends.ort_session.OrtBackend.run_attention`); without it, the attention methods
    (``"rollout"``, ``"gae"``) are refused.  It may offer ``normalized_head()``:
    ``(normalize, run)``, the first LayerNorm of the block the token target enters and the head
    with that norm's output fed separately (see `backends.graph_backend.GraphBackend.normalized_head`);
    without it, ``method_options={"mask_at": "normalized"}`` is refused.
    """

    head: Head

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch of model-ready inputs.

        Returns ``(features, logits)``: features ``(N, K, h, w)``, ``(N, h, w, K)`` or a
        transformer's tokens ``(N, T, C)`` as `head.layout` says (``"NTC"``), and logits
        ``(N, C)`` (pre-activation).
        """
        ...

    def run_head(self, features: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
        """Run only the part of the model from the feature tensor to the logits.

        `features` is any batch ``(M, ...)`` in the feature tensor's shape (features of
        several images, or edited copies of one image's features).  Returns logits
        ``(M, C)``; with `seeds` ``(M, k, C)``, returns instead the gradients
        ``(M, k, *features.shape[1:])``:
        ``gradients[m, j] = d (seeds[m, j] . logits[m]) / d features[m]`` (k seeds per
        item, for the top-k classes).  The backbone is not run again; the result may be
        a read-only view.
        """
        ...


# A backend may also offer, outside the Protocol (the Explainer looks it up with getattr):
#
#     pooled_head() -> callable or None
#
# ``run((M, K) spatial means of the feature map) -> (M, C)`` logits when the target is read
# only by a whole-map average pooling (the head from the pooled tensor on), else None.
# Forward-only methods whose copies pool to known vectors (Recipro-CAM, Ablation-CAM) then
# run the head on ``(M, K)`` rows instead of ``(M, K, h, w)`` maps.


# name -> "module:attribute" or a factory; a factory is called as
# factory(model, providers=..., feature=..., logits=..., output=...) and returns a Backend;
# `device=` and `precision=` are passed too when the caller gives them.
_REGISTRY: dict[str, Any] = {"onnxruntime": "backends.ort_session:OrtBackend",
                             "openvino": "backends.ov_session:OvBackend"}


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
