"""Tests of camcore.overlay: pixel values of blends, colormaps and box outlines."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camcore import InvalidInput, overlay

# matplotlib's jet at LUT entries 0, 64, 128, 192, 255, worked out by hand from
# its segment data and truncated to bytes as matplotlib does.
JET = {
    0: (0, 0, 127),
    64: (0, 128, 255),
    128: (124, 255, 121),
    192: (255, 148, 0),
    255: (127, 0, 0),
}


def test_alpha_one_gives_the_colormap():
    image = np.zeros((1, 5, 3), np.uint8)
    # minmax-normalized to 0, 0.25, 0.5, 0.75, 1 -> entries 0, 64, 128, 192, 255
    m = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    out = overlay(image, m, alpha=1.0)
    np.testing.assert_array_equal(out[0], [JET[i] for i in (0, 64, 128, 192, 255)])
    gray = overlay(image, m, alpha=1.0, colormap="gray")
    np.testing.assert_array_equal(gray[0], np.repeat([[0], [64], [128], [192], [255]], 3, axis=1))


@pytest.mark.parametrize(
    "image",
    [
        np.arange(48, dtype=np.uint8).reshape(4, 4, 3),
        np.arange(16, dtype=np.uint8).reshape(4, 4),
        np.arange(16, dtype=np.uint8).reshape(4, 4, 1),
        np.dstack([np.arange(48, dtype=np.uint8).reshape(4, 4, 3), np.full((4, 4), 9, np.uint8)]),
        np.linspace(0, 1, 48).reshape(4, 4, 3),
        np.linspace(0, 1, 48).reshape(4, 4, 3).astype(np.float16),
    ],
)
def test_alpha_zero_gives_the_image_back(image):
    before = image.copy()
    out = overlay(image, np.random.default_rng(0).random((2, 2)), alpha=0.0)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    if image.dtype == np.uint8:
        expected = image[:, :, :3] if image.ndim == 3 else image[:, :, None]
    else:
        expected = np.rint(image.astype(np.float32) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, np.broadcast_to(expected, (4, 4, 3)))
    np.testing.assert_array_equal(image, before)


def test_blend_is_the_rounded_weighted_sum():
    image = np.full((1, 2, 3), 100, np.uint8)
    out = overlay(image, np.array([[0.0, 1.0]]), alpha=0.25)
    # 0.75 * 100 + 0.25 * jet: (75, 75, 106.75) and (106.75, 75, 75)
    np.testing.assert_array_equal(out[0], [[75, 75, 107], [107, 75, 75]])


@settings(max_examples=60, deadline=None)
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
       alpha=st.floats(0, 1), colormap=st.sampled_from(["jet", "gray"]), seed=st.integers(0, 2**16))
def test_uint8_blend_matches_the_float_formula(pixels, alpha, colormap, seed):
    # uint8 images go through lookup tables; a float image of the same values through the formula
    m = np.random.default_rng(seed).normal(size=pixels.shape[:2])
    out = overlay(pixels, m, alpha=alpha, colormap=colormap)
    colored = overlay(np.zeros_like(pixels), m, alpha=1.0, colormap=colormap)  # the colormap itself
    assert np.array_equal(colored, overlay(np.full_like(pixels, 255), m, alpha=1.0, colormap=colormap))
    expected = np.rint((1.0 - alpha) * pixels.astype(np.float32) + alpha * colored.astype(np.float32))
    np.testing.assert_array_equal(out, np.clip(expected, 0, 255).astype(np.uint8))


def test_map_is_upsampled_bilinearly_to_the_image():
    image = np.zeros((4, 4, 3), np.uint8)
    # Bilinear 2 -> 4 columns: 0, 0.25, 0.75, 1 -> entries 0, 64, 192, 255.
    out = overlay(image, np.array([[0.0, 1.0], [0.0, 1.0]]), alpha=1.0)
    for row in out:
        np.testing.assert_array_equal(row, [JET[i] for i in (0, 64, 192, 255)])


def test_constant_map_gets_the_lowest_color():
    out = overlay(np.zeros((3, 3), np.uint8), np.full((3, 3), 7.0), alpha=1.0)
    np.testing.assert_array_equal(out, np.broadcast_to(JET[0], (3, 3, 3)))


def test_box_outline_pixels_have_the_box_color():
    image = np.zeros((224, 224, 3), np.uint8)
    out = overlay(image, np.zeros((7, 7)), alpha=0.0, boxes=[[20, 30, 120, 100]], color=(255, 0, 255))
    box = np.array([255, 0, 255], np.uint8)
    painted = np.all(out == box, axis=2)
    # Thickness max(1, round(224 / 100)) = 2, drawn inside the half-open box.
    for y in (30, 31, 98, 99):
        assert painted[y, 20:120].all()
    for x in (20, 21, 118, 119):
        assert painted[30:100, x].all()
    assert painted.sum() == 2 * (2 * 100) + 2 * (2 * (70 - 4))
    assert not painted[32:98, 22:118].any()  # inside
    assert not painted[29].any() and not painted[100].any() and not painted[:, 120].any()


def test_boxes_are_clipped_rounded_and_accept_one_box():
    image = np.zeros((10, 10), np.uint8)
    # Default green, thickness 1; the right and bottom edges lie outside the image.
    out = overlay(image, np.zeros((2, 2)), alpha=0.0, boxes=np.array([4.4, 5.6, 30.0, 40.0]))
    painted = np.all(out == [0, 255, 0], axis=2)
    expected = np.zeros((10, 10), bool)
    expected[6, 4:] = True
    expected[6:, 4] = True
    np.testing.assert_array_equal(painted, expected)
    # A box entirely outside draws nothing, an empty list draws nothing.
    far = overlay(image, np.zeros((2, 2)), alpha=0.0, boxes=[[-9, -9, -2, -2]])
    np.testing.assert_array_equal(far, 0)
    none = overlay(image, np.zeros((2, 2)), alpha=0.0, boxes=np.zeros((0, 4)))
    np.testing.assert_array_equal(none, 0)


@pytest.mark.parametrize(
    "image, map2d, kwargs, pattern",
    [
        (np.zeros((1, 2, 2, 3), np.uint8), np.zeros((2, 2)), {}, r"image must be 2-D or 3-D \(H, W\) or \(H, W, C\)"),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2)), {}, r"image must have 1, 3 or 4 channels.*\(2, 2, 2\)"),
        (np.zeros((2, 2), np.int16), np.zeros((2, 2)), {}, r"image must be uint8 or float in \[0, 1\], got dtype int16"),
        (np.full((2, 2), 1.5), np.zeros((2, 2)), {}, r"image must hold values in \[0, 1\] when float"),
        (np.zeros((0, 2), np.uint8), np.zeros((2, 2)), {}, r"image must not be empty"),
        (np.zeros((2, 2), np.uint8), np.zeros((1, 2, 2)), {}, r"map2d must be 2-D \(h, w\), got shape \(1, 2, 2\)"),
        (np.zeros((2, 2), np.uint8), np.array([[np.nan, 0.0]]), {}, r"map2d must be finite"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"alpha": 1.5}, r"alpha must be a real number in \[0, 1\], got 1.5"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"colormap": "viridis"}, r"colormap must be one of 'jet', 'gray', got 'viridis'"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"boxes": [[0, 0, 1]]}, r"boxes must be \(n, 4\).*got shape \(1, 3\)"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"boxes": [[0, 0, np.nan, 1]]}, r"boxes must be finite"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"boxes": [[2, 0, 1, 1]]}, r"boxes must have x0 <= x1 and y0 <= y1"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2)), {"boxes": [[0, 0, 1, 1]], "color": (0, 300, 0)}, r"color must be 3 ints in \[0, 255\]"),
    ],
)
def test_overlay_invalid_input(image, map2d, kwargs, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        overlay(image, map2d, **kwargs)
