"""Maps of a vision transformer: every method on its token tensor, viewed on the patch grid.

The backend returns the target token tensor ``(N, T, C)`` (`Head.layout` ``"NTC"``) and runs the
head from it.  Here the patch tokens are viewed as a channels-last map ``(N, gh, gw, C)``
(`camcore.tokens.tokens_to_grid`), the prefix tokens dropped from the map, and each method runs on
that map as on a CNN's:

- CAM (exact where the head is a mean over the patch tokens then affine), EigenCAM: on the map;
- the gradient methods: gradients at the token tensor through `Backend.run_head`, viewed on the grid;
- AblationCAM, Recipro-CAM: the edited copies of the patch tokens are put back behind the item's own
  prefix tokens (kept unchanged in every run) before the head runs;
- ScoreCAM: the model is re-run on the input masked by the upsampled maps.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import InvalidInput
from .maps import cam
from .methods import GRADIENT_METHODS, eigencam
from .perturbation import ablationcam, reciprocam, scorecam
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


def token_maps(explainer, features: np.ndarray, classes: np.ndarray, method: str, inputs=None) -> np.ndarray:
    """``(n, k, gh, gw)`` maps of `method` for token `features` ``(n, T, C)`` and `classes` ``(n, k)``."""
    head = explainer.head
    prefix = head.tokens.prefix
    grid = token_grid(explainer, features, inputs)
    f = tokens_to_grid(features, grid, prefix=prefix)
    if method == "cam":
        return cam(f, head.weights, classes, layout="NHWC")
    if method == "eigencam":
        return np.repeat(eigencam(f, layout="NHWC")[:, None], classes.shape[1], axis=1)
    if method in GRADIENT_METHODS:
        gradients = tokens_to_grid(explainer._class_gradients(features, classes), grid, prefix=prefix)
        return GRADIENT_METHODS[method](f, gradients, layout="NHWC")
    options = dict(explainer.method_options)
    unknown = set(options) - {"batch_size", "max_channels", "scoring"}
    if unknown:
        raise InvalidInput(f"method_options takes 'batch_size', 'max_channels', 'scoring', got {sorted(unknown)}")
    if method == "scorecam":
        if inputs is None:
            raise InvalidInput("scorecam re-runs the model: maps() needs the `inputs` that gave `features`")
        feed, _ = explainer._feed(inputs)
        name = head.input.name
        rows = explainer.fixed_batch or options.get("batch_size", explainer.batch_size)

        def run_model(masked, items):
            return explainer.forward({k: masked if k == name else v[items] for k, v in feed.items()})[1]

        return scorecam(feed[name], f, classes, run_model, layout="NHWC", input_layout=explainer.input_layout,
                        max_channels=options.get("max_channels"), batch_size=rows)
    rows = options.get("batch_size", 256)
    run = explainer.backend.run_head
    if method == "ablationcam":
        def one(part, sel, run_head):
            return ablationcam(part, sel, run_head, layout="NHWC", batch_size=rows)
    elif method == "reciprocam":
        scoring = options.get("scoring", head.scoring)

        def one(part, sel, run_head):
            return reciprocam(part, sel, run_head, layout="NHWC", batch_size=rows, scoring=scoring)
    else:
        raise InvalidInput(f"unknown method {method!r}")
    if prefix == 0:
        return one(f, classes, lambda g: run(g.reshape(len(g), -1, g.shape[-1])))
    maps = []
    for i in range(len(f)):  # each item's copies keep its own prefix tokens
        kept = features[i:i + 1, :prefix]
        maps.append(one(f[i:i + 1], classes[i:i + 1], lambda g, kept=kept: run(grid_to_tokens(g, kept))))
    return np.concatenate(maps)


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
