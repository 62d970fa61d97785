"""Reading weakly-supervised localization datasets: wsolevaluation metadata and Pascal-VOC XML.

Two layouts are read into one `Dataset`:

* the metadata folder of clovaai/wsolevaluation (ImageNet, CUB-200-2011,
  OpenImages30k): ``image_ids.txt`` (one relative image path per line),
  ``class_labels.txt`` (``path,class_index``) and ``localization.txt``, either
  boxes ``path,x0,y0,x1,y1`` (several lines for several boxes) or, for PxAP,
  masks ``path,mask_path,ignore_path`` (one line per instance mask; the
  ignore mask, on the first line of the image only, may be empty). Mask paths
  are relative to a mask root (wsolevaluation keeps them next to the images).
  ``image_sizes.txt`` is not needed: sizes are read from the images.
* Pascal-VOC XML annotations, one file per image, as the ImageNet validation
  boxes ship (``<filename>``, ``<object><name>synset</name><bndbox>...``),
  with a synset file whose line ``i`` starts with the synset of class ``i``
  (ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca``).

Boxes are kept as written: inclusive pixel coordinates ``(x0, y0, x1, y1)``
of the original image, the convention of wsolevaluation's IoU. Blank lines
are skipped; any other malformed line raises `InvalidInput` naming the file
and the line number. Listed images that lack a class label or boxes/masks
are kept aside in `Dataset.unannotated`, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from xml.parsers import expat

import numpy as np

from .errors import InvalidInput

__all__ = ["Sample", "Dataset", "read_dataset", "read_wsol_metadata", "read_voc", "read_synsets"]

_IMAGE_SUFFIXES = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG", ".bmp")
SYNSET_FILES = ("synsets.txt", "LOC_synset_mapping.txt")


@dataclass(frozen=True)
class Sample:
    """One annotated image.

    Attributes
    ----------
    image_id : str
        Path relative to the image root, as listed (``/``-separated).
    label : int
        The ground-truth class.
    boxes : (m, 4) int64 ndarray
        Inclusive boxes ``(x0, y0, x1, y1)`` in original-image pixels; ``(0, 4)``
        for a mask dataset.
    masks : tuple of str
        Instance-mask paths relative to the mask root (mask datasets only).
    ignore : str or None
        The ignore-region mask path, when given.
    """

    image_id: str
    label: int
    boxes: np.ndarray
    masks: tuple = ()
    ignore: str | None = None


@dataclass(frozen=True)
class Dataset:
    """Annotated samples in listing order, and the listed images without annotations.

    Attributes
    ----------
    samples : list of Sample
    unannotated : list of str
        Image ids listed without a class label, or without boxes (masks).
    kind : {"boxes", "masks"}
    source : str
        ``"wsolevaluation"`` or ``"voc"``.
    """

    samples: list
    unannotated: list = field(default_factory=list)
    kind: str = "boxes"
    source: str = "wsolevaluation"


def _where(path: Path, number: int) -> str:
    return f"{path}, line {number}"


def _lines(path: Path):
    """Yield ``(line_number, stripped_text)`` for the non-blank lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 text: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line:
            yield number, line


def _image_id(text: str, path: Path, number: int) -> str:
    """A relative image path that stays inside the image root."""
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts or "\\" in text:
        raise InvalidInput(f"{_where(path, number)}: expected a relative image path inside the root, got {text!r}")
    return text


def _int_field(text: str, what: str, path: Path, number: int, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{_where(path, number)}: {what} must be an integer, got {text!r} in {line!r}") from None


def _check_box(box, path: Path, number: int, line: str) -> None:
    x0, y0, x1, y1 = box
    if min(box) < 0 or x1 < x0 or y1 < y0:
        raise InvalidInput(f"{_where(path, number)}: expected a box x0,y0,x1,y1 with 0 <= x0 <= x1 "
                           f"and 0 <= y0 <= y1, got {line!r}")


def read_wsol_metadata(folder) -> Dataset:
    """Read a wsolevaluation metadata folder (one split).

    Parameters
    ----------
    folder : path
        Holds ``image_ids.txt``, ``class_labels.txt`` and ``localization.txt``.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "image_ids.txt").write_text("a/1.jpg\\na/2.jpg\\n")
    >>> _ = (d / "class_labels.txt").write_text("a/1.jpg,3\\na/2.jpg,3\\n")
    >>> _ = (d / "localization.txt").write_text("a/1.jpg,1,2,30,40\\na/1.jpg,5,5,9,9\\n")
    >>> ds = read_wsol_metadata(d)
    >>> ds.samples[0].label, ds.samples[0].boxes.tolist(), ds.unannotated
    (3, [[1, 2, 30, 40], [5, 5, 9, 9]], ['a/2.jpg'])
    """
    folder = Path(folder)
    files = {name: folder / f"{name}.txt" for name in ("image_ids", "class_labels", "localization")}
    for path in files.values():
        if not path.is_file():
            raise InvalidInput(f"metadata folder {folder} has no {path.name}")
    ids, seen = [], {}
    for number, line in _lines(files["image_ids"]):
        image_id = _image_id(line, files["image_ids"], number)
        if image_id in seen:
            raise InvalidInput(f"{_where(files['image_ids'], number)}: {image_id!r} is already listed "
                               f"on line {seen[image_id]}")
        seen[image_id] = number
        ids.append(image_id)
    labels = {}
    for number, line in _lines(files["class_labels"]):
        parts = line.split(",")
        if len(parts) != 2:
            raise InvalidInput(f"{_where(files['class_labels'], number)}: expected 'path,class_index', got {line!r}")
        label = _int_field(parts[1], "class_index", files["class_labels"], number, line)
        if label < 0:
            raise InvalidInput(f"{_where(files['class_labels'], number)}: class_index must be >= 0, got {line!r}")
        image_id = _image_id(parts[0], files["class_labels"], number)
        if labels.get(image_id, label) != label:
            raise InvalidInput(f"{_where(files['class_labels'], number)}: {image_id!r} already has class "
                               f"{labels[image_id]}")
        labels[image_id] = label
    boxes, masks, ignores, kind = {}, {}, {}, None
    loc = files["localization"]
    for number, line in _lines(loc):
        parts = line.split(",")
        this = {5: "boxes", 3: "masks"}.get(len(parts))
        if this is None or (kind is not None and this != kind):
            expected = {"boxes": "'path,x0,y0,x1,y1'", "masks": "'path,mask_path,ignore_path'"}.get(
                kind, "'path,x0,y0,x1,y1' or 'path,mask_path,ignore_path'")
            raise InvalidInput(f"{_where(loc, number)}: expected {expected}, got {line!r}")
        kind = this
        image_id = _image_id(parts[0], loc, number)
        if kind == "boxes":
            box = tuple(_int_field(v, name, loc, number, line) for v, name in zip(parts[1:], ("x0", "y0", "x1", "y1")))
            _check_box(box, loc, number, line)
            boxes.setdefault(image_id, []).append(box)
        else:
            masks.setdefault(image_id, []).append(_image_id(parts[1], loc, number))
            if parts[2]:
                if image_id in ignores:
                    raise InvalidInput(f"{_where(loc, number)}: {image_id!r} already has an ignore mask")
                ignores[image_id] = _image_id(parts[2], loc, number)
    kind = kind or "boxes"
    samples, unannotated = [], []
    for image_id in ids:
        annotated = image_id in (boxes if kind == "boxes" else masks)
        if image_id not in labels or not annotated:
            unannotated.append(image_id)
        elif kind == "boxes":
            samples.append(Sample(image_id, labels[image_id], np.asarray(boxes[image_id], dtype=np.int64)))
        else:
            samples.append(Sample(image_id, labels[image_id], np.zeros((0, 4), np.int64),
                                  tuple(masks[image_id]), ignores.get(image_id)))
    return Dataset(samples, unannotated, kind, "wsolevaluation")


def read_synsets(path) -> dict:
    """Map each synset to its class index: the line number (from 0) of the line starting with it.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "LOC_synset_mapping.txt"
    >>> _ = p.write_text("n01440764 tench, Tinca tinca\\nn01443537 goldfish\\n")
    >>> read_synsets(p)
    {'n01440764': 0, 'n01443537': 1}
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"synset file not found: {path}")
    out = {}
    text = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(text, 1):
        words = line.split()
        if not words:
            raise InvalidInput(f"{_where(path, number)}: expected a synset id, got an empty line")
        if words[0] in out:
            raise InvalidInput(f"{_where(path, number)}: synset {words[0]!r} is already on line {out[words[0]] + 1}")
        out[words[0]] = number - 1
    return out


@dataclass
class _Node:
    """An XML element with the line it starts on."""

    tag: str
    line: int
    text: str = ""
    children: list = field(default_factory=list)

    def find(self, path: str):
        node = self
        for tag in path.split("/"):
            node = next((c for c in node.children if c.tag == tag), None)
            if node is None:
                return None
        return node

    def findtext(self, path: str) -> str | None:
        node = self.find(path)
        return None if node is None else node.text.strip()


def _parse_xml(path: Path) -> _Node:
    parser = expat.ParserCreate()
    stack = [_Node("", 0)]

    def start(tag, attrs):
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def text(data):
        stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    parser.CharacterDataHandler = text
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as exc:
        raise InvalidInput(f"{_where(path, exc.lineno)}: malformed XML: {expat.ErrorString(exc.code)}") from None
    return stack[0].children[0]


def _voc_file(path: Path, synsets: dict, images_root: Path | None):
    """``(image_id, label or None, boxes)`` of one VOC XML file."""
    root = _parse_xml(path)
    name_node = root.find("filename")
    if name_node is None or not name_node.text.strip():
        raise InvalidInput(f"{_where(path, root.line)}: no <filename> element")
    image_id = _image_id(name_node.text.strip(), path, name_node.line)
    if not Path(image_id).suffix and images_root is not None:
        # ImageNet's XML names the file without its extension
        found = [image_id + s for s in _IMAGE_SUFFIXES if (images_root / (image_id + s)).is_file()]
        image_id = found[0] if found else image_id + ".JPEG"
    labels, boxes = [], []
    for obj in (c for c in root.children if c.tag == "object"):
        synset = obj.findtext("name") or ""
        if synset not in synsets:
            raise InvalidInput(f"{_where(path, obj.line)}: synset {synset!r} is not in the synset file")
        box = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            node = obj.find(f"bndbox/{tag}")
            value = None if node is None else node.text.strip()
            try:
                box.append(int(float(value)))
            except (TypeError, ValueError):
                line = obj.line if node is None else node.line
                raise InvalidInput(f"{_where(path, line)}: <object> {synset!r} needs a numeric bndbox/{tag}, "
                                   f"got {value!r}") from None
        _check_box(box, path, obj.line, f"bndbox {box}")
        labels.append(synsets[synset])
        boxes.append(box)
    return image_id, (labels[0] if labels else None), boxes


def read_voc(folder, synsets, *, images_root=None) -> Dataset:
    """Read Pascal-VOC XML annotations (every ``*.xml`` in `folder`, sorted by name).

    The image's class is that of its first ``<object>``; every object's box
    counts as a ground-truth box (ImageNet's validation images have one class).

    Parameters
    ----------
    folder : path
    synsets : path or dict
        A synset file (see `read_synsets`) or its mapping ``{synset: index}``.
    images_root : path, optional
        Used to find the extension of ``<filename>`` values written without one
        (ImageNet); ``.JPEG`` is assumed when none is found.

    Returns
    -------
    Dataset
        Files without any ``<object>`` are listed in `Dataset.unannotated`.
    """
    folder = Path(folder)
    mapping = synsets if isinstance(synsets, dict) else read_synsets(synsets)
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise InvalidInput(f"annotation folder {folder} has no .xml files")
    root = None if images_root is None else Path(images_root)
    samples, unannotated, seen = [], [], {}
    for path in files:
        image_id, label, boxes = _voc_file(path, mapping, root)
        if image_id in seen:
            raise InvalidInput(f"{path}: image {image_id!r} is already annotated by {seen[image_id].name}")
        seen[image_id] = path
        if label is None:
            unannotated.append(image_id)
        else:
            samples.append(Sample(image_id, label, np.asarray(boxes, dtype=np.int64)))
    return Dataset(samples, unannotated, "boxes", "voc")


def read_dataset(metadata, *, synsets=None, images_root=None) -> Dataset:
    """Read `metadata` as a wsolevaluation folder (it has ``image_ids.txt``) or VOC XML annotations.

    For VOC, `synsets` defaults to ``synsets.txt`` or ``LOC_synset_mapping.txt``
    inside the folder.
    """
    folder = Path(metadata)
    if not folder.is_dir():
        raise InvalidInput(f"metadata folder not found: {folder}")
    if (folder / "image_ids.txt").is_file():
        return read_wsol_metadata(folder)
    if synsets is None:
        synsets = next((folder / n for n in SYNSET_FILES if (folder / n).is_file()), None)
        if synsets is None and any(folder.glob("*.xml")):
            raise InvalidInput(f"VOC annotations in {folder} need a synset file: pass one, or put "
                               f"{' or '.join(SYNSET_FILES)} in the folder")
    if synsets is None:
        raise InvalidInput(f"{folder} holds neither image_ids.txt (wsolevaluation metadata) nor .xml annotations")
    return read_voc(folder, synsets, images_root=images_root)

