"""The core glue (Explainer, Preprocess, Geometry) with a fake backend: no onnxruntime involved."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import camcore
from camcore import Explainer, Head, InvalidInput, Preprocess, TensorSpec
from camcore.preprocess import Geometry
from tests.fakes import gap_linear_head


class FakeBackend:
    """A GAP + linear model in NumPy: features are the input itself (N, K, h, w) or (N, h, w, K)."""

    def __init__(self, weights, bias, layout="NCHW", scoring="softmax", shape=("N", 3, 8, 8)):
        self.head = Head(weights=weights.astype(np.float32), bias=bias.astype(np.float32), feature="f",
                         logits="logits", layout=layout, pooling="GlobalAveragePool",
                         input=TensorSpec("x", shape, np.dtype(np.float32)),
                         inputs=(TensorSpec("x", shape, np.dtype(np.float32)),), scoring=scoring)
        self.calls = []

    def run(self, inputs):
        x = inputs["x"]
        self.calls.append(len(x))
        pooled = x.mean(axis=(2, 3)) if self.head.layout == "NCHW" else x.mean(axis=(1, 2))
        return x, pooled @ self.head.weights.T + self.head.bias

    def run_head(self, features, seeds=None):
        return gap_linear_head(features, self.head.weights, self.head.bias, self.head.layout, seeds)


def make(layout="NCHW", scoring="softmax", k=3, c=4, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    shape = ("N", k, 8, 8) if layout == "NCHW" else ("N", 8, 8, k)
    backend = FakeBackend(rng.standard_normal((c, k)), rng.standard_normal(c), layout, scoring, shape)
    return Explainer(backend, **kwargs), rng


def test_import_has_no_onnx():
    code = "import sys, camcore; bad = [m for m in ('onnx', 'onnxruntime', 'backends') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_explain_identity_and_scores(layout):
    ex, rng = make(layout)
    shape = (5, 3, 8, 8) if layout == "NCHW" else (5, 8, 8, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    out = ex.explain(x, top_k=4)
    assert out.maps.shape == (5, 4, 8, 8) and out.maps.dtype == np.float32
    np.testing.assert_allclose(out.maps.mean((-2, -1)) + ex.head.bias[out.classes],
                               np.take_along_axis(out.logits, out.classes, 1), atol=1e-5)
    assert np.all(np.diff(np.take_along_axis(out.logits, out.classes, 1), axis=1) <= 0)
    p = np.exp(out.logits) / np.exp(out.logits).sum(1, keepdims=True)
    np.testing.assert_allclose(out.scores, np.take_along_axis(p, out.classes, 1), rtol=1e-5)


def test_sigmoid_scores():
    ex, rng = make(scoring="sigmoid")
    out = ex.explain(rng.standard_normal((2, 3, 8, 8)).astype(np.float32), classes=[1, 2])
    np.testing.assert_allclose(out.scores, 1 / (1 + np.exp(-out.logits[:, [1, 2]])), rtol=1e-5)


def test_chunks_bound_the_batch():
    ex, rng = make(batch_size=4)
    out = ex.explain(rng.standard_normal((10, 3, 8, 8)).astype(np.float32))
    assert ex.backend.calls == [4, 4, 2]
    assert out.classes.shape == (10, 1)


@pytest.mark.parametrize("batch_dim", [-1, 0, "N", None])
def test_dynamic_batch_declared_as_minus_one_is_chunked(batch_dim):
    """paddle2onnx writes dynamic axes as -1: that is no fixed batch of -1."""
    rng = np.random.default_rng(0)
    ex = Explainer(FakeBackend(rng.standard_normal((4, 3)), rng.standard_normal(4), shape=(batch_dim, 3, -1, -1)),
                   batch_size=4)
    assert ex.fixed_batch is None
    out = ex.explain(rng.standard_normal((10, 3, 8, 8)).astype(np.float32))
    assert ex.backend.calls == [4, 4, 2] and out.maps.shape == (10, 1, 8, 8)


def test_explain_validation():
    ex, rng = make()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InvalidInput, match=r"top_k must be an int in \[1, 4\], got 0"):
        ex.explain(x, top_k=0)
    with pytest.raises(InvalidInput, match=r"classes must be in \[0, 4\), got -1"):
        ex.explain(x, classes=[-1])
    with pytest.raises(InvalidInput, match="backend must implement"):
        Explainer(object())


def test_explain_images_geometry_and_boxes():
    """A hot block in the input image must come back as a box on the same pixels of the original."""
    k = 3
    weights = np.eye(k)
    backend = FakeBackend(weights, np.zeros(k), shape=("N", 3, 8, 8))
    ex = Explainer(backend, preprocess=Preprocess(8, mean=0, std=1))
    image = np.zeros((64, 48, 3), np.uint8)
    image[16:32, 12:24, 0] = 255  # red block -> channel 0 hot there
    (result,) = ex.explain_images([image], classes=[0], threshold=0.5)
    assert result.size == (64, 48)
    assert result.maps.shape == (1, 64, 48) and result.maps.max() == pytest.approx(1.0)
    x0, y0, x1, y1 = result.box(0)
    assert abs(x0 - 12) <= 3 and abs(x1 - 24) <= 3 and abs(y0 - 16) <= 4 and abs(y1 - 32) <= 4
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 64


def test_explain_images_errors_reported(tmp_path):
    ex, _ = make(preprocess=Preprocess(8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = np.full((10, 10, 3), 128, np.uint8)
    results = list(ex.iter_explain_images([good, bad, good], errors="report"))
    assert [r.error is None for r in results] == [True, False, True]
    assert "bad.png" in results[1].error and len(results[1].classes) == 0
    with pytest.raises(camcore.CamError, match="bad.png"):
        ex.explain_images([good, bad])


def test_encoded_images_are_decoded_like_files(tmp_path):
    from PIL import Image

    from camcore.preprocess import EncodedImage

    ex, rng = make(preprocess=Preprocess(8))
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    items = [EncodedImage(path.read_bytes(), "a.png"), EncodedImage(b"not an image", "bad.png")]
    from_bytes = list(ex.iter_explain_images(items, errors="report", top_k=2))
    [from_file] = ex.explain_images([path], top_k=2)
    assert from_bytes[0].source == "a.png" and from_bytes[0].error is None
    np.testing.assert_array_equal(from_bytes[0].cams, from_file.cams)
    assert from_bytes[1].error is not None and "bad.png" in from_bytes[1].error


def test_explain_images_chunking_invariant():
    ex, rng = make(preprocess=Preprocess(8))
    images = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(7)]
    a = ex.explain_images(images, top_k=2, batch_size=3)
    b = ex.explain_images(images, top_k=2, batch_size=7)
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra.classes, rb.classes)
        np.testing.assert_allclose(ra.maps, rb.maps, atol=1e-6)
        assert [x.tolist() for x in ra.boxes] == [x.tolist() for x in rb.boxes]


@pytest.mark.parametrize("image", [np.zeros((9, 7), np.uint8), np.zeros((9, 7, 4), np.uint8),
                                   np.zeros((9, 7, 3), np.float64)])
def test_preprocess_accepts_gray_rgba_float(image):
    x, g = Preprocess(4, mean=0, std=1)(image)
    assert x.shape == (4, 4, 3) and x.dtype == np.float32 and g.original_size == (9, 7)


def test_preprocess_normalization_and_bgr():
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = 255
    x, _ = Preprocess(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image)
    np.testing.assert_allclose(x[0, 0], [1, -1, -1])
    x, _ = Preprocess(2, mean=0, std=1, channel_order="BGR")(image)
    np.testing.assert_allclose(x[0, 0], [0, 0, 1])


def test_preprocess_validation():
    with pytest.raises(InvalidInput, match="resize must be one of"):
        Preprocess(224, resize="pad")
    with pytest.raises(InvalidInput, match="size must be a pair"):
        Preprocess(0)
    with pytest.raises(InvalidInput, match="std must be non-zero"):
        Preprocess(224, std=0)
    with pytest.raises(InvalidInput, match="image must have 3 or 4 channels"):
        Preprocess(4)(np.zeros((4, 4, 2)))


@settings(max_examples=60, deadline=None)
@given(h0=st.integers(1, 400), w0=st.integers(1, 400), h=st.integers(1, 64), w=st.integers(1, 64),
       fraction=st.floats(0.3, 1.0))
def test_crop_geometry_is_centered_and_inside(h0, w0, h, w, fraction):
    g = Preprocess((h, w), resize="crop", crop_fraction=fraction).geometry((h0, w0))
    x0, y0, x1, y1 = g.crop
    assert 0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0
    assert abs((x0 + x1) - w0) <= 1 and abs((y0 + y1) - h0) <= 1  # centered
    # the window keeps the model's aspect ratio, up to rounding and clipping
    cw, ch = x1 - x0, y1 - y0
    if cw < w0 and ch < h0 and min(cw, ch) >= 4:
        # rounding each side to whole pixels moves the ratio by at most half a pixel per side
        assert abs(cw / ch - w / h) <= (cw + 0.5) / (ch - 0.5) - cw / ch + 1e-9 + (w / h) * 0.5 / min(cw, ch)


def test_imagenet_crop_matches_resize_256_crop_224():
    g = Preprocess.imagenet().geometry((512, 768))
    # resize the shorter side 512 -> 256 (scale 1/2), crop 224 -> 448 original pixels, centered
    assert g.crop == (160, 32, 608, 480)


def test_geometry_unmap_places_window():
    g = Geometry((6, 8), (2, 1, 6, 5), (2, 2))
    out = g.unmap(np.ones((1, 2, 2), np.float32))
    assert out.shape == (1, 6, 8)
    assert out[0, 1:5, 2:6].min() == 1 and out.sum() == 16


# ----------------------------------------------------------------- the reading pipeline

def _mixed_images(tmp_path, rng, n=11):
    """Arrays and PNG paths of different sizes, one unreadable file among them."""
    from PIL import Image

    images = []
    for i in range(n):
        array = rng.integers(0, 256, (10 + 3 * i, 14 + i, 3), dtype=np.uint8)
        if i % 2:
            path = tmp_path / f"{i}.png"
            Image.fromarray(array).save(path)
            images.append(path)
        else:
            images.append(array)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    images.insert(5, bad)
    return images


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_pipeline_keeps_input_order_and_results(tmp_path, workers, batch_size):
    ex, rng = make(preprocess=Preprocess(8))
    images = _mixed_images(tmp_path, rng)
    got = list(ex.iter_explain_images(images, top_k=2, errors="report", workers=workers, batch_size=batch_size))
    want = list(ex.iter_explain_images(images, top_k=2, errors="report", workers=0, batch_size=len(images)))
    assert [r.source for r in got] == [None if isinstance(i, np.ndarray) else str(i) for i in images]
    assert [r.error is None for r in got] == [i != 5 for i in range(len(images))]
    for a, b in zip(got, want):
        assert a.size == b.size
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.cams, b.cams, atol=1e-6)
        assert [x.tolist() for x in a.boxes] == [x.tolist() for x in b.boxes]


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_raises_at_the_bad_image(tmp_path, workers):
    ex, rng = make(preprocess=Preprocess(8))
    images = _mixed_images(tmp_path, rng)
    seen = []
    with pytest.raises(camcore.CamError, match="bad.png"):
        for result in ex.iter_explain_images(images, workers=workers, batch_size=2):
            seen.append(result)
    assert len(seen) == 4  # the chunk holding the bad image (images 4 and 5) fails as a whole


@pytest.mark.parametrize("workers", [1, 4])
def test_pipeline_holds_at_most_four_chunks(workers):
    ex, rng = make(preprocess=Preprocess(8))
    pulled = []

    def images():
        for i in range(40):
            pulled.append(i)
            yield rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)

    ahead = []
    for done, _ in enumerate(ex.iter_explain_images(images(), workers=workers, batch_size=3), start=1):
        ahead.append(len(pulled) - done)
    assert len(ahead) == 40
    # the chunk being yielded, the one finishing (maps and boxes) and two chunks being read
    assert max(ahead) <= 4 * 3
    assert max(ahead) >= 6  # and it does read ahead


def test_pipeline_closes_its_threads():
    import threading

    ex, rng = make(preprocess=Preprocess(8))
    images = (rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(50))
    stream = ex.iter_explain_images(images, workers=3, batch_size=2)
    next(stream)
    assert any(t.name.startswith("camcore-read") for t in threading.enumerate())
    stream.close()
    assert not any(t.name.startswith("camcore-read") for t in threading.enumerate())


def test_pipeline_validation():
    ex, _ = make(preprocess=Preprocess(8))
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidInput, match="workers must be an int >= 0"):
            list(ex.iter_explain_images([np.zeros((8, 8, 3), np.uint8)], workers=bad))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), h0=st.integers(1, 60),
       w0=st.integers(1, 60), constant=st.booleans(), seed=st.integers(0, 2**16))
def test_image_maps_equal_normalize_of_upsample(k, h, w, h0, w0, constant, seed):
    from camcore.explainer import _image_maps

    rng = np.random.default_rng(seed)
    cams = rng.standard_normal((k, h, w)).astype(np.float32)
    if constant:
        cams[0] = 0.0  # stays exactly constant through the interpolation
    g = Geometry((h0 + 3, w0 + 2), (1, 2, w0 + 1, h0 + 2), (8, 8))
    got = _image_maps(cams, g, "bilinear")
    want = g.place(camcore.normalize(camcore.upsample(cams, (h0, w0))))
    assert got.dtype == np.float32 and got.shape == (k, h0 + 3, w0 + 2)
    np.testing.assert_array_equal(got, want)
    assert not constant or not got[0].any()
