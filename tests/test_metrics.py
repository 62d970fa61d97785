"""Tests of camcore.metrics.

The protocol functions are checked against wsolevaluation's own test vectors
and against a reference written here: Suzuki & Abe's border following (the
algorithm of ``cv2.findContours``) with shoelace areas and bounding rects, as
``cv2.contourArea`` and ``cv2.boundingRect`` compute them.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from camcore.errors import InvalidInput
from camcore.maps import normalize, upsample
from camcore.metrics import (
    BoxAccResult,
    box_accuracies,
    iou,
    localization_accuracy,
    max_box_acc,
    protocol_boxes,
    pxap,
    pxap_counts,
)

# --------------------------------------------------------------------------- reference

# the 8 neighbours, clockwise on screen (rows grow downwards), starting east
_DIRS = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]


def _follow(f, start, first_probe, nbd):
    """Suzuki & Abe steps 3.2-3.6: trace one border, return its pixels in order."""
    i, j = start
    k0 = _DIRS.index((first_probe[0] - i, first_probe[1] - j))
    p1 = None
    for s in range(8):  # 3.2: clockwise from the probe
        di, dj = _DIRS[(k0 + s) % 8]
        if f[i + di, j + dj] != 0:
            p1 = (i + di, j + dj)
            break
    if p1 is None:
        f[i, j] = -nbd
        return [start]
    p2, p3, points = p1, start, []
    while True:
        k = _DIRS.index((p2[0] - p3[0], p2[1] - p3[1]))
        east_zero = False
        for s in range(1, 9):  # 3.4: counterclockwise from the one after p2
            kk = (k - s) % 8
            q = (p3[0] + _DIRS[kk][0], p3[1] + _DIRS[kk][1])
            if f[q] != 0:
                p4 = q
                break
            east_zero |= kk == 0
        if east_zero:  # 3.5
            f[p3] = -nbd
        elif f[p3] == 1:
            f[p3] = nbd
        points.append(p3)
        if p4 == start and p3 == p1:  # 3.6
            return points
        p2, p3 = p3, p4


def reference_contours(binary):
    """All borders (outer and hole) of a binary image, in raster discovery order.

    Returns a list of (area, (x, y, w, h)) with the shoelace area of the
    pixel-centre polygon and the bounding rect of its pixels.
    """
    f = np.pad(np.asarray(binary, dtype=np.int64), 1)
    out, nbd = [], 1
    for i in range(1, f.shape[0] - 1):
        for j in range(1, f.shape[1] - 1):
            if f[i, j] == 1 and f[i, j - 1] == 0:
                probe = (i, j - 1)
            elif f[i, j] >= 1 and f[i, j + 1] == 0:
                probe = (i, j + 1)
            else:
                continue
            nbd += 1
            pts = np.array(_follow(f, (i, j), probe, nbd)) - 1
            y, x = pts[:, 0], pts[:, 1]
            area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
            rect = (x.min(), y.min(), x.max() - x.min() + 1, y.max() - y.min() + 1)
            out.append((area, rect))
    return out


def reference_boxes(scoremap, thresholds, multi_contour):
    """wsolevaluation's box inference, with the border following above in place of OpenCV."""
    u8 = (np.asarray(scoremap, dtype=np.float64) * 255).astype(np.uint8)
    height, width = u8.shape
    result = []
    for t in thresholds:
        contours = reference_contours(u8 > int(t * np.max(u8)))
        if not contours:
            result.append([[0, 0, 0, 0]])
            continue
        if not multi_contour:
            # OpenCV lists later-found outer contours first; max() keeps the first maximum
            best = max(c[0] for c in contours)
            contours = [[c for c in contours if c[0] == best][-1]]
        result.append(
            [[x, y, min(x + w, width - 1), min(y + h, height - 1)] for _, (x, y, w, h) in contours]
        )
    return result


def sorted_rows(boxes):
    return sorted(map(tuple, np.asarray(boxes).tolist()))


def blob_maps(rng, n, size=(14, 17), blobs=4):
    """Random multi-blob maps in [0, 1] with holes and thin parts, normalized as the protocol expects."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    maps = np.zeros((n, h, w))
    for m in maps:
        for _ in range(rng.integers(1, blobs + 1)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sy, sx = rng.uniform(0.7, 4, size=2)
            m += rng.uniform(0.2, 1) * np.exp(-((yy - cy) ** 2 / sy**2 + (xx - cx) ** 2 / sx**2))
        m += 0.15 * rng.random((h, w))
        m -= m.min()
        m /= m.max()
    return maps


# --------------------------------------------------------------------------- iou


def test_iou_values_and_shapes():
    out = iou([0, 0, 4, 4], [[2, 2, 6, 6], [0, 0, 4, 4], [4, 0, 8, 4]])
    np.testing.assert_allclose(out, [[4 / 28, 1.0, 0.0]])
    assert iou(np.zeros((3, 4)), np.zeros((0, 4))).shape == (3, 0)


def test_iou_inclusive_protocol_vectors():
    assert iou([1, 2, 5, 6], [3, 1, 4, 5], inclusive=True)[0, 0] == pytest.approx(8 / 27)
    # the protocol's "zero" boxes cover one pixel each
    np.testing.assert_array_equal(iou(np.zeros((3, 4)), np.zeros((5, 4)), inclusive=True), np.ones((3, 5)))
    np.testing.assert_array_equal(
        iou([[1, 1, 3, 3], [4, 4, 5, 5]], [[1, 1, 3, 3], [4, 4, 5, 5]], inclusive=True), np.eye(2)
    )


def test_iou_degenerate_is_zero_not_nan():
    out = iou([[2, 2, 2, 5], [3, 3, 1, 1]], [[2, 2, 2, 5], [0, 0, 9, 9]])
    np.testing.assert_array_equal(out, np.zeros((2, 2)))


def test_iou_float32_kept():
    assert iou(np.ones((1, 4), np.float32), np.ones((2, 4), np.float32)).dtype == np.float32


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([[0, 0, 1]], [0, 0, 1, 1], "a must have shape (4,) or (n, 4), got shape (1, 3)"),
        ([0, 0, 1, 1], np.zeros((2, 2, 4)), "b must have shape"),
        ([0, 0, np.nan, 1], [0, 0, 1, 1], "a must be finite"),
        ([0, 0, 1, 1], ["a", "b", "c", "d"], "b must be a real numeric array"),
    ],
)
def test_iou_rejects_bad_boxes(a, b, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        iou(a, b)


def _box_strategy():
    coord = st.integers(-20, 20)
    return st.tuples(coord, coord, coord, coord).map(
        lambda c: [min(c[0], c[2]), min(c[1], c[3]), max(c[0], c[2]), max(c[1], c[3])]
    )


@given(st.lists(_box_strategy(), min_size=1, max_size=5), st.lists(_box_strategy(), min_size=1, max_size=5))
def test_iou_symmetric_and_bounded(a, b):
    for inclusive in (False, True):
        ab = iou(a, b, inclusive=inclusive)
        assert ab.shape == (len(a), len(b))
        np.testing.assert_array_equal(ab, iou(b, a, inclusive=inclusive).T)
        assert np.all((ab >= 0) & (ab <= 1))


@given(_box_strategy())
def test_iou_self_is_one(box):
    expected = 1.0 if box[2] > box[0] and box[3] > box[1] else 0.0
    assert iou(box, box)[0, 0] == expected
    assert iou(box, box, inclusive=True)[0, 0] == 1.0


# --------------------------------------------------------------------------- protocol boxes

TAUS = np.arange(0, 1, 0.2)
UNIMODAL = [[0, 0, 0, 0, 0], [0, 0.4, 0.4, 0.4, 0.6], [0, 0.4, 1, 0.8, 0.6], [0, 0.4, 0.4, 0.4, 0.6]]
MULTIMODAL = [[0.4, 0, 0.2, 0.2, 0.2], [0.4, 0.4, 0, 0.4, 0], [0, 0, 0, 0.4, 0], [1, 0.6, 0.8, 0.2, 0.2]]


def test_protocol_vector_unimodal():
    boxes = protocol_boxes(UNIMODAL, TAUS)
    assert [b.tolist() for b in boxes] == [[[1, 1, 4, 3]], [[1, 1, 4, 3]], [[2, 1, 4, 3]], [[2, 2, 4, 3]], [[2, 2, 3, 3]]]


def test_protocol_vector_multimodal_largest():
    boxes = protocol_boxes(MULTIMODAL, TAUS)
    assert [b[0].tolist() for b in boxes] == [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]


def test_protocol_vector_multimodal_all_contours():
    expected = [[[0, 0, 4, 3]], [[0, 1, 4, 3], [0, 0, 2, 2]], [[0, 3, 3, 3]], [[2, 3, 3, 3], [0, 3, 1, 3]], [[0, 3, 1, 3]]]
    boxes = protocol_boxes(MULTIMODAL, TAUS, multi_contour=True)
    assert [sorted_rows(b) for b in boxes] == [sorted_rows(b) for b in expected]


@pytest.mark.parametrize("multi_contour", [False, True])
def test_protocol_vector_all_zero(multi_contour):
    boxes = protocol_boxes(np.zeros((3, 3)), TAUS, multi_contour=multi_contour)
    assert [b.tolist() for b in boxes] == [[[0, 0, 0, 0]]] * 5


def test_reference_reproduces_protocol_vectors():
    # the oracle itself must pass the protocol's vectors before it judges anything
    assert [b[0] for b in reference_boxes(UNIMODAL, TAUS, False)] == [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]
    assert [b[0] for b in reference_boxes(MULTIMODAL, TAUS, False)] == [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]
    assert [sorted_rows(b) for b in reference_boxes(MULTIMODAL, TAUS, True)] == [
        [(0, 0, 4, 3)], [(0, 0, 2, 2), (0, 1, 4, 3)], [(0, 3, 3, 3)], [(0, 3, 1, 3), (2, 3, 3, 3)], [(0, 3, 1, 3)]
    ]


def test_hole_contours_are_boxes():
    # a ring: the outer contour and the hole contour (grown by one pixel around the hole)
    ring = np.zeros((9, 9))
    ring[1:8, 1:8] = 1
    ring[3:5, 3:6] = 0
    (boxes,) = protocol_boxes(ring, [0.5], multi_contour=True)
    assert sorted_rows(boxes) == [(1, 1, 8, 8), (2, 2, 7, 6)]
    assert sorted_rows(boxes) == sorted_rows(reference_boxes(ring, [0.5], True)[0])


def test_largest_is_by_polygon_area_not_pixel_count():
    # a 1-pixel-wide line of 9 pixels has polygon area 0; a 2x2 square (4 pixels) has area 1
    m = np.zeros((6, 12))
    m[0, :9] = 1
    m[3:5, 2:4] = 1
    (box,) = protocol_boxes(m, [0.5])
    assert box.tolist() == [[2, 3, 4, 5]]


def test_largest_counts_holes_as_inside():
    # a 7x7 outline (24 pixels, polygon area 36) beats a solid 5x6 block (30 pixels, area 20)
    m = np.zeros((9, 20))
    m[1:8, 1:8] = 1
    m[2:7, 2:7] = 0
    m[1:6, 10:16] = 1
    (box,) = protocol_boxes(m, [0.5])
    assert box.tolist() == [[1, 1, 8, 8]]
    assert [box.tolist()] == [reference_boxes(m, [0.5], False)[0]]


def assert_matches_reference(scoremap, taus):
    """protocol_boxes equals the border-following reference, largest contour and all contours."""
    for multi in (False, True):
        ours = protocol_boxes(scoremap, taus, multi_contour=multi)
        ref = reference_boxes(scoremap, taus, multi)
        if multi:
            assert [sorted_rows(b) for b in ours] == [sorted_rows(b) for b in ref]
        else:
            assert [b.tolist() for b in ours] == ref


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(6, 7), (14, 17), (20, 9)]))
def test_protocol_boxes_match_border_following_reference(seed, size):
    rng = np.random.default_rng(seed)
    scoremap = blob_maps(rng, 1, size)[0]
    taus = np.arange(0, 1, 0.05)
    assert_matches_reference(scoremap, taus)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 7), st.integers(1, 7)), elements=st.sampled_from([0.0, 0.3, 0.6, 1.0])))
def test_protocol_boxes_match_reference_on_adversarial_maps(scoremap):
    # few levels: many ties, one-pixel lines, diagonal touches and holes
    taus = [0.0, 0.3, 0.5, 0.9]
    assert_matches_reference(scoremap, taus)


def test_protocol_boxes_validates():
    with pytest.raises(InvalidInput, match=r"scoremap must be 2-D \(H, W\), got shape \(1, 2, 2\)"):
        protocol_boxes(np.zeros((1, 2, 2)), TAUS)
    with pytest.raises(InvalidInput, match=r"scoremap must be in \[0, 1\]"):
        protocol_boxes(np.full((2, 2), 1.5), TAUS)
    with pytest.raises(InvalidInput, match="scoremap must be finite"):
        protocol_boxes(np.full((2, 2), np.nan), TAUS)
    with pytest.raises(InvalidInput, match="thresholds must be a non-empty"):
        protocol_boxes(np.zeros((2, 2)), [])


# --------------------------------------------------------------------------- max_box_acc


def reference_max_box_acc(maps, gt_boxes, thresholds, iou_thresholds, multi_contour):
    """The protocol's BoxEvaluator loop, on the reference boxes (per-image max over boxes)."""
    correct = np.zeros((len(iou_thresholds), len(thresholds)))
    for scoremap, gt in zip(maps, gt_boxes):
        boxes = reference_boxes(scoremap, thresholds, multi_contour)
        best = np.array([iou(b, gt, inclusive=True).max() for b in boxes])
        for d, threshold in enumerate(iou_thresholds):
            correct[d] += best >= threshold
    curve = correct * 100 / len(maps)
    return curve.max(axis=1).mean(), curve


def random_gt(rng, n, size):
    h, w = size
    out = []
    for _ in range(n):
        m = rng.integers(1, 3)
        x0, y0 = rng.integers(0, w - 1, m), rng.integers(0, h - 1, m)
        x1, y1 = rng.integers(x0, w), rng.integers(y0, h)
        out.append(np.stack([x0, y0, x1, y1], axis=1))
    return out


@pytest.mark.parametrize("multi_contour", [False, True])
def test_max_box_acc_matches_reference_on_multi_blob_maps(multi_contour):
    rng = np.random.default_rng(7)
    maps = blob_maps(rng, 30, (16, 18))
    gt = random_gt(rng, 30, (16, 18))
    taus = np.arange(0, 1, 0.05)
    res = max_box_acc(maps, gt, thresholds=taus, multi_contour=multi_contour)
    value, curve = reference_max_box_acc(maps, gt, taus, (0.3, 0.5, 0.7), multi_contour)
    np.testing.assert_allclose(res.curve, curve)
    assert res.value == pytest.approx(value)
    assert 0 < res.value < 100  # the data exercise both outcomes
    np.testing.assert_array_equal(res.best_thresholds, taus[np.argmax(curve, axis=1)])


def cam_like_maps(rng, n, size=(40, 44), grid=(7, 7)):
    """Bicubic-upsampled random feature-resolution maps, normalized: CAM-like, with many peaks and holes."""
    return normalize(upsample(rng.standard_normal((n,) + grid), size, method="bicubic"))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_protocol_boxes_match_reference_on_cam_like_maps(seed):
    # all levels of a realistic map at once: rows with several runs, merging and splitting
    # components, holes that open to the border through the row above or below
    scoremap = cam_like_maps(np.random.default_rng(seed), 1)[0]
    taus = np.arange(0, 1, 0.04)
    assert_matches_reference(scoremap, taus)


def test_nested_holes_and_open_gaps():
    m = np.zeros((13, 30))
    m[1:12, 1:12] = 1  # a ring...
    m[3:10, 3:10] = 0
    m[5:8, 5:8] = 1  # ...around a dot
    m[1:12, 16:28] = 1  # a cup: its gap opens to the top row
    m[2:10, 19:25] = 0
    m[0, 19:25] = 0
    m[1, 19:25] = 0
    for multi in (False, True):
        ours = protocol_boxes(m, [0.5], multi_contour=multi)[0]
        ref = reference_boxes(m, [0.5], multi)[0]
        assert sorted_rows(ours) == sorted_rows(ref)
    assert sorted_rows(protocol_boxes(m, [0.5], multi_contour=True)[0]) == [
        (1, 1, 12, 12), (2, 2, 11, 11), (5, 5, 8, 8), (16, 1, 28, 12)]


def test_a_hole_contour_can_tie_and_win_the_largest():
    # a one-pixel-thin diamond with a tail: its hole's contour has the outer contour's area (2)
    # and is found later, so OpenCV's max() returns the hole's box
    m = np.zeros((3, 7))
    m[[0, 1, 1, 2, 2], [1, 0, 2, 1, 3]] = 0.3
    assert protocol_boxes(m, [0.0])[0].tolist() == [[0, 0, 3, 2]] == reference_boxes(m, [0.0], False)[0]
    # a thicker ring: the outer contour is strictly larger and keeps its box
    m = np.zeros((6, 7))
    m[0:5, 0:5] = 1
    m[2, 2] = 0
    assert protocol_boxes(m, [0.5])[0].tolist() == [[0, 0, 5, 5]] == reference_boxes(m, [0.5], False)[0]


def test_box_accuracies_is_both_rules_in_one_pass():
    rng = np.random.default_rng(3)
    maps = np.concatenate([blob_maps(rng, 10, (24, 20)), cam_like_maps(rng, 10, (24, 20))])
    gt = random_gt(rng, 20, (24, 20))
    taus = np.arange(0, 1, 0.02)
    both = box_accuracies(maps, gt, thresholds=taus)
    for result, multi in ((both.largest, False), (both.all, True)):
        single = max_box_acc(maps, gt, thresholds=taus, multi_contour=multi)
        np.testing.assert_array_equal(result.counts, single.counts)
        _, curve = reference_max_box_acc(maps, gt, taus, (0.3, 0.5, 0.7), multi)
        np.testing.assert_allclose(result.curve, curve)
    chunks = box_accuracies(maps[:7], gt[:7], thresholds=taus) + box_accuracies(maps[7:], gt[7:], thresholds=taus)
    np.testing.assert_array_equal(chunks.largest.counts, both.largest.counts)
    np.testing.assert_array_equal(chunks.all.counts, both.all.counts)
    assert chunks.all.n_images == 20


def test_pxap_counts_add_over_chunks():
    rng = np.random.default_rng(5)
    maps = rng.random((6, 9, 9))
    masks = rng.random((6, 9, 9)) < 0.3
    ignore = rng.random((6, 9, 9)) < 0.1
    whole = pxap_counts(maps, masks, ignore=ignore)
    parts = pxap_counts(maps[:2], masks[:2], ignore=ignore[:2]) + pxap_counts(maps[2:], masks[2:], ignore=ignore[2:])
    np.testing.assert_array_equal(parts.positive, whole.positive)
    assert parts.value == whole.value == pxap(maps, masks, ignore=ignore)
    assert whole.positive.sum() == (masks & ~ignore).sum()
    with pytest.raises(InvalidInput, match="identical thresholds"):
        whole + pxap_counts(maps, masks, thresholds=[0.0, 0.5])


def test_max_box_acc_v1_keeps_the_largest_contour_v2_all():
    m = np.zeros((1, 30, 30))
    m[0, 0:12, 0:12] = 1.0  # a large decoy
    m[0, 20:26, 20:26] = 0.9  # the object, smaller: uint8 229, foreground while int(tau * 255) < 229
    gt = [[[20, 20, 25, 25]]]
    v1 = max_box_acc(m, gt, iou_thresholds=(0.5,), multi_contour=False)
    v2 = max_box_acc(m, gt, iou_thresholds=(0.5,), multi_contour=True)
    assert (v1.value, v2.value) == (0.0, 100.0)
    np.testing.assert_array_equal(v2.curve[0, :90], 100.0)  # tau <= 0.89
    np.testing.assert_array_equal(v2.curve[0, 90:], 0.0)
    assert v2.best_thresholds.tolist() == [0.0]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(12, 40), st.integers(12, 40), st.data()
)
def test_max_box_acc_perfect_map_is_100(h, w, data):
    # box sides >= 10 pixels: the protocol's one-pixel overshoot keeps IoU >= (10/11)^2 > 0.7
    x0 = data.draw(st.integers(0, w - 10))
    y0 = data.draw(st.integers(0, h - 10))
    x1 = data.draw(st.integers(x0 + 9, w - 1))
    y1 = data.draw(st.integers(y0 + 9, h - 1))
    m = np.zeros((1, h, w))
    m[0, y0 : y1 + 1, x0 : x1 + 1] = 1
    for multi in (False, True):
        res = max_box_acc(m, [[[x0, y0, x1, y1]]], multi_contour=multi)
        assert res.value == 100.0
        np.testing.assert_array_equal(res.curve, 100.0)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_max_box_acc_batch_order_and_chunking_invariant(seed):
    rng = np.random.default_rng(seed)
    maps = blob_maps(rng, 6, (10, 12))
    gt = random_gt(rng, 6, (10, 12))
    taus = np.arange(0, 1, 0.1)
    whole = max_box_acc(maps, gt, thresholds=taus)
    perm = rng.permutation(6)
    shuffled = max_box_acc(maps[perm], [gt[i] for i in perm], thresholds=taus)
    chunks = max_box_acc(maps[:2], gt[:2], thresholds=taus) + max_box_acc(maps[2:], gt[2:], thresholds=taus)
    for other in (shuffled, chunks):
        np.testing.assert_array_equal(other.counts, whole.counts)
        assert other.value == whole.value and other.n_images == 6


def test_max_box_acc_result_fields():
    m = np.zeros((2, 20, 20))
    m[0, 2:12, 1:16] = 1
    res = max_box_acc(m, [[1, 2, 15, 11], [[0, 0, 4, 4]]], thresholds=[0.0, 0.5], iou_thresholds=[0.5, 0.9])
    assert isinstance(res, BoxAccResult)
    np.testing.assert_array_equal(res.counts, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(res.curve, [[50.0, 50.0], [0.0, 0.0]])
    np.testing.assert_array_equal(res.best_thresholds, [0.0, 0.0])
    assert res.value == 25.0
    with pytest.raises(Exception):
        res.n_images = 3  # frozen


def test_max_box_acc_validates():
    maps = np.zeros((2, 4, 4))
    with pytest.raises(InvalidInput, match=r"gt_boxes must have one entry per map \(2\), got 1"):
        max_box_acc(maps, [[0, 0, 1, 1]])
    with pytest.raises(InvalidInput, match=r"gt_boxes\[1\] must hold at least one box"):
        max_box_acc(maps, [[0, 0, 1, 1], np.zeros((0, 4))])
    with pytest.raises(InvalidInput, match=r"scoremaps must be 3-D \(N, H, W\)"):
        max_box_acc(maps[0], [[0, 0, 1, 1]])
    with pytest.raises(InvalidInput, match=r"iou_thresholds must lie in \[0.0, 1.0\]"):
        max_box_acc(maps, [[0, 0, 1, 1]] * 2, iou_thresholds=[1.5])
    with pytest.raises(InvalidInput, match="BoxAccResult objects can only be added with identical thresholds"):
        max_box_acc(maps, [[0, 0, 1, 1]] * 2) + max_box_acc(maps, [[0, 0, 1, 1]] * 2, thresholds=[0.5])


# --------------------------------------------------------------------------- pxap


def reference_pxap(maps, masks, thresholds):
    """Average precision from sorted scores at the bin edges, computed pixel by pixel."""
    scores, truth = maps.ravel(), masks.ravel().astype(bool)
    edges = np.append(thresholds, [1.0, 2.0])[::-1]
    ap, prev_recall = 0.0, 0.0
    for edge in edges:
        predicted = scores >= edge
        tp = (predicted & truth).sum()
        recall = tp / truth.sum()
        if predicted.sum():
            ap += tp / predicted.sum() * (recall - prev_recall)
        prev_recall = recall
    return 100 * ap


def test_pxap_perfect_and_constant():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 0, 0] = True
    assert pxap(masks.astype(float), masks) == 100.0
    for c in (0.0, 0.42, 0.999):
        assert pxap(np.full(masks.shape, c), masks) == pytest.approx(100 * masks.mean())


def test_pxap_matches_pixelwise_reference():
    rng = np.random.default_rng(3)
    maps = blob_maps(rng, 5, (12, 12))
    masks = maps + 0.3 * rng.random(maps.shape) > 0.6
    taus = np.arange(0, 1, 0.01)
    value = pxap(maps, masks, thresholds=taus)
    assert value == pytest.approx(reference_pxap(maps, masks, taus))
    assert 40 < value < 100


def test_pxap_ignore_region_excluded():
    rng = np.random.default_rng(4)
    maps = rng.random((2, 6, 6))
    masks = rng.random((2, 6, 6)) > 0.5
    ignore = rng.random((2, 6, 6)) > 0.7
    keep = ~ignore
    expected = reference_pxap(maps[keep], masks[keep], np.arange(0, 1, 0.01))
    assert pxap(maps, masks, ignore=ignore) == pytest.approx(expected)
    assert pxap(maps, masks, ignore=ignore) != pytest.approx(pxap(maps, masks))


def test_pxap_validates():
    maps = np.zeros((1, 3, 3))
    with pytest.raises(InvalidInput, match=r"masks must have the shape of scoremaps \(1, 3, 3\), got \(3, 3\)"):
        pxap(maps, np.zeros((3, 3)))
    with pytest.raises(InvalidInput, match="masks must contain at least one positive"):
        pxap(maps, np.zeros((1, 3, 3)))
    with pytest.raises(InvalidInput, match="thresholds must increase strictly"):
        pxap(maps, np.ones((1, 3, 3)), thresholds=[0.5, 0.2])


# --------------------------------------------------------------------------- localization_accuracy

GT_BOXES = [[[0, 0, 10, 10]], [[20, 20, 30, 30], [0, 0, 5, 5]], [[0, 0, 8, 8]]]
HIT, MISS = [0, 0, 10, 10], [50, 50, 60, 60]


def test_localization_top1_top5_gt_known():
    pred_classes = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    pred_boxes = [
        [HIT, MISS, MISS],  # right class, right box
        [MISS, [0, 0, 5, 5], MISS],  # class right only at rank 2; box hits the second GT box
        [MISS, MISS, MISS],  # class right, box wrong
    ]
    gt_classes = [1, 5, 7]
    top1 = localization_accuracy(pred_classes, pred_boxes, gt_classes, GT_BOXES, k=1)
    top3 = localization_accuracy(pred_classes, pred_boxes, gt_classes, GT_BOXES, k=3)
    assert top1 == {"top_k_loc": 1 / 3, "gt_known_loc": 2 / 3}
    assert top3 == {"top_k_loc": 2 / 3, "gt_known_loc": 2 / 3}


def test_localization_box_of_wrong_class_does_not_count():
    loc = localization_accuracy([[2, 1]], [[HIT, MISS]], [1], GT_BOXES[:1], k=2)
    assert loc == {"top_k_loc": 0.0, "gt_known_loc": 0.0}


def test_localization_gt_known_boxes_and_missing_class():
    pred_classes = [[1, 2], [3, 4]]
    pred_boxes = [[MISS, MISS], [MISS, MISS]]
    gt = [[[0, 0, 10, 10]], [[0, 0, 10, 10]]]
    # class 9 never predicted: a GT-known miss without gt_known_boxes
    assert localization_accuracy(pred_classes, pred_boxes, [1, 9], gt)["gt_known_loc"] == 0.0
    given_boxes = [HIT, np.zeros((0, 4))]
    loc = localization_accuracy(pred_classes, pred_boxes, [1, 9], gt, gt_known_boxes=given_boxes)
    assert loc == {"top_k_loc": 0.0, "gt_known_loc": 0.5}


def test_localization_label_sets_and_multiple_boxes_per_prediction():
    pred_boxes = [[np.array([MISS, HIT]), np.zeros((0, 4))]]
    loc = localization_accuracy([[3, 4]], pred_boxes, [{1, 3}], GT_BOXES[:1], k=1)
    assert loc == {"top_k_loc": 1.0, "gt_known_loc": 1.0}


def test_localization_iou_threshold_is_inclusive():
    # IoU of [0,0,10,10] with [0,0,10,5] is exactly 0.5
    loc = localization_accuracy([[1]], [[[0, 0, 10, 5]]], [1], GT_BOXES[:1], iou_threshold=0.5)
    assert loc["top_k_loc"] == 1.0
    loc = localization_accuracy([[1]], [[[0, 0, 10, 5]]], [1], GT_BOXES[:1], iou_threshold=0.51)
    assert loc["top_k_loc"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pred_classes=[1, 2]), r"pred_classes must be 2-D \(N, K\)"),
        (dict(pred_classes=[[1.5]]), "pred_classes must hold ints"),
        (dict(k=2), r"k must be an int in \[1, 1\]"),
        (dict(pred_boxes=[[HIT], [HIT]]), r"pred_boxes must have one entry per image \(1\), got 2"),
        (dict(pred_boxes=[[HIT, HIT]]), r"pred_boxes\[0\] must hold one entry per predicted class \(1\), got 2"),
        (dict(pred_boxes=[[[0, 0, 1]]]), r"pred_boxes\[0\]\[0\] must have shape \(4,\) or \(n, 4\)"),
        (dict(gt_classes=[[[1]]]), r"gt_classes\[0\] must be an int or a collection of ints"),
        (dict(gt_boxes=[np.zeros((0, 4))]), r"gt_boxes\[0\] must hold at least one box"),
        (dict(iou_threshold=2), r"iou_threshold must be in \[0, 1\]"),
        (dict(gt_known_boxes=[]), r"gt_known_boxes must have one entry per image \(1\), got 0"),
    ],
)
def test_localization_validates(kwargs, message):
    args = dict(pred_classes=[[1]], pred_boxes=[[HIT]], gt_classes=[1], gt_boxes=GT_BOXES[:1])
    args.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        localization_accuracy(**args)


def test_inputs_not_mutated():
    maps = np.random.default_rng(0).random((2, 6, 6))
    gt = [np.array([[0, 0, 3, 3]]), np.array([[1, 1, 4, 4]])]
    before = maps.copy(), [g.copy() for g in gt]
    max_box_acc(maps, gt, thresholds=[0.2, 0.5])
    pxap(maps, maps > 0.5)
    np.testing.assert_array_equal(maps, before[0])
    for g, b in zip(gt, before[1]):
        np.testing.assert_array_equal(g, b)
