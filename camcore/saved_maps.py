"""Raw maps on disk: `save_maps` writes `ImageExplanation`s to one ``.npz``, `load_maps` reads them back.

The file keeps what the maps are made of, not a picture: the feature-resolution
maps, un-normalized (float32, or float16 on request), the classes, scores and
boxes, the method, and the `Geometry` that puts the maps back on each image.  It
holds plain NumPy arrays (no pickles), so ``np.load(path)`` reads it anywhere:

========================  ====================  ==============================================
key                       shape, dtype          meaning
========================  ====================  ==============================================
``format``                () str                ``"camcore.maps/1"``
``cams``                  (M, h, w) f4 or f2    every image's maps, one after the other
``counts``                (n,) int64            maps per image: image i's are
                                                ``cams[offsets[i]:offsets[i + 1]]``,
                                                ``offsets = concatenate([[0], cumsum(counts)])``
``classes``, ``scores``   (M,) int64, float32   the class and score of each map
``boxes``                 (M, 4) int64          ``(x0, y0, x1, y1)`` half-open, original-image
                                                pixels; ``-1`` rows: no box (constant map)
``class_names``           (M,) str              the class names ("" when unknown)
``sources``               (n,) str              image paths ("" for arrays)
``sizes``                 (n, 2) int64          original ``(H0, W0)``
``crops``, ``input_sizes`` (n, 4), (n, 2) int64 the `Geometry` (zeros for an error)
``errors``                (n,) str              why an image was not explained ("" if it was)
``methods``, ``upsample`` (n,) str              the method and the upsampling of each image
========================  ====================  ==============================================
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InvalidInput
from .explainer import ImageExplanation
from .outputs import atomic_write_bytes
from .preprocess import Geometry

__all__ = ["save_maps", "load_maps", "FORMAT"]

FORMAT = "camcore.maps/1"


def save_maps(path, results: Sequence[ImageExplanation], *, dtype="float32", class_names=None) -> Path:
    """Write `results` (from `Explainer.explain_images`) to one ``.npz`` file, atomically.

    Parameters
    ----------
    path : str, Path or None
        The file to write (``.npz`` is not appended); None returns the file's bytes instead.
    results : sequence of ImageExplanation
        Images of one run: their maps share one feature resolution.
    dtype : {"float32", "float16"}
        How the maps are stored; float16 halves the file, within float16's relative
        precision (about 1e-3 of each map's range).
    class_names : sequence of str or callable, optional
        ``explainer.class_names`` or ``explainer.class_name``, stored beside the indices.

    Returns
    -------
    Path, or bytes when `path` is None

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from camcore.preprocess import Geometry
    >>> r = ImageExplanation("cat.jpg", (4, 6), np.array([3]), np.array([0.9], np.float32),
    ...                      [np.array([[1, 0, 5, 4]])], np.arange(4, dtype=np.float32).reshape(1, 2, 2),
    ...                      Geometry((4, 6), (1, 0, 5, 4), (2, 2)))
    >>> path = save_maps(tempfile.mkdtemp() + "/maps.npz", [r])
    >>> [back] = load_maps(path)
    >>> back.box(), bool(np.array_equal(back.maps, r.maps))
    ((1, 0, 5, 4), True)
    """
    if dtype not in ("float32", "float16", np.float32, np.float16):
        raise InvalidInput(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    results = list(results)
    if not all(isinstance(r, ImageExplanation) for r in results):
        raise InvalidInput("results must be ImageExplanation objects (Explainer.explain_images)")
    explained = [r for r in results if r.error is None and len(r.classes)]
    shapes = {tuple(r.cams.shape[1:]) for r in explained}
    if len(shapes) > 1:
        raise InvalidInput(f"results must share one map resolution (one model), got {sorted(shapes)}")
    h, w = shapes.pop() if shapes else (0, 0)
    cams = [np.asarray(r.cams, np.float32) for r in explained]
    all_cams = np.concatenate(cams) if cams else np.zeros((0, h, w), np.float32)
    boxes = [np.asarray(b[0] if len(b) else [-1, -1, -1, -1], np.int64) for r in results for b in r.boxes]
    classes = np.concatenate([np.asarray(r.classes, np.int64) for r in results] or [np.zeros(0, np.int64)])
    name = class_names if callable(class_names) or class_names is None else (
        lambda i, names=list(class_names): names[i] if 0 <= i < len(names) else "")
    arrays = {
        "format": np.array(FORMAT),
        "cams": all_cams.astype(np.dtype(dtype)),
        "counts": np.array([len(r.classes) for r in results], np.int64),
        "classes": classes,
        "scores": np.concatenate([np.asarray(r.scores, np.float32) for r in results] or [np.zeros(0, np.float32)]),
        "boxes": np.stack(boxes) if boxes else np.zeros((0, 4), np.int64),
        "class_names": np.array(["" if name is None else str(name(int(c))) for c in classes], dtype=str),
        "sources": np.array(["" if r.source is None else str(r.source) for r in results], dtype=str),
        "sizes": np.array([tuple(int(v) for v in r.size) for r in results], np.int64).reshape(-1, 2),
        "crops": np.array([r.geometry.crop if r.geometry else (0, 0, 0, 0) for r in results], np.int64).reshape(-1, 4),
        "input_sizes": np.array([r.geometry.input_size if r.geometry else (0, 0) for r in results],
                                np.int64).reshape(-1, 2),
        "errors": np.array([r.error or "" for r in results], dtype=str),
        "methods": np.array([r.method for r in results], dtype=str),
        "upsample": np.array([r.upsample for r in results], dtype=str),
    }
    if arrays["counts"].sum() != len(arrays["cams"]) or len(boxes) != len(classes):
        raise InvalidInput("each result must have as many maps and boxes as classes")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    if path is None:
        return buffer.getvalue()
    return atomic_write_bytes(path, buffer.getvalue())


def load_maps(path) -> list[ImageExplanation]:
    """Read a file written by `save_maps` (or ``camcore explain --save-maps``): a path or a binary file object.

    Returns
    -------
    list of ImageExplanation
        In the order saved; ``.cams`` at float32 (from float16 when so saved), and
        ``.maps`` and ``.box()`` as the originals'.
    """
    try:
        data = np.load(path if hasattr(path, "read") else Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read maps file {path}: {str(exc).strip().splitlines()[0]}") from None
    with data:
        if "format" not in data.files or str(data["format"]) != FORMAT:
            raise InvalidInput(f"{path} is not a camcore maps file (expected format {FORMAT!r})")
        a = {key: data[key] for key in data.files}
    offsets = np.concatenate([[0], np.cumsum(a["counts"])])
    results = []
    for i in range(len(a["counts"])):
        part = slice(offsets[i], offsets[i + 1])
        error = str(a["errors"][i]) or None
        geometry = None
        if error is None:
            geometry = Geometry(tuple(int(v) for v in a["sizes"][i]), tuple(int(v) for v in a["crops"][i]),
                                tuple(int(v) for v in a["input_sizes"][i]))
        boxes = [b[None].copy() if b[0] >= 0 else np.zeros((0, 4), np.int64) for b in a["boxes"][part]]
        results.append(ImageExplanation(
            str(a["sources"][i]) or None, tuple(int(v) for v in a["sizes"][i]), a["classes"][part].copy(),
            a["scores"][part].copy(), boxes,
            a["cams"][part].astype(np.float32) if error is None else np.zeros((0, 0, 0), np.float32), geometry,
            str(a["upsample"][i]), error, str(a["methods"][i])))
    return results
