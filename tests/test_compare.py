"""`camcore compare`: method grids, timings and faithfulness figures."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from camcore import Preprocess
from camcore.outputs import title_height
from camcore.cli import main as cli_main
from camcore.compare import DEFAULT_METHODS, compare, grid
from tests.test_explainer import make
from tests.zoo import CASES


def test_compare_maps_equal_explain_and_classes_agree():
    ex, rng = make(preprocess=Preprocess(8, mean=0, std=1))
    images = [rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8) for i in range(3)]
    result = compare(ex, images, methods=["cam", "reciprocam", "cam"], top_k=2, faithfulness=True, steps=4)
    assert result["methods"] == ["cam", "reciprocam"]
    x, _ = Preprocess(8, mean=0, std=1).batch(images)
    for method in result["methods"]:
        expected = ex.explain(x, top_k=2, method=method)
        for j, explained in enumerate(result["explanations"][method]):
            np.testing.assert_allclose(explained.cams, expected.maps[j])
            np.testing.assert_array_equal(explained.classes, expected.classes[j])
            assert explained.maps.shape == (2, 12 + j, 10)
        assert result["seconds_per_image"][method] > 0
        f = result["faithfulness"][method]
        assert 0 <= f["average_drop"] <= 100 and 0 <= f["deletion_auc"] <= 1 and f["steps"] == 4
    assert compare(ex, images, top_k=1)["methods"] == list(DEFAULT_METHODS)


def test_grid_shape_rows_are_classes_columns_methods():
    ex, rng = make(preprocess=Preprocess(8, mean=0, std=1))
    image = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    result = compare(ex, [image], methods=["cam", "eigencam", "ablationcam"], top_k=2)
    cells = [(m, result["explanations"][m][0]) for m in result["methods"]]
    picture = grid(image, cells, ex, width=100)
    assert picture.shape == (2 * (title_height(100) + 50), 300, 3) and picture.dtype == np.uint8
    # the title strips are dark gray, the overlays are not
    assert (picture[0, :, :] == 32).all() and not (picture[title_height(100) + 25, :, :] == 32).all()


@pytest.fixture
def zoo_files(tmp_path):
    model = CASES["gap_gemm"]().save(tmp_path)
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        iio.imwrite(path, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        paths.append(str(path))
    return str(model), paths


def test_cli_compare_writes_grids_and_json(tmp_path, zoo_files, capsys):
    model, images = zoo_files
    out = tmp_path / "out"
    code = cli_main(["compare", model, *images, "--out", str(out), "--methods", "cam,eigencam,reciprocam,scorecam",
                     "--top-k", "3", "--faithfulness", "--steps", "2", "--width", "48", "--max-channels", "4"])
    assert code == 0, capsys.readouterr().err
    assert "reciprocam" in capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["cam", "eigencam", "reciprocam", "scorecam"] and summary["max_channels"] == 4
    assert set(summary["seconds_per_image"]) == set(summary["methods"]) == set(summary["faithfulness"])
    assert [r["grid"] for r in summary["images"]] == ["a.compare.png", "b.compare.png"]
    assert len(summary["images"][0]["classes"]) == 3
    picture = iio.imread(out / "a.compare.png")
    assert picture.shape == (3 * (title_height(48) + 40), 4 * 48, 3)


def test_cli_compare_errors_leave_no_files(tmp_path, zoo_files, capsys):
    model, images = zoo_files
    out = tmp_path / "out"
    assert cli_main(["compare", model, *images, "--out", str(out), "--methods", "cam,bogus"]) == 1
    assert "method must be one of" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["compare", model, "--out", str(out)]) == 1
    assert "no images given" in capsys.readouterr().err


def test_progress_is_called_once_per_method():
    ex, rng = make(preprocess=Preprocess(8, mean=0, std=1))
    calls = []
    compare(ex, [rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)], methods=["cam", "eigencam", "reciprocam"],
            progress=calls.append)
    assert calls == [1, 1, 1]
