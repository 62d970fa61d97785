"""Forward-only class activation maps: the public path of `camcore.methods.perturbation`.

Ablation-CAM, Recipro-CAM and Score-CAM re-run the model or its head on perturbed
copies and need no gradient; see `camcore.methods.perturbation` for the details.
"""

from .methods.perturbation import FORWARD_METHODS, ablationcam, reciprocam, runs_per_image, scorecam

__all__ = ["ablationcam", "reciprocam", "scorecam", "FORWARD_METHODS", "runs_per_image"]
