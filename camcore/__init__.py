"""camcore: Class Activation Mapping (Zhou et al., CVPR 2016) for any exported model.

The package is a pure NumPy/SciPy/scikit-image core: CAM math, upsampling,
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

from . import metrics
from .api import fuse, load
from .backend import Backend, Head, TensorSpec, register_backend
from .errors import CamError, InvalidInput, MissingDependency, NotCamCompatible
from .explainer import Explainer, Explanation, ImageExplanation
from .localize import boxes
from .maps import cam, normalize, upsample
from .preprocess import Preprocess
from .render import overlay

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CamError",
    "Explainer",
    "Explanation",
    "Head",
    "ImageExplanation",
    "InvalidInput",
    "MissingDependency",
    "NotCamCompatible",
    "Preprocess",
    "TensorSpec",
    "boxes",
    "cam",
    "fuse",
    "load",
    "metrics",
    "normalize",
    "overlay",
    "register_backend",
    "upsample",
]
