"""Image reading and preprocessing (Pillow) against the conventions users compare with.

Reference: Pillow's anti-aliased resampling (``ImagingResample``), which torchvision's
``Resize`` calls on PIL images and reimplements in float for tensors with
``antialias=True``, and which Keras's ``load_img(target_size=...)`` calls.  For an
output pixel ``i`` of an axis shrunk by ``scale = n_in / n_out``, the filter is
centered at ``(i + 0.5) * scale`` (half-pixel centers), widened by ``max(scale, 1)``,
truncated to the image and normalized to sum 1.  `reference_resize` writes that
out in NumPy, in float64; torchvision is not imported (not installable here).
"""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from camcore import InvalidInput, Preprocess
from camcore.errors import CamError
from camcore.preprocess import read_image


def _triangle(x):
    return np.maximum(0.0, 1.0 - np.abs(x))


def _keys_half(x, a=-0.5):
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_keys_half, 2.0)}


def reference_matrix(n_out, n_in, method, start=0.0, stop=None):
    """(n_out, n_in) weights of Pillow's precompute_coeffs for the window [start, stop)."""
    kernel, support = KERNELS[method]
    stop = n_in if stop is None else stop
    scale = (stop - start) / n_out
    widen = max(scale, 1.0)
    r = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = start + (i + 0.5) * scale
        lo = max(int(center - support * widen + 0.5), 0)  # C's (int) truncates toward zero
        hi = min(int(center + support * widen + 0.5), n_in)
        x = np.arange(lo, hi)
        w = kernel((x - center + 0.5) / widen)
        r[i, lo:hi] = w / w.sum()
    return r


def reference_resize(image, size, method, box=None, *, uint8=False):
    """(H, W, C) image -> (h, w, C) float64, separable.

    The filter taps reach outside `box` (into the rest of the image) as in Pillow.
    ``uint8=True`` rounds and clips to 0..255 after each pass, as Pillow does on
    8-bit images (width first, then height).
    """
    h0, w0 = image.shape[:2]
    x0, y0, x1, y1 = box or (0, 0, w0, h0)
    ry = reference_matrix(size[0], h0, method, y0, y1)
    rx = reference_matrix(size[1], w0, method, x0, x1)

    def rounded(a):
        return np.clip(np.round(a), 0, 255) if uint8 else a

    columns = rounded(np.tensordot(image.astype(np.float64), rx, axes=(1, 1)))  # (H, C, w)
    return rounded(np.tensordot(ry, columns, axes=(1, 0))).transpose(0, 2, 1)


def raw(size, **options):
    """Preprocess that only resizes: no scaling, no mean, no std."""
    return Preprocess(size, mean=0, std=1, scale=1, **options)


def test_hand_computed_values():
    # 4 -> 2 bilinear, widened to support 2: centers 1 and 3, weights (.75, .75, .25) / 1.75
    row = np.array([[0, 0, 255, 255]], np.uint8)
    image = np.repeat(row[..., None], 3, axis=-1)
    x, _ = raw((1, 2))(image)
    np.testing.assert_array_equal(x[0, :, 0], [36, 219])  # 63.75 / 1.75 = 36.4, 382.5 / 1.75 = 218.6
    np.testing.assert_allclose(reference_resize(image, (1, 2), "bilinear")[0, :, 0], [255 / 7, 1530 / 7])


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in, n_out", [(128, 32), (120, 40), (64, 64), (30, 90)])
def test_ramps_are_kept(method, n_in, n_out):
    """Symmetric normalized filters keep a linear ramp, away from the edges, when they sample it
    symmetrically: integer shrink factors, or upsampling."""
    ramp = (2 * np.arange(n_in, dtype=np.float32) + 1) / 2  # pixel x holds its center, x + 0.5
    image = np.repeat(np.tile(ramp, (8, 1))[..., None], 3, axis=-1)
    x, _ = raw((8, n_out), interpolation=method)(image)
    centers = (np.arange(n_out) + 0.5) * n_in / n_out
    reach = KERNELS[method][1] * max(n_in / n_out, 1) + 1
    inside = (centers > reach) & (centers < n_in - reach)
    assert inside.sum() >= n_out // 3
    np.testing.assert_allclose(x[3, inside, 1], centers[inside], atol=2e-3)


def test_uint8_ramp_exact():
    ramp = (2 * np.arange(128)).astype(np.uint8)  # 0, 2, ..., 254
    image = np.repeat(np.tile(ramp, (16, 1))[..., None], 3, axis=-1)
    x, _ = raw((4, 32))(image)
    # output pixel i is centered at source pixel 4 i + 1.5, where the ramp is 8 i + 3
    np.testing.assert_array_equal(x[:, 2:-2, 0], np.tile(8 * np.arange(2, 30) + 3, (4, 1)))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape, size", [((37, 53), (16, 12)), ((20, 20), (31, 7)), ((9, 40), (9, 40))])
def test_float_images_match_the_reference(method, shape, size):
    rng = np.random.default_rng(0)
    image = rng.random(shape + (3,)).astype(np.float32)
    x, _ = raw(size, interpolation=method)(image)
    np.testing.assert_allclose(x, reference_resize(image, size, method), atol=2e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut"])
def test_photos_match_pillow_and_the_reference(method, photo):
    """uint8 photos: exactly PIL's resize (torchvision's ``Resize((224, 224))`` on a PIL image),
    and within one level of the reference that rounds and clips between passes as Pillow does
    (Pillow's weights are 22-bit fixed point)."""
    image = getattr(data, photo)()
    x, _ = raw(224, interpolation=method)(image)
    pil = np.asarray(Image.fromarray(image).resize((224, 224), getattr(Image.Resampling, method.upper())))
    np.testing.assert_array_equal(x, pil)
    error = np.abs(x - reference_resize(image, (224, 224), method, uint8=True))
    assert error.max() <= 1.0 and error.mean() < 0.05


def test_crop_window_filters_with_its_neighbours():
    """resize="crop" resizes the crop window of the original in one pass (Pillow's ``box``):
    the filter at the window's edges reaches the pixels just outside it, as when the whole
    image is resized and then cropped (torchvision), not as if the window were cut first."""
    image = data.coffee()  # (400, 600)
    x, geometry = raw(224, resize="crop")(image)
    assert geometry.crop == (125, 25, 475, 375)
    error = np.abs(x - reference_resize(image, (224, 224), "bilinear", geometry.crop, uint8=True))
    assert error.max() <= 1.0
    x0, y0, x1, y1 = geometry.crop
    cut_first = reference_resize(image[y0:y1, x0:x1], (224, 224), "bilinear", uint8=True)
    edge = np.abs(x - cut_first)[[0, -1]].max()
    assert edge > 5 and np.abs(x - cut_first)[2:-2, 2:-2].max() <= 1.0


def test_imagenet_crop_is_close_to_torchvision_resize_then_center_crop():
    """torchvision: ``Resize(256)`` then ``CenterCrop(224)`` (two steps, integer crop of the
    resized image). camcore cuts the window from the original and resizes it once, so the
    two differ by a sub-pixel shift and scale: within a few levels on a photo."""
    image = data.chelsea()  # (300, 451)
    h, w = 256, int(256 * 451 / 300)  # torchvision's _compute_resized_output_size
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    torchvision = resized[top:top + 224, left:left + 224]
    x, _ = Preprocess.imagenet(mean=0, std=1, scale=1)(image)
    difference = np.abs(x - torchvision)
    assert difference.mean() < 4.0
    assert np.corrcoef(x.ravel(), torchvision.ravel())[0, 1] > 0.98


def test_dtypes_and_channels():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    size = (12, 10)
    x8, _ = raw(size)(rgb)
    # gray = the same gray on 3 channels; RGBA drops alpha; uint16 and float resize in float
    gray, _ = raw(size)(rgb[..., 0])
    np.testing.assert_array_equal(gray, raw(size)(np.dstack([rgb[..., 0]] * 3))[0])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(raw(size)(np.dstack([rgb, rgb[..., :1]]))[0], x8)
    x16, _ = raw(size)(rgb.astype(np.uint16) * 257)  # 16 bits scaled from their full depth: 65535 -> 255
    np.testing.assert_allclose(x16, reference_resize(rgb, size, "bilinear"), atol=1e-3)
    xf, _ = raw(size)(rgb / 255.0)
    np.testing.assert_allclose(xf * 255, reference_resize(rgb, size, "bilinear"), atol=1e-3)
    assert x8.dtype == x16.dtype == xf.dtype == np.float32
    assert np.abs(x8 - reference_resize(rgb, size, "bilinear")).max() <= 1.0


def test_nearest_and_validation():
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    x, _ = raw(2, interpolation="nearest")(image)
    np.testing.assert_array_equal(x[..., 0], [[5, 7], [13, 15]])  # source pixel floor((i + 0.5) * 2)
    with pytest.raises(InvalidInput, match="interpolation must be one of"):
        Preprocess(4, interpolation="area")
    with pytest.raises(InvalidInput, match="image must be finite"):
        raw(2)(np.full((4, 4, 3), np.nan))


def test_normalization_after_resize():
    image = np.full((10, 20, 3), 200, np.uint8)
    x, _ = Preprocess(5, mean=(0.5, 0.25, 0), std=(0.5, 0.25, 2))(image)
    np.testing.assert_allclose(x[2, 2], [(200 / 255 - 0.5) / 0.5, (200 / 255 - 0.25) / 0.25, 200 / 255 / 2],
                               rtol=1e-6)
    assert image.max() == 200  # input untouched


@pytest.mark.parametrize("mode, shape, dtype", [
    ("RGB", (6, 5, 3), np.uint8), ("L", (6, 5), np.uint8), ("RGBA", (6, 5, 4), np.uint8),
    ("I;16", (6, 5), np.uint16), ("1", (6, 5), np.uint8), ("CMYK", (6, 5, 3), np.uint8),
])
def test_read_image_modes(tmp_path, mode, shape, dtype):
    picture = Image.new(mode, (5, 6))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    picture.save(path)
    image = read_image(path)
    assert image.shape == shape and image.dtype == dtype


def test_read_image_palette_with_transparency_is_rgba(tmp_path):
    picture = Image.new("P", (4, 3))
    picture.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    picture.putpixel((1, 1), 1)
    picture.save(tmp_path / "p.png", transparency=0)
    image = read_image(tmp_path / "p.png")
    assert image.shape == (3, 4, 4)
    np.testing.assert_array_equal(image[1, 1], [255, 0, 0, 255])
    np.testing.assert_array_equal(image[0, 0, 3], 0)
    picture.save(tmp_path / "q.png")
    assert read_image(tmp_path / "q.png").shape == (3, 4, 3)


def test_read_image_matches_the_pixels_written(tmp_path):
    photo = data.astronaut()
    Image.fromarray(photo).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), photo)
    with pytest.raises(CamError, match="image not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CamError, match="cannot read image .*bad.jpg"):
        read_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("shape, size, resize", [((37, 53), 16, "crop"), ((20, 30), (8, 12), "stretch"),
                                                 ((16, 16), 16, "stretch"), ((300, 200), 224, "crop")])
def test_preprocess_from_a_decoded_picture_equals_from_its_array(mode, shape, size, resize):
    # The reader threads preprocess the decoded Pillow image directly: it must be the array path, bit for bit.
    rng = np.random.default_rng(0)
    channels = {"RGB": (3,), "L": (), "RGBA": (4,)}[mode]
    picture = Image.fromarray(rng.integers(0, 256, (*shape, *channels), dtype=np.uint8), mode)
    p = Preprocess(size, resize=resize)
    x, geometry = p._from_picture(picture)
    want_x, want_geometry = p(np.asarray(picture))
    assert x.dtype == want_x.dtype and np.array_equal(x, want_x) and geometry == want_geometry
