"""The real-export corpus that ``tools/corpus/build.py`` builds: where it is, what it holds.

Each manifest entry (``manifest.json``) describes one export: ``name``, ``file`` (relative to
``models/``), ``framework``, ``exporter`` (exporter, options, opset), ``opset``, ``input``
(name and shape as declared in the ONNX file), ``layout`` (of the framework's ``features``),
``affine`` (decided by the framework: global average pooling of a 4-D map, then an affine
head), ``pooling`` ("avg", "max" or "token"), ``refuse_ops`` (the ONNX op types a refusal may
legitimately name), ``patterns`` (notable graph patterns) and ``feature_shape``.

Each ``NAME.npz`` holds the framework's own answers for a batch of two random inputs:
``x`` (the ONNX input's dtype and layout), ``logits (2, C)``, ``features`` (the tensor the
global pooling reads, in ``layout``), ``grad_classes (2,)`` and ``grad`` (same shape as
``features``: d logits[n, grad_classes[n]] / d features by the framework's autograd), and for
affine models ``weights (C, K)`` and ``bias (C,)`` from its classifier.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "keras", "paddle")  # the CNN corpus: what manifest() gives by default
TRANSFORMERS = "transformers"
BUILD = "python3 tools/corpus/build.py"


def home() -> Path:
    """``$CAMCORE_CORPUS_HOME``, or ``.corpus`` in the repository."""
    return Path(os.environ.get("CAMCORE_CORPUS_HOME") or ROOT / ".corpus")


def manifest(*frameworks: str) -> list:
    """The manifest's entries of ``frameworks`` (default: the CNN ones, ``FRAMEWORKS``); empty
    when the corpus was never built."""
    path = home() / "manifest.json"
    entries = json.loads(path.read_text())["models"] if path.exists() else []
    return [e for e in entries if e["framework"] in (frameworks or FRAMEWORKS)]


def missing(framework: str) -> str | None:
    """Why ``framework``'s part of the corpus cannot be tested, or None."""
    entries = manifest(framework)
    command = f"{BUILD} --framework {framework}"
    if not entries:
        return f"no {framework} exports in {home()}: run `{command}`"
    absent = [e["name"] for e in entries
              if not (home() / "models" / e["file"]).exists() or not npz_path(e).exists()]
    if absent:
        return f"{framework} exports {absent} listed but missing in {home()}: run `{command}`"
    return None


def require(framework: str) -> None:
    """Skip (fail under CI, where the corpus must have been built) when ``framework`` is missing."""
    reason = missing(framework)
    if reason is not None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def npz_path(entry: dict) -> Path:
    return (home() / "models" / entry["file"]).with_suffix(".npz")


def load(entry: dict) -> dict:
    """The entry plus ``path`` (the ONNX file) and ``data`` (the npz arrays, loaded)."""
    with np.load(npz_path(entry)) as npz:
        data = {k: npz[k] for k in npz.files}
    return {**entry, "path": home() / "models" / entry["file"], "data": data}


def corpus_entries(framework: str | None = None) -> list:
    """Every entry of ``framework`` (default: the CNN ones) with ``path`` and loaded ``data``."""
    return [load(e) for e in (manifest(framework) if framework else manifest())]


def entry_id(entry: dict) -> str:
    return f"{entry['framework']}-{entry['name']}"
