"""Forward-only class activation maps: the model or its head re-run on perturbed copies.

These methods need no gradient, only forward passes, so they work with any runtime
(a TensorRT engine without a backward graph, a head whose ops have no gradient rule).
Each is written against callables, never a backend:

* ``run_head(features) -> logits``: the head alone (target layer -> ``(M, C)`` logits)
  on any batch ``(M, ...)`` of feature maps shaped like the target layer (see
  `camcore.Backend.run_head`); the backbone is not re-run;
* ``run_model(inputs, items) -> logits``: the whole model on ``(M, ...)`` model-ready
  inputs, where row ``m`` is a perturbed copy of item ``items[m]`` of the batch (so a
  multi-input model can be fed that item's other inputs).

The perturbed copies are built lazily, ``batch_size`` rows at a time, and rows of
several items share a run: the results do not depend on how items are batched.
Maps are ``(N, k, h, w)`` at feature resolution, follow the dtype rule of
`camcore.methods` (float16 -> float32, float32/float64 kept) and are not normalized.
Inputs are never modified.

Cost in runs per image (``K`` channels, ``h x w`` feature map):
``ablationcam`` K + 1 head runs, ``reciprocam`` h*w head runs, ``scorecam`` K (or
``max_channels``) full model runs.

Where the head starts with a whole-map average pooling, ``ablationcam`` and
``reciprocam`` take ``run_pooled((M, K) spatial means) -> (M, C)``: their copies pool to
vectors known in advance, so the head runs on ``(M, K)`` rows instead of ``(M, K, h, w)``
maps, with the same result.  Otherwise each head run gets at most `CHUNK_BYTES` of
copies, made in one buffer reused from run to run.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_choice, check_ndim
from ..errors import InvalidInput
from ..maps import normalize, upsample
from ..scores import sigmoid, softmax
from ._common import LAYOUTS, feature_array, weighted_sum
from ._registry import MethodSpec

__all__ = ["ablationcam", "reciprocam", "scorecam", "FORWARD_METHODS", "runs_per_image", "CHUNK_BYTES"]

_SCORINGS = ("softmax", "sigmoid", "logits")


def _classes(classes, n: int) -> np.ndarray:
    sel = np.asarray(classes)
    if sel.dtype.kind not in "iu" or sel.ndim != 2 or sel.shape[0] != n or sel.shape[1] < 1:
        raise InvalidInput(f"classes must be an ({n}, k) int array, got {sel.dtype} with shape {sel.shape}")
    return sel.astype(np.int64)


def _batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInput(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _run_rows(run, make_rows, n_rows: int, batch_size: int) -> np.ndarray:
    """``run(make_rows(rows))`` over ``rows = arange(n_rows)`` in chunks: ``(n_rows, C)`` float64 logits."""
    out = []
    for start in range(0, n_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, n_rows))
        # A copy (np.array): `make_rows` refills the buffer it handed out, which a run may return a view of.
        logits = np.array(run(*make_rows(rows)), dtype=np.float64)
        if logits.ndim < 1 or len(logits) != len(rows):
            raise InvalidInput(f"the run returned {len(logits)} rows of logits for {len(rows)} inputs")
        out.append(logits.reshape(len(rows), -1))
    return np.concatenate(out) if out else np.zeros((0, 0))


# Perturbed copies of the feature map per head run are capped at this many bytes, whatever
# `batch_size` and the batch: a 1280 x 7 x 7 float32 map is 250 kB, so 128 copies a run.
CHUNK_BYTES = 32 * 2**20


def _chunk_rows(batch_size: int, row_bytes: int) -> int:
    """Rows per run: `batch_size`, fewer when that many rows would exceed `CHUNK_BYTES`."""
    return max(1, min(batch_size, CHUNK_BYTES // max(int(row_bytes), 1)))


def _check_pooled(run_pooled):
    if run_pooled is not None and not callable(run_pooled):
        raise InvalidInput(f"run_pooled must be None or a callable, got {type(run_pooled).__name__}")


def _picked_scores(logits: np.ndarray, sel: np.ndarray, scoring: str) -> np.ndarray:
    """``(N, P, k)`` scores of the classes ``sel`` ``(N, k)`` from ``(N, P, C)`` logits.

    The softmax is normalized only where it is read: ``exp(z_c - logsumexp(z))``, no ``(N, P, C)``
    division.
    """
    picked = np.take_along_axis(logits, sel[:, None, :], axis=2)
    if scoring == "softmax":
        top = logits.max(axis=2, keepdims=True)
        return np.exp(picked - top - np.log(np.exp(logits - top).sum(axis=2, keepdims=True)))
    return sigmoid(picked) if scoring == "sigmoid" else picked


def _weighted_maps(weights: np.ndarray, f: np.ndarray, layout: str) -> np.ndarray:
    """``relu(sum_k weights[n, j, k] f[n, k])`` as ``(N, k, h, w)`` in f's dtype."""
    return weighted_sum(weights.astype(f.dtype), f if layout == "NCHW" else f.transpose(0, 3, 1, 2))


def ablationcam(features, classes, run_head, *, layout="NCHW", batch_size=256, run_pooled=None):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): the drop of the class logit when a channel is zeroed.

    For each channel ``k`` the head is re-run on the features with ``A_k`` set to zero,
    giving the logit ``y_c^(-k)``; the weight is the relative drop
    ``w[c, k] = (y_c - y_c^(-k)) / y_c`` (0 where ``y_c == 0``) and
    ``M_c = relu(sum_k w[c, k] A_k)``.  ``y_c`` is the head's logit on the unmodified
    features, run alongside (``K + 1`` head rows per item, shared by its classes).

    On a GAP + affine head (``y_c = sum_k W[c, k] mean_xy(A_k) + b_c``),
    ``y_c - y_c^(-k) = W[c, k] mean_xy(A_k)``.

    When the head starts with a whole-map average pooling, a copy with ``A_k`` zeroed
    pools to the mean vector with entry ``k`` zeroed: given `run_pooled`, the head is
    run from the pooled vectors, ``(K + 1, K)`` numbers per item instead of
    ``(K + 1, K, h, w)``.  Otherwise the copies are made in one reused buffer of at
    most `CHUNK_BYTES`.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    classes : (N, k) int ndarray
    run_head : callable
        ``run_head((M, *features.shape[1:])) -> (M, C)`` logits.
    layout : {"NCHW", "NHWC"}, optional
    batch_size : int, optional
        Rows per `run_head` call (fewer when they would exceed `CHUNK_BYTES`).
    run_pooled : callable, optional
        ``run_pooled((M, K) spatial means) -> (M, C)`` logits: the head after its
        global average pooling (see `camcore.backend`); used instead of `run_head`.

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[1.0, 2.0]])                   # one class, logit = W . mean_xy(A)
    >>> head = lambda f: f.mean(axis=(2, 3)) @ W.T
    >>> f = np.array([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2): means 2 and 1, y = 4
    >>> ablationcam(f, [[0]], head)                  # w = (2/4, 2/4)
    array([[[[1.5, 1.5]]]])
    """
    f = feature_array(features, layout)
    sel = _classes(classes, len(f))
    chunk = _batch_size(batch_size)
    n = len(f)
    k_feat = f.shape[1] if layout == "NCHW" else f.shape[3]
    _check_pooled(run_pooled)
    per_item = k_feat + 1  # row 0 of an item: unmodified; row 1 + k: channel k zeroed

    if run_pooled is not None:
        means = f.mean(axis=(2, 3) if layout == "NCHW" else (1, 2))  # (N, K)

        def make_rows(rows):
            items, channel = np.divmod(rows, per_item)
            batch = means[items]
            ablated = np.flatnonzero(channel > 0)
            batch[ablated, channel[ablated] - 1] = 0
            return (batch,)

        logits = _run_rows(run_pooled, make_rows, n * per_item, chunk).reshape(n, per_item, -1)
    else:
        buffer = np.empty((min(_chunk_rows(chunk, f[0].nbytes), n * per_item), *f.shape[1:]), f.dtype)

        def make_rows(rows):
            items, channel = np.divmod(rows, per_item)
            batch = np.take(f, items, axis=0, out=buffer[:len(rows)])  # `features` is never modified
            ablated = np.flatnonzero(channel > 0)
            if layout == "NCHW":
                batch[ablated, channel[ablated] - 1] = 0
            else:
                batch[ablated, :, :, channel[ablated] - 1] = 0
            return (batch,)

        logits = _run_rows(run_head, make_rows, n * per_item, len(buffer)).reshape(n, per_item, -1)
    picked = np.take_along_axis(logits, sel[:, None, :], axis=2)  # (N, K + 1, k)
    base, ablated = picked[:, :1], picked[:, 1:]
    drop = base - ablated
    weights = np.divide(drop, base, out=np.zeros_like(drop), where=base != 0)
    return _weighted_maps(weights.transpose(0, 2, 1), f, layout)


# ViT Recipro-CAM's spatial mask around a position (Byun & Lee, 2023): a 3x3 Gaussian.
GAUSSIAN_3X3 = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
_MASKS = ("point", "gaussian")
# Where ViT Recipro-CAM masks a transformer's tokens (``method_options["mask_at"]``, applied by
# `camcore.token_explain`): the token target layer itself, or also after the first norm of the
# block it enters, as OpenVINO XAI 1.1 does.
MASK_AT = ("input", "normalized")


def reciprocam(features, classes, run_head, *, layout="NCHW", scoring="softmax", batch_size=256, mask="point",
               run_pooled=None):
    """Recipro-CAM (Byun & Lee, 2022, arXiv:2209.14074): the class score of each position kept alone.

    For each position ``p`` of the ``h x w`` map, the head is re-run on the features
    with every other position set to zero (``A * 1_p``), and ``M_c[p]`` is the score
    of class ``c`` on it: ``M_c[p] = score_c(head(A * 1_p))``.  The paper reads the
    softmax probability (``scoring="softmax"``); ``"sigmoid"`` suits multi-label heads
    and ``"logits"`` reads the raw logit.  ``h * w`` head rows per item.

    ``mask="gaussian"`` is ViT Recipro-CAM (Byun & Lee, "ViT-ReciproCAM: Gradient and
    Attention-Free Visual Explanations for Vision Transformer", arXiv:2310.02588, 2023), the
    method OpenVINO XAI ships for transformers: the copy for position ``p`` keeps the
    features around ``p`` weighted by a 3x3 Gaussian centred on it,
    ``M_c[p] = score_c(head(A * G_p))`` with ``G_p[p + d] = g[d]``,
    ``g = [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` (cut at the border, not renormalized).
    On a transformer the features are the patch tokens of the token target layer on the
    patch grid, and the head runs re-attach each item's prefix tokens (CLS, distillation,
    registers: any number of them), unmasked (`camcore.Explainer` does this).  Where the
    mask is applied (``method_options["mask_at"]``):

    - ``"input"`` (the default): to the token target layer itself, the last block's input
      ``x`` under CLS pooling: the block's residual stream carries ``G_p * x`` and its
      attention branch ``LN1(G_p * x)``; that LayerNorm rescales each token, so inside the
      3x3 neighbourhood the attention branch sees the tokens at full weight, and outside it
      ``LN1(0)`` (the norm's bias);
    - ``"normalized"``: also after the block's first LayerNorm, as OpenVINO XAI 1.1's
      ``ViTReciproCAM`` does: the residual stream gets ``G_p * x`` and the attention branch
      ``G_p * LN1(x)`` (``LN1`` of the unmasked tokens), the prefix tokens unmasked in both.
      With ``scoring="logits"`` (OpenVINO XAI reads the logits) this is OpenVINO XAI's map.

    On a GAP + affine head with ``scoring="logits"`` and ``mask="point"``,
    ``M_c[p] = sum_k W[c, k] A_k[p] / (h w) + b_c``: the CAM divided by ``h w``,
    plus the bias.

    When the head starts with a whole-map average pooling, ``A * 1_p`` pools to
    ``A[:, p] / (h w)``: given `run_pooled`, the head is run from these vectors,
    ``(h w, K)`` numbers per item instead of ``(h w, K, h, w)``, with the same
    result.  Otherwise the masked copies are written into one reused buffer of at most
    `CHUNK_BYTES`, and only the position each row keeps is written and cleared.

    Parameters
    ----------
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
    classes : (N, k) int ndarray
    run_head : callable
        ``run_head((M, *features.shape[1:])) -> (M, C)`` logits.
    layout : {"NCHW", "NHWC"}, optional
    scoring : {"softmax", "sigmoid", "logits"}, optional
    batch_size : int, optional
        Rows per `run_head` call (fewer when they would exceed `CHUNK_BYTES`).
    mask : {"point", "gaussian"}, optional
        The position alone (Recipro-CAM), or its 3x3 Gaussian neighbourhood (ViT Recipro-CAM).
    run_pooled : callable, optional
        ``run_pooled((M, K) spatial means) -> (M, C)`` logits: the head after its
        global average pooling (see `camcore.backend`); used instead of `run_head`
        with ``mask="point"``.

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> W, b = np.array([[1.0, -1.0]]), np.array([0.5])
    >>> head = lambda f: f.mean(axis=(2, 3)) @ W.T + b
    >>> f = np.array([[[[4.0, 0.0]], [[0.0, 2.0]]]])   # (1, 2, 1, 2)
    >>> reciprocam(f, [[0]], head, scoring="logits")   # (4 - 0) / 2 + 0.5, (0 - 2) / 2 + 0.5
    array([[[[ 2.5, -0.5]]]])
    >>> reciprocam(f, [[0]], head, scoring="logits", mask="gaussian")   # (4/4 - 2/8) / 2 + 0.5, (4/8 - 2/4) / 2 + 0.5
    array([[[[0.875, 0.5  ]]]])
    """
    f = feature_array(features, layout)
    sel = _classes(classes, len(f))
    check_choice(scoring, _SCORINGS, "scoring")
    check_choice(mask, _MASKS, "mask")
    chunk = _batch_size(batch_size)
    n = len(f)
    h, w = f.shape[2:] if layout == "NCHW" else f.shape[1:3]
    positions = h * w
    _check_pooled(run_pooled)

    if mask == "gaussian":
        # weights[p] (h, w): the kernel centred on p, cut at the border
        padded = np.zeros((positions, h + 2, w + 2), f.dtype)
        ys, xs = np.divmod(np.arange(positions), w)
        for dy in range(3):
            for dx in range(3):
                padded[np.arange(positions), ys + dy, xs + dx] = GAUSSIAN_3X3[dy, dx]
        weights = padded[:, 1:-1, 1:-1]

        def masked_rows(rows):
            items, p = np.divmod(rows, positions)
            m = weights[p]
            return (f[items] * (m[:, None] if layout == "NCHW" else m[..., None]),)

        logits = _run_rows(run_head, masked_rows, n * positions, _chunk_rows(chunk, f[0].nbytes))
    elif run_pooled is not None:
        k_feat = f.shape[1] if layout == "NCHW" else f.shape[3]
        vectors = f.reshape(n, k_feat, positions).transpose(0, 2, 1) if layout == "NCHW" else \
            f.reshape(n, positions, k_feat)
        # What the pooling computes on the masked copy: the kept vector (a sum with zeros) / (h w).
        vectors = (vectors / f.dtype.type(positions)).reshape(n * positions, k_feat)
        logits = _run_rows(run_pooled, lambda rows: (vectors[rows],), n * positions, chunk)
    else:
        buffer = np.zeros((min(_chunk_rows(chunk, f[0].nbytes), n * positions), *f.shape[1:]), f.dtype)
        written = []  # the (rows, y, x) the buffer holds besides zeros

        def make_rows(rows):
            if written:
                _keep(buffer, layout, *written.pop(), 0)
            items, p = np.divmod(rows, positions)
            y, x = np.divmod(p, w)
            at = np.arange(len(rows))
            _keep(buffer, layout, at, y, x, f[items, :, y, x] if layout == "NCHW" else f[items, y, x, :])
            written.append((at, y, x))
            return (buffer[:len(rows)],)

        logits = _run_rows(run_head, make_rows, n * positions, len(buffer))
    picked = _picked_scores(logits.reshape(n, positions, -1), sel, scoring)  # (N, h*w, k)
    return picked.transpose(0, 2, 1).reshape(n, sel.shape[1], h, w).astype(f.dtype, copy=False)


def _keep(buffer, layout, at, y, x, values):
    """Write `values` ``(M, K)`` at position ``(y[m], x[m])`` of row ``at[m]`` of `buffer`."""
    if layout == "NCHW":
        buffer[at, :, y, x] = values
    else:
        buffer[at, y, x, :] = values


def _top_variance(f_nchw: np.ndarray, max_channels) -> np.ndarray:
    """``(N, m)`` channel indices: all, or the `max_channels` of highest spatial variance (ties: lower index)."""
    n, k_feat = f_nchw.shape[:2]
    if max_channels is None or max_channels >= k_feat:
        return np.broadcast_to(np.arange(k_feat), (n, k_feat))
    variance = f_nchw.reshape(n, k_feat, -1).var(axis=2)
    return np.sort(np.argsort(-variance, axis=1, kind="stable")[:, :max_channels], axis=1)


def scorecam(inputs, features, classes, run_model, *, layout="NCHW", input_layout="NCHW", max_channels=None,
             batch_size=32):
    """Score-CAM (Wang et al., CVPR Workshops 2020): channels weighted by the score of the input they mask.

    Each activation map ``A_k`` is upsampled (bilinear, half-pixel) to the input size and
    min-max normalized to ``H_k`` in [0, 1] (a constant map gives zeros); the whole
    model is re-run on ``X * H_k`` (the model-ready input, in its own layout and dtype).
    With ``s_k`` the logit of class ``c`` on it, the weights are ``w = softmax_k(s)``
    (Algorithm 1 of the paper; the baseline score it subtracts is the same for every
    ``k`` and cancels in the softmax) and ``M_c = relu(sum_k w_k A_k)``.

    ``max_channels = m`` keeps only the ``m`` channels of highest spatial variance
    (Faster Score-CAM, Wang et al. 2020): ``m`` model runs per item instead of ``K``;
    the softmax runs over the kept channels and the others weigh 0.

    Parameters
    ----------
    inputs : (N, 3, H, W) ndarray, or (N, H, W, 3) with ``input_layout="NHWC"``
        Model-ready inputs (any number of input channels).
    features : (N, K, h, w) ndarray, or (N, h, w, K) with ``layout="NHWC"``
        The target layer's activations on `inputs`.
    classes : (N, k) int ndarray
    run_model : callable
        ``run_model(masked (M, ...), items (M,) int) -> (M, C)`` logits, where row ``m``
        of `masked` is a copy of ``inputs[items[m]]`` times a mask.
    layout, input_layout : {"NCHW", "NHWC"}, optional
    max_channels : int, optional
        Keep the channels of highest variance (default: all).
    batch_size : int, optional
        Masked inputs per `run_model` call.

    Returns
    -------
    maps : (N, k, h, w) ndarray

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[1.0, 0.0]])
    >>> model = lambda x, items: x.mean(axis=(2, 3)) @ W.T   # the input is its own feature map
    >>> x = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])        # (1, 2, 1, 2)
    >>> m = scorecam(x, x, [[0]], model)                    # logits 0.5 and 0: w = softmax(0.5, 0)
    >>> np.round(m, 4)
    array([[[[0.6225, 0.3775]]]])
    """
    f = feature_array(features, layout)
    sel = _classes(classes, len(f))
    check_choice(input_layout, LAYOUTS, "input_layout")
    x = np.asarray(inputs)
    check_ndim(x, 4, "inputs", "(N, H, W, 3)" if input_layout == "NHWC" else "(N, 3, H, W)")
    if len(x) != len(f):
        raise InvalidInput(f"inputs and features must hold the same number of items, got {len(x)} and {len(f)}")
    if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(max_channels, (int, np.integer))
                                     or max_channels < 1):
        raise InvalidInput(f"max_channels must be None or an int >= 1, got {max_channels!r}")
    chunk = _batch_size(batch_size)
    n = len(f)
    f_nchw = f if layout == "NCHW" else f.transpose(0, 3, 1, 2)
    size = x.shape[2:] if input_layout == "NCHW" else x.shape[1:3]
    kept = _top_variance(f_nchw, max_channels)  # (N, m)
    m = kept.shape[1]

    def make_rows(rows):
        items, j = np.divmod(rows, m)
        masks = normalize(upsample(f_nchw[items, kept[items, j]], size, method="bilinear"))  # (M, H, W)
        masks = masks[:, None] if input_layout == "NCHW" else masks[..., None]
        return (x[items] * masks).astype(x.dtype, copy=False), items

    logits = _run_rows(run_model, make_rows, n * m, chunk).reshape(n, m, -1)
    s = np.take_along_axis(logits, sel[:, None, :], axis=2).transpose(0, 2, 1)  # (N, k, m)
    w = softmax(s, axis=2)
    weights = np.zeros((n, sel.shape[1], f_nchw.shape[1]))
    np.put_along_axis(weights, np.broadcast_to(kept[:, None, :], w.shape), w, axis=2)
    return _weighted_maps(weights, f, layout)


# Method name -> what it runs, for `Explainer.explain(method=...)`.
FORWARD_METHODS = ("ablationcam", "scorecam", "reciprocam")


def runs_per_image(method: str, *, channels: int, positions: int, max_channels=None) -> dict:
    """Model and head runs one image costs with `method`, besides the backbone run every method makes.

    Examples
    --------
    >>> runs_per_image("reciprocam", channels=1280, positions=49)
    {'head': 49, 'model': 0}
    """
    if method == "ablationcam":
        return {"head": channels + 1, "model": 0}
    if method == "reciprocam":
        return {"head": positions, "model": 0}
    if method == "scorecam":
        return {"head": 0, "model": channels if max_channels is None else min(channels, max_channels)}
    return {"head": 0, "model": 0}


def _ablationcam_maps(given):
    return ablationcam(given.features, given.classes, given.run_head, layout=given.layout,
                       batch_size=given.options.get("batch_size", 256), run_pooled=given.run_pooled)


def _reciprocam_maps(given):
    # On a transformer's tokens, ViT Recipro-CAM's Gaussian neighbourhood unless told otherwise.
    at = given.options.get("mask_at", "input")
    check_choice(at, MASK_AT, "mask_at")
    if at != "input" and not given.token_model:
        raise InvalidInput(f"mask_at={at!r} masks a vision transformer's tokens after a block's first norm; "
                           f"this model's target is a feature map (use mask_at='input')")
    return reciprocam(given.features, given.classes, given.run_head, layout=given.layout,
                      batch_size=given.options.get("batch_size", 256),
                      scoring=given.options.get("scoring", given.scoring), run_pooled=given.run_pooled,
                      mask=given.options.get("mask", "gaussian" if given.token_model else "point"))


def _scorecam_maps(given):
    rows = given.fixed_batch or given.options.get("batch_size", given.batch_size)
    return scorecam(given.inputs, given.features, given.classes, given.run_model, layout=given.layout,
                    input_layout=given.input_layout, max_channels=given.options.get("max_channels"),
                    batch_size=rows)


# In the order of FORWARD_METHODS.
SPECS = (
    MethodSpec("ablationcam", frozenset({"features", "head_runs"}), ablationcam, _ablationcam_maps,
               options=("batch_size",)),
    MethodSpec("scorecam", frozenset({"features", "model_runs"}), scorecam, _scorecam_maps,
               options=("batch_size", "max_channels")),
    MethodSpec("reciprocam", frozenset({"features", "head_runs"}), reciprocam, _reciprocam_maps,
               options=("batch_size", "scoring", "mask", "mask_at")),
)
