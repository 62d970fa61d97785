"""`drift`: how the explanations of a deployed form of a model (int8, float16, optimized) differ from the float model's.

Both models explain the same images, preprocessed the same way (the reference's
preprocessing, each model fed in its own input dtype and layout).  Per image:

* the top-1 class of each model and whether they agree;
* the Pearson correlation of the two maps of the reference's top-1 class (so a class
  flip does not hide as a map change), on the model-input grid;
* the IoU of the boxes of those maps (`camcore.localize.boxes`, on the original image);
* each model's Average Drop (Chattopadhay et al., WACV 2018) and deletion AUC (Petsiuk et
  al., BMVC 2018) for its own top-1 map, and the change ``deployed - reference``
  (`camcore.faithfulness`).

`picture` puts the worst images (lowest map correlation) side by side.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidInput

__all__ = ["drift", "picture", "FIELDS"]

# Per-image fields, in table order.
FIELDS = ("top1_agree", "pearson", "box_iou", "delta_average_drop", "delta_deletion_auc")


def _same_runtime(explainer) -> dict:
    """The `camcore.load` keywords that put another model on `explainer`'s runtime, device and
    requested precision (a backend without a `runtime`, as a fake, gives the defaults)."""
    backend = explainer.backend
    runtime = getattr(backend, "runtime", None)
    name = getattr(runtime, "name", None)
    if name is None:
        return {}
    chosen = {"backend": name, "precision": getattr(runtime, "requested_precision", None)}
    if name == "onnxruntime":
        chosen["providers"] = getattr(backend, "providers", None)
    else:
        chosen["device"] = getattr(backend, "device", None)
    return chosen


def _explainer(model, like=None):
    from .api import load
    from .explainer import Explainer

    if isinstance(model, Explainer):
        return model
    if like is not None:
        return load(model, class_names=like.class_names, **_same_runtime(like))
    return load(model)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def _faithfulness(explainer, x, maps, classes, steps):
    from .faithfulness import confidence_scores, deletion_insertion

    original, masked = confidence_scores(explainer, x, maps, classes)
    drop = 100.0 * np.divide(np.maximum(original - masked, 0), original, out=np.zeros_like(original),
                             where=original != 0)  # per image; its mean is `average_drop`
    curves = deletion_insertion(explainer, x, maps, classes, steps=steps)
    return drop, curves["deletion_auc"]


def drift(reference, deployed, images, *, preprocess=None, method: str = "auto", threshold: float = 0.2,
          steps: int = 16, faithfulness: bool = True, sources=None) -> dict:
    """Explain `images` with a reference model and its deployed form; measure how the explanations moved.

    Parameters
    ----------
    reference, deployed : Explainer, path or onnx.ModelProto
        The float model and its deployed form (quantized, float16, optimized...).  A
        path is loaded with `camcore.load` (the deployed one on the reference's runtime,
        device or providers, requested precision and class names); None as `reference`
        is the embedded model.  Load both with ``camcore.load(..., backend=, device=,
        precision=)`` to explain on another runtime.
    images : sequence of (H, W) or (H, W, 3) ndarray
        Decoded images (`camcore.preprocess.read_image`).
    preprocess : Preprocess, optional
        Default: the reference's (`Explainer.default_preprocess`), for both models.
    method : str
        As in `Explainer.explain` ("auto": CAM where the head allows it, else Grad-CAM),
        resolved on each model separately.
    threshold : float
        Box threshold, fraction of each map's maximum.
    steps : int
        Deletion steps.
    faithfulness : bool
        Also compute Average Drop and deletion AUC (``4 N (steps + 2)`` model runs in all).
    sources : sequence of str, optional
        A name per image for the records (e.g. its path).

    Returns
    -------
    dict
        ``images``: one record per image (``source``, ``reference_class``,
        ``deployed_class``, ``reference_score``, ``deployed_score``, ``top1_agree``,
        ``pearson``, ``reference_box``, ``deployed_box``, ``box_iou`` and, with
        `faithfulness`, ``reference_average_drop``, ``deployed_average_drop``,
        ``delta_average_drop`` (percent points), ``reference_deletion_auc``,
        ``deployed_deletion_auc``, ``delta_deletion_auc``); ``overall``: ``images``,
        ``top1_agreement`` (fraction), ``pearson_mean``, ``pearson_min``, ``box_iou_mean``,
        ``delta_average_drop`` (difference of the two Average Drops over all images) and
        ``delta_deletion_auc`` (mean); ``methods``: the method each model used;
        ``runtime``: per model, the runtime that ran it (`camcore.outputs.runtime_of`:
        ``backend``, ``version``, ``devices``, ``precision`` read back); and, for
        `picture`, ``maps`` (per image: the two ``(H, W)`` maps on the input grid).

    Examples
    --------
    >>> import numpy as np, camcore
    >>> from camcore.drift import drift
    >>> ex = camcore.load()
    >>> out = drift(ex, ex, [np.full((64, 64, 3), 128, np.uint8)], faithfulness=False)
    >>> out["overall"]["top1_agreement"], out["images"][0]["box_iou"]
    (1.0, 1.0)
    """
    from .explainer import _image_maps
    from .localize import boxes as find_boxes
    from .maps import upsample
    from .metrics import iou
    from .outputs import runtime_of

    images = list(images)
    if not images:
        raise InvalidInput("drift needs at least one image")
    if sources is not None and len(sources) != len(images):
        raise InvalidInput(f"sources must name each of the {len(images)} images, got {len(sources)}")
    ref = _explainer(reference)
    dep = _explainer(deployed, like=ref)
    if ref.head.num_classes != dep.head.num_classes:
        raise InvalidInput(f"the models disagree on the number of classes: {ref.head.num_classes} "
                           f"and {dep.head.num_classes}")
    preprocess = preprocess or ref.default_preprocess()
    runs = {}
    for name, ex in (("reference", ref), ("deployed", dep)):
        x, geometries = preprocess.batch(images, layout=ex.input_layout, dtype=ex.head.input.dtype)
        own = ex.explain(x, top_k=1, method=method)
        # The reference's top-1 class in both models: a flip must not pass for a map change.
        shared = own if name == "reference" else ex.explain(x, classes=runs["reference"]["own"].classes,
                                                            method=method)
        size = tuple(x.shape[2:] if ex.input_layout == "NCHW" else x.shape[1:3])
        runs[name] = {"x": x, "geometries": geometries, "own": own, "size": size,
                      "shared": upsample(shared.maps[:, 0].astype(np.float64), size, method="bilinear"),
                      "own_grid": upsample(own.maps[:, 0].astype(np.float64), size, method="bilinear")}
    r, d = runs["reference"], runs["deployed"]
    if r["size"] != d["size"]:
        raise InvalidInput(f"the models take different input sizes: {r['size']} and {d['size']}")
    records = []
    for i in range(len(images)):
        boxes = []
        for run in (r, d):
            full = _image_maps(run["shared"][i][None].astype(np.float32), run["geometries"][i], "bilinear")[0]
            found = find_boxes(full, threshold=threshold)
            boxes.append(tuple(int(v) for v in found[0]) if len(found) else None)
        if boxes[0] is not None and boxes[1] is not None:
            box_iou = float(iou(boxes[0], boxes[1])[0, 0])
        else:
            box_iou = 1.0 if boxes[0] == boxes[1] else 0.0
        rc, dc = int(r["own"].classes[i, 0]), int(d["own"].classes[i, 0])
        records.append({
            "source": None if sources is None else str(sources[i]),
            "reference_class": rc, "deployed_class": dc,
            "reference_score": float(r["own"].scores[i, 0]), "deployed_score": float(d["own"].scores[i, 0]),
            "top1_agree": rc == dc, "pearson": _pearson(r["shared"][i], d["shared"][i]),
            "reference_box": boxes[0], "deployed_box": boxes[1], "box_iou": box_iou})
    overall = {"images": len(images),
               "top1_agreement": float(np.mean([rec["top1_agree"] for rec in records])),
               "pearson_mean": float(np.nanmean([rec["pearson"] for rec in records])),
               "pearson_min": float(np.nanmin([rec["pearson"] for rec in records])),
               "box_iou_mean": float(np.mean([rec["box_iou"] for rec in records]))}
    if faithfulness:
        measured = {}
        for name, ex, run in (("reference", ref, r), ("deployed", dep, d)):
            measured[name] = _faithfulness(ex, run["x"], run["own_grid"], run["own"].classes[:, 0], steps)
        for i, rec in enumerate(records):
            for key, index in (("average_drop", 0), ("deletion_auc", 1)):
                a, b = float(measured["reference"][index][i]), float(measured["deployed"][index][i])
                rec.update({f"reference_{key}": a, f"deployed_{key}": b, f"delta_{key}": b - a})
        overall["delta_average_drop"] = float(measured["deployed"][0].mean() - measured["reference"][0].mean())
        overall["delta_deletion_auc"] = float(np.mean([rec["delta_deletion_auc"] for rec in records]))
    return {"images": records, "overall": overall,
            "methods": {"reference": r["own"].method, "deployed": d["own"].method},
            "runtime": {"reference": runtime_of(ref), "deployed": runtime_of(dep)},
            "maps": [(r["shared"][i].astype(np.float32), d["shared"][i].astype(np.float32))
                     for i in range(len(images))],
            "geometries": r["geometries"]}


def worst(result: dict, count: int = 4) -> list:
    """Indices of the `count` images whose maps moved most (lowest Pearson correlation; NaN first)."""
    key = [(-math.inf if math.isnan(rec["pearson"]) else rec["pearson"]) for rec in result["images"]]
    return [int(i) for i in np.argsort(key, kind="stable")[:count]]


def picture(result: dict, images, *, count: int = 4, width: int = 256, class_name=str) -> np.ndarray:
    """The `count` worst images side by side: one row per image, reference map left, deployed map right.

    Both maps are of the reference's top-1 class; each title gives that model's own top-1
    class and score, the deployed one also the maps' correlation.

    Parameters
    ----------
    result : dict
        What `drift` returned for `images`.
    images : sequence of ndarray
        The images given to `drift`.
    class_name : callable
        Class index -> name, for the titles.

    Returns
    -------
    (rows * (title + h), 2 * width, 3) uint8 ndarray
    """
    from skimage.transform import resize

    from .outputs import title_strip
    from .explainer import _image_maps
    from .localize import boxes as find_boxes
    from .maps import upsample
    from .outputs import _display
    from .render import overlay

    rows = []
    for i in worst(result, count):
        rec, rgb = result["images"][i], _display(np.asarray(images[i]))
        height = max(1, round(rgb.shape[0] * width / rgb.shape[1]))
        small = (resize(rgb, (height, width), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
        tiles = []
        for side, grid_map in zip(("reference", "deployed"), result["maps"][i]):
            full = _image_maps(grid_map[None], result["geometries"][i], "bilinear")[0]
            shown = upsample(full, (height, width))
            box = find_boxes(shown)
            title = (f"{side}: {class_name(rec[side + '_class'])} {100 * rec[side + '_score']:.0f}%"
                     + (f"  r={rec['pearson']:.2f}" if side == "deployed" else ""))
            tiles.append(np.concatenate([title_strip(title, width),
                                         overlay(small, shown, boxes=box if len(box) else None)]))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
