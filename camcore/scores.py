"""Class scores from logits, and the top-k classes: the one place they are computed.

`softmax` and `sigmoid` turn ``(..., C)`` logits into probabilities (sigmoid for
multi-label heads, as `camcore.Head.scoring` says); `top_k` picks the ``k`` best
classes of each row, best first, ties to the lower index.  All follow the dtype rule
(float16 -> float32; float32 and float64 kept; integers -> float64) and never modify
their input.
"""

from __future__ import annotations

import numpy as np

from ._validate import check_ndim, float_array
from .errors import InvalidInput

__all__ = ["softmax", "sigmoid", "top_k"]


def softmax(logits, *, axis: int = -1) -> np.ndarray:
    """Softmax along `axis`, computed stably.

    ``p_c = exp(z_c - max_j z_j) / sum_i exp(z_i - max_j z_j)``.

    Parameters
    ----------
    logits : (..., C) ndarray
    axis : int, optional
        The class axis (default the last).

    Returns
    -------
    probabilities : (..., C) ndarray
        Summing to 1 along `axis`.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([[0.0, np.log(3.0)]]))
    array([[0.25, 0.75]])
    """
    z = float_array(logits, "logits")
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(logits) -> np.ndarray:
    """The logistic function, elementwise: ``1 / (1 + exp(-z)) = (1 + tanh(z / 2)) / 2``.

    The tanh form does not overflow for large ``|z|``; its error is absolute (about one
    machine epsilon), so probabilities far below it are not resolved.

    Parameters
    ----------
    logits : (..., C) ndarray

    Returns
    -------
    probabilities : (..., C) ndarray
        Each in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> sigmoid(np.array([0.0, np.log(3.0)]))
    array([0.5 , 0.75])
    """
    z = float_array(logits, "logits")
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def top_k(logits, k: int) -> np.ndarray:
    """The `k` classes of highest logit in each row, best first (ties: lower index first).

    The same as ``np.argsort(-logits, axis=1, kind="stable")[:, :k]``, without sorting
    whole rows: ``k = 1`` is an argmax, other ``k`` a partition whose rows are sorted
    in full only where a tie straddles the k-th place.

    Parameters
    ----------
    logits : (N, C) ndarray
    k : int
        At least 1; ``k >= C`` orders every class.

    Returns
    -------
    classes : (N, min(k, C)) int64 ndarray

    Examples
    --------
    >>> import numpy as np
    >>> top_k(np.array([[0.1, 0.7, 0.2, 0.7]]), 3)
    array([[1, 3, 2]])
    """
    x = np.asarray(logits)
    check_ndim(x, 2, "logits", "(N, C)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInput(f"k must be an int >= 1, got {k!r}")
    if k == 1:  # the common case, without the partition and sort
        return np.argmax(x, axis=1)[:, None].astype(np.int64, copy=False)
    if k >= x.shape[1]:
        return np.argsort(-x, axis=1, kind="stable").astype(np.int64, copy=False)
    part = np.sort(np.argpartition(-x, k - 1, axis=1)[:, :k], axis=1)  # index order: stable among ties
    order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    # Where more than k logits reach the k-th value, the partition chose among the tied ones at random.
    kth = np.take_along_axis(x, best[:, -1:], axis=1)
    tied = (x >= kth).sum(axis=1) > k
    if tied.any():
        best[tied] = np.argsort(-x[tied], axis=1, kind="stable")[:, :k]
    return best.astype(np.int64, copy=False)
