"""save_maps / load_maps round trips."""

import numpy as np
import pytest
from PIL import Image

import camcore
from camcore import InvalidInput, Preprocess
from camcore.saved_maps import load_maps, save_maps
from camcore.targets import Targets
from tests.test_explainer import make


def _results(tmp_path, *, top_k=2, resize="crop", sizes=((20, 30), (31, 17), (8, 8)), bad=True, **kwargs):
    explainer, rng = make(k=3, c=5)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(paths[-1])
    if bad:
        paths.insert(1, str(tmp_path / "missing.png"))
    preprocess = Preprocess(8, resize=resize, mean=(0, 0, 0), std=(1, 1, 1))
    results = list(explainer.iter_explain_images(paths, preprocess=preprocess, top_k=top_k, errors="report", **kwargs))
    return explainer, results


@pytest.mark.parametrize("resize, top_k", [("crop", 2), ("stretch", 1), ("crop", 5)])
def test_float32_round_trip_is_exact(tmp_path, resize, top_k):
    explainer, results = _results(tmp_path, top_k=top_k, resize=resize)
    path = save_maps(tmp_path / "maps.npz", results, class_names=["a", "b", "c", "d", "e"])
    back = load_maps(path)
    assert len(back) == len(results)
    for got, want in zip(back, results):
        assert (got.source, got.size, got.error, got.method, got.upsample) == \
               (want.source, want.size, want.error, want.method, want.upsample)
        np.testing.assert_array_equal(got.classes, want.classes)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.cams, want.cams)
        assert got.cams.dtype == np.float32
        assert got.geometry == want.geometry
        np.testing.assert_array_equal(got.maps, want.maps)
        assert [got.box(j) for j in range(len(got.classes))] == [want.box(j) for j in range(len(want.classes))]
    assert back[1].error is not None and len(back[1].classes) == 0
    with np.load(path) as raw:
        assert raw["class_names"].tolist() == [["a", "b", "c", "d", "e"][c] for c in raw["classes"]]
        assert raw["cams"].dtype == np.float32


def test_float16_round_trip_within_float16_tolerance(tmp_path):
    explainer, results = _results(tmp_path, top_k=3)
    path = save_maps(tmp_path / "maps16.npz", results, dtype="float16")
    with np.load(path) as raw:
        assert raw["cams"].dtype == np.float16
    for got, want in zip(load_maps(path), results):
        if want.error is not None:
            continue
        scale = np.abs(want.cams).max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(got.cams, want.cams, rtol=0, atol=float(scale.max()) * 2 ** -10)
        np.testing.assert_allclose(got.maps, want.maps, rtol=0, atol=5e-3)
        assert [got.box(j) for j in range(3)] == [want.box(j) for j in range(3)]


def test_ragged_classes_round_trip(tmp_path):
    explainer, results = _results(tmp_path, bad=False, classes=Targets([[0], [1, 2, 4], [3, 0]]))
    back = load_maps(save_maps(tmp_path / "m.npz", results, class_names=explainer.class_name))
    assert [r.classes.tolist() for r in back] == [[0], [1, 2, 4], [3, 0]]
    for got, want in zip(back, results):
        np.testing.assert_array_equal(got.maps, want.maps)


def test_real_model_round_trip(tmp_path):
    from skimage import data

    explainer = camcore.load()
    results = explainer.explain_images([data.chelsea(), data.coffee()], top_k=2)
    back = load_maps(save_maps(tmp_path / "m.npz", results))
    for got, want in zip(back, results):
        np.testing.assert_array_equal(got.maps, want.maps)
        assert got.box(0) == want.box(0) and got.box(1) == want.box(1)
        assert got.source is None


def test_bad_inputs(tmp_path):
    explainer, results = _results(tmp_path)
    with pytest.raises(InvalidInput, match="dtype must be"):
        save_maps(tmp_path / "m.npz", results, dtype="int8")
    with pytest.raises(InvalidInput, match="ImageExplanation"):
        save_maps(tmp_path / "m.npz", [1, 2])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="cannot read maps file"):
        load_maps(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(InvalidInput, match="not a camcore maps file"):
        load_maps(tmp_path / "other.npz")
    assert not list(tmp_path.glob(".m.npz*"))  # no temporary file left


def test_bytes_and_file_objects(tmp_path):
    import io

    explainer, results = _results(tmp_path, bad=False)
    blob = save_maps(None, results)
    assert isinstance(blob, bytes)
    for got, want in zip(load_maps(io.BytesIO(blob)), results):
        np.testing.assert_array_equal(got.maps, want.maps)
