"""Faithfulness metrics (camcore.faithfulness, re-exported by camcore.evaluation), computed by hand."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from camcore import Explainer, InvalidInput
from camcore.evaluation import (auc, average_drop, confidence_scores, deletion_insertion, increase_in_confidence,
                                pointing_game)
from tests.test_explainer import FakeBackend


def sig(v):
    return 1 / (1 + np.exp(-np.asarray(v, np.float64)))


def tiny(layout="NCHW"):
    """p(class 0) = sigmoid(4 * mean of input channel 0); channels 1, 2 are ignored."""
    weights = np.array([[4.0, 0, 0], [0, 0, 0]])
    shape = ("N", 3, 2, 2) if layout == "NCHW" else ("N", 2, 2, 3)
    return Explainer(FakeBackend(weights, np.zeros(2), layout, "sigmoid", shape))


def images(layout="NCHW"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    x[0, 0] = [[1, 0.5], [0, -1]]
    x[1, 0] = 2
    maps = np.array([[[3, 1], [2, 0]], [[1, 0], [0, 0]]], np.float32)
    return (x if layout == "NCHW" else x.transpose(0, 2, 3, 1)), maps


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_average_drop_and_increase_in_confidence_by_hand(layout):
    x, maps = images(layout)
    before = x.copy()
    y, o = confidence_scores(tiny(layout), x, maps, np.array([0, 0]))
    np.testing.assert_array_equal(x, before)
    # item 0: mean 1/8 -> logit 0.5; map normalized [[1, 1/3], [2/3, 0]] -> masked mean 7/24 -> 7/6
    # item 1: mean 2 -> logit 8; map [[1, 0], [0, 0]] -> masked mean 1/2 -> 2
    np.testing.assert_allclose(y, sig([0.5, 8]), rtol=1e-6)
    np.testing.assert_allclose(o, sig([7 / 6, 2]), rtol=1e-6)
    drop = (sig(8) - sig(2)) / sig(8)
    assert average_drop(y, o) == pytest.approx(100 * drop / 2)
    assert increase_in_confidence(y, o) == 50.0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_deletion_insertion_by_hand(layout):
    x, maps = images(layout)
    out = deletion_insertion(tiny(layout), x, maps, np.array([0, 0]), steps=4, insertion_baseline="zeros",
                             batch_size=3)
    # item 0, pixels by saliency: (0,0)=1, (1,0)=0, (0,1)=0.5, (1,1)=-1 in channel 0
    deletion = sig([0.5, -0.5, -0.5, -1, 0])
    insertion = sig([0, 1, 1, 1.5, 0.5])
    np.testing.assert_allclose(out["deletion"][0], deletion, rtol=1e-6)
    np.testing.assert_allclose(out["insertion"][0], insertion, rtol=1e-6)
    assert out["deletion_auc"][0] == pytest.approx((deletion.sum() - (deletion[0] + deletion[-1]) / 2) / 4)
    # item 1 (ties after the first pixel: row-major): 2 per pixel kept
    np.testing.assert_allclose(out["deletion"][1], sig([8, 6, 4, 2, 0]), rtol=1e-6)
    np.testing.assert_allclose(out["insertion"][1], sig([0, 2, 4, 6, 8]), rtol=1e-6)
    again = deletion_insertion(tiny(layout), x, maps, np.array([0, 0]), steps=4, insertion_baseline="zeros",
                               batch_size=100)
    np.testing.assert_allclose(again["insertion"], out["insertion"], rtol=1e-7)


def test_steps_that_do_not_divide_the_pixels_floor_the_count():
    x, maps = images()
    out = deletion_insertion(tiny(), x, maps, np.array([0, 0]), steps=3)
    np.testing.assert_allclose(out["deletion"][1], sig([8, 6, 4, 0]), rtol=1e-6)  # 0, 1, 2, 4 pixels


def test_blur_baseline_is_rise_gaussian():
    x, maps = images()
    out = deletion_insertion(tiny(), x, maps, np.array([0, 0]), steps=2)
    blurred = gaussian_filter(x[:, 0].astype(np.float64), (0, 5, 5), mode="nearest", truncate=1.0)
    np.testing.assert_allclose(out["insertion"][:, 0], sig(4 * blurred.mean(axis=(1, 2))), rtol=1e-5)


def test_auc_and_validation():
    np.testing.assert_allclose(auc([[0, 1, 1], [1, 1, 1]]), [0.75, 1.0])
    x, maps = images()
    with pytest.raises(InvalidInput, match=r"maps must be \(N, H, W\) = \(2, 2, 2\)"):
        confidence_scores(tiny(), x, maps[:, :1], np.array([0, 0]))
    with pytest.raises(InvalidInput, match=r"classes must be in \[0, 2\)"):
        confidence_scores(tiny(), x, maps, np.array([0, 5]))
    with pytest.raises(InvalidInput, match="steps must be an int >= 1"):
        deletion_insertion(tiny(), x, maps, np.array([0, 0]), steps=0)
    with pytest.raises(InvalidInput, match="deletion_baseline must be one of"):
        deletion_insertion(tiny(), x, maps, np.array([0, 0]), deletion_baseline="mean")


def test_pointing_game_by_hand():
    m = np.zeros((3, 10, 10))
    m[0, 4, 4] = 1          # inside [2, 6)
    m[1, 4, 8] = 1          # x = 8: 3 pixels right of the box's last column 5
    m[2] = 1                # constant: the first pixel (0, 0), 2 sqrt(2) from (2, 2)
    boxes = [[[2, 2, 6, 6]], [[2, 2, 6, 6], [9, 9, 10, 10]], [[2, 2, 6, 6]]]
    assert pointing_game(m, boxes).tolist() == [True, False, False]
    assert pointing_game(m, boxes, tolerance=3).tolist() == [True, True, True]
    assert pointing_game(m, boxes, tolerance=2.5).tolist() == [True, False, False]
    assert pointing_game(m[:1], [np.zeros((0, 4))]).tolist() == [False]
    with pytest.raises(InvalidInput, match="tolerance must be a number >= 0"):
        pointing_game(m, boxes, tolerance=-1)
