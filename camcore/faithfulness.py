"""Faithfulness metrics: how the model's score moves when the pixels a map points at are kept or removed.

They re-run the model (through an `Explainer`) on edited copies of model-ready
inputs, in batches.  Everywhere:

* ``inputs`` ``(N, 3, H, W)`` (or ``(N, H, W, 3)`` for an NHWC model) are one
  batch of the model's single image input, in its own dtype and layout;
* ``maps`` ``(N, H, W)`` are saliency maps on the input grid (upsample a feature
  map with `camcore.upsample` first), one per item; they are min-max normalized
  here (`camcore.normalize`), so any scale works;
* ``classes`` ``(N,)`` name the class each map explains;
* a *score* is the model's probability for that class (softmax over the logits,
  or sigmoid for a multi-label head, as `Explanation.scores`).

`camcore.evaluation` re-exports them, and ``camcore eval --faithfulness`` reports
them over a dataset.
"""

from __future__ import annotations

import numpy as np

from ._validate import check_choice, check_ndim, float_array
from .errors import InvalidInput
from .maps import normalize
from .scores import sigmoid, softmax

__all__ = ["confidence_scores", "average_drop", "increase_in_confidence", "deletion_insertion", "auc",
           "BASELINES"]

BASELINES = ("zeros", "blur")
# RISE's insertion baseline: a Gaussian blur, kernel 11, sigma 5.
_BLUR_SIGMA, _BLUR_RADIUS = 5.0, 5


def _check(explainer, inputs, maps, classes):
    """Validate; return inputs, float maps normalized to [0, 1] (N, H, W), int64 classes, spatial axes."""
    x = np.asarray(inputs)
    layout = explainer.input_layout
    check_ndim(x, 4, "inputs", "(N, H, W, 3)" if layout == "NHWC" else "(N, 3, H, W)")
    size = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
    m = float_array(maps, "maps")
    if m.shape != (len(x), *size):
        raise InvalidInput(f"maps must be (N, H, W) = ({len(x)}, {size[0]}, {size[1]}) like the inputs, "
                           f"got shape {m.shape}")
    c = np.asarray(classes)
    if c.dtype.kind not in "iu" or c.shape != (len(x),):
        raise InvalidInput(f"classes must be ({len(x)},) ints, got {c.dtype} with shape {c.shape}")
    if ((c < 0) | (c >= explainer.head.num_classes)).any():
        raise InvalidInput(f"classes must be in [0, {explainer.head.num_classes}), got {c.tolist()}")
    return x, normalize(m), c.astype(np.int64), layout


def _expand(m: np.ndarray, layout: str) -> np.ndarray:
    """(N, H, W) -> broadcastable against the inputs' layout."""
    return m[:, None] if layout == "NCHW" else m[..., None]


def _score_rows(explainer, make_rows, classes_of_rows, n_rows: int, batch_size, progress) -> np.ndarray:
    """The class score of each of `n_rows` built inputs, run in chunks: ``(n_rows,)`` float64."""
    chunk = explainer.fixed_batch or int(batch_size or explainer.batch_size)
    if chunk < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size!r}")
    name = explainer.head.input.name
    scoring = sigmoid if explainer.head.scoring == "sigmoid" else softmax
    out = np.empty(n_rows)
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(start + chunk, n_rows))
        _, logits = explainer.forward({name: make_rows(rows)})
        p = scoring(logits.astype(np.float64))
        out[rows] = p[np.arange(len(rows)), classes_of_rows[rows]]
        if progress is not None:
            progress(len(rows))
    return out


def confidence_scores(explainer, inputs, maps, classes, *, batch_size=None, progress=None):
    """The class scores on each input and on the input multiplied by its normalized map.

    Parameters
    ----------
    explainer : Explainer
    inputs : (N, 3, H, W) or (N, H, W, 3) ndarray
    maps : (N, H, W) ndarray
    classes : (N,) int ndarray
    batch_size : int, optional
        Model runs per chunk (default: the explainer's).
    progress : callable, optional
        Called with the number of model rows done after each run.

    Returns
    -------
    original, masked : (N,) float64 ndarrays
        ``Y_c`` on ``X`` and ``O_c`` on ``X * M`` (2N model rows).
    """
    x, m, c, layout = _check(explainer, inputs, maps, classes)
    n = len(x)
    masks = _expand(m, layout)

    def make_rows(rows):
        items = rows % n
        out = x[items].copy()
        masked = rows >= n
        out[masked] = (out[masked] * masks[items[masked]]).astype(x.dtype, copy=False)
        return out

    scores = _score_rows(explainer, make_rows, np.concatenate([c, c]), 2 * n, batch_size, progress)
    return scores[:n], scores[n:]


def average_drop(original, masked) -> float:
    """Average Drop (Chattopadhay et al., Grad-CAM++, WACV 2018), in percent: lower is better.

    ``100 / N * sum_i max(0, Y_i - O_i) / Y_i``, where ``Y_i`` is the class score on the
    image and ``O_i`` the score on the image multiplied by the normalized map (see
    `confidence_scores`).  Items with ``Y_i == 0`` count as no drop.

    Parameters
    ----------
    original, masked : (N,) array_like

    Returns
    -------
    float

    Examples
    --------
    >>> average_drop([0.8, 0.5], [0.4, 0.6])     # (0.5 + 0) / 2
    25.0
    """
    y, o = np.asarray(original, np.float64), np.asarray(masked, np.float64)
    drop = np.maximum(y - o, 0)
    return float(100.0 * np.mean(np.divide(drop, y, out=np.zeros_like(drop), where=y != 0)))


def increase_in_confidence(original, masked) -> float:
    """Increase in Confidence (Chattopadhay et al., Grad-CAM++, WACV 2018), in percent: higher is better.

    ``100 / N * sum_i 1[O_i > Y_i]``: how often the score on the image multiplied by
    the normalized map beats the score on the image (see `confidence_scores`).

    Examples
    --------
    >>> increase_in_confidence([0.8, 0.5], [0.4, 0.6])
    50.0
    """
    y, o = np.asarray(original, np.float64), np.asarray(masked, np.float64)
    return float(100.0 * np.mean(o > y))


def auc(curves) -> np.ndarray:
    """Area under curves sampled at ``0, 1/S, ..., 1``, by the trapezoid rule (as RISE).

    Examples
    --------
    >>> auc([[1.0, 0.5, 0.0]])
    array([0.5])
    """
    y = np.asarray(curves, np.float64)
    return (y.sum(axis=-1) - (y[..., 0] + y[..., -1]) / 2) / (y.shape[-1] - 1)


def _baseline(x: np.ndarray, kind: str, layout: str) -> np.ndarray:
    if kind == "zeros":
        return np.zeros_like(x)
    from scipy.ndimage import gaussian_filter

    sigma = (0, 0, _BLUR_SIGMA, _BLUR_SIGMA) if layout == "NCHW" else (0, _BLUR_SIGMA, _BLUR_SIGMA, 0)
    blurred = gaussian_filter(x.astype(np.float64), sigma, mode="nearest", truncate=_BLUR_RADIUS / _BLUR_SIGMA)
    return blurred.astype(x.dtype)


def deletion_insertion(explainer, inputs, maps, classes, *, steps=16, deletion_baseline="zeros",
                       insertion_baseline="blur", batch_size=None, progress=None) -> dict:
    """Deletion and insertion curves and their AUC (Petsiuk et al., RISE, BMVC 2018).

    Pixels are ranked by saliency, highest first (ties: row-major order).  At step
    ``s = 0..steps`` the first ``floor(s * H * W / steps)`` pixels (all channels) are

    * deletion: replaced by the deletion baseline in the input (lower AUC is better: the
      score should fall fast once the salient pixels are gone);
    * insertion: restored onto the insertion baseline (higher AUC is better).

    The curve is the class score at each step, the AUC its trapezoid area over
    ``[0, 1]`` (`auc`).  Baselines: ``"zeros"`` is the zero input, i.e. the
    normalization mean for a mean/std-normalized model (RISE's deletion); ``"blur"`` is
    the input blurred by a Gaussian of sigma 5 (RISE's kernel 11, edges repeated;
    RISE's insertion).  ``2 N (steps + 1)`` model rows, run in batches.

    Parameters
    ----------
    explainer : Explainer
    inputs : (N, 3, H, W) or (N, H, W, 3) ndarray
    maps : (N, H, W) ndarray
    classes : (N,) int ndarray
    steps : int
    deletion_baseline, insertion_baseline : {"zeros", "blur"}
    batch_size : int, optional
    progress : callable, optional
        Called with the number of model rows done after each run.

    Returns
    -------
    dict
        ``deletion``, ``insertion``: ``(N, steps + 1)`` curves; ``deletion_auc``,
        ``insertion_auc``: ``(N,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidInput(f"steps must be an int >= 1, got {steps!r}")
    check_choice(deletion_baseline, BASELINES, "deletion_baseline")
    check_choice(insertion_baseline, BASELINES, "insertion_baseline")
    x, m, c, layout = _check(explainer, inputs, maps, classes)
    n, (h, w) = len(x), m.shape[1:]
    order = np.argsort(-m.reshape(n, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
    rank = _expand(rank.reshape(n, h, w), layout)
    counts = np.arange(steps + 1) * (h * w) // steps
    bases = {"deletion": _baseline(x, deletion_baseline, layout), "insertion": _baseline(x, insertion_baseline, layout)}
    per_curve = n * (steps + 1)

    def make_rows(rows):
        curve, rest = np.divmod(rows, per_curve)
        items, step = np.divmod(rest, steps + 1)
        top = rank[items] < counts[step].reshape(-1, 1, 1, 1)  # the most salient pixels
        deleted = np.where(top, bases["deletion"][items], x[items])
        inserted = np.where(top, x[items], bases["insertion"][items])
        return np.where((curve == 0).reshape(-1, 1, 1, 1), deleted, inserted)

    scores = _score_rows(explainer, make_rows, np.tile(np.repeat(c, steps + 1), 2), 2 * per_curve,
                         batch_size, progress).reshape(2, n, steps + 1)
    return {"deletion": scores[0], "insertion": scores[1], "deletion_auc": auc(scores[0]),
            "insertion_auc": auc(scores[1])}
