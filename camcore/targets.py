"""What to explain: class names or indices, per-image targets from a file, multi-label
thresholds, negated logits of binary models, and contrastive targets (FinerCAM).

A `Targets` is given where `classes=` is taken (`Explainer.explain`,
`explain_images`, `iter_explain_images`): the explainer asks it, chunk by chunk,
which classes to explain once it has the logits (`Targets.select`).  Most targets
are one logit each; contrastive and negated targets are a linear combination of
logits, a *seed* vector ``s`` over the C classes, and the map explains ``s . logits``:

* CAM: the weights ``s @ W`` (for a contrast ``w_c - w_ref``), exact by linearity:
  ``mean(map) + s . b == s . logits``.
* Gradient methods (``gradcam``, ``gradcam++``, ``xgradcam``, ``hirescam``,
  ``layercam``): ``s`` seeds the same backward pass of the head that a single
  class uses, so a contrast costs what one class costs.
* The other methods (``eigencam``, ``ablationcam``, ``reciprocam``, ``scorecam``)
  score one class each and refuse contrastive and negated targets.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InvalidInput
from .methods import REGISTRY
from .scores import sigmoid, softmax, top_k

__all__ = ["Targets", "Selection", "class_indices", "read_targets", "targets_from_options", "finer_references",
           "seedable", "SEEDED_METHODS", "NEGATIVE"]


def seedable(spec) -> bool:
    """Whether a registered method explains any linear combination of logits (a seed vector): a
    class-specific method that needs only the head's weights, the features and gradients (or a
    transformer's attention and its gradients, `gae`)."""
    return spec.class_specific and spec.needs <= {"weights", "features", "gradients", "attention",
                                                  "attention_gradients"}


# CAM, the gradient methods and GAE, in the registry's order.
SEEDED_METHODS = tuple(name for name, spec in REGISTRY.items() if seedable(spec))

# SEEDED_METHODS as the refusals name them (attention methods apply to transformers only).
SEEDED_TEXT = ", ".join(name + (" (on a transformer)" if "attention" in REGISTRY[name].needs else "")
                        for name in SEEDED_METHODS)

# The class index of a single-logit binary model's negative class: its negated logit.
NEGATIVE = 1
_HEADER_IMAGE = ("image", "path", "file", "filename", "file_name")
_HEADER_CLASS = ("class", "classes", "label", "labels", "target", "targets")


@dataclass(frozen=True, eq=False)
class Selection:
    """What `Targets.select` chose for a chunk of n items, k classes each.

    Attributes
    ----------
    classes : (n, k) int64 ndarray
        The classes explained, as reported; -1 pads a row with fewer than k classes.
    compute : (n, k) int64 ndarray
        Valid class indices for the methods (`classes` with padding and the negative
        class of a single-logit model replaced by a real class).
    seeds : (n, k, C) float32 ndarray or None
        The logit combination each map explains, when not a single class's logit.
    scores : (n, k) float32 ndarray
        The probability of each class (0 for padding).
    """

    classes: np.ndarray
    compute: np.ndarray
    seeds: np.ndarray | None
    scores: np.ndarray


def finer_references(logits: np.ndarray, target: int, *, count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The classes most similar to `target` and their weights, as FinerCAM picks them.

    Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details
    for Visual Explanation", CVPR 2025) explains a class against the classes the model
    finds most similar to it: those whose logits are nearest the target's,
    ``d = argsort_j |y_j - y_c|`` (c itself excluded), the first `count` of them.  Each
    reference is weighted by its softmax probability, normalized over the references,
    ``omega_d = p_d / sum_d' p_d'``, and the map explains

    ``y_c - alpha * sum_d omega_d y_d``

    (`Targets` applies ``alpha``; ``alpha = 1`` by default, as in the paper; a smaller
    alpha keeps more of the class's coarse evidence).  The weights are held constant
    (a seed vector), so the map costs what one class costs.

    Parameters
    ----------
    logits : (C,) float ndarray
        One item's logits.
    target : int
        The class c explained.
    count : int
        References to take (at most C - 1).

    Returns
    -------
    references : (count,) int64 ndarray
    weights : (count,) float64 ndarray, summing to 1

    Examples
    --------
    >>> refs, w = finer_references(np.array([5.0, 4.0, 0.0, 4.5]), 0, count=2)
    >>> refs.tolist(), bool(np.isclose(w.sum(), 1))
    ([3, 1], True)
    """
    y = np.asarray(logits, np.float64)
    distance = np.abs(y - y[target])
    distance[target] = np.inf
    references = np.argsort(distance, kind="stable")[:count]
    p = softmax(y)[references]
    return references.astype(np.int64), p / p.sum()


class Targets:
    """The classes to explain for each item, chosen when the logits are known.

    Pass one as `classes=` to `Explainer.explain`, `explain_images` or
    `iter_explain_images`.

    Parameters
    ----------
    classes : None, sequence of int, or sequence of sequences of int
        None: the `top_k` classes by logit (or those above `multilabel`).  A flat
        sequence: the same classes for every item.  A sequence of sequences: the
        classes of each item, in input order (any number per item, for example the
        ground truth read by `read_targets`).  On a single-logit binary model, class
        0 is its logit and class 1 (`NEGATIVE`) its negative class, explained as the
        negated logit with score ``1 - sigmoid(logit)``.
    top_k : int
        With ``classes=None`` and no `multilabel`.
    multilabel : float in [0, 1], optional
        Every class whose sigmoid score is at least this threshold, in decreasing
        score order; an item with none gets no class.
    contrast : None, int or "finer"
        Explain each class c against a reference: a class index (the map explains
        ``y_c - y_ref``), or ``"finer"``: FinerCAM's automatic choice of the
        `references` most similar classes, weighted by their probabilities
        (`finer_references`), the map explaining ``y_c - alpha * sum_d omega_d y_d``.
        Supported by `SEEDED_METHODS` only.
    alpha : float
        FinerCAM's comparison strength (1 by default, as in the paper).
    references : int
        FinerCAM's number of reference classes (3 by default, as in the authors' code).

    Notes
    -----
    Rows are indexed like an ``(N, k)`` classes array (``targets[start:stop]``,
    ``targets[[i, j]]``) so that the explainer can cut them into chunks.
    """

    ndim = 2  # indexed per item, as an (N, k) classes array

    def __init__(self, classes=None, *, top_k: int = 1, multilabel: float | None = None, contrast=None,
                 alpha: float = 1.0, references: int = 3):
        self.rows = None  # per item
        self.fixed = None  # the same for every item
        if classes is not None:
            if isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__"):
                raise InvalidInput(f"classes must be a sequence of ints or of sequences of ints, got {classes!r}")
            if len(classes) and all(not isinstance(c, (str, bytes)) and hasattr(c, "__len__") for c in classes):
                self.rows = [_int_list(c, f"classes[{i}]") for i, c in enumerate(classes)]
            else:
                self.fixed = _int_list(classes, "classes")
                if not self.fixed:
                    raise InvalidInput("classes must name at least one class")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InvalidInput(f"top_k must be a positive int, got {top_k!r}")
        if multilabel is not None:
            if isinstance(multilabel, bool) or not isinstance(multilabel, (int, float)) or not 0 <= multilabel <= 1:
                raise InvalidInput(f"multilabel must be a threshold in [0, 1], got {multilabel!r}")
            if classes is not None:
                raise InvalidInput("multilabel chooses the classes itself: give classes or multilabel, not both")
        if not (contrast is None or contrast == "finer" or (isinstance(contrast, (int, np.integer))
                                                          and not isinstance(contrast, bool) and contrast >= 0)):
            raise InvalidInput(f"contrast must be None, a class index or 'finer', got {contrast!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
            raise InvalidInput(f"alpha must be a finite number, got {alpha!r}")
        if isinstance(references, bool) or not isinstance(references, (int, np.integer)) or references < 1:
            raise InvalidInput(f"references must be a positive int, got {references!r}")
        self.top_k, self.multilabel, self.contrast = int(top_k), multilabel, contrast
        self.alpha, self.references = float(alpha), int(references)

    def __repr__(self) -> str:
        what = (f"rows of {len(self.rows)} items" if self.rows is not None else
                f"classes={self.fixed}" if self.fixed is not None else
                f"multilabel={self.multilabel}" if self.multilabel is not None else f"top_k={self.top_k}")
        return f"Targets({what}, contrast={self.contrast!r}, {self.fingerprint()})"

    def keyed(self, keys: Sequence) -> "Targets":
        """A copy whose rows are looked up by key (`for_keys`): `keys` names each row (image paths)."""
        part = self[slice(None)]
        if self.rows is not None:
            if len(keys) != len(self.rows):
                raise InvalidInput(f"keys must name each of the {len(self.rows)} rows, got {len(keys)}")
            part.by_key = dict(zip(map(str, keys), self.rows))
        return part

    def for_keys(self, keys: Sequence) -> "Targets":
        """The rows of `keys` (a Ray block's paths), in their order; targets without rows are returned as they are."""
        if self.rows is None:
            return self
        by_key = getattr(self, "by_key", None)
        if by_key is None:
            raise InvalidInput("these targets are not keyed: call keyed(paths) first")
        missing = [k for k in keys if str(k) not in by_key]
        if missing:
            raise InvalidInput(f"no targets for {missing[0]}")
        part = self[slice(None)]
        part.rows = [by_key[str(k)] for k in keys]
        return part

    def fingerprint(self) -> str:
        """A digest of everything that chooses the classes (a resumed run's blocks are reused only when equal)."""
        import hashlib

        what = json.dumps([self.rows, self.fixed, self.top_k, self.multilabel, self.contrast, self.alpha,
                           self.references, sorted(getattr(self, "by_key", {}).items())], default=str)
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    def __getitem__(self, index) -> "Targets":
        if self.rows is None and not isinstance(index, slice):
            return self
        part = object.__new__(Targets)
        part.__dict__.update(self.__dict__)
        if self.rows is not None:
            part.rows = self.rows[index] if isinstance(index, slice) else [self.rows[int(i)] for i in index]
        return part

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else 0

    # ----------------------------------------------------------------- checks

    def _named(self):
        return self.fixed if self.fixed is not None else [c for row in self.rows or () for c in row]

    def seeded(self, num_classes: int) -> bool:
        """True when some map explains a combination of logits (contrast, negated logit)."""
        return self.contrast is not None or (num_classes == 1 and NEGATIVE in self._named())

    def check_method(self, method: str, num_classes: int) -> None:
        """Raise `InvalidInput` (one line) when `method` cannot explain these targets."""
        if self.seeded(num_classes) and method not in SEEDED_METHODS:
            what = "contrastive targets" if self.contrast is not None else "the negative class (a negated logit)"
            raise InvalidInput(f"{what} need one of {SEEDED_TEXT}; method {method!r} cannot "
                               f"explain a combination of logits")

    def validate(self, n: int, num_classes: int) -> "Targets":
        """Check the targets against n items of a model with `num_classes` logits; returns self."""
        top = 2 if num_classes == 1 else num_classes  # a single logit: 0 is it, 1 its negation
        for c in self._named():
            if not 0 <= c < top:
                raise InvalidInput(f"class {c} is out of range: the model has {num_classes} "
                                   f"class{'es' if num_classes != 1 else ''} (indices 0..{num_classes - 1}"
                                   f"{', and 1 for the negative class of a single logit' if num_classes == 1 else ''})")
        if self.rows is not None and len(self.rows) != n:
            raise InvalidInput(f"targets hold classes for {len(self.rows)} items, got {n} items")
        if self.fixed is None and self.rows is None and self.multilabel is None and self.top_k > num_classes:
            raise InvalidInput(f"top_k must be an int in [1, {num_classes}], got {self.top_k}")
        if self.contrast == "finer" and num_classes < 2:
            raise InvalidInput("contrast='finer' needs a model with at least 2 classes")
        if isinstance(self.contrast, (int, np.integer)) and not 0 <= self.contrast < num_classes:
            raise InvalidInput(f"the contrast class must be in [0, {num_classes}), got {self.contrast}")
        return self

    # ----------------------------------------------------------------- selection

    def _chosen(self, logits, probabilities) -> list:
        n = len(logits)
        if self.rows is not None:
            return self.rows
        if self.fixed is not None:
            return [self.fixed] * n
        if self.multilabel is not None:
            scores = sigmoid(logits)
            return [[int(c) for c in np.argsort(-s, kind="stable") if s[c] >= self.multilabel] for s in scores]
        return [row.tolist() for row in top_k(logits, self.top_k)]

    def select(self, logits: np.ndarray, probabilities: np.ndarray) -> Selection:
        """Choose the classes, their seeds and scores for a chunk.

        Parameters
        ----------
        logits : (n, C) float32 ndarray
        probabilities : (n, C) float32 ndarray
            The model's scores (softmax, or sigmoid for a sigmoid head).

        Returns
        -------
        Selection
        """
        logits = np.asarray(logits, np.float32)
        n, num_classes = logits.shape
        chosen = self._chosen(logits, probabilities)
        k = max([len(row) for row in chosen] + [1])
        classes = np.full((n, k), -1, np.int64)
        for i, row in enumerate(chosen):
            classes[i, :len(row)] = row
        valid = classes >= 0
        single = num_classes == 1
        negative = valid & (classes == NEGATIVE) if single else np.zeros_like(valid)
        compute = np.where(valid & ~negative, classes, 0)
        if self.multilabel is not None:
            source = sigmoid(logits)
        else:
            source = sigmoid(logits) if single else probabilities
        scores = np.take_along_axis(np.asarray(source, np.float32), compute, axis=1)
        scores = np.where(negative, 1 - scores, scores)
        scores = np.where(valid, scores, 0).astype(np.float32)
        seeds = None
        if self.contrast is not None or negative.any():
            seeds = np.zeros((n, k, num_classes), np.float32)
            rows, cols = np.nonzero(valid)
            seeds[rows, cols, compute[rows, cols]] = np.where(negative[rows, cols], -1.0, 1.0)
            for i, j in zip(rows, cols):
                c = compute[i, j]
                if self.contrast == "finer":
                    refs, weights = finer_references(logits[i], c, count=min(self.references, num_classes - 1))
                    np.subtract.at(seeds[i, j], refs, (self.alpha * weights).astype(np.float32))
                elif self.contrast is not None:
                    seeds[i, j, self.contrast] -= 1.0
        return Selection(classes, compute, seeds, scores)


def _int_list(values, name) -> list:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidInput(f"{name} must hold class indices (ints), got {v!r}; names go through "
                               f"camcore.targets.class_indices")
        out.append(int(v))
    return out


def targets_from_options(*, class_names=None, num_classes: int, classes=None, targets_file=None,
                         multilabel: float | None = None, contrast=None, alpha: float = 1.0, references: int = 3,
                         top_k: int = 1, images: Sequence = (), roots: Sequence = ()) -> "Targets | None":
    """The `Targets` of command-line style options, or None when none is given (plain top-k).

    Parameters
    ----------
    class_names, num_classes
        The model's (``explainer.class_names``, ``explainer.head.num_classes``).
    classes : str or sequence, optional
        Class names or indices (`class_indices`), the same for every image.
    targets_file : path, optional
        A CSV or JSON of image -> class(es) (`read_targets`), matched against `images`.
    multilabel : float, optional
        Every class whose sigmoid score is at least this.
    contrast : str or int, optional
        ``"finer"``, or the reference class (a name or an index).
    alpha, references, top_k
        As in `Targets`.
    images, roots : sequences of paths
        The images of the run, in order, and the folders they were found in.

    Raises
    ------
    InvalidInput
        Two ways of choosing the classes at once, or a bad entry (named).
    """
    given = [flag for flag, value in (("classes", classes), ("targets", targets_file), ("multilabel", multilabel))
             if value is not None]
    if len(given) > 1:
        raise InvalidInput(f"give one of classes, targets or multilabel, got {' and '.join(given)}")
    if contrast is not None and contrast != "finer":
        [contrast] = class_indices([contrast] if isinstance(contrast, (int, np.integer)) else [str(contrast)],
                                   class_names=class_names, num_classes=num_classes, where="contrast: ")
    if not given and contrast is None:
        return None
    chosen = None
    if classes is not None:
        chosen = class_indices(classes, class_names=class_names, num_classes=num_classes)
    elif targets_file is not None:
        chosen = read_targets(targets_file, images, class_names=class_names, num_classes=num_classes, roots=roots)
    return Targets(chosen, top_k=top_k if chosen is None and multilabel is None else 1, multilabel=multilabel,
                   contrast=contrast, alpha=alpha, references=references)


# ----------------------------------------------------------------- names

def class_indices(spec, *, class_names: Sequence[str] | None = None, num_classes: int | None = None,
                  where: str = "") -> list[int]:
    """Class names or indices -> indices.

    Each item is an int, a string of digits (an index), or a class name: matched
    exactly, else case-insensitively when that is unique.  On a single-logit model
    (``num_classes == 1``), ``"negative"`` is its negative class (`NEGATIVE`).

    Parameters
    ----------
    spec : str, int or sequence of them
        A string may hold several, comma separated (``"cat,dog"``, ``"281,285"``).
    class_names : sequence of str, optional
        ``explainer.class_names``.
    num_classes : int, optional
        Checks indices are in range.
    where : str
        Prefix of error messages (a file and line).

    Examples
    --------
    >>> class_indices("tabby, 2", class_names=["tabby", "tiger", "Persian"])
    [0, 2]
    >>> class_indices(["persian"], class_names=["tabby", "tiger", "Persian"])
    [2]
    """
    if isinstance(spec, (str, int, np.integer)):
        spec = [spec]
    items = []
    for item in spec:
        if isinstance(item, str):
            items.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            items.append(item)
    names = list(class_names or [])
    lowered = {}
    for i, name in enumerate(names):
        lowered.setdefault(str(name).lower(), []).append(i)
    top = None if num_classes is None else (2 if num_classes == 1 else num_classes)
    out = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            index = int(item)
        elif isinstance(item, str) and item.lstrip("-").isdigit():
            index = int(item)
        elif isinstance(item, str) and item in names:
            index = names.index(item)
        elif isinstance(item, str) and len(lowered.get(item.lower(), ())) == 1:
            index = lowered[item.lower()][0]
        elif isinstance(item, str) and num_classes == 1 and item.lower() == "negative":
            index = NEGATIVE
        else:
            known = "" if names else " (the model has no class names: give indices)"
            raise InvalidInput(f"{where}unknown class {item!r}{known}")
        if index < 0 or (top is not None and index >= top):
            raise InvalidInput(f"{where}class {item!r} is out of range: the model has {num_classes} classes")
        out.append(index)
    if not out:
        raise InvalidInput(f"{where}no class given")
    return out


# ----------------------------------------------------------------- files

def read_targets(path, images: Sequence, *, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, roots: Sequence = ()) -> list[list[int]]:
    """Read a targets file (CSV or JSON: image -> class(es)) for `images`, in their order.

    Formats
    -------
    CSV (``.csv``, or any file not ending in ``.json``): rows ``IMAGE,CLASS``; a first
    row naming the columns (``image``/``path``/``file``/``filename`` and
    ``class``/``label``/``classes``/``labels``) is a header, and then other columns
    are ignored.  CLASS is an index or a class name; several classes go in one cell
    separated by ``;`` or ``|``, or on several rows of the same image.
    JSON: an object ``{"IMAGE": CLASS or [CLASS, ...]}``, or a list of objects with an
    image key and a class key as above.

    Matching rule
    -------------
    An entry names an image when, in this order: it is the image's path as given
    (normalized: ``./a/../b.jpg`` is ``b.jpg``); or it is a path relative to the
    targets file's folder or to one of `roots` (the folders given on the command
    line) that leads to the same file; or it has no folder part and is the image's
    file name, which must then be unique among `images`.  Entries naming no image
    are ignored (a label file of a whole data set can drive a subset).

    Returns
    -------
    list of lists of int
        The classes of each image.

    Raises
    ------
    InvalidInput
        Naming the entry: a malformed row or file, an unknown class, an ambiguous file
        name, or an image with no entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidInput(f"cannot read targets file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"targets file {path} is not UTF-8 text") from None
    entries = _json_entries(path, text) if path.suffix.lower() == ".json" else _csv_entries(path, text)
    by_key: dict = {}
    for where, key, value in entries:
        classes = class_indices(value, class_names=class_names, num_classes=num_classes, where=f"{where}: ")
        known = by_key.setdefault(key, (where, []))[1]
        for c in classes:
            if c not in known:  # a class given twice is explained once
                known.append(c)
    return _match(path, by_key, images, roots)


def _csv_entries(path, text):
    rows = list(csv.reader(io.StringIO(text)))
    image_col, class_col, start = 0, 1, 0
    first = [cell.strip().lower() for cell in rows[0]] if rows else []
    if first and any(c in _HEADER_IMAGE for c in first) and any(c in _HEADER_CLASS for c in first):
        image_col = next(i for i, c in enumerate(first) if c in _HEADER_IMAGE)
        class_col = next(i for i, c in enumerate(first) if c in _HEADER_CLASS)
        start = 1
    entries = []
    for number, row in enumerate(rows[start:], start + 1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path} line {number}"
        if (start == 0 and len(row) != 2) or len(row) <= max(image_col, class_col):
            raise InvalidInput(f"{where}: expected IMAGE,CLASS, got {','.join(row)!r}")
        key, value = row[image_col].strip(), row[class_col].strip()
        if not key or not value:
            raise InvalidInput(f"{where}: expected IMAGE,CLASS, got {','.join(row)!r}")
        entries.append((where, key, [v for v in value.replace("|", ";").split(";") if v.strip()]))
    if not entries:
        raise InvalidInput(f"targets file {path} has no IMAGE,CLASS rows")
    return entries


def _json_entries(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"targets file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    entries = []
    if isinstance(data, dict):
        items = [(f"{path} entry {key!r}", key, value) for key, value in data.items()]
    elif isinstance(data, list):
        items = []
        for i, item in enumerate(data):
            where = f"{path} item {i}"
            if not isinstance(item, dict):
                raise InvalidInput(f"{where}: expected an object with an image and a class, got {item!r}")
            key = next((item[k] for k in _HEADER_IMAGE if k in item), None)
            value = next((item[k] for k in _HEADER_CLASS if k in item), None)
            items.append((where, key, value))
    else:
        raise InvalidInput(f"targets file {path} must hold an object or a list, got {type(data).__name__}")
    for where, key, value in items:
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"{where}: expected an image path, got {key!r}")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise InvalidInput(f"{where}: expected a class or a list of classes (names or indices), got {value!r}")
        entries.append((where, key, values))
    if not entries:
        raise InvalidInput(f"targets file {path} has no entries")
    return entries


def _match(path, by_key, images, roots):
    folders = [Path(path).parent, *map(Path, roots)]
    given = {os.path.normpath(str(image)): i for i, image in enumerate(images)}
    absolute = {os.path.abspath(str(image)): i for i, image in enumerate(images)}
    names: dict = {}
    for i, image in enumerate(images):
        names.setdefault(os.path.basename(str(image)), []).append(i)
    found: dict = {}
    for key, (where, classes) in by_key.items():
        hits = set()
        norm = os.path.normpath(key)
        if norm in given:
            hits.add(given[norm])
        else:
            for folder in folders:
                target = os.path.abspath(os.path.join(str(folder), key))
                if target in absolute:
                    hits.add(absolute[target])
            if not hits and os.path.basename(norm) == norm and norm in names:
                if len(names[norm]) > 1:
                    raise InvalidInput(f"{where}: {key!r} names {len(names[norm])} images "
                                       f"({', '.join(str(images[i]) for i in names[norm][:2])}, ...): give its path")
                hits.add(names[norm][0])
        for i in hits:
            if i in found:
                found[i] = (found[i][0], found[i][1] + [c for c in classes if c not in found[i][1]])
            else:
                found[i] = (where, list(classes))
    missing = [str(image) for i, image in enumerate(images) if i not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidInput(f"image {missing[0]} has no entry in targets file {path}{more}")
    return [found[i][1] for i in range(len(images))]
