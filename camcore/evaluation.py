"""Localization evaluation on weakly-supervised localization datasets (the library behind `camcore eval`).

`evaluate` runs an `Explainer` over a `camcore.wsol.Dataset` in batches and
reports, in percent: classification top-1/top-5, the CAM paper's top-1/top-5
and GT-known localization, wsolevaluation's MaxBoxAcc (V1) and MaxBoxAccV2,
and PxAP for mask datasets.

Protocol (clovaai/wsolevaluation, Choe et al., CVPR 2020)
---------------------------------------------------------
Followed where it defines things (its ``inference.py`` / ``evaluation.py``):

* the score map of an image is the CAM of its **ground-truth class**, cast to
  float64, resized to the 224 x 224 grid with bicubic interpolation (OpenCV
  ``INTER_CUBIC``, which `camcore.upsample` reproduces) and min-max
  normalized (a constant or NaN map becomes zeros);
* ground-truth boxes are scaled to that grid as its ``resize_bbox`` does:
  ``int(x * 224 / W)``, ``int(y * 224 / H)`` on the inclusive coordinates of
  ``localization.txt``;
* MaxBoxAcc (V1): largest contour, IoU 0.5; MaxBoxAccV2: all contours, mean
  over IoU 0.3/0.5/0.7; both over the score-map thresholds (``--thresholds``,
  default ``0:1:0.01``, the interval its ``evaluation.py`` uses by default);
  boxes and inclusive IoU are `camcore.metrics.box_accuracies`;
* PxAP: masks are the union of the instance masks (gray value > 0.5), resized
  to 224 x 224 with OpenCV's ``INTER_NEAREST`` rule (source index
  ``floor(i * n_in / 224)``); the ignore region is the ignore mask minus the
  instance masks; `camcore.metrics.pxap_counts` bins the float maps;
* ``--save-maps DIR`` writes each normalized 224 x 224 float64 score map to
  ``DIR/<image_id>.npy`` (the image id keeps its extension), which is where
  wsolevaluation's ``inference.py`` saves them and its ``evaluation.py``
  (``CamDataset``) reads them back.

Top-1/top-5 and GT-known localization (the CAM paper's heuristic, not defined
by wsolevaluation) use the same 224 x 224 normalized map of the ground-truth
class: `camcore.boxes` keeps pixels ``>= threshold * max`` (``--threshold``,
0.2) and boxes the largest 8-connected component (half-open); ground-truth
boxes are the scaled inclusive boxes above, made half-open (``x1 + 1``,
``y1 + 1``), so that the IoU equals the inclusive IoU of the ILSVRC toolkit.
GT-known: that box reaches IoU >= 0.5 with any ground-truth box of the image.
Top-k: GT-known and the class among the k best. (Each image has one class,
so a top-k box can only count for the ground-truth class, whose map is the
GT-known one: the maps of the other predicted classes are not computed.)

Differences from the published protocol
---------------------------------------
* **The model's preprocessing** is used, not wsolevaluation's (stretch to
  224 x 224, ImageNet mean/std). With ``resize="stretch"`` (the embedded
  EfficientNet-Lite0) the geometry is the protocol's. With ``resize="crop"``
  the CAM covers only the crop window, so the 224 grid is laid on that window:
  boxes are mapped with ``int((x - x0) * 224 / w)`` (window origin
  ``(x0, y0)``, size ``w x h``) and clipped to ``[0, 223]``; a box outside
  the window becomes a degenerate box on its edge and can hardly be matched.
  Masks are cut to the window before resizing.
* **The CAM is a sum** over channels (`camcore.cam`), where wsolevaluation's
  models take the mean: a positive factor that min-max normalization removes,
  up to float rounding (maps are computed in float32, as torch does, then
  resized in float64).
* **Image sizes** come from the decoded images, not from ``image_sizes.txt``.
* **Listed images without annotations** (no class label, or no boxes/masks)
  are left out of every figure and reported (``unannotated``); wsolevaluation
  would fail on them.
* **Mask datasets** (OpenImages) have no boxes: localization and MaxBoxAcc
  figures are null there; wsolevaluation likewise reports only PxAP.
* **Classification** top-1/top-5 is on the same preprocessed inputs.
"""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import InvalidInput
from .faithfulness import (auc, average_drop, confidence_scores, deletion_insertion,  # noqa: F401 (re-exported)
                           increase_in_confidence)
from .localize import boxes as heuristic_boxes
from .maps import normalize, upsample
from .metrics import box_accuracies, localization_accuracy, pointing_game, pxap_counts
from .preprocess import Geometry, Preprocess, read_image
from .scores import top_k as _top_classes
from .wsol import Dataset

__all__ = ["GRID", "IOU_THRESHOLDS", "evaluate", "grid_boxes", "grid_mask",
           "average_drop", "increase_in_confidence", "confidence_scores", "deletion_insertion", "auc",
           "pointing_game"]

GRID = 224  # wsolevaluation's _RESIZE_LENGTH
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
_V1_IOU = 0.5


def grid_boxes(boxes, geometry: Geometry, size: int = GRID) -> np.ndarray:
    """Scale inclusive boxes of the original image to the ``size x size`` grid of the model input.

    For a stretch geometry this is wsolevaluation's ``resize_bbox``
    (``int(x * size / W)``); for a crop, coordinates are taken relative to the
    crop window and clipped to ``[0, size - 1]``.

    Parameters
    ----------
    boxes : (m, 4) array_like
        Inclusive ``(x0, y0, x1, y1)`` in original-image pixels.
    geometry : Geometry
    size : int

    Returns
    -------
    (m, 4) int64 ndarray
        Inclusive boxes on the grid.

    Examples
    --------
    >>> g = Geometry(original_size=(375, 500), crop=(0, 0, 500, 375), input_size=(224, 224))
    >>> grid_boxes([[156, 163, 318, 230]], g).tolist()
    [[69, 97, 142, 137]]
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = geometry.crop
    sx, sy = float(size) / float(x1 - x0), float(size) / float(y1 - y0)
    scaled = (b - np.array([x0, y0, x0, y0], dtype=np.float64)) * np.array([sx, sy, sx, sy])
    return np.clip(np.trunc(scaled), 0, size - 1).astype(np.int64)


def grid_mask(mask, geometry: Geometry, size: int = GRID) -> np.ndarray:
    """A mask of the original image on the ``size x size`` grid, by OpenCV's ``INTER_NEAREST`` rule.

    Parameters
    ----------
    mask : (H0, W0) ndarray
    geometry : Geometry

    Returns
    -------
    (size, size) ndarray
        ``mask[y0 + floor(i * h / size), x0 + floor(j * w / size)]`` for the crop window.

    Examples
    --------
    >>> g = Geometry(original_size=(2, 4), crop=(0, 0, 4, 2), input_size=(4, 4))
    >>> grid_mask(np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), g, 4)
    array([[1, 2, 3, 4],
           [1, 2, 3, 4],
           [5, 6, 7, 8],
           [5, 6, 7, 8]])
    """
    x0, y0, x1, y1 = geometry.crop
    rows = y0 + np.minimum((np.arange(size) * (y1 - y0)) // size, y1 - y0 - 1)
    cols = x0 + np.minimum((np.arange(size) * (x1 - x0)) // size, x1 - x0 - 1)
    return np.asarray(mask)[np.ix_(rows, cols)]


def _gray_mask(path: Path) -> np.ndarray:
    """A mask file as bool: gray value > 0.5 on 0..255 (OpenCV's gray weights for color files)."""
    image = read_image(path, exif_orientation=False)  # as the image it masks (see Evaluator.forward)
    if image.ndim == 3:
        rgb = image[..., :3].astype(np.float64)
        image = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    elif image.dtype.kind == "f":
        image = image * 255.0
    return image > 0.5


def _model_info(explainer) -> dict:
    source = getattr(explainer, "source", None)
    info = {"path": source, "sha256": None}
    if source is not None and Path(source).is_file():
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        info["sha256"] = digest.hexdigest()
    return info


def _save_map(folder: Path, image_id: str, scoremap: np.ndarray) -> None:
    from .outputs import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, scoremap.astype(np.float64))
    atomic_write_bytes(folder / f"{image_id}.npy", buffer.getvalue())


FAITHFULNESS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "pointing_game")


class BatchScorer:
    """Runs one batch of samples and counts what every figure adds up from (picklable, for Ray actors)."""

    def __init__(self, images: Path, *, preprocess: Preprocess, method: str, thresholds, top_k: int,
                 threshold: float, boxed: bool, mask_root: Path, save_maps, faithfulness: bool, steps: int,
                 tolerance: float, chunk: int, contrast=None):
        self.images, self.preprocess, self.method, self.thresholds = images, preprocess, method, thresholds
        self.contrast = contrast
        self.top_k, self.threshold, self.boxed = top_k, threshold, boxed
        self.mask_root, self.save_maps = mask_root, save_maps
        self.faithfulness, self.steps, self.tolerance, self.chunk = faithfulness, steps, tolerance, chunk

    def forward(self, explainer, batch):
        """Read and run a batch: ``(geometries, labels, top classes, 224 x 224 score maps, faithfulness sums)``."""
        head = explainer.head
        # Dataset boxes refer to the stored pixels (torchvision's loaders ignore EXIF orientation).
        x, geometries = self.preprocess.batch([read_image(self.images / s.image_id, exif_orientation=False)
                                               for s in batch],
                                              layout=explainer.input_layout, dtype=head.input.dtype)
        feed = {head.input.name: x}
        features, logits = explainer.forward(feed)
        labels = np.array([s.label for s in batch], dtype=np.int64)
        if self.contrast is None:
            maps = explainer.maps(features, labels[:, None], method=self.method, inputs=feed)[:, 0]
        else:  # the ground-truth class against a reference (camcore.targets)
            from .targets import Targets

            chosen = Targets(labels[:, None].tolist(), contrast=self.contrast).select(logits, logits)
            maps = explainer.maps(features, chosen.compute, method=self.method, inputs=feed, seeds=chosen.seeds)[:, 0]
        scoremaps = normalize(upsample(maps.astype(np.float64), (GRID, GRID), method="bicubic"))
        faith = None
        if self.faithfulness:
            faith = dict.fromkeys(FAITHFULNESS, 0.0)
            _add_faithfulness(faith, explainer, x, maps, labels, scoremaps,
                              [grid_boxes(s.boxes, g) + [0, 0, 1, 1] for s, g in zip(batch, geometries)]
                              if self.boxed else None, steps=self.steps, tolerance=self.tolerance,
                              batch_size=self.chunk)
        return geometries, labels, _top_classes(logits, self.top_k), scoremaps, faith

    def score(self, batch, geometries, labels, top, scoremaps):
        """Every figure of one batch, as counts that add up: ``(len(batch), counts)``."""
        thresholds, top_k = self.thresholds, self.top_k
        out = {"top1_cls": int((top[:, 0] == labels).sum()),
               "top5_cls": int((top[:, :5] == labels[:, None]).any(axis=1).sum())}
        if self.save_maps is not None:
            for sample, scoremap in zip(batch, scoremaps):
                _save_map(self.save_maps, sample.image_id, scoremap)
        if self.boxed:
            gt = [grid_boxes(s.boxes, g) for s, g in zip(batch, geometries)]
            out["box_acc"] = box_accuracies(scoremaps, gt, thresholds=thresholds, iou_thresholds=IOU_THRESHOLDS)
            known = [heuristic_boxes(m, threshold=self.threshold) for m in scoremaps]
            half_open = [b + np.array([0, 0, 1, 1]) for b in gt]
            # one class per image: a top-k box counts only for the ground-truth class, whose map
            # is the GT-known one, so the maps of the other predicted classes are never needed
            pred = [[b] * top_k for b in known]
            for k, key in ((1, "top1_loc"), (5, "top5_loc")):
                if k <= top_k:
                    acc = localization_accuracy(top, pred, labels, half_open, k=k, gt_known_boxes=known)
                    out[key] = round(acc["top_k_loc"] * len(batch))
            out["gt_known_loc"] = round(acc["gt_known_loc"] * len(batch))
        else:
            masks, ignores = [], []
            for sample, g in zip(batch, geometries):
                truth = np.any([grid_mask(_gray_mask(self.mask_root / m), g) for m in sample.masks], axis=0)
                ignore = np.zeros_like(truth)
                if sample.ignore is not None:
                    ignore = grid_mask(_gray_mask(self.mask_root / sample.ignore), g) & ~truth
                masks.append(truth)
                ignores.append(ignore)
            out["pixel"] = pxap_counts(scoremaps, np.stack(masks), ignore=np.stack(ignores), thresholds=thresholds)
        return len(batch), out


def evaluate(explainer, dataset: Dataset, images, *, preprocess: Preprocess | None = None,
             thresholds=np.arange(0, 1, 0.01), top_k: int = 5, threshold: float = 0.2,
             batch_size: int | None = None, mask_root=None, save_maps=None, progress=None,
             method: str = "auto", faithfulness: bool = False, steps: int = 16, tolerance: float = 15.0,
             engine=None, contrast=None) -> dict:
    """Evaluate an explainer's class maps on a localization dataset (see the module docstring).

    Parameters
    ----------
    explainer : Explainer
        Any explainer (its backend runs the model; `Explainer.head` gives the CAM weights).
    dataset : camcore.wsol.Dataset
    images : path
        The image root; ``images / sample.image_id`` is read.
    preprocess : Preprocess, optional
        Default: ``explainer.default_preprocess()``.
    thresholds : (T,) array_like
        Score-map thresholds of MaxBoxAcc and PxAP.
    top_k : int
        Predicted classes kept per image; top-5 figures need ``top_k >= 5``.
    threshold : float in [0, 1]
        The heuristic's box threshold for top-k and GT-known localization.
    batch_size : int, optional
        Images per model run (default: the explainer's; a fixed-batch model's own).
    mask_root : path, optional
        Root of mask paths (default: `images`).
    save_maps : path, optional
        Folder receiving ``<image_id>.npy`` score maps.
    progress : callable, optional
        Called with the number of images done after each batch.
    method : str
        The map method, as in `Explainer.explain` ("auto": CAM where the head is GAP +
        affine, else Grad-CAM).
    faithfulness : bool, optional
        Also report the faithfulness of the ground-truth class's map (bilinear to the
        model input, see `camcore.faithfulness`): Average Drop, Increase in Confidence,
        deletion/insertion AUC in `steps` steps, and, on box datasets, the pointing game
        on the 224 grid with a `tolerance` in grid pixels.  ``2 (steps + 2)`` more model
        runs per image.
    engine : callable, optional
        Runs the batches elsewhere: ``engine(scorer, batches)`` yields ``(index, (n, counts,
        faithfulness))``, ``scorer.score(batch, *run) + (faithfulness,)`` where
        ``*run, faithfulness = scorer.forward(explainer, batch)``, for every batch, in any
        order (`camcore.distributed.evaluate_engine`).
    contrast : None, int or "finer", optional
        Map the ground-truth class against a reference class, or FinerCAM's most similar
        classes (`camcore.targets.Targets`); cam and the gradient methods only.

    Returns
    -------
    dict
        Figures in percent (``top1_loc``, ``top5_loc``, ``gt_known_loc``,
        ``max_box_acc_v1``, ``max_box_acc_v2``, ``pxap``, ``top1_cls``,
        ``top5_cls``; None where they do not apply), their ``errors``
        (100 - figure), optimal thresholds, counts and settings; ``faithfulness``
        (None unless asked) holds the means over the images.
    """
    head = explainer.head
    method = explainer.resolve_method(method)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= head.num_classes:
        raise InvalidInput(f"top_k must be an int in [1, {head.num_classes}], got {top_k!r}")
    if not 0 <= float(threshold) <= 1:
        raise InvalidInput(f"threshold must be in [0, 1], got {threshold!r}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if not dataset.samples:
        raise InvalidInput("the dataset has no annotated image to evaluate")
    preprocess = preprocess or explainer.default_preprocess()
    chunk = explainer.fixed_batch or int(batch_size or explainer.batch_size)
    if chunk < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size!r}")
    bad = [s for s in dataset.samples if s.label >= head.num_classes]
    if bad:
        raise InvalidInput(f"image {bad[0].image_id!r} has class {bad[0].label}, but the model has "
                           f"{head.num_classes} classes")
    if contrast is not None:
        from .targets import Targets

        Targets([0], contrast=contrast).validate(1, head.num_classes).check_method(method, head.num_classes)
    images = Path(images)
    boxed = dataset.kind == "boxes"
    scorer = BatchScorer(images, preprocess=preprocess, method=method, thresholds=thresholds, top_k=int(top_k),
                         threshold=float(threshold), boxed=boxed,
                         mask_root=images if mask_root is None else Path(mask_root),
                         save_maps=None if save_maps is None else Path(save_maps),
                         faithfulness=faithfulness, steps=steps, tolerance=tolerance, chunk=chunk,
                         contrast=contrast)
    hits = dict.fromkeys(("top1_cls", "top5_cls", "top1_loc", "top5_loc", "gt_known_loc"), 0)
    totals = {"box_acc": None, "pixel": None}
    faithful = dict.fromkeys(FAITHFULNESS, 0.0)

    def collect(out, faith):
        for key, value in out.items():
            if key in totals:
                totals[key] = value if totals[key] is None else totals[key] + value
            else:
                hits[key] += value
        for key, value in (faith or {}).items():
            faithful[key] += value

    started = time.perf_counter()
    batches = [dataset.samples[start:start + chunk] for start in range(0, len(dataset.samples), chunk)]
    if engine is None:
        # the figures of one batch are computed in a second thread while the next batch is read and run
        # (NumPy and image decoding release the GIL); batches are collected in order
        def finish(future, faith):
            n_done, out = future.result()
            collect(out, faith)
            if progress is not None:
                progress(n_done)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in batches:
                *run, faith = scorer.forward(explainer, batch)
                future = pool.submit(scorer.score, batch, *run)
                if pending is not None:
                    finish(*pending)
                pending = future, faith
            if pending is not None:
                finish(*pending)
    else:
        # batches come back in any order; the float sums (faithfulness) are added in batch order
        arrived = {}
        for index, (n_done, out, faith) in engine(scorer, batches):
            arrived[index] = out, faith
            if progress is not None:
                progress(n_done)
        for index in range(len(batches)):
            collect(*arrived[index])
    box_acc, pixel = totals["box_acc"], totals["pixel"]
    seconds = time.perf_counter() - started
    n = len(dataset.samples)
    figures = {key: 100.0 * value / n for key, value in hits.items()}
    if top_k < 5:
        figures["top5_cls"] = figures["top5_loc"] = None
    optimal = {"max_box_acc_v1": None, "max_box_acc_v2": None}
    per_iou = None
    if boxed:
        v1 = IOU_THRESHOLDS.index(_V1_IOU)
        figures["max_box_acc_v1"] = float(box_acc.largest.per_iou[v1])
        figures["max_box_acc_v2"] = box_acc.all.value
        optimal["max_box_acc_v1"] = float(box_acc.largest.best_thresholds[v1])
        optimal["max_box_acc_v2"] = {f"{t:g}": float(b) for t, b in zip(IOU_THRESHOLDS, box_acc.all.best_thresholds)}
        per_iou = {f"{t:g}": float(v) for t, v in zip(IOU_THRESHOLDS, box_acc.all.per_iou)}
    else:
        figures.update(top1_loc=None, top5_loc=None, gt_known_loc=None, max_box_acc_v1=None, max_box_acc_v2=None)
    figures["pxap"] = None if boxed else pixel.value
    keys = ("top1_loc", "top5_loc", "gt_known_loc", "max_box_acc_v1", "max_box_acc_v2", "pxap", "top1_cls",
            "top5_cls")
    out = {key: figures[key] for key in keys}
    out["errors"] = {key: None if figures[key] is None else 100.0 - figures[key] for key in keys}
    out["faithfulness"] = None
    if faithfulness:
        out["faithfulness"] = {key: value / n for key, value in faithful.items()}
        out["faithfulness"].update(average_drop=100.0 * faithful["average_drop"] / n,
                                   increase_in_confidence=100.0 * faithful["increase_in_confidence"] / n,
                                   pointing_game=100.0 * faithful["pointing_game"] / n if boxed else None,
                                   steps=int(steps), deletion_baseline="zeros", insertion_baseline="blur",
                                   pointing_tolerance=float(tolerance))
    out.update({
        "max_box_acc_v2_per_iou": per_iou,
        "optimal_thresholds": optimal,
        "iou_thresholds": list(IOU_THRESHOLDS),
        "thresholds": [round(float(t), 10) for t in thresholds],
        "box_threshold": float(threshold),
        "top_k": int(top_k),
        "method": method,
        "contrast": contrast,
        "grid": GRID,
        "model": _model_info(explainer),
        "preprocess": {"size": list(preprocess.size), "resize": preprocess.resize, "mean": list(preprocess.mean),
                       "std": list(preprocess.std), "scale": preprocess.scale,
                       "channel_order": preprocess.channel_order, "crop_fraction": preprocess.crop_fraction},
        "dataset": {"source": dataset.source, "kind": dataset.kind},
        "counts": {"evaluated": n, "unannotated": len(dataset.unannotated),
                   "listed": n + len(dataset.unannotated)},
        "unannotated": list(dataset.unannotated),
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    })
    return out


def _add_faithfulness(sums: dict, explainer, x, maps, labels, scoremaps, boxes, *, steps, tolerance, batch_size):
    """Add one batch's faithfulness figures to `sums` (per-image values summed; drop and IC as fractions)."""
    layout = explainer.input_layout
    size = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
    on_input = upsample(maps.astype(np.float64), tuple(size), method="bilinear")
    original, masked = confidence_scores(explainer, x, on_input, labels, batch_size=batch_size)
    sums["average_drop"] += average_drop(original, masked) * len(x) / 100.0
    sums["increase_in_confidence"] += increase_in_confidence(original, masked) * len(x) / 100.0
    curves = deletion_insertion(explainer, x, on_input, labels, steps=steps, batch_size=batch_size)
    sums["deletion_auc"] += float(curves["deletion_auc"].sum())
    sums["insertion_auc"] += float(curves["insertion_auc"].sum())
    if boxes is not None:
        sums["pointing_game"] += int(pointing_game(scoremaps, boxes, tolerance=tolerance).sum())
