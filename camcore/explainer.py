"""Placeholder while the module is being written."""
class Explainer: pass
class Explanation: pass
class ImageExplanation: pass
