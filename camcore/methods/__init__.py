"""Class activation map methods, on `features` and `gradients` arrays, and their registry.

Each gradient function takes the target layer's activations ``features`` ``(N, K, h, w)`` and,
for ``k`` classes per item, the gradients of each class's logit with respect to them,
``gradients`` ``(N, k, K, h, w)`` (``gradients[n, j] = d logit[n, c_j] / d features[n]``),
and returns maps ``(N, k, h, w)``.  With ``layout="NHWC"`` the channel axis is last in
both arrays: ``(N, h, w, K)`` and ``(N, k, h, w, K)``.  The maps keep the dtype rule
(float16 -> float32, float32 and float64 kept, integers -> float64) and are not
normalized; each ends with the ReLU its paper applies.

Where the head is global average pooling + affine (``logit_c = mean_xy(sum_k W[c, k] f_k)
+ b_c``), the gradient is ``W[c, k] / (h w)`` at every pixel, so Grad-CAM is exactly
``relu(CAM) / (h w)``.

`eigencam` needs no gradients: it takes ``features`` alone.  The other forward-only
methods re-run the model or its head: see `camcore.perturbation`.

The modules group the methods by what they need:

* `camcore.methods.weights`: CAM (the head's class weights and the features);
* `camcore.methods.gradient`: Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM
  (features and gradients);
* `camcore.methods.eigen`: EigenCAM (features alone);
* `camcore.methods.perturbation`: Ablation-CAM, Recipro-CAM (head re-runs) and
  Score-CAM (model re-runs);
* `camcore.methods.attention`: attention rollout and GAE (a vision transformer's attention
  probabilities, and for GAE their gradients), maps on the patch grid.

Each ends in a ``SPECS`` table of `MethodSpec`; `REGISTRY` merges them here, and the
`camcore.Explainer` gathers what a method's spec `needs` and calls it.  A new method is
one module with its table, added to the merge below.
"""

from __future__ import annotations

from . import attention, eigen, gradient, perturbation, weights
from ._registry import NEEDS, MethodInputs, MethodSpec, merge
from .attention import gae, rollout
from .eigen import eigencam
from .gradient import GRADIENT_METHODS, gradcam, gradcam_pp, hirescam, layercam, xgradcam

__all__ = ["gradcam", "gradcam_pp", "xgradcam", "hirescam", "layercam", "eigencam", "rollout", "gae", "GRADIENT_METHODS", "METHODS",
           "REGISTRY", "MethodSpec", "MethodInputs", "NEEDS", "method_options"]

# Method name -> MethodSpec, in the order `method=` lists them.
REGISTRY = merge(weights.SPECS, gradient.SPECS, eigen.SPECS, perturbation.SPECS, attention.SPECS)

# Every value `method=` takes; "auto" is "cam" on GAP + affine heads, else "gradcam".
# The forward-only methods (`camcore.perturbation`) need no gradient.
METHODS = ("auto", *REGISTRY)


def method_options() -> tuple:
    """Every ``method_options`` key some registered method reads, sorted.

    Examples
    --------
    >>> method_options()
    ('batch_size', 'mask', 'mask_at', 'max_channels', 'scoring')
    """
    return tuple(sorted({key for spec in REGISTRY.values() for key in spec.options}))
