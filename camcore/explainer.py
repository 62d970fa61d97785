"""`Explainer`: the glue between a backend (which runs the model) and the array core."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .backend import Backend, Head
from .errors import CamError, InvalidInput, NotCamCompatible
from .localize import boxes as find_boxes
from .maps import upsample
from .methods import METHODS, REGISTRY, MethodInputs, MethodSpec, method_options
from .preprocess import EncodedImage, Geometry, Preprocess, _read_picture, as_input_dtype
from .scores import sigmoid, softmax
from .scores import top_k as _top_k

__all__ = ["Explainer", "Explanation", "Gradients", "ImageExplanation", "softmax", "sigmoid"]


@dataclass(frozen=True, eq=False)
class Explanation:
    """Result of `Explainer.explain`.

    Attributes
    ----------
    logits : (N, C) float32 ndarray
        Pre-activation scores, even when the graph ends in Softmax or Sigmoid.
    classes : (N, k) int64 ndarray
    scores : (N, k) float32 ndarray
        Probabilities of `classes`: softmax over the logits, or sigmoid for
        multi-label models whose graph ends in Sigmoid.
    maps : (N, k, h, w) float32 ndarray
        Raw maps at feature resolution, channels-first whatever the model's layout.
        With ``method="cam"`` the bias is not included:
        ``maps.mean((-2, -1)) + bias[classes] == logits``.
    method : str
        The method that made the maps ("cam", "gradcam", ...; never "auto").
    """

    logits: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    method: str = "cam"


@dataclass(frozen=True, eq=False)
class Gradients:
    """Result of `Explainer.gradients`: the raw material of gradient-based methods.

    Attributes
    ----------
    features : (N, K, h, w) or (N, h, w, K) ndarray
        The target layer's activations, in the model's own layout (`layout`); a vision
        transformer's tokens ``(N, T, C)`` with ``layout="NTC"`` (prefix tokens included:
        `camcore.tokens.tokens_to_grid` views the patch tokens on the grid).
    logits : (N, C) float32 ndarray
    classes : (N, k) int64 ndarray
    gradients : (N, k, *features.shape[1:]) ndarray
        ``gradients[n, j] = d logits[n, classes[n, j]] / d features[n]``, computed
        inside the ONNX graph by the runtime.
    layout : {"NCHW", "NHWC", "NTC"}
    """

    features: np.ndarray
    logits: np.ndarray
    classes: np.ndarray
    gradients: np.ndarray
    layout: str


@dataclass(frozen=True, eq=False)
class ImageExplanation:
    """Result of `Explainer.explain_images` for one image.

    Attributes
    ----------
    source : str or None
        The image path, when one was given.
    size : (H0, W0)
        Original image size.
    classes : (k,) int64 ndarray
    scores : (k,) float32 ndarray
    boxes : list of k (m, 4) int64 ndarrays, m in {0, 1}
        The largest box of each class's map (paper heuristic), in original-image
        pixels, ``(x0, y0, x1, y1)`` half-open; empty when the map is constant.
    cams : (k, h, w) float32 ndarray
        Raw maps at feature resolution.
    geometry : Geometry
        How the model input was cut from the original image.
    error : str or None
        Why the image could not be explained (then `classes` is empty).
    method : str
        The method that made the maps.
    """

    source: str | None
    size: tuple
    classes: np.ndarray
    scores: np.ndarray
    boxes: list
    cams: np.ndarray
    geometry: Geometry | None
    upsample: str = "bilinear"
    error: str | None = None
    method: str = "cam"

    @property
    def maps(self) -> np.ndarray:
        """``(k, H0, W0)`` float32 maps in [0, 1] on the original image (recomputed per access)."""
        if self.geometry is None:
            return np.zeros((0,) + tuple(self.size), np.float32)
        return _image_maps(self.cams, self.geometry, self.upsample)

    def box(self, j: int = 0):
        """The j-th class's box as a tuple ``(x0, y0, x1, y1)``, or None."""
        b = self.boxes[j]
        return tuple(int(v) for v in b[0]) if len(b) else None


def _image_maps(cams: np.ndarray, geometry: Geometry, method: str) -> np.ndarray:
    """``(k, H0, W0)`` float32 maps in [0, 1]: `upsample` at float32, then min-max in place.

    The same values as ``normalize(upsample(cams, ...))``, without its temporaries:
    at photo sizes, allocating (and page-faulting) full-size arrays costs more than
    the interpolation itself.
    """
    window = upsample(cams.astype(np.float32, copy=False), geometry.window_size, method=method)
    lo = window.min(axis=(-2, -1), keepdims=True)
    span = window.max(axis=(-2, -1), keepdims=True) - lo
    flat = span <= 0  # a constant map becomes 0, as `normalize` does
    window -= lo
    window /= np.where(flat, 1, span)
    if flat.any():
        window[flat[:, 0, 0]] = 0
    return geometry.place(window)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _prepare_image(image, preprocess: Preprocess, keep_pixels: bool):
    """Read and preprocess one image (runs in a worker thread): ``(source, x, geometry, pixels, error)``."""
    if isinstance(image, EncodedImage):
        source = image.name
    else:
        source = str(image) if not isinstance(image, np.ndarray) else None
    try:
        if source is None:
            x, geometry = preprocess(image)
            pixels = image
        else:  # decoded once; the array of the whole picture is made only when kept
            picture = _read_picture(source, data=image.data if isinstance(image, EncodedImage) else None,
                                    exif_orientation=preprocess.exif_orientation)
            x, geometry = preprocess._from_picture(picture)
            pixels = np.asarray(picture) if keep_pixels else None
    except CamError as exc:
        return source, None, None, None, exc
    return source, x, geometry, pixels if keep_pixels else None, None


def _class_selection(classes, n: int, num_classes: int):
    """Validate `classes` -> None (top-k) or an (n, k) int64 array."""
    if classes is None:
        return None
    if hasattr(classes, "select"):  # --- targets: a camcore.targets.Targets validates itself
        return classes.validate(n, num_classes)
    try:
        sel = np.asarray(classes)
    except Exception:
        raise InvalidInput(f"classes must be a list of ints or an (N, k) array, got {classes!r}") from None
    if sel.dtype.kind not in "iu" and not (sel.size == 0 and sel.dtype.kind == "f"):
        raise InvalidInput(f"classes must be integers, got dtype {sel.dtype}")
    if sel.ndim == 1:
        sel = np.broadcast_to(sel, (n, sel.size))
    elif sel.ndim != 2 or sel.shape[0] != n:
        raise InvalidInput(f"classes must be 1-D (k,) or 2-D ({n}, k), got shape {sel.shape}")
    if sel.shape[1] == 0:
        raise InvalidInput("classes must name at least one class")
    bad = (sel < 0) | (sel >= num_classes)
    if bad.any():
        raise InvalidInput(f"classes must be in [0, {num_classes}), got {sel[bad].ravel()[0]}")
    return sel.astype(np.int64)


class Explainer:
    """Explain a model's predictions with CAM.

    Usually made by `camcore.load`.  It holds a backend (anything with the
    `Backend` protocol) and, optionally, the model's preprocessing and class names.

    Parameters
    ----------
    backend : Backend
    preprocess : Preprocess, optional
        Default preprocessing for `explain_images`.
    class_names : sequence of str, optional
    batch_size : int
        Inputs are run in chunks of this many items, so memory stays bounded.
    method_options : dict, optional
        Options of the forward-only methods (`camcore.perturbation`), also settable
        later through the attribute of that name: ``"batch_size"`` (perturbed rows per
        run; default 256 for the head, `batch_size` for the whole model), ``"max_channels"``
        (scorecam: keep the channels of highest variance; default all) and ``"scoring"``
        (reciprocam: ``"softmax"``, ``"sigmoid"`` or ``"logits"``; default the model's).
    """

    def __init__(self, backend: Backend, *, preprocess: Preprocess | None = None,
                 class_names: Sequence[str] | None = None, batch_size: int = 32, source=None,
                 method_options: Mapping | None = None):
        if not isinstance(backend, Backend):
            raise InvalidInput(f"backend must implement camcore.Backend, got {type(backend).__name__}")
        if int(batch_size) < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size!r}")
        self.backend = backend
        self.preprocess = preprocess
        self.class_names = list(class_names) if class_names is not None else None
        self.batch_size = int(batch_size)
        self.source = source
        self.method_options = dict(method_options or {})

    @property
    def head(self) -> Head:
        return self.backend.head

    def __repr__(self) -> str:
        h = self.head
        return (f"Explainer(input={h.input.name!r} {h.input.shape}, feature={h.feature!r}, "
                f"layout={h.layout!r}, pooling={h.pooling!r}, classes={h.num_classes}, channels={h.channels})")

    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    # ------------------------------------------------------------------ arrays

    def _feed(self, inputs) -> tuple[dict, int]:
        if not isinstance(inputs, Mapping):
            inputs = {self.head.input.name: inputs}
        feed = {name: np.asarray(value) for name, value in inputs.items()}
        sizes = {v.shape[0] if v.ndim else None for v in feed.values()}
        if len(sizes) != 1 or None in sizes:
            raise InvalidInput(f"inputs must share one batch size, got shapes {[v.shape for v in feed.values()]}")
        return feed, sizes.pop()

    def resolve_method(self, method: str) -> str:
        """The method `method` stands for on this model ("auto" -> "cam" or "gradcam").

        Raises `NotCamCompatible` (with the reason) for "cam" on a head that is not
        GAP + affine, and `InvalidInput` for an unknown name.
        """
        if method not in METHODS:
            raise InvalidInput(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if method == "auto":
            return "cam" if self.head.affine else "gradcam"
        if "weights" in REGISTRY[method].needs and not self.head.affine:
            raise NotCamCompatible(self.head.cam_refusal or "the head is not global average pooling + affine")
        return method

    def _selection(self, classes, top_k, n):
        sel = _class_selection(classes, n, self.head.num_classes)
        if sel is None and not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
                                and 1 <= top_k <= self.head.num_classes):
            raise InvalidInput(f"top_k must be an int in [1, {self.head.num_classes}], got {top_k!r}")
        return sel

    def explain(self, inputs, *, classes=None, top_k: int = 1, batch_size: int | None = None,
                method: str = "auto") -> Explanation:
        """Run model-ready inputs and compute class activation maps.

        Parameters
        ----------
        inputs : ndarray or dict of ndarray
            In the model's own dtype and layout, batch first; a dict for multi-input models.
        classes : None, (k,) sequence or (N, k) array of int, or camcore.targets.Targets, optional
            None: the `top_k` classes by logit.  1-D: the same classes for every item.
            2-D: per item.  A `camcore.targets.Targets` chooses them from the logits
            (multi-label, contrastive, negated targets, any number per item); rows with
            fewer classes are padded with class -1, score 0 and a zero map.
        top_k : int
        batch_size : int, optional
            Chunk size (default: the explainer's).
        method : str
            ``"cam"`` (Zhou et al. 2016; exact, GAP + affine heads only), a gradient method
            (``"gradcam"``, ``"gradcam++"``, ``"xgradcam"``, ``"hirescam"``, ``"layercam"``;
            see `camcore.methods`), ``"eigencam"``, a forward-only method re-running the
            head or the model (``"ablationcam"``, ``"reciprocam"``, ``"scorecam"``; see
            `camcore.perturbation` and `method_options`), or ``"auto"``: ``"cam"`` where the
            head is affine, else ``"gradcam"``.  Gradient methods run the backbone once
            per batch and the head (forward and backward) once per class.

        Returns
        -------
        Explanation
            ``logits (N, C)``, ``classes (N, k)``, ``scores (N, k)``, ``maps (N, k, h, w)``
            and the `method` used.
        """
        method = self.resolve_method(method)
        feed, n = self._feed(inputs)
        sel = self._selection(classes, top_k, n)
        chunk = self._chunk_size(batch_size)
        parts = []
        for start in range(0, max(n, 1), chunk):
            part = {name: value[start:start + chunk] for name, value in feed.items()}
            parts.append(self._explain_chunk(part, None if sel is None else sel[start:start + chunk], top_k,
                                             method))
        if n == 0:
            raise InvalidInput("inputs must hold at least one item")
        if len({p[1].shape[1] for p in parts}) > 1:  # --- targets: chunks of fewer classes padded with -1
            parts = _same_width(parts)
        return Explanation(*(np.concatenate(arrays) for arrays in zip(*parts)), method=method)

    def gradients(self, inputs, *, classes=None, top_k: int = 1, batch_size: int | None = None) -> Gradients:
        """The target layer's activations and the gradients of class logits with respect to them.

        One forward pass of the model per chunk, then the head alone, forward and
        backward, for each class (the backbone is not run again).  The raw material of
        every gradient method in `camcore.methods`, for writing one's own.

        Parameters
        ----------
        inputs : ndarray or dict of ndarray
            In the model's own dtype and layout, batch first.
        classes, top_k, batch_size
            As in `explain`.

        Returns
        -------
        Gradients
        """
        feed, n = self._feed(inputs)
        sel = self._selection(classes, top_k, n)
        if n == 0:
            raise InvalidInput("inputs must hold at least one item")
        chunk = self._chunk_size(batch_size)
        parts = []
        for start in range(0, n, chunk):
            features, logits = self.forward({name: value[start:start + chunk] for name, value in feed.items()})
            rows = _top_k(logits, top_k) if sel is None else sel[start:start + chunk]
            parts.append((features, logits, rows, self._class_gradients(features, rows)))
        # A backend may return broadcast views: the public arrays are plain ones.
        return Gradients(*(np.concatenate(arrays) for arrays in zip(*parts)), layout=self.head.layout)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with, or None for a dynamic batch axis."""
        shape = self.head.input.shape
        # Some exporters declare dynamic axes as -1 (or 0).
        return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None

    def _chunk_size(self, batch_size) -> int:
        chunk = self.batch_size if batch_size is None else int(batch_size)
        if chunk < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size!r}")
        return self.fixed_batch or chunk

    def forward(self, feed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run one chunk through the backend: ``(features, (n, C) float32 logits)``.

        A model with a fixed batch size gets a short chunk padded (with copies of
        its last item) and the padding cut from the results.
        """
        n = len(next(iter(feed.values())))
        fixed = self.fixed_batch
        if fixed is not None and n != fixed:
            if n > fixed:
                raise InvalidInput(f"inputs must come in chunks of {fixed} for this model, got {n}")
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed - n, axis=0)]) for k, v in feed.items()}
        features, logits = self.backend.run(feed)
        logits = np.asarray(logits, dtype=np.float32).reshape(len(logits), -1)[:n]
        if logits.shape[1] != self.head.num_classes:
            raise CamError(f"the backend returned {logits.shape[1]} logits, the head has {self.head.num_classes}")
        return features[:n], logits

    def _class_gradients(self, features: np.ndarray, sel: np.ndarray) -> np.ndarray:
        """``(n, k, *features.shape[1:])``: d logits[i, sel[i, j]] / d features[i], from the head alone."""
        n, k = sel.shape
        seeds = np.zeros((n, k, self.head.num_classes), np.float32)
        seeds[np.arange(n)[:, None], np.arange(k), sel] = 1
        return np.asarray(self.backend.run_head(features, seeds))

    def maps(self, features: np.ndarray, classes: np.ndarray, *, method: str = "auto", inputs=None,
             seeds: np.ndarray | None = None) -> np.ndarray:
        """Class maps from a forward pass already made (`forward`): ``(n, k, h, w)`` float32.

        Parameters
        ----------
        features : ndarray
            The target layer's activations for n items, as `forward` returns them.
        classes : (n, k) int ndarray
        method : str
            As in `explain`.
        inputs : dict of ndarray, optional
            The model inputs that gave `features` (needed by methods that re-run the model).
        seeds : (n, k, C) float ndarray, optional
            Explain ``seeds[i, j] . logits[i]`` instead of the logit of ``classes[i, j]``
            (contrastive and negated targets, `camcore.targets`): CAM with the weights
            ``seeds @ W`` (exact by linearity), a gradient method with these seeds in the
            same backward pass (on a transformer: at the token target layer, viewed on the
            patch grid; `gae`: the attention gradients of the seeded logits).  Other methods
            refuse it.
        """
        spec = REGISTRY[self.resolve_method(method)]
        if seeds is not None:  # --- targets: a linear combination of logits
            return _seeded_maps(self, spec, features, seeds, inputs)
        if self.head.layout == "NTC":  # a vision transformer's tokens: maps on the patch grid
            from .token_explain import token_maps

            return token_maps(self, spec, features, classes, inputs).astype(np.float32, copy=False)
        maps = spec.compute(self._method_inputs(spec, features, classes, inputs))
        return maps.astype(np.float32, copy=False)

    def _method_inputs(self, spec: MethodSpec, features, classes, feed, seeds=None) -> MethodInputs:
        """What `spec` needs, gathered for one chunk: nothing is run that the method does not use.

        With `seeds` ``(n, k, C)`` (`_seeded_maps`), map ``j`` of item ``i`` explains
        ``seeds[i, j] . logits[i]``: the weights are ``seeds @ W`` (row ``i * k + j``, which
        `classes` then indexes) and the gradients are those of the seeded logits.
        """
        options = dict(self.method_options)
        if spec.options:
            known = method_options()
            unknown = set(options) - set(known)
            if unknown:
                raise InvalidInput(f"method_options takes {', '.join(map(repr, known))}, got {sorted(unknown)}")
        head, given = self.head, {}
        if "weights" in spec.needs:  # seeded: w_c - w_ref, CAM is linear in the weights
            given["weights"] = head.weights if seeds is None else seeds.reshape(-1, seeds.shape[2]) @ head.weights
        if "gradients" in spec.needs:
            given["gradients"] = (self._class_gradients(features, classes) if seeds is None
                                  else np.asarray(self.backend.run_head(features, seeds)))
        if "head_runs" in spec.needs:
            given["run_head"] = self.backend.run_head
            pooled_head = getattr(self.backend, "pooled_head", None)  # optional (see camcore.backend)
            given["run_pooled"] = pooled_head() if callable(pooled_head) else None
        if "model_runs" in spec.needs:
            if feed is None:
                raise InvalidInput(f"{spec.name} re-runs the model: maps() needs the `inputs` that gave `features`")
            feed, _ = self._feed(feed)
            name = head.input.name

            def run_model(masked, items):
                return self.forward({k: masked if k == name else v[items] for k, v in feed.items()})[1]

            given.update(run_model=run_model, inputs=feed[name])
        if "attention" in spec.needs:
            given["attention"] = self._attention_inputs(spec, features, classes, feed, seeds)
        return MethodInputs(features, classes, head.layout, options, scoring=head.scoring,
                            batch_size=self.batch_size, fixed_batch=self.fixed_batch,
                            input_layout=self.input_layout, token_model=getattr(head, "tokens", None) is not None,
                            **given)

    def _attention_inputs(self, spec: MethodSpec, features, classes, feed, seeds=None):
        """The attention probabilities of the items of `feed` (and their gradients for `classes`,
        or for the seeded logits, when `spec` needs them), with the transformer's prefix tokens,
        grid and pooling."""
        from .methods.attention import POOLINGS, AttentionInputs

        others = ("the feature methods apply (gradcam and its family, eigencam, ablationcam, scorecam, "
                  "reciprocam)")
        tokens = getattr(self.head, "tokens", None)
        run = getattr(self.backend, "run_attention", None)
        if tokens is None or run is None:
            why = "this backend does not give them" if run is None else "this model pools no tokens"
            raise NotCamCompatible(f"{spec.name} needs attention maps of a vision transformer, and {why}; {others}")
        if tokens.pooling not in POOLINGS:
            raise NotCamCompatible(f"{spec.name} needs attention over the image's tokens, and this model pools a "
                                   f"{tokens.pooling!r} map (windowed attention, as in Swin); {others}")
        if feed is None:
            raise InvalidInput(f"{spec.name} reads the attention of the model run: maps() needs the `inputs` "
                               f"that gave `features`")
        feed, _ = self._feed(feed)
        x = feed.get(self.head.input.name)
        size = None
        if x is not None and np.ndim(x) == 4:
            size = x.shape[2:4] if self.input_layout == "NCHW" else x.shape[1:3]
        count = np.shape(features)[1] if np.ndim(features) == 3 else None
        grid = tokens.grid_for(count, size) if count is not None else tuple(tokens.grid)
        if "attention_gradients" not in spec.needs:
            seeds = None
        elif seeds is None:
            n, k = classes.shape
            seeds = np.zeros((n, k, self.head.num_classes), np.float32)
            seeds[np.arange(n)[:, None], np.arange(k), classes] = 1
        probabilities, gradients = run(feed, seeds, tokens=tokens.prefix + grid[0] * grid[1])
        return AttentionInputs(probabilities, gradients, tokens.prefix, tuple(grid), tokens.pooling)

    def _explain_chunk(self, feed, sel, top_k, method):
        head = self.head
        features, logits = self.forward(feed)
        if sel is None:
            sel = _top_k(logits, top_k)
        probabilities = sigmoid(logits) if head.scoring == "sigmoid" else softmax(logits)
        if hasattr(sel, "select"):  # --- targets: chosen from the logits (camcore.targets.Targets.select)
            chosen = sel.select(logits, probabilities)
            maps = self.maps(features, chosen.compute, method=method, inputs=feed, seeds=chosen.seeds)
            return logits, chosen.classes, chosen.scores, np.where((chosen.classes < 0)[..., None, None], 0, maps)
        scores = np.take_along_axis(probabilities, sel, axis=1).astype(np.float32)
        return logits, sel, scores, self.maps(features, sel, method=method, inputs=feed)

    # ------------------------------------------------------------------ images

    def default_preprocess(self) -> Preprocess:
        """The explainer's preprocessing, else ImageNet's at the model's input size."""
        if self.preprocess is not None:
            return self.preprocess
        shape = self.head.input.shape
        hw = shape[2:4] if self.input_layout == "NCHW" else shape[1:3]
        size = tuple(hw) if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) else (224, 224)
        if self.head.tokens is not None and self.head.tokens.input_size and size != tuple(hw):
            size = tuple(self.head.tokens.input_size)  # the size the transformer was analysed at
        return Preprocess.imagenet(size)

    @property
    def input_layout(self) -> str:
        """``"NCHW"`` or ``"NHWC"``: where the image input keeps its channels (1 or 3)."""
        shape = self.head.input.shape
        if len(shape) == 4 and shape[1] in (1, 3):
            return "NCHW"
        if len(shape) == 4 and shape[3] in (1, 3):
            return "NHWC"
        if self.head.tokens is not None:  # read from the graph (the first Conv's input)
            return self.head.tokens.input_layout
        return self.head.layout

    def explain_images(self, images, *, preprocess: Preprocess | None = None, top_k: int = 1,
                       threshold: float = 0.2, upsample: str = "bilinear", classes=None,
                       batch_size: int | None = None, method: str = "auto") -> list[ImageExplanation]:
        """Explain raw images: paths, or (H, W), (H, W, 3), (H, W, 4) uint8 or float arrays.

        Each image is preprocessed (`preprocess`, default `default_preprocess()`), run
        in chunks, and its maps are put back onto the original image through the
        same resize/crop geometry.  Results keep only feature-resolution CAMs and
        the boxes, so memory stays bounded; ``ImageExplanation.maps`` rebuilds the
        full-size maps on access.  A model whose image input is an integer type (uint8
        pixels, its normalization inside the graph) is fed the resized pixels on 0..255,
        in its own layout, with no normalization on the host (`Preprocess.for_input`).
        Image files are turned upright by their EXIF orientation unless the preprocessing
        says otherwise (`Preprocess.exif_orientation`); sizes and boxes refer to the
        image as turned.

        Parameters
        ----------
        images : iterable of path, ndarray or `camcore.preprocess.EncodedImage`
        preprocess : Preprocess, optional
        top_k : int
        threshold : float in [0, 1]
            Box threshold, as a fraction of each map's max (paper: 0.2).
        upsample : {"nearest", "bilinear", "bicubic"}
        classes : optional
            As in `explain`, instead of `top_k`.
        method : str
            As in `explain` (default "auto").

        Returns
        -------
        list of ImageExplanation
        """
        return list(self.iter_explain_images(images, preprocess=preprocess, top_k=top_k, threshold=threshold,
                                             upsample=upsample, classes=classes, batch_size=batch_size,
                                             errors="raise", method=method))

    def iter_explain_images(self, images: Iterable, *, preprocess: Preprocess | None = None, top_k: int = 1,
                            threshold: float = 0.2, upsample: str = "bilinear", classes=None,
                            batch_size: int | None = None, errors: str = "raise",
                            method: str = "auto", workers: int | None = None) -> Iterator[ImageExplanation]:
        """Like `explain_images`, one result at a time, in input order.

        Reading and preprocessing run in a pool of `workers` threads, up to two
        chunks ahead of inference (Pillow, NumPy and onnxruntime release the GIL),
        and the same threads make a chunk's full-size maps and boxes while the
        model runs the next one, so at most four chunks of images are held at
        any time.  ``workers=0`` does everything in the calling thread.  The
        default is the number of CPU cores, at most 4.

        With ``errors="report"``, an image that cannot be read or preprocessed gives an
        `ImageExplanation` whose `error` holds the one-line reason, and the others go on.
        """
        for result, _ in self._explain_image_stream(images, preprocess=preprocess, top_k=top_k,
                                                    threshold=threshold, upsample=upsample, classes=classes,
                                                    batch_size=batch_size, errors=errors, method=method,
                                                    workers=workers):
            yield result

    def _explain_image_stream(self, images, *, preprocess, top_k, threshold, upsample, classes, batch_size,
                              errors, method, workers, keep_pixels=False):
        """`iter_explain_images` yielding ``(result, kept)``: with `keep_pixels` (the CLI draws
        them), `kept` is ``(image, maps)``, the decoded image and its ``(k, H0, W0)`` maps,
        for each image explained; otherwise None."""
        if errors not in ("raise", "report"):
            raise InvalidInput(f"errors must be 'raise' or 'report', got {errors!r}")
        if not 0 <= float(threshold) <= 1:
            raise InvalidInput(f"threshold must be in [0, 1], got {threshold!r}")
        if upsample not in ("nearest", "bilinear", "bicubic"):
            raise InvalidInput(f"upsample must be one of 'nearest', 'bilinear', 'bicubic', got {upsample!r}")
        method = self.resolve_method(method)
        workers = _default_workers() if workers is None else workers
        if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 0:
            raise InvalidInput(f"workers must be an int >= 0, got {workers!r}")
        layout, dtype = self.input_layout, self.head.input.dtype
        preprocess = (preprocess or self.default_preprocess()).for_input(dtype)  # integer inputs: pixels
        chunk = self._chunk_size(batch_size)
        # --- targets: a camcore.targets.Targets is indexed per image, as an (N, k) array
        class_rows = None if classes is None else classes if hasattr(classes, "select") else np.asarray(classes)
        options = (layout, dtype, top_k, threshold, upsample, class_rows, errors, method)
        if workers == 0:
            prepared = (_prepare_image(image, preprocess, keep_pixels) for image in images)
            yield from self._run_chunks(prepared, chunk, options)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="camcore-read")
        try:
            yield from self._run_chunks(_prefetch(pool, images, preprocess, keep_pixels, 2 * chunk), chunk, options,
                                         pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_chunks(self, prepared, chunk, options, pool=None):
        """Explain `prepared` images chunk by chunk, results in input order.

        With a `pool`, each image's full-size maps and boxes are made there while the
        model runs the next chunk: results come one chunk late, the model never waits.
        """
        finishing, lag = deque(), 0 if pool is None else 1

        def run(batch):
            try:
                finishing.append(self._image_chunk(batch, *options, pool=pool))
            except Exception:
                # the results before the failing chunk are still delivered
                while finishing:
                    yield from _resolved(finishing.popleft())
                raise
            while len(finishing) > lag:
                yield from _resolved(finishing.popleft())

        batch = []
        for index, item in enumerate(prepared):
            batch.append((index, item))
            if len(batch) == chunk:
                yield from run(batch)
                batch = []
        if batch:
            yield from run(batch)
        while finishing:
            yield from _resolved(finishing.popleft())

    def _image_chunk(self, batch, layout, dtype, top_k, threshold, resize, class_rows, errors, method, pool=None):
        """Run one chunk; returns its ``(result, kept)`` in order, each maybe a future of `pool`."""
        ready, results = [], {}
        for index, (source, x, geometry, pixels, error) in batch:
            if error is None:
                ready.append((index, source, x, geometry, pixels))
            elif errors == "raise":
                raise error
            else:
                results[index] = (ImageExplanation(source, (0, 0), np.zeros(0, np.int64), np.zeros(0, np.float32),
                                                   [], np.zeros((0, 0, 0), np.float32), None, resize,
                                                   str(error), method), None)
        if ready:
            x = np.stack([r[2] for r in ready])
            if layout == "NCHW":
                x = x.transpose(0, 3, 1, 2)
            x = as_input_dtype(x, dtype)
            sel = None
            if class_rows is not None:
                sel = class_rows if class_rows.ndim == 1 else class_rows[[r[0] for r in ready]]
            out = self.explain(x, classes=sel, top_k=top_k, batch_size=len(x), method=method)
            for j, (index, source, _, geometry, pixels) in enumerate(ready):
                keep = out.classes[j] >= 0  # --- targets: -1 pads a row of fewer classes (multi-label)
                args = (source, out.classes[j][keep], out.scores[j][keep], out.maps[j][keep], geometry, pixels,
                        threshold, resize, method)
                results[index] = _finish_image(*args) if pool is None else pool.submit(_finish_image, *args)
        return [results[index] for index, _ in batch]


def _same_width(parts):
    """--- targets: chunk results ``(logits, classes, scores, maps)`` padded to the widest k (classes -1)."""
    k = max(p[1].shape[1] for p in parts)

    def pad(a, value):
        return np.pad(a, [(0, 0), (0, k - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=value)

    return [(logits, pad(classes, -1), pad(scores, 0), pad(maps, 0)) for logits, classes, scores, maps in parts]


def _seeded_maps(explainer, spec, features, seeds, inputs=None):
    """--- targets: ``(n, k, h, w)`` float32 maps of ``seeds[i, j] . logits[i]`` (see `Explainer.maps`).

    CAM gets the weights ``seeds @ W`` (one row per map), a gradient method the gradients of
    the seeded logits from the same backward pass, `gae` the seeded logits' attention
    gradients; on a transformer the maps are on the patch grid (`token_maps`).  Methods that
    score one class refuse.
    """
    from .targets import SEEDED_TEXT, seedable

    head = explainer.head
    seeds = np.asarray(seeds, np.float32)
    n = len(features)
    if seeds.ndim != 3 or seeds.shape[0] != n or seeds.shape[2] != head.num_classes:
        raise InvalidInput(f"seeds must have shape ({n}, k, {head.num_classes}), got {seeds.shape}")
    if not seedable(spec):
        raise InvalidInput(f"contrastive and negated targets need one of {SEEDED_TEXT}, "
                           f"got method {spec.name!r}")
    rows = np.arange(n * seeds.shape[1]).reshape(n, -1)  # row i * k + j of the seeded weights
    if head.layout == "NTC":  # a vision transformer's tokens: maps on the patch grid
        from .token_explain import token_maps

        maps = token_maps(explainer, spec, features, rows, inputs, seeds=seeds)
    else:
        maps = spec.compute(explainer._method_inputs(spec, features, rows, inputs, seeds))
    return maps.astype(np.float32, copy=False)


def _finish_image(source, classes, scores, cams, geometry, pixels, threshold, resize, method):
    """One image's full-size maps and boxes: ``(ImageExplanation, kept)`` as the stream yields them."""
    full = _image_maps(cams, geometry, resize)
    found = [find_boxes(m, threshold=threshold) for m in full]
    result = ImageExplanation(source, geometry.original_size, classes, scores, found, cams, geometry, resize,
                              method=method)
    return result, None if pixels is None else (pixels, full)


def _resolved(results):
    """The items of `results`, waiting for those that are futures."""
    for item in results:
        yield item.result() if isinstance(item, Future) else item


def _prefetch(pool, images, preprocess, keep_pixels, ahead):
    """`_prepare_image` over `images` in `pool`, results in input order, at most `ahead` in flight.

    `images` is iterated in the calling thread only (it may be a generator).
    """
    pending = deque()
    source = iter(images)
    while True:
        while len(pending) < ahead:
            image = next(source, _END)
            if image is _END:
                break
            pending.append(pool.submit(_prepare_image, image, preprocess, keep_pixels))
        if not pending:
            return
        yield pending.popleft().result()


_END = object()
