"""A disk cache of the graph analysis, so that loading a model analysed before never imports `onnx`.

`OrtBackend` analyses a model's graph with the `onnx` package (`onnx_graph.find_head`,
`find_target`, `expose_outputs`); importing `onnx` alone takes most of a one-image
``camcore explain`` (its `ml_dtypes` extension).  The analysis only depends on the model
file, the tensor-name overrides and the versions of camcore, onnx and onnxruntime, so
its result is stored once per such key (with a fingerprint of camcore's graph code, so that a
changed checkout of the same version does not read an older analysis):

``<folder>/<key>/head.json``
    The `Head` (TensorSpec dtypes as numpy dtype strings, shapes with ints, str or
    None), the key's parts and the sha256 of the two other files.
``<folder>/<key>/head.npz``
    The classifier's ``weights`` and ``bias`` when the head is affine.
``<folder>/<key>/exposed.onnx``
    The model with the feature and logits tensors exposed as outputs (what the
    session runs), serialized.

No pickle.  An entry is written into a temporary folder and moved into place with
`os.replace`, so readers never see half an entry; one that cannot be read or fails its
checksums is a miss (and is rewritten).  A folder that cannot be written means no
cache, never an error.  `folder` says where entries live: ``$CAMCORE_CACHE_DIR``, else
``$XDG_CACHE_HOME/camcore``, else ``~/.cache/camcore`` (``CAMCORE_CACHE_DIR=off``
disables the cache).  Deleting it at any time is safe.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import numbers
import os
import shutil
import tempfile
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from camcore import __version__ as camcore_version
from camcore.backend import Head, TensorSpec
from camcore.tokens import TokenLayout

__all__ = ["folder", "digest", "entry_key", "key_name", "lookup", "store", "head_to_json", "head_from_json",
           "same_head"]

FORMAT = 2  # bump when the entry layout or the meaning of a field changes
_HEAD, _ARRAYS, _EXPOSED = "head.json", "head.npz", "exposed.onnx"
_ARRAY_FIELDS = ("weights", "bias")
_TEMP, _TRASH = ".tmp-", ".old-"
_STALE_S = 3600  # temporary folders older than this were left by killed processes


def folder() -> Path | None:
    """The folder of the analysis entries, or None when the cache is off.

    ``$CAMCORE_CACHE_DIR`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/camcore``
    (an absolute ``XDG_CACHE_HOME`` only, as the XDG spec says), else ``~/.cache/camcore``;
    entries go into its ``analysis`` subfolder.
    """
    chosen = os.environ.get("CAMCORE_CACHE_DIR", "")
    if chosen.strip().lower() == "off":
        return None
    if chosen:
        base = Path(chosen).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        try:
            base = Path(xdg) / "camcore" if os.path.isabs(xdg) else Path.home() / ".cache" / "camcore"
        except RuntimeError:  # no home directory to be found: no cache
            return None
    return base / "analysis"


def digest(data: bytes) -> str:
    """sha256 of `data`, in hex."""
    return hashlib.sha256(data).hexdigest()


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def entry_key(model_sha256: str, *, feature=None, logits=None, output=None, onnxruntime_version: str) -> dict:
    """The parts an analysis depends on; `key_name` of it names the entry.

    onnx's version is read from the installed package's metadata: `onnx` is not imported.
    """
    return {"format": FORMAT, "model_sha256": model_sha256, "feature": feature, "logits": logits,
            "output": output, "camcore": camcore_version, "code": code_fingerprint(),
            "onnx": _package_version("onnx"), "onnxruntime": onnxruntime_version}


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the analysis code (this package's modules): an entry written by other code of the
    same camcore version (a development checkout, a patched install) is a miss, not a stale answer."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def key_name(parts: dict) -> str:
    """The entry's folder name: sha256 of the key's parts as canonical JSON."""
    return digest(json.dumps(parts, sort_keys=True, default=repr).encode("utf-8"))


# --------------------------------------------------------------------------- Head <-> JSON


def _shape(shape) -> list:
    out = []
    for d in shape:
        if isinstance(d, numbers.Integral) and not isinstance(d, bool):
            out.append(int(d))
        elif d is None or isinstance(d, str):
            out.append(d)
        else:
            raise TypeError(f"a shape holds ints, str or None, got {type(d).__name__}")
    return out


def _spec_to_json(spec: TensorSpec) -> dict:
    return {"name": spec.name, "shape": _shape(spec.shape), "dtype": np.dtype(spec.dtype).str}


def _spec_from_json(d: dict) -> TensorSpec:
    return TensorSpec(d["name"], tuple(d["shape"]), np.dtype(d["dtype"]))


def head_to_json(head: Head) -> tuple[dict, dict]:
    """``(document, arrays)``: the `Head` as JSON-ready values, and its ndarrays by field name.

    Raises
    ------
    TypeError
        A field holds a value JSON cannot carry.
    """
    document, arrays = {}, {}
    for f in dataclasses.fields(Head):
        value = getattr(head, f.name)
        if f.name in _ARRAY_FIELDS:
            document[f.name] = value is not None
            if value is not None:
                arrays[f.name] = np.asarray(value)
        elif f.name == "input":
            document[f.name] = _spec_to_json(value)
        elif f.name == "inputs":
            document[f.name] = [_spec_to_json(s) for s in value]
        elif f.name == "feature_shape":
            document[f.name] = _shape(value)
        elif f.name == "tokens":  # a TokenLayout of JSON-ready values (tuples become lists)
            document[f.name] = None if value is None else dataclasses.asdict(value)
        else:
            document[f.name] = value
    json.dumps(document)  # raises TypeError on anything JSON cannot carry
    return document, arrays


def head_from_json(document: dict, arrays) -> Head:
    """Rebuild the `Head` written by `head_to_json`."""
    values = {}
    for f in dataclasses.fields(Head):
        value = document[f.name]
        if f.name in _ARRAY_FIELDS:
            values[f.name] = np.asarray(arrays[f.name]) if value else None
        elif f.name == "input":
            values[f.name] = _spec_from_json(value)
        elif f.name == "inputs":
            values[f.name] = tuple(_spec_from_json(s) for s in value)
        elif f.name == "feature_shape":
            values[f.name] = tuple(value)
        elif f.name == "tokens":
            values[f.name] = None if value is None else _tokens_from_json(value)
        else:
            values[f.name] = value
    return Head(**values)


def _tokens_from_json(d: dict) -> TokenLayout:
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return TokenLayout(**{k: tuples(v) for k, v in d.items()})


def same_head(a, b) -> bool:
    """True when two heads (or any of their fields) are equal field by field, of the same types.

    Arrays must have the same dtype, shape and bytes.
    """
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same_head(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_head(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_head(a[k], b[k]) for k in a)
    return a == b


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# --------------------------------------------------------------------------- entries


def lookup(parts: dict, where: Path | None = None) -> tuple[bytes, Head] | None:
    """``(exposed model bytes, Head)`` stored for the key `parts`, or None.

    Anything wrong with the entry (missing or truncated files, checksums that do not
    match, another key, fields that do not parse) makes it a miss.
    """
    where = folder() if where is None else where
    if where is None:
        return None
    entry = where / key_name(parts)
    try:
        meta = json.loads((entry / _HEAD).read_bytes())
        if meta["key"] != parts:
            return None
        exposed = (entry / _EXPOSED).read_bytes()
        packed = (entry / _ARRAYS).read_bytes()
        if digest(exposed) != meta["exposed_sha256"] or digest(packed) != meta["arrays_sha256"]:
            return None
        with np.load(io.BytesIO(packed), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return exposed, head_from_json(meta["head"], arrays)
    except Exception:  # any unreadable entry, whatever the error, is a miss
        return None


def store(parts: dict, exposed: bytes, head: Head, where: Path | None = None) -> bool:
    """Write the entry of `parts` atomically; True when written.

    A head that JSON and npz cannot carry exactly (checked by reading it back), and a
    folder that cannot be written, are not errors: nothing is stored.
    """
    where = folder() if where is None else where
    if where is None:
        return False
    try:
        document, arrays = head_to_json(head)
        packed = _npz_bytes(arrays)
        with np.load(io.BytesIO(packed), allow_pickle=False) as npz:
            if not same_head(head_from_json(json.loads(json.dumps(document)), npz), head):
                return False
        meta = json.dumps({"key": parts, "head": document, "exposed_sha256": digest(exposed),
                           "arrays_sha256": digest(packed)}, indent=1)
    except (TypeError, ValueError):
        return False
    try:
        where.mkdir(parents=True, exist_ok=True)
        _sweep(where)
        temp = Path(tempfile.mkdtemp(prefix=_TEMP, dir=where))
    except OSError:
        return False
    try:
        (temp / _EXPOSED).write_bytes(exposed)
        (temp / _ARRAYS).write_bytes(packed)
        (temp / _HEAD).write_text(meta, encoding="utf-8")
        _move_into_place(temp, where / key_name(parts), where)
        return True
    except OSError:
        return False
    finally:
        _remove(temp)


def _move_into_place(temp: Path, entry: Path, where: Path) -> None:
    try:
        os.replace(temp, entry)
        return
    except OSError:
        if not entry.exists():
            raise
    # An entry is there: a broken one (we analysed the model because of it) or one a
    # concurrent process just wrote.  Move it aside in one step, then ours in.
    trash = where / f"{_TRASH}{uuid.uuid4().hex}"
    os.replace(entry, trash)
    try:
        os.replace(temp, entry)
    finally:
        _remove(trash)


def _remove(path: Path) -> None:
    """Remove a folder or a file, if there, ignoring errors."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _sweep(where: Path) -> None:
    """Remove temporary folders that interrupted writers left behind (an hour old or more)."""
    now = time.time()
    try:
        for item in os.scandir(where):
            if item.name.startswith((_TEMP, _TRASH)) and now - item.stat(follow_symlinks=False).st_mtime > _STALE_S:
                _remove(Path(item.path))
    except OSError:
        pass
