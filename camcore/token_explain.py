"""Maps of a vision transformer: every method on its token tensor, viewed on the patch grid.

The backend returns the target token tensor ``(N, T, C)`` (`Head.layout` ``"NTC"``) and runs the
head from it.  Here the patch tokens are viewed as a channels-last map ``(N, gh, gw, C)``
(`camcore.tokens.tokens_to_grid`), the prefix tokens dropped from the map, and each registered
method runs on that map as on a CNN's:

- CAM (exact where the head is a mean over the patch tokens then affine), EigenCAM: on the map;
- the gradient methods: gradients at the token tensor through `Backend.run_head`, viewed on the grid;
- methods that re-run the head (AblationCAM, Recipro-CAM): the edited copies of the patch tokens
  are put back behind the item's own prefix tokens, unchanged in every run, before the head runs
  (one item at a time when there are prefix tokens);
- ScoreCAM: the model is re-run on the input masked by the upsampled maps.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from .tokens import grid_to_tokens, tokens_to_grid

__all__ = ["token_maps", "token_grid", "token_info", "token_lines"]


def _input_size(explainer, inputs):
    if inputs is None:
        return None
    x = inputs.get(explainer.head.input.name) if isinstance(inputs, Mapping) else inputs
    if x is None or np.ndim(x) != 4:
        return None
    return x.shape[2:4] if explainer.input_layout == "NCHW" else x.shape[1:3]


def token_grid(explainer, features: np.ndarray, inputs=None) -> tuple:
    """The patch grid ``(gh, gw)`` of `features` ``(N, T, C)`` (for the input size of `inputs`)."""
    return explainer.head.tokens.grid_for(features.shape[1], _input_size(explainer, inputs))


def token_maps(explainer, spec, features: np.ndarray, classes: np.ndarray, inputs=None, *,
               seeds: np.ndarray | None = None) -> np.ndarray:
    """``(n, k, gh, gw)`` maps of the registered method `spec` for token `features` ``(n, T, C)``.

    With `seeds` ``(n, k, C)``, map ``j`` of item ``i`` explains ``seeds[i, j] . logits[i]``
    (contrastive and negated targets; `Explainer.maps`).
    """
    prefix = explainer.head.tokens.prefix
    grid = token_grid(explainer, features, inputs)
    given = explainer._method_inputs(spec, features, classes, inputs, seeds)  # gradients at the tokens, etc.
    run = given.run_head
    view = {}
    if "mask_at" in spec.options and given.options.get("mask_at") == "normalized":
        # ViT Recipro-CAM as OpenVINO XAI masks: the tokens and their norm in the block, alike
        features, run = _with_block_norm(explainer, features)
        view["run_pooled"] = None
    view.update(features=tokens_to_grid(features, grid, prefix=prefix), layout="NHWC")
    if given.gradients is not None:
        view["gradients"] = tokens_to_grid(given.gradients, grid, prefix=prefix)
    if run is None or prefix == 0:
        if run is not None:
            view["run_head"] = lambda g: run(g.reshape(len(g), -1, g.shape[-1]))
        return spec.compute(dataclasses.replace(given, **view))
    maps = []
    for i in range(len(features)):  # each item's edited copies keep its own prefix tokens
        kept = features[i:i + 1, :prefix]
        part = {k: v[i:i + 1] for k, v in view.items() if isinstance(v, np.ndarray)}
        maps.append(spec.compute(dataclasses.replace(
            given, **{**view, **part}, classes=classes[i:i + 1],
            run_head=lambda g, kept=kept: run(grid_to_tokens(g, kept)))))
    return np.concatenate(maps)


def _with_block_norm(explainer, features):
    """``(tokens and their block norm side by side (n, T, 2C), run_head of such rows)``.

    A mask on the grid scales both halves of a token alike, so a method that masks features
    masks the tokens in the residual stream and after the first norm of the block they enter.
    """
    from .errors import NotCamCompatible

    build = getattr(explainer.backend, "normalized_head", None)
    if build is None:
        raise NotCamCompatible("mask_at='normalized' needs a backend that runs the head from a block's norm; "
                               "this one does not (use mask_at='input')")
    normalize, run = build()
    c = features.shape[-1]
    both = np.concatenate([features, np.asarray(normalize(features), features.dtype)], axis=-1)
    return both, lambda rows: run(rows[..., :c], rows[..., c:])


def token_info(head) -> dict | None:
    """What `camcore inspect` shows of a transformer's tokens (JSON-ready), or None for a CNN."""
    t = head.tokens
    if t is None:
        return None
    dims = [[d if isinstance(d, int) else None for d in shape] for _, shape in t.tensors]
    return {
        "pooling": t.pooling, "pooling_detail": t.detail, "prefix_tokens": t.prefix, "grid": list(t.grid),
        "stride": list(t.stride), "input_size": list(t.input_size), "source": t.source,
        "last_block_input": t.block_input, "final_norm_input": t.norm_input,
        "tensors": [{"name": name, "shape": shape} for (name, _), shape in zip(t.tensors, dims)],
        "attention": list(t.attention),
    }


def token_lines(info: dict) -> list:
    """`token_info` as the lines of `camcore inspect`'s text output."""
    def shape_text(shape):
        return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"

    gh, gw = info["grid"]
    lines = [f"tokens       {info['pooling']}: {info['pooling_detail']}",
             f"prefix       {info['prefix_tokens']} token(s) before the patches (kept in runs, dropped from maps)",
             f"grid         {gh}x{gw} patches ({info['stride'][0]}x{info['stride'][1]} input pixels each)",
             f"last block   input {info['last_block_input']} (the default target under CLS pooling)",
             f"final norm   input {info['final_norm_input']} (the default target under mean pooling)",
             f"attention    {len(info['attention'])} attention-probability tensor(s)",
             f"token layers {len(info['tensors'])} token tensors (--feature NAME), last first:"]
    lines += [f"  {t['name']} {shape_text(t['shape'])}" for t in reversed(info["tensors"])]
    return lines
