"""CAM itself (Zhou et al., CVPR 2016): the head's own class weights on the activations.

``M_c = sum_k W[c, k] A_k``, exact for a global-average-pooling + affine head; the
array function is `camcore.maps.cam` (the array core).  Registered here so the
`Explainer` finds it like any other method; it needs the head's ``weights``, which
only a GAP + affine head has.
"""

from __future__ import annotations

from ..maps import cam
from ._registry import MethodSpec

__all__ = []


def _cam_maps(given):
    return cam(given.features, given.weights, given.classes, layout=given.layout)


SPECS = (MethodSpec("cam", frozenset({"weights", "features"}), cam, _cam_maps),)
