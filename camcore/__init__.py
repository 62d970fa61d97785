"""camcore: Class Activation Mapping (Zhou et al., CVPR 2016) for any exported model.

The package is a pure NumPy/SciPy core: CAM math, upsampling,
normalization, boxes, overlays and localization metrics, on arrays.  Running a
model is a backend's job (`backends`, imported lazily by `load`).

Conventions used everywhere
---------------------------
* maps are ``(..., h, w)``; features are ``(N, K, h, w)`` unless ``layout="NHWC"``.
* boxes are ``(x0, y0, x1, y1)``, half-open (``x0 <= x < x1``), in pixels of the
  image they refer to.
* dtype rule (as scikit-image): float16 -> float32; float32 and float64 kept;
  integers -> float64.
"""

import importlib

__version__ = "0.1.0"

# Where each public name lives. They are imported on first use (PEP 562), so that
# `import camcore` and `camcore --help` load neither NumPy's dependents nor SciPy.
_EXPORTS = {
    "metrics": None, "methods": None, "faithfulness": None,
    "fuse": "api", "load": "api",
    "Backend": "backend", "Head": "backend", "TensorSpec": "backend", "register_backend": "backend",
    "CamError": "errors", "InvalidInput": "errors", "MissingDependency": "errors", "NotCamCompatible": "errors",
    "Explainer": "explainer", "Explanation": "explainer", "Gradients": "explainer", "ImageExplanation": "explainer",
    "boxes": "localize",
    "cam": "maps", "normalize": "maps", "upsample": "maps",
    "Preprocess": "preprocess",
    "overlay": "render",
    "load_maps": "saved_maps", "save_maps": "saved_maps",
    "Targets": "targets",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'camcore' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f".{module or name}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Backend",
    "CamError",
    "Explainer",
    "Explanation",
    "Gradients",
    "Head",
    "ImageExplanation",
    "InvalidInput",
    "MissingDependency",
    "NotCamCompatible",
    "Preprocess",
    "TensorSpec",
    "boxes",
    "cam",
    "load_maps",
    "save_maps",
    "Targets",
    "fuse",
    "load",
    "faithfulness",
    "methods",
    "metrics",
    "normalize",
    "overlay",
    "register_backend",
    "upsample",
]
