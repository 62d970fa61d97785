"""Methods made from a vision transformer's attention probabilities: rollout and GAE.

A transformer block's attention probabilities ``A`` (the Softmax outputs, ``(N, H, T, T)``
for ``H`` heads over ``T = prefix + gh * gw`` tokens, row ``i`` holding how token ``i``
mixes the others) say how much each token reads each other token.  Rolled out over the
layers, they relate the token(s) the classifier pools to the patch tokens; the map is
that relevance over the patch tokens, on the patch grid ``(gh, gw)``.

The pooled token is a weighting ``p`` over the ``T`` tokens, from how the head pools
(`pooled_token`): the CLS row for CLS pooling, the mean of the CLS and distillation rows
for DeiT with its teacher, the mean of all rows (or of the patch rows) for mean pooling,
half CLS and half patch mean for DINOv2's concatenation.  The map is ``p @ R`` over the
patch columns, where ``R`` ``(T, T)`` is the method's relevance matrix.

Both refuse attention whose token count is not the image's (windowed attention, as in
Swin, where ``T`` is a window's): the rollout has no meaning there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import check_ndim, float_array
from ..errors import InvalidInput, NotCamCompatible
from ._registry import MethodSpec

__all__ = ["rollout", "gae", "pooled_token", "AttentionInputs", "POOLINGS", "ATTENTION_METHODS"]

# How a transformer's head pools its tokens (`camcore.tokens.TokenLayout.pooling`).
POOLINGS = ("cls", "cls_dist_mean", "token_mean", "token_mean_no_prefix", "cls_concat_mean")


def pooled_token(pooling: str, *, prefix: int, tokens: int) -> np.ndarray:
    """The weights ``p`` ``(T,)`` over the tokens that make the token the head reads.

    Parameters
    ----------
    pooling : {"cls", "cls_dist_mean", "token_mean", "token_mean_no_prefix", "cls_concat_mean"}
    prefix : int
        Tokens before the patch tokens.
    tokens : int
        ``T``, prefix included.

    Returns
    -------
    p : (T,) float64 ndarray, summing to 1

    Examples
    --------
    >>> pooled_token("cls_dist_mean", prefix=2, tokens=6)
    array([0.5, 0.5, 0. , 0. , 0. , 0. ])
    >>> pooled_token("cls_concat_mean", prefix=1, tokens=5)
    array([0.5  , 0.125, 0.125, 0.125, 0.125])
    """
    if pooling not in POOLINGS:
        raise InvalidInput(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
    prefix, tokens = int(prefix), int(tokens)
    if not 0 <= prefix < tokens:
        raise InvalidInput(f"prefix must be in [0, {tokens}) for {tokens} tokens, got {prefix}")
    p = np.zeros(tokens)
    needs_prefix = {"cls": 1, "cls_dist_mean": 2, "cls_concat_mean": 1}.get(pooling, 0)
    if prefix < needs_prefix:
        raise InvalidInput(f"{pooling!r} pooling reads {needs_prefix} prefix token(s), the tokens have {prefix}")
    if pooling == "cls":
        p[0] = 1.0
    elif pooling == "cls_dist_mean":
        p[:2] = 0.5
    elif pooling == "token_mean":
        p[:] = 1.0 / tokens
    elif pooling == "token_mean_no_prefix":
        p[prefix:] = 1.0 / (tokens - prefix)
    else:  # CLS concatenated with the patch mean: both halves feed the head
        p[0] = 0.5
        p[prefix:] = 0.5 / (tokens - prefix)
    return p


def _stack(attention, name: str, *, prefix: int, grid) -> np.ndarray:
    """The layers' probabilities ``(N, H_l, T, T)``, checked, in one dtype (the dtype rule)."""
    layers = list(attention)
    if not layers:
        raise InvalidInput(f"{name} must hold at least one layer's attention probabilities")
    arrays = [float_array(a, name) for a in layers]
    gh, gw = (int(v) for v in grid)
    tokens = int(prefix) + gh * gw
    for i, a in enumerate(arrays):
        check_ndim(a, 4, f"{name}[{i}]", "(N, heads, T, T)")
        if a.shape[-2:] != (tokens, tokens):
            raise NotCamCompatible(
                f"{name}[{i}] is attention over {a.shape[-1]} tokens, not the image's {tokens} "
                f"({prefix} prefix + {gh}x{gw} patches): windowed or pooled attention cannot be rolled out; "
                f"use a feature method (gradcam, reciprocam, ...) instead")
        if a.shape[0] != arrays[0].shape[0]:
            raise InvalidInput(f"{name}[{i}] has shape {a.shape}, {name}[0] {arrays[0].shape}: the layers must "
                               f"share the batch size")
    dtype = np.result_type(*arrays)
    return [a.astype(dtype, copy=False) for a in arrays]  # the head count may differ between layers


def rollout(attention, *, prefix: int, grid, pooling: str = "cls"):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    Each layer's attention, averaged over its heads, is mixed with the identity for the
    residual connection and its rows renormalized,
    ``Â_l = rownorm(0.5 * mean_h(A_l) + 0.5 * I)``, and the layers are rolled out by
    matrix products, ``R = Â_L Â_(L-1) ... Â_1``.  The map is the pooled token's row
    over the patch tokens, ``M = (p @ R)[prefix:]`` on the grid (`pooled_token`).
    It is the same for every class.

    Parameters
    ----------
    attention : sequence of (N, H, T, T) ndarray, or one (L, N, H, T, T) ndarray
        The attention probabilities of the ``L`` layers, first layer first; ``T = prefix + gh * gw``.
    prefix : int
        Tokens before the patch tokens (CLS, distillation, registers).
    grid : (gh, gw)
        The patch grid.
    pooling : str, optional
        How the head pools the tokens (`POOLINGS`).

    Returns
    -------
    maps : (N, gh, gw) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])   # CLS reads patch 0
    >>> rollout([a], prefix=1, grid=(1, 2))
    array([[[0.25, 0.  ]]])
    """
    a = _stack(attention, "attention", prefix=prefix, grid=grid)
    tokens = a[0].shape[-1]
    p = pooled_token(pooling, prefix=prefix, tokens=tokens).astype(a[0].dtype)
    eye = np.eye(tokens, dtype=a[0].dtype)
    rolled = None
    for layer in a:  # (N, H, T, T)
        mixed = 0.5 * layer.mean(axis=1) + 0.5 * eye
        mixed /= mixed.sum(axis=-1, keepdims=True)
        rolled = mixed if rolled is None else np.matmul(mixed, rolled)
    gh, gw = (int(v) for v in grid)
    return np.matmul(p, rolled)[:, prefix:].reshape(len(rolled), gh, gw)


def gae(attention, gradients, *, prefix: int, grid, pooling: str = "cls"):
    """Generic attention-model explainability (Chefer, Gur & Wolf, ICCV 2021), for self-attention.

    Each layer's attention is weighted by the gradient of the class's logit with respect
    to it and its positive part averaged over the heads,
    ``Ā_l = mean_h((∇A_l ⊙ A_l)^+)``; the relevance starts at the identity and is
    propagated layer by layer, first layer first, ``R <- R + Ā_l R``.  The map is the
    pooled token's row over the patch tokens, ``M_c = (p @ R)[prefix:]`` on the grid
    (`pooled_token`; the CLS row in the paper).

    Parameters
    ----------
    attention : sequence of (N, H, T, T) ndarray, or one (L, N, H, T, T) ndarray
        The attention probabilities of the ``L`` layers, first layer first.
    gradients : sequence of (N, k, H, T, T) ndarray, or one (L, N, k, H, T, T) ndarray
        ``gradients[l][n, j] = d logit[n, c_j] / d attention[l][n]``.
    prefix : int
    grid : (gh, gw)
    pooling : str, optional
        How the head pools the tokens (`POOLINGS`).

    Returns
    -------
    maps : (N, k, gh, gw) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    >>> g = np.ones((1, 1, 1, 3, 3)); g[..., 0, 1] = 4.0       # the logit grows with CLS -> patch 0
    >>> gae([a], [g], prefix=1, grid=(1, 2))
    array([[[[2., 0.]]]])
    """
    a = _stack(attention, "attention", prefix=prefix, grid=grid)
    grads = [float_array(g, f"gradients[{i}]") for i, g in enumerate(gradients)]
    if len(grads) != len(a):
        raise InvalidInput(f"gradients must hold one array per attention layer ({len(a)}), got {len(grads)}")
    n, tokens = a[0].shape[0], a[0].shape[-1]
    for i, g in enumerate(grads):
        check_ndim(g, 5, f"gradients[{i}]", "(N, k, heads, T, T)")
        heads = a[i].shape[1]
        if g.shape[0] != n or g.shape[2:] != (heads, tokens, tokens) or g.shape[1] != grads[0].shape[1]:
            raise InvalidInput(f"gradients[{i}] must be ({n}, k, {heads}, {tokens}, {tokens}) with one k for all "
                               f"layers, got shape {g.shape}")
    dtype = np.result_type(a[0].dtype, *grads)
    p = pooled_token(pooling, prefix=prefix, tokens=tokens).astype(dtype)
    k = grads[0].shape[1]
    relevance = np.broadcast_to(np.eye(tokens, dtype=dtype), (n, k, tokens, tokens)).copy()
    for layer, g in zip(a, grads):
        weighted = np.maximum(g * layer[:, None], 0).mean(axis=2)  # (N, k, T, T)
        relevance += np.matmul(weighted, relevance)
    gh, gw = (int(v) for v in grid)
    return np.matmul(p, relevance)[..., prefix:].reshape(n, k, gh, gw)


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """What the attention methods read of a transformer, gathered by the `Explainer`.

    Attributes
    ----------
    probabilities : tuple of (n, H, T, T) ndarray
        The attention probabilities, first layer first.
    gradients : tuple of (n, k, H, T, T) ndarray, or None
        Their gradients for each item's ``k`` classes (for `gae`).
    prefix : int
    grid : (gh, gw)
    pooling : str
        One of `POOLINGS`.
    """

    probabilities: tuple
    gradients: tuple | None
    prefix: int
    grid: tuple
    pooling: str


def _rollout_maps(given):
    att = given.attention
    maps = rollout(att.probabilities, prefix=att.prefix, grid=att.grid, pooling=att.pooling)
    return np.repeat(maps[:, None], given.classes.shape[1], axis=1)


def _gae_maps(given):
    att = given.attention
    return gae(att.probabilities, att.gradients, prefix=att.prefix, grid=att.grid, pooling=att.pooling)


SPECS = (
    MethodSpec("rollout", frozenset({"attention"}), rollout, _rollout_maps, class_specific=False),
    MethodSpec("gae", frozenset({"attention", "attention_gradients"}), gae, _gae_maps),
)

# The methods that read attention probabilities, refused where a graph has none to read.
ATTENTION_METHODS = tuple(spec.name for spec in SPECS)
