"""The method registry's records: what a method needs, and what the `Explainer` hands it.

Each family module ends in a ``SPECS`` tuple of `MethodSpec`; `camcore.methods` merges
them explicitly (`merge`), failing on a name registered twice.  A method's `compute`
receives a `MethodInputs` holding what its `needs` name, and nothing the Explainer
would have to run for it otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import InvalidInput

# What a method may need: the head's class weights, the target layer's activations, their
# gradients, re-runs of the head alone or of the whole model, a transformer's attention
# probabilities, or their gradients.
NEEDS = frozenset({"weights", "features", "gradients", "head_runs", "model_runs", "attention",
                   "attention_gradients"})


@dataclass(frozen=True, eq=False)
class MethodInputs:
    """What the `Explainer` gathers for one chunk of ``n`` items, as a method's `needs` say.

    Attributes
    ----------
    features : (n, K, h, w) or (n, h, w, K) ndarray
        The target layer's activations, in `layout`.
    classes : (n, k) int64 ndarray
    layout : {"NCHW", "NHWC"}
    options : mapping
        ``Explainer.method_options``, already checked against every method's `options`.
    scoring : {"softmax", "sigmoid"}
        How the head turns logits into scores.
    batch_size : int
        The explainer's chunk size.
    fixed_batch : int or None
        The batch size the model was exported with, if any.
    weights : (C, K) ndarray or None
        ``"weights"``: the GAP + affine head's class weights.
    gradients : (n, k, *features.shape[1:]) ndarray or None
        ``"gradients"``: ``d logit[i, classes[i, j]] / d features[i]``.
    run_head : callable or None
        ``"head_runs"``: ``run_head((M, *features.shape[1:])) -> (M, C)`` logits.
    run_pooled : callable or None
        With ``"head_runs"``, when the backend finds the target read only by a whole-map
        average pooling: ``run_pooled((M, K) spatial means) -> (M, C)`` logits, the head
        from the pooled vector on (see `camcore.backend`).
    run_model : callable or None
        ``"model_runs"``: ``run_model(masked (M, ...), items (M,)) -> (M, C)`` logits.
    inputs : ndarray or None
        ``"model_runs"``: the image input that gave `features`, in `input_layout`.
    input_layout : {"NCHW", "NHWC"}
    token_model : bool
        The features are a vision transformer's patch tokens on the patch grid.
    attention : camcore.methods.attention.AttentionInputs or None
        ``"attention"``: the attention probabilities, the prefix tokens, the patch grid and the
        pooling; with ``"attention_gradients"``, the probabilities' gradients too.
    """

    features: np.ndarray
    classes: np.ndarray
    layout: str
    options: Mapping = field(default_factory=dict)
    scoring: str = "softmax"
    batch_size: int = 32
    fixed_batch: int | None = None
    weights: np.ndarray | None = None
    gradients: np.ndarray | None = None
    run_head: Callable | None = None
    run_pooled: Callable | None = None
    run_model: Callable | None = None
    inputs: np.ndarray | None = None
    input_layout: str = "NCHW"
    token_model: bool = False
    attention: Any = None


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One registered method.

    Attributes
    ----------
    name : str
        The value of ``method=``.
    needs : frozenset of str
        A subset of `NEEDS`.
    function : callable
        The public array function (`camcore.methods.gradcam`, ...).
    compute : callable
        ``compute(MethodInputs) -> (n, k, h, w)`` maps: `function` called on what it needs.
    class_specific : bool
        False when the map is the same for every class (EigenCAM).
    options : tuple of str
        The ``method_options`` keys it reads.
    """

    name: str
    needs: frozenset
    function: Callable
    compute: Callable
    class_specific: bool = True
    options: tuple = ()

    def __post_init__(self):
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise InvalidInput(f"method {self.name!r} needs {sorted(unknown)}, not among {sorted(NEEDS)}")
        object.__setattr__(self, "needs", frozenset(self.needs))


def merge(*tables) -> dict:
    """Name -> `MethodSpec` over `tables` (tuples of specs), in order; a name twice is an error."""
    merged = {}
    for table in tables:
        for spec in table:
            if spec.name in merged:
                raise InvalidInput(f"method {spec.name!r} is registered twice")
            merged[spec.name] = spec
    return merged
