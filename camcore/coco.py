"""Boxes as COCO detections: one JSON that pycocotools and FiftyOne read as is.

`coco_detections` turns `ImageExplanation`s into a COCO object-detection file:

* ``images``: ``id`` (1, 2, ... in input order), ``width``, ``height``,
  ``file_name`` (relative to `root` when given, else the path as given);
* ``categories``: one per class, ``id`` = the class index, ``name``;
* ``annotations``: one per explained class that has a box: ``id`` (1, 2, ...),
  ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels (from the
  half-open ``(x0, y0, x1, y1)`` box: ``w = x1 - x0``, ``h = y1 - y0``), ``area``,
  ``iscrowd`` 0 and ``score`` (the class score).

``pycocotools.coco.COCO(path)`` loads the whole file, and
``coco.loadRes(json.load(open(path))["annotations"])`` takes its annotations as
detection results; FiftyOne imports it with ``fo.types.COCODetectionDataset``
(``data_path`` = `root`), the score becoming each detection's confidence.  Images
that could not be explained are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from .errors import InvalidInput
from .explainer import ImageExplanation

__all__ = ["coco_detections", "write_coco"]


def coco_detections(results: Sequence[ImageExplanation], *, class_name: Callable[[int], str] | None = None,
                    num_classes: int | None = None, root=None, description: str = "camcore boxes") -> dict:
    """The COCO detection dict of `results` (see the module's docstring).

    Parameters
    ----------
    results : sequence of ImageExplanation, or of results.json records
        Records (``{"path", "width", "height", "error", "classes": [{"index", "name",
        "score", "box"}]}``) carry their class names.
    class_name : callable, optional
        Class index -> name (``explainer.class_name``); default the index as text.
    num_classes : int, optional
        List every class of the model as a category (default: the classes explained).
    root : path, optional
        ``file_name`` is the image path relative to this folder.
    description : str
        ``info.description``.

    Returns
    -------
    dict

    Examples
    --------
    >>> import numpy as np
    >>> r = ImageExplanation("photos/cat.jpg", (300, 451), np.array([285]), np.array([0.79], np.float32),
    ...                      [np.array([[10, 20, 110, 220]])], np.zeros((1, 7, 7), np.float32), None)
    >>> coco = coco_detections([r], root="photos")
    >>> coco["images"], coco["annotations"][0]["bbox"]
    ([{'id': 1, 'width': 451, 'height': 300, 'file_name': 'cat.jpg'}], [10, 20, 100, 200])
    """
    name = class_name or str
    images, annotations, used, names = [], [], set(), {}
    for result in results:
        if isinstance(result, ImageExplanation):
            if result.error is not None:
                continue
            source, (height, width) = result.source, (int(v) for v in result.size)
            found = [(int(c), float(s), result.box(j), None) for j, (c, s) in enumerate(zip(result.classes,
                                                                                               result.scores))]
        elif isinstance(result, dict) and "path" in result and "classes" in result:  # a results.json record
            if result.get("error") is not None:
                continue
            source, height, width = result["path"], int(result["height"]), int(result["width"])
            found = [(int(c["index"]), float(c["score"]), None if c.get("box") is None else tuple(c["box"]),
                      c.get("name")) for c in result["classes"]]
        else:
            raise InvalidInput(f"results must be ImageExplanation objects or results.json records, "
                               f"got {type(result).__name__}")
        image_id = len(images) + 1
        source = "" if source is None else str(source)
        file_name = os.path.relpath(source, root) if root is not None and source else source
        images.append({"id": image_id, "width": width, "height": height, "file_name": file_name})
        for c, score, box, known in found:
            used.add(c)
            if known is not None:
                names.setdefault(c, known)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0, "score": round(float(score), 6)})
    ids = range(num_classes) if num_classes is not None else sorted(used)
    categories = [{"id": int(c), "name": str(names[c] if class_name is None and c in names else name(int(c))),
                   "supercategory": ""} for c in ids]
    return {"info": {"description": description, "root": None if root is None else str(root)},
            "images": images, "categories": categories, "annotations": annotations}


def write_coco(path, results: Sequence[ImageExplanation], **kwargs) -> Path:
    """Write `coco_detections(results, **kwargs)` to `path` as JSON, atomically; returns the path."""
    from .outputs import atomic_write_text

    return atomic_write_text(path, json.dumps(coco_detections(results, **kwargs), indent=1) + "\n")
