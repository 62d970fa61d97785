"""Validation helpers shared by the public functions (private)."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput


def float_array(x, name: str) -> np.ndarray:
    """Return `x` as a float array following the one dtype rule.

    float16 -> float32; float32 and float64 are kept; integers and bools -> float64.
    The input is never modified (a view is returned when no conversion is needed,
    and callers must not write into it).
    """
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInput(f"{name} must be an array, got {type(x).__name__}: {exc}") from None
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype in (np.float32, np.float64):
        return arr
    if arr.dtype.kind in "biu":
        return arr.astype(np.float64)
    raise InvalidInput(f"{name} must be a real numeric array, got dtype {arr.dtype}")


def check_ndim(arr: np.ndarray, ndim, name: str, axes: str) -> None:
    """Raise InvalidInput unless `arr.ndim` is `ndim` (an int or a tuple of ints)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        raise InvalidInput(f"{name} must be {want} {axes}, got shape {arr.shape}")


def check_size(size, name: str = "size") -> tuple[int, int]:
    """Return `size` as a pair of positive ints `(H, W)`."""
    try:
        h, w = (int(s) for s in size)
    except Exception:
        raise InvalidInput(f"{name} must be a pair (H, W) of positive ints, got {size!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(size):
        raise InvalidInput(f"{name} must be a pair (H, W) of positive ints, got {size!r}")
    return h, w


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
