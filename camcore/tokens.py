"""Token sequences of vision transformers <-> maps on the patch grid (pure NumPy).

A vision transformer carries ``T = prefix + gh * gw`` tokens of ``C`` channels: ``prefix``
tokens that belong to no pixel (CLS, distillation, register tokens) followed by one token
per patch, row-major over the patch grid ``(gh, gw)``.  Maps live on that grid: the
prefix tokens are dropped from the map, and kept (unchanged) in every run of the model's
head, so that edited copies of the patch tokens still see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import check_ndim
from .errors import InvalidInput

__all__ = ["TokenLayout", "tokens_to_grid", "grid_to_tokens", "grid_for"]


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's token tensor maps onto the image, as found in its graph.

    Attributes
    ----------
    pooling : str
        How the head pools the tokens: ``"cls"`` (the CLS token), ``"cls_dist_mean"`` (CLS and
        distillation tokens, each through its head, averaged), ``"token_mean"`` (mean over all
        tokens of a ``(N, T, C)`` sequence: LeViT, PVTv2, Hugging Face's Swin; exact CAM when there
        are no prefix tokens), ``"token_mean_no_prefix"`` (mean over the patch tokens after the
        prefix tokens are sliced off), ``"cls_concat_mean"`` (CLS concatenated with the mean of the
        patch tokens, as DINOv2) or ``"spatial_mean"`` (mean over H and W of a channels-last map
        ``(N, h, w, C)``, as timm's Swin).
    prefix : int
        Tokens before the patch tokens (CLS, distillation, registers), at the target tensor.
    grid : (gh, gw)
        The patch grid of the target tensor, for an input of `input_size`.
    stride : (sh, sw)
        Input pixels per grid cell (``input_size / grid``), to place the tokens of an input of
        another size (models that interpolate their position embeddings).
    input_size : (H, W)
        The input size the graph was analysed at.
    source : str
        The token tensor the pooling reads (``(N, T, C)``, or ``(N, h, w, C)`` for Swin).
    detail : str
        The pooling in words, for ``camcore inspect``.
    tensors : tuple of (name, shape)
        Token tensors the logits depend on through them alone (the residual stream: block inputs
        and outputs), in graph order; any of them can be the target (``feature=``).
    block_input : str
        The input of the last transformer block (the default target under CLS pooling: at the
        last block's *output* the patch tokens' gradient is exactly zero, since the head reads
        the CLS token alone and nothing after the last block mixes tokens).
    norm_input : str
        The input of the final norm, i.e. the last block's output (the default target under mean
        pooling, unless the mean itself feeds an affine head: then its input, where CAM is exact).
    attention : tuple of str
        Attention probabilities (Softmax outputs ``(N, heads, T, T)``) in graph order, for
        attention methods (rollout, GAE); empty where the export fuses attention or windows it.
        (Swin's windowed attention is listed too: its ``T`` is a window's, not the image's.)
    input_layout : {"NCHW", "NHWC"}
        Where the image input keeps its channels.
    """

    pooling: str
    prefix: int
    grid: tuple
    stride: tuple = (1, 1)
    input_size: tuple = ()
    source: str = ""
    detail: str = ""
    tensors: tuple = ()
    block_input: str = ""
    norm_input: str = ""
    attention: tuple = ()
    input_layout: str = "NCHW"

    def grid_for(self, tokens: int, input_size=None) -> tuple:
        """The grid of a sequence of `tokens` tokens (prefix included) for `input_size`."""
        return grid_for(tokens, prefix=self.prefix, grid=self.grid, stride=self.stride, input_size=input_size)


def grid_for(tokens: int, *, prefix: int, grid, stride=(1, 1), input_size=None) -> tuple:
    """The patch grid ``(gh, gw)`` of `tokens` tokens, `prefix` of them before the patches.

    The grid ``input_size // stride`` when `input_size` is given and that grid holds the
    ``tokens - prefix`` patches (an input of another shape), else `grid`, which must hold them.

    >>> grid_for(197, prefix=1, grid=(14, 14))
    (14, 14)
    >>> grid_for(1 + 16 * 12, prefix=1, grid=(14, 14), stride=(16, 16), input_size=(256, 192))
    (16, 12)
    """
    patches = tokens - prefix
    gh, gw = (int(v) for v in grid)
    if input_size is not None:
        h, w = (int(input_size[0]) // int(stride[0]), int(input_size[1]) // int(stride[1]))
        if h * w == patches:
            return h, w
    if gh * gw == patches:
        return gh, gw
    raise InvalidInput(f"cannot place {patches} patch tokens ({tokens} tokens, {prefix} prefix) on the "
                       f"{gh}x{gw} patch grid" + (f" or on the grid of a {input_size[0]}x{input_size[1]} input"
                                                   if input_size is not None else ""))


def tokens_to_grid(tokens, grid, *, prefix: int = 0):
    """The patch tokens of a token sequence, on the patch grid (channels last).

    Parameters
    ----------
    tokens : (..., T, C) ndarray
        Token sequences (``(N, T, C)`` activations, ``(N, k, T, C)`` gradients), with
        ``T = prefix + gh * gw``.
    grid : (gh, gw)
    prefix : int
        Leading tokens that belong to no patch; dropped.

    Returns
    -------
    (..., gh, gw, C) ndarray
        A view of `tokens` where possible (never a copy of the input's data to write into).

    >>> t = np.arange(2 * 7 * 1).reshape(2, 7, 1)
    >>> tokens_to_grid(t, (2, 3), prefix=1)[1, :, :, 0]
    array([[ 8,  9, 10],
           [11, 12, 13]])
    """
    t = np.asarray(tokens)
    if t.ndim < 2:
        raise InvalidInput(f"tokens must be (..., T, C), got shape {t.shape}")
    gh, gw = (int(v) for v in grid)
    prefix = int(prefix)
    if prefix < 0 or t.shape[-2] != prefix + gh * gw:
        raise InvalidInput(f"tokens must hold {prefix} prefix + {gh}x{gw} patch tokens = {prefix + gh * gw} "
                           f"on axis -2, got shape {t.shape}")
    return t[..., prefix:, :].reshape(*t.shape[:-2], gh, gw, t.shape[-1])


def grid_to_tokens(grid_tokens, prefix_tokens):
    """Patch tokens on the grid, back into a sequence behind the given prefix tokens.

    Parameters
    ----------
    grid_tokens : (M, gh, gw, C) ndarray
        Patch tokens on the grid (for example edited copies of one item's).
    prefix_tokens : (M, p, C) or (1, p, C) ndarray
        The prefix tokens each row keeps (broadcast over rows when 1).

    Returns
    -------
    (M, p + gh * gw, C) ndarray
        In the dtype of `grid_tokens`.

    >>> g = np.ones((2, 2, 3, 4)); p = np.zeros((1, 1, 4))
    >>> grid_to_tokens(g, p).shape
    (2, 7, 4)
    """
    g = np.asarray(grid_tokens)
    check_ndim(g, 4, "grid_tokens", "(M, gh, gw, C)")
    p = np.asarray(prefix_tokens)
    check_ndim(p, 3, "prefix_tokens", "(M, p, C)")
    m, gh, gw, c = g.shape
    if p.shape[2] != c or p.shape[0] not in (1, m):
        raise InvalidInput(f"prefix_tokens must be ({m} or 1, p, {c}), got shape {p.shape}")
    patches = g.reshape(m, gh * gw, c)
    if p.shape[1] == 0:
        return patches
    return np.concatenate([np.broadcast_to(p, (m, *p.shape[1:])).astype(g.dtype, copy=False), patches], axis=1)
