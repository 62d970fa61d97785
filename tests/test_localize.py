"""Tests of camcore.boxes against a plain flood-fill oracle."""

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from camcore import InvalidInput, boxes


def components(mask):
    """8-connected components by flood fill, in raster order of their first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            pixels, todo = [], deque([(y, x)])
            seen[y, x] = True
            while todo:
                cy, cx = todo.popleft()
                pixels.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            todo.append((ny, nx))
            found.append(pixels)
    return found


def oracle(map2d, threshold, mode):
    top = map2d.max()
    if top <= 0:
        return np.zeros((0, 4), np.int64)
    comps = components(map2d >= threshold * top)
    # Stable sort by size keeps the raster order of first pixels among ties.
    comps = sorted(comps, key=len, reverse=True)
    out = []
    for pixels in comps:
        ys, xs = zip(*pixels)
        out.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    out = np.array(out, np.int64).reshape(-1, 4)
    return out[:1] if mode == "largest" else out


small_maps = arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.sampled_from([-1.0, 0.0, 0.1, 0.5, 1.0, 2.0]),
)


@settings(max_examples=300, deadline=None)
@given(small_maps, st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.sampled_from(["largest", "all"]))
def test_boxes_match_the_flood_fill_oracle(map2d, threshold, mode):
    got = boxes(map2d, threshold=threshold, mode=mode)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, oracle(map2d, threshold, mode))


@settings(max_examples=200, deadline=None)
@given(small_maps, st.floats(0, 1))
def test_boxes_are_tight_and_in_bounds(map2d, threshold):
    h, w = map2d.shape
    got = boxes(map2d, threshold=threshold, mode="all")
    top = map2d.max()
    if top <= 0:
        assert got.shape == (0, 4)
        return
    mask = map2d >= threshold * top
    comps = components(mask)
    assert len(got) == len(comps)
    sizes = []
    for x0, y0, x1, y1 in got:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # The component this box belongs to: the one with a pixel on the box's top-left edge.
        comp = next(
            c for c in comps
            if min(p[1] for p in c) == x0 and min(p[0] for p in c) == y0
            and max(p[1] for p in c) == x1 - 1 and max(p[0] for p in c) == y1 - 1
        )
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        for py, px in comp:
            assert inside[py, px]  # contains every kept pixel of its component
        sub = np.zeros_like(mask)
        sub[tuple(np.array(comp).T)] = True
        sub = sub[y0:y1, x0:x1]
        # No smaller box would do: every edge row and column holds a component pixel.
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        sizes.append(len(comp))
    assert sizes == sorted(sizes, reverse=True)
    assert np.array_equal(boxes(map2d, threshold=threshold), got[:1])


def test_diagonal_pixels_are_one_component_and_ties_go_to_raster_order():
    m = np.zeros((5, 6))
    m[0, 4] = m[1, 5] = 1.0  # 2 pixels, diagonal neighbours, first in raster order
    m[3, 0] = m[4, 1] = 1.0  # 2 pixels too
    m[3, 3] = 1.0  # 1 pixel
    np.testing.assert_array_equal(boxes(m), [[4, 0, 6, 2]])
    np.testing.assert_array_equal(boxes(m, mode="all"), [[4, 0, 6, 2], [0, 3, 2, 5], [3, 3, 4, 4]])


@pytest.mark.parametrize(
    "rows, expected",
    [
        # One run per row, each touching the next (the quick single-blob test settles these).
        (["#..", ".#.", "..#"], [[0, 0, 3, 3]]),
        (["..#..", ".###.", "#####", ".###."], [[0, 0, 5, 4]]),
        # Runs in adjacent rows that do not touch: two components.
        (["#..", "..#"], [[0, 0, 1, 1], [2, 1, 3, 2]]),
        (["##...", "...##"], [[0, 0, 2, 1], [3, 1, 5, 2]]),
        # One component with two runs in a row (a U, a ring): full labelling.
        (["#.#", "#.#", "###"], [[0, 0, 3, 3]]),
        (["###", "#.#", "###"], [[0, 0, 3, 3]]),
        # An empty row inside the kept pixels' bounding box.
        (["##", "..", ".#"], [[0, 0, 2, 1], [1, 2, 2, 3]]),
    ],
)
def test_shapes_around_the_single_blob_shortcut(rows, expected):
    m = np.array([[c == "#" for c in r] for r in rows], dtype=float)
    np.testing.assert_array_equal(boxes(m, mode="all"), expected)
    np.testing.assert_array_equal(boxes(m, mode="all"), oracle(m, 0.2, "all"))


def test_threshold_is_relative_to_the_maximum_and_inclusive():
    m = np.array([[0.2, 0.0, 0.19999], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(boxes(m, mode="all"), [[0, 0, 1, 1], [2, 2, 3, 3]])
    np.testing.assert_array_equal(boxes(m * 7, mode="all"), [[0, 0, 1, 1], [2, 2, 3, 3]])
    # threshold 0 keeps every non-negative pixel; -inf pixels are never kept.
    n = np.array([[-1.0, 0.0], [-np.inf, 3.0]])
    np.testing.assert_array_equal(boxes(n, threshold=0.0), [[1, 0, 2, 2]])


@pytest.mark.parametrize(
    "map2d", [np.zeros((3, 4)), -np.ones((3, 4)), np.full((2, 2), -np.inf)]
)
def test_no_positive_maximum_gives_an_empty_result(map2d):
    for mode in ("largest", "all"):
        got = boxes(map2d, mode=mode)
        assert got.shape == (0, 4) and got.dtype == np.int64


def test_whole_map_box_and_input_types():
    m = np.ones((4, 7), dtype=np.uint8)
    np.testing.assert_array_equal(boxes(m), [[0, 0, 7, 4]])
    f = np.random.default_rng(0).random((9, 9)).astype(np.float32)
    f0 = f.copy()
    boxes(f, threshold=0.5, mode="all")
    np.testing.assert_array_equal(f, f0)


@pytest.mark.parametrize(
    "map2d, kwargs, pattern",
    [
        (np.zeros((2, 3, 3)), {}, r"map2d must be 2-D \(H, W\), got shape \(2, 3, 3\)"),
        (np.zeros((0, 3)), {}, r"map2d must not be empty, got shape \(0, 3\)"),
        (np.array([[1.0, np.nan]]), {}, r"map2d must not hold NaN or \+inf"),
        (np.array([[1.0, np.inf]]), {}, r"map2d must not hold NaN or \+inf"),
        (np.ones((2, 2)), {"threshold": 1.5}, r"threshold must be a real number in \[0, 1\], got 1.5"),
        (np.ones((2, 2)), {"threshold": -0.1}, r"threshold must be a real number in \[0, 1\], got -0.1"),
        (np.ones((2, 2)), {"threshold": "0.2"}, r"threshold must be a real number in \[0, 1\], got '0.2'"),
        (np.ones((2, 2)), {"threshold": float("nan")}, r"threshold must be a real number"),
        (np.ones((2, 2)), {"mode": "biggest"}, r"mode must be one of 'largest', 'all', got 'biggest'"),
    ],
)
def test_boxes_invalid_input(map2d, kwargs, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        boxes(map2d, **kwargs)
