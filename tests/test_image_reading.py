"""Images read as people see them: 16/32-bit files scaled from their full bit depth, EXIF orientation applied.

The embedded EfficientNet-Lite0 (real ImageNet weights) on scikit-image's chelsea: a 16-bit
file must give what its 8-bit twin gives, and a phone JPEG stored sideways with EXIF
orientation 6 what the upright photo gives, with sizes and boxes in the upright frame.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

import camcore
from camcore import default_model
from camcore.errors import CamError, InvalidInput
from camcore.preprocess import Preprocess, bit_depth_scale, read_image

ORIENTATION = 0x0112
CATS = range(281, 286)


@pytest.fixture(scope="module")
def lite0():
    return camcore.load(providers=["CPUExecutionProvider"])


def _gray(rgb: np.ndarray) -> np.ndarray:
    """Luma on 0..1 (float64), the picture both twins are made from."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------- bit depth


def test_bit_depth_scale():
    assert bit_depth_scale(np.uint8) == 1.0
    assert bit_depth_scale(np.uint16) * 65535 == pytest.approx(255)
    assert bit_depth_scale(np.int64) == 1.0  # integer arrays made from 8-bit images


@pytest.mark.parametrize("size", [(7, 5), (12, 10)])
def test_uint16_is_its_8_bit_twin(size):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    p = Preprocess(size, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    x8, _ = p(rgb)
    x16, _ = p(rgb.astype(np.uint16) * 257)  # 255 -> 65535: the same picture at 16 bits
    np.testing.assert_allclose(x16, x8, atol=0.02)  # x8 resized in uint8 (rounded), x16 in float
    x16_full, _ = p(np.full((4, 4), 65535, np.uint16))
    np.testing.assert_allclose(x16_full[0, 0], (1 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.3, 0.4]),
                               rtol=1e-6)


def test_read_image_integer_and_float_modes(tmp_path):
    gray = _gray(data.chelsea())[:40, :50]
    Image.fromarray((gray * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((gray * 65535).round().astype(np.int32)).save(tmp_path / "i16.tif")  # mode I, 16-bit data
    Image.fromarray((gray * 2**31 - 1).astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 31-bit data
    Image.fromarray(gray.astype(np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "i16.tif").mode == Image.open(tmp_path / "i32.tif").mode == "I"
    g16 = read_image(tmp_path / "g16.png")
    assert g16.dtype == np.uint16 and g16.shape == (40, 50)
    i16 = read_image(tmp_path / "i16.tif")
    assert i16.dtype == np.uint16
    np.testing.assert_array_equal(i16, g16)
    i32 = read_image(tmp_path / "i32.tif")
    assert i32.dtype == np.float32
    np.testing.assert_allclose(i32, gray, atol=1e-6)
    f = read_image(tmp_path / "f.tif")
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, gray, atol=1e-7)


def test_negative_32_bit_values_read_as_zero(tmp_path):
    values = np.array([[-5, 0], [2**30, 2**31 - 1]], np.int32)
    Image.fromarray(values).save(tmp_path / "neg.tif")
    np.testing.assert_allclose(read_image(tmp_path / "neg.tif"), [[0, 0], [0.5, 1]], atol=1e-6)


@pytest.mark.parametrize("scale", [1 / 255, 1.0])
def test_every_bit_depth_file_gives_the_8_bit_input(tmp_path, scale):
    """8-bit PNG, 16-bit PNG and TIFF, 32-bit integer and float TIFF of one picture: one model input."""
    gray = _gray(data.chelsea())
    files = {
        "l8.png": Image.fromarray((gray * 255).round().astype(np.uint8)),
        "g16.png": Image.fromarray((gray * 65535).round().astype(np.uint16)),
        "g16.tif": Image.fromarray((gray * 65535).round().astype(np.uint16)),
        "i32.tif": Image.fromarray((gray * (2**31 - 1)).astype(np.int32)),
        "f32.tif": Image.fromarray(gray.astype(np.float32)),
    }
    p = Preprocess(32, mean=0.5, std=0.25, scale=scale)
    expected, _ = p(gray * 255 * scale)  # float arrays are taken as already scaled
    for name, picture in files.items():
        picture.save(tmp_path / name)
        from camcore.preprocess import _read_picture

        x, geometry = p._from_picture(_read_picture(tmp_path / name))
        assert geometry.original_size == gray.shape
        np.testing.assert_allclose(x, expected, atol=0.02 / 0.25 * 255 * scale, err_msg=name)


def test_16_bit_png_gives_its_8_bit_twins_result(lite0, tmp_path):
    """A 16-bit gray PNG: the same top-1 and maps correlated >= 0.99 with its 8-bit twin."""
    gray = _gray(data.chelsea())
    Image.fromarray((gray * 255).round().astype(np.uint8)).save(tmp_path / "chelsea8.png")
    Image.fromarray((gray * 65535).round().astype(np.uint16)).save(tmp_path / "chelsea16.png")
    assert Image.open(tmp_path / "chelsea16.png").mode == "I;16"
    r8, r16 = lite0.explain_images([tmp_path / "chelsea8.png", tmp_path / "chelsea16.png"], top_k=3)
    assert r8.classes[0] == r16.classes[0]
    assert r16.scores[0] == pytest.approx(r8.scores[0], abs=0.02)
    assert r8.size == r16.size == gray.shape
    assert _correlation(r8.maps[0], r16.maps[0]) >= 0.99
    assert _iou(r8.box(0), r16.box(0)) >= 0.9


# --------------------------------------------------------------------------- EXIF orientation


def _stored_sideways(upright: np.ndarray, path: Path, orientation: int) -> None:
    """Save `upright` as a camera does: pixels as the sensor read them, plus the orientation tag."""
    stored = Image.fromarray(upright)
    # The inverse of what a viewer does (Pillow's exif_transpose) for each orientation.
    inverse = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
               6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}
    for step in inverse[orientation]:
        stored = stored.transpose(step)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_read_image_applies_every_orientation(tmp_path, orientation):
    upright = np.zeros((6, 10, 3), np.uint8)
    upright[:2, :3] = 255  # a white block at the top left
    _stored_sideways(upright, tmp_path / "x.png", orientation)  # PNG: lossless, with an eXIf chunk
    image = read_image(tmp_path / "x.png")
    np.testing.assert_array_equal(image, upright)
    stored = read_image(tmp_path / "x.png", exif_orientation=False)
    assert stored.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    assert not np.array_equal(stored, upright) if orientation >= 5 else True


def test_exif_orientation_6_jpeg_gives_the_upright_result(lite0, tmp_path):
    """A phone JPEG stored sideways (orientation 6): the upright photo's class, score, map and box."""
    upright = data.chelsea()  # (300, 451, 3)
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    _stored_sideways(upright, tmp_path / "phone.jpg", 6)
    stored = Image.open(tmp_path / "phone.jpg")
    assert stored.size == (300, 451) and stored.getexif()[ORIENTATION] == 6  # (W, H): sideways
    up, phone = lite0.explain_images([tmp_path / "upright.jpg", tmp_path / "phone.jpg"], top_k=1)
    assert phone.size == up.size == (300, 451)
    assert phone.classes[0] == up.classes[0] and up.classes[0] in CATS
    assert phone.scores[0] == pytest.approx(up.scores[0], abs=0.02)
    assert _correlation(phone.maps[0], up.maps[0]) >= 0.99
    box = phone.box(0)
    assert box[2] <= 451 and box[3] <= 300  # in the upright frame
    assert _iou(box, up.box(0)) >= 0.9
    # The cat's face is around (x=250, y=110) in the upright photo (tests/test_real_model.py).
    assert box[0] <= 250 < box[2] and box[1] <= 110 < box[3]

    # Turned off: the stored pixels, sideways, as before.
    sideways = lite0.explain_images([tmp_path / "phone.jpg"],
                                    preprocess=Preprocess(**{**_fields(lite0.preprocess), "exif_orientation": False}))
    assert sideways[0].size == (451, 300)


def _fields(p: Preprocess) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def test_arrays_are_never_turned(lite0):
    image = data.chelsea()
    (result,) = lite0.explain_images([image])
    assert result.size == (300, 451)


def test_exif_orientation_option_is_validated():
    with pytest.raises(InvalidInput, match="exif_orientation must be True or False"):
        Preprocess(8, exif_orientation="no")


def test_unreadable_image_still_one_camerror(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(CamError, match="cannot read image"):
        read_image(tmp_path / "bad.jpg")


def _camcore(*args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "camcore.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_cli_results_refer_to_the_upright_image_and_no_exif_turns_it_off(tmp_path):
    import json

    upright = data.chelsea()
    _stored_sideways(upright, tmp_path / "phone.jpg", 6)
    _camcore("explain", tmp_path / "phone.jpg", "--out", tmp_path / "up", "--quiet")
    record = json.loads((tmp_path / "up" / "results.json").read_text())["images"][0]
    assert (record["height"], record["width"]) == (300, 451)
    top = record["classes"][0]
    assert top["index"] in CATS
    x0, y0, x1, y1 = top["box"]
    assert x0 <= 250 < x1 <= 451 and y0 <= 110 < y1 <= 300  # the cat's face, upright
    overlay = np.asarray(Image.open(tmp_path / "up" / "phone.cam.jpg"))  # JPEG in, JPEG overlay out
    assert overlay.shape[1] == 451  # drawn on the upright photo

    _camcore("explain", tmp_path / "phone.jpg", "--out", tmp_path / "stored", "--quiet", "--no-exif")
    record = json.loads((tmp_path / "stored" / "results.json").read_text())["images"][0]
    assert (record["height"], record["width"]) == (451, 300)
