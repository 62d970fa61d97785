"""Every method side by side: time per image and, when asked, faithfulness (the library behind `camcore compare`).

For each image it writes ``<stem>.compare.png``: one row per explained class
(the model's top-k, the same for every method), one column per method, each
cell the map over the image with its box and a title.  ``compare.json`` holds
each method's time per image (one `Explainer.explain` call on the whole
preprocessed batch, so one-time setup such as building a head session counts)
and, with ``--faithfulness``, Average Drop, Increase in Confidence and
deletion/insertion AUC of the top-1 map (see `camcore.faithfulness`).
"""

from __future__ import annotations

import time

import numpy as np

from .errors import InvalidInput

__all__ = ["DEFAULT_METHODS", "compare", "grid"]

# scorecam runs the whole model once per channel: only when asked.
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "ablationcam",
                   "reciprocam")


def _method_list(explainer, methods) -> list:
    """Validated method names, in order, without repeats; "cam" is left out of the default on non-affine heads."""
    if methods is None:
        return [m for m in DEFAULT_METHODS if m != "cam" or explainer.head.affine]
    chosen = []
    for name in methods:
        resolved = explainer.resolve_method(name)
        if resolved not in chosen:
            chosen.append(resolved)
    if not chosen:
        raise InvalidInput("methods must name at least one method")
    return chosen


def compare(explainer, images, *, methods=None, preprocess=None, top_k: int = 1, faithfulness: bool = False,
            steps: int = 16, threshold: float = 0.2, progress=None, classes=None) -> dict:
    """Explain `images` with each method; return the maps, timings and faithfulness figures.

    Parameters
    ----------
    explainer : Explainer
    images : sequence of (H, W, 3) ndarray
        Decoded images (`camcore.preprocess.read_image`).
    methods : sequence of str, optional
        Default `DEFAULT_METHODS` ("cam" only where the head is GAP + affine).
    preprocess : Preprocess, optional
    top_k : int
        Classes per image (the grid's rows).
    faithfulness : bool
        Also score the top-1 map of each method (`confidence_scores`, `deletion_insertion`).
    steps : int
        Deletion/insertion steps.
    threshold : float
        Box threshold, fraction of the map's maximum.
    progress : callable, optional
        Called with 1 after each method.
    classes : optional
        As in `Explainer.explain` (a `camcore.targets.Targets` included), instead of `top_k`.

    Returns
    -------
    dict
        ``methods`` (names), ``explanations`` (method -> list of `ImageExplanation`),
        ``seconds_per_image`` (method -> float), ``faithfulness`` (method -> dict, or None).
    """
    from .explainer import ImageExplanation, _image_maps
    from .faithfulness import average_drop, confidence_scores, deletion_insertion, increase_in_confidence
    from .localize import boxes as find_boxes
    from .maps import upsample

    methods = _method_list(explainer, methods)
    preprocess = preprocess or explainer.default_preprocess()
    x, geometries = preprocess.batch(images, layout=explainer.input_layout, dtype=explainer.head.input.dtype)
    size = x.shape[2:] if explainer.input_layout == "NCHW" else x.shape[1:3]
    result = {"methods": methods, "explanations": {}, "seconds_per_image": {},
              "faithfulness": {} if faithfulness else None}
    for method in methods:
        started = time.perf_counter()
        out = explainer.explain(x, classes=classes, top_k=top_k, method=method)
        result["seconds_per_image"][method] = (time.perf_counter() - started) / len(x)
        explained = []
        for j, geometry in enumerate(geometries):
            full = _image_maps(out.maps[j], geometry, "bilinear")
            found = [find_boxes(m, threshold=threshold) for m in full]
            keep = out.classes[j] >= 0  # -1 pads the rows of images with fewer classes (camcore.targets)
            explained.append(ImageExplanation(None, geometry.original_size, out.classes[j][keep], out.scores[j][keep],
                                              [b for b, k in zip(found, keep) if k], out.maps[j][keep], geometry,
                                              method=method))
        result["explanations"][method] = explained
        if faithfulness:
            top1 = upsample(out.maps[:, 0].astype(np.float64), tuple(size), method="bilinear")
            original, masked = confidence_scores(explainer, x, top1, out.classes[:, 0])
            curves = deletion_insertion(explainer, x, top1, out.classes[:, 0], steps=steps)
            result["faithfulness"][method] = {
                "average_drop": average_drop(original, masked),
                "increase_in_confidence": increase_in_confidence(original, masked),
                "deletion_auc": float(curves["deletion_auc"].mean()),
                "insertion_auc": float(curves["insertion_auc"].mean()),
                "steps": int(steps)}
        if progress is not None:
            progress(1)
    return result


def grid(image, cells, explainer, *, width: int = 256) -> np.ndarray:
    """One picture: rows are classes, columns are methods.

    Parameters
    ----------
    image : (H, W) or (H, W, 3) ndarray
    cells : list of (method, ImageExplanation)
        The columns, in order.
    width : int
        Width of each cell in pixels (the image is resized to it, keeping its aspect).

    Returns
    -------
    (rows * (title + h), columns * width, 3) uint8 ndarray
    """
    from skimage.transform import resize

    from .localize import boxes as find_boxes
    from .maps import upsample
    from .outputs import _display, title_strip
    from .render import overlay

    rgb = _display(image)
    height = max(1, round(rgb.shape[0] * width / rgb.shape[1]))
    small = (resize(rgb, (height, width), anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
    rows = []
    for j in range(len(cells[0][1].classes)):
        row = []
        for method, explained in cells:
            shown = upsample(explained.maps[j], (height, width))
            box = find_boxes(shown)
            tile = overlay(small, shown, boxes=box if len(box) else None)
            title = (f"{method} {explainer.class_name(int(explained.classes[j]))} "
                     f"{100 * float(explained.scores[j]):.1f}%")
            row.append(np.concatenate([title_strip(title, width), tile]))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)
