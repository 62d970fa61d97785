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

The ``transformers`` framework (vision transformers from timm and Hugging Face, exported by
both torch exporters and optimum; tools/corpus/export_transformers.py) is left out of
``manifest()`` by default, since the CNN tests above do not apply to it: ask for it with
``manifest(TRANSFORMERS)`` or ``transformer_entries()``. Its entries add ``library`` ("timm" or
"hf"), ``family``, ``export_kind`` ("ts", "dynamo" or "optimum"), ``model_class``, ``pooling``
(the expected kind: "cls", "cls_dist_mean", "token_mean", "token_mean_no_prefix",
"cls_concat_mean", "spatial_mean", or "gap" for a CNN), ``prefix_tokens`` (CLS, distillation,
registers), ``grid`` ``[gh, gw]`` (of the last stage), ``hidden_size``, ``image_size``,
``head_affine`` (features -> logits is affine), ``affine`` (a mean pooling, then an affine head:
exact CAM), ``attention_kind`` ("global", "windowed" or "none"), ``attention`` (name, grad and
shape of each attention-probability array), ``targets`` (name -> shape and grad array),
``patch_grad_max_norm_input`` (max |gradient| on the patch tokens at ``norm_input``: exactly 0
under CLS pooling), ``export_seconds`` and ``file_bytes``. Its ``NAME.npz`` holds ``x``,
``logits``, ``grad_classes`` (the top-1 class of each item; every gradient is of
``sum_n logits[n, grad_classes[n]]``), and, each with ``grad_<name>``:
``block_input`` (the last block's input, pytorch-grad-cam's ``blocks[-1].norm1`` input),
``norm_input`` (the last block's output, the final norm's input), ``spatial`` (hierarchical
models: the channels-last map ``(N, gh, gw, C)`` the pooling reads), ``features`` (what the
head pools, also as ``grad``); and ``attn_LL`` with ``attn_grad_LL``, every attention
probability ``(N', heads, T, T')`` in call order (Swin: windows in the batch axis).
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


def transformer_entries() -> list:
    """The ``transformers`` framework's manifest entries (not loaded: see ``load``)."""
    return manifest(TRANSFORMERS)


def entry_id(entry: dict) -> str:
    return f"{entry['framework']}-{entry['name']}"
