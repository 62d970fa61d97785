"""The embedded default model: EfficientNet-Lite0 with ImageNet weights (see tools/export_lite0.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .preprocess import Preprocess

__all__ = ["path", "metadata", "preprocess", "class_names"]

_DATA = Path(__file__).parent / "data"
_NAME = "efficientnet_lite0"


def path() -> Path:
    """Path of the embedded ONNX model."""
    return _DATA / f"{_NAME}.onnx"


@lru_cache(maxsize=1)
def metadata() -> dict:
    """What was recorded when the model was exported (preprocessing, sources, hash)."""
    return json.loads((_DATA / f"{_NAME}.json").read_text())


def preprocess() -> Preprocess:
    """The preprocessing the embedded model expects.

    The export recorded scikit-image's anti-aliased bilinear resize; camcore resizes
    with Pillow's anti-aliased bilinear filter instead (`Preprocess`), which gives the
    same top-1 class on the sample photos (tests/test_real_model.py).
    """
    p = metadata()["preprocessing"]
    return Preprocess(tuple(p["size"]), resize=p["resize"], mean=tuple(p["mean"]), std=tuple(p["std"]),
                      scale=p["scale"], channel_order=p["channel_order"],
                      crop_fraction=p.get("crop_fraction", 0.875), interpolation="bilinear")


@lru_cache(maxsize=1)
def class_names() -> tuple:
    """The 1000 ImageNet class names, in index order."""
    return tuple((_DATA / "imagenet_classes.txt").read_text().splitlines())
