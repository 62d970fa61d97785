"""The error hierarchy: every error camcore raises on purpose is a `CamError`."""

__all__ = ["CamError", "InvalidInput", "NotCamCompatible", "MissingDependency"]


class CamError(Exception):
    """Base class of every error that camcore raises on purpose."""


class InvalidInput(CamError, ValueError):
    """An argument has the wrong shape, dtype, range or value.

    The message names the argument, what was expected and what was given.
    """


class NotCamCompatible(CamError, ValueError):
    """The model cannot be explained with CAM (no global average pooling, a head
    that is not affine, global max pooling...). The message is one line."""


class MissingDependency(CamError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


def missing_dependency(module: str, *extras: str) -> MissingDependency:
    """Build the error for a missing optional module, naming the pip extra(s) to install."""
    options = " or ".join(f"pip install 'camcore[{extra}]'" for extra in extras)
    return MissingDependency(f"{module} is required for this; install it with: {options}")
