"""Placeholder while the module is being written."""
class Preprocess: pass
