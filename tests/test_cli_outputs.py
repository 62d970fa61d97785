"""The command line's targets and outputs: --classes, --targets, --multilabel, --contrast, --save-maps,
--coco, --report and `camcore report`, end to end in subprocesses."""

import json
import re

import numpy as np
import onnx
import pytest
from PIL import Image
from pycocotools.coco import COCO
from skimage import data

import camcore
from camcore.saved_maps import load_maps
from camcore.targets import Targets
from tests.test_cli import camcore_cli, error_lines
from tests.test_targets import tiny_model

LABELS = {"chelsea": "Egyptian cat", "coffee": "espresso", "rocket": "space shuttle"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    folder.mkdir()
    for name in LABELS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    (root / "labels.csv").write_text("image,label\n" + "".join(f"photos/{n}.png,{c}\n" for n, c in LABELS.items()))
    return root


def test_explain_true_classes_with_maps_coco_and_report(photos, tmp_path):
    out = tmp_path / "out"
    proc = camcore_cli("explain", photos / "photos", "--targets", photos / "labels.csv", "--save-maps",
                       "--coco", tmp_path / "coco.json", "--report", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["targets"] == "targets from labels.csv"
    assert "seconds_per_image" not in results  # results.json is the same from run to run
    records = results["images"]
    assert [r["classes"][0]["name"] for r in records] == [LABELS[n] for n in sorted(LABELS)]
    explainer = camcore.load()
    paths = [r["path"] for r in records]
    want = explainer.explain_images(paths, classes=Targets([[explainer.class_names.index(LABELS[n])]
                                                            for n in sorted(LABELS)]))
    for record, expected in zip(records, want):
        [saved] = load_maps(out / record["maps"])
        np.testing.assert_allclose(saved.cams, expected.cams, rtol=1e-5, atol=1e-5)
        assert saved.box(0) == expected.box(0) == tuple(record["classes"][0]["box"])
        assert (out / record["overlay"]).is_file()
    coco = COCO(str(tmp_path / "coco.json"))
    for image_id, record in zip(coco.getImgIds(), records):
        assert (photos / "photos" / coco.loadImgs(image_id)[0]["file_name"]).resolve() == \
            (photos / "photos" / f"{record['path'].rsplit('/', 1)[1]}").resolve()
        [ann] = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w, y + h] == record["classes"][0]["box"]
        assert coco.loadCats(ann["category_id"])[0]["name"] == record["classes"][0]["name"]
    assert len(coco.getCatIds()) == 1000
    page = (out / "report.html").read_text()
    assert "Egyptian cat" in page and "chelsea.cam.png" in page
    assert re.search(r'"seconds_per_image":[0-9.e-]+[,}]', page)  # the time the run measured

    (out / "report.html").unlink()
    proc = camcore_cli("report", out)
    assert proc.returncode == 0, proc.stderr
    again = (out / "report.html").read_text()
    assert re.sub(r',?"seconds_per_image":[0-9.e-]+', "", page) == again


def test_classes_by_name_and_float16_maps(photos, tmp_path):
    out = tmp_path / "out"
    proc = camcore_cli("explain", photos / "photos" / "chelsea.png", "--classes", "tabby,285", "--save-maps",
                       "--maps-dtype", "float16", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    [record] = json.loads((out / "results.json").read_text())["images"]
    assert [c["index"] for c in record["classes"]] == [281, 285]
    [saved] = load_maps(out / record["maps"])
    assert np.load(out / record["maps"])["cams"].dtype == np.float16
    assert saved.classes.tolist() == [281, 285]


@pytest.mark.parametrize("args, message", [
    (["--classes", "tabby,unicorn"], "unknown class 'unicorn'"),
    (["--classes", "1000"], "class '1000' is out of range"),
    (["--targets", "{labels}"], r"image .*rocket.png has no entry in targets file"),
    (["--targets", "{bad}"], r"bad.csv line 3: expected IMAGE,CLASS"),
    (["--targets", "{unknown}"], r"unknown.csv line 2: unknown class 'kitten'"),
    (["--contrast", "finer", "--method", "ablationcam"], "contrastive targets need one of cam, gradcam"),
    (["--classes", "tabby", "--top-k", "2"], "--top-k and --classes both choose the classes"),
    (["--maps-dtype", "float16"], "--maps-dtype needs --save-maps"),
    (["--results-format", "jsonl"], "--report reads results.json: it needs --results-format json"),
])
def test_bad_input_one_line_and_no_outputs(photos, tmp_path, args, message):
    (tmp_path / "labels.csv").write_text("chelsea.png,tabby\ncoffee.png,espresso\n")
    (tmp_path / "bad.csv").write_text("chelsea.png,tabby\ncoffee.png,espresso\nrocket.png\n")
    (tmp_path / "unknown.csv").write_text("chelsea.png,tabby\ncoffee.png,kitten\nrocket.png,1\n")
    args = [a.format(labels=tmp_path / "labels.csv", bad=tmp_path / "bad.csv", unknown=tmp_path / "unknown.csv")
            for a in args]
    out = tmp_path / "out"
    proc = camcore_cli("explain", photos / "photos", *args, "--save-maps" if "--maps-dtype" not in args else "--quiet",
                       "--coco", tmp_path / "coco.json", "--report", "--out", out)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "coco.json").exists()


def test_multilabel_on_a_sigmoid_model(tmp_path):
    model, _, _ = tiny_model(6, sigmoid=True, seed=11)
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    proc = camcore_cli("explain", tmp_path / "m.onnx", *[tmp_path / f"im{i}.png" for i in range(4)],
                       "--multilabel", "0.4", "--size", "8", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    explainer = camcore.load(tmp_path / "m.onnx")
    from camcore import Preprocess

    for record in json.loads((out / "results.json").read_text())["images"]:
        x, _ = Preprocess.imagenet((8, 8))(np.asarray(Image.open(record["path"])))
        logits = explainer.forward({"x": x.transpose(2, 0, 1)[None].astype(np.float32)})[1][0]
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        assert sorted(c["index"] for c in record["classes"]) == sorted(np.nonzero(p >= 0.4)[0].tolist())
        assert all(c["score"] >= 0.4 for c in record["classes"])


def test_report_command_needs_results(tmp_path):
    proc = camcore_cli("report", tmp_path)
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [f"camcore: error: {tmp_path} holds no results.json or compare.json: "
                                        f"run camcore explain or compare --out {tmp_path}"]


def test_ray_engine_targets_and_maps_per_block(photos, tmp_path):
    from tests.test_distributed import ROOT

    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'camcore[ray]')")
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # Ray puts the driver's working directory on the workers' path: make it this checkout
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        remote = tmp_path / "ray"
        proc = camcore_cli("explain", photos / "photos", "--targets", photos / "labels.csv", "--save-maps",
                           "--contrast", "tabby", "--quiet", "--out", remote, "--engine", "ray",
                           "--address", address, "--batch-size", "2")
        assert proc.returncode == 0, proc.stderr
    finally:
        ray.shutdown()
        os.chdir(cwd)
    got = json.loads((remote / "results.json").read_text())["images"]
    assert [r["classes"][0]["name"] for r in got] == [LABELS[n] for n in sorted(LABELS)]
    assert [(r["maps"], r["maps_index"]) for r in got] == [("maps-000000.npz", 0), ("maps-000000.npz", 1),
                                                           ("maps-000001.npz", 0)]
    explainer = camcore.load()
    rows = [[explainer.class_names.index(LABELS[n])] for n in sorted(LABELS)]
    want = explainer.explain_images([r["path"] for r in got], classes=Targets(rows, contrast=281))
    for record, expected in zip(got, want):  # the same maps as the local engine's, through the API
        saved = load_maps(remote / record["maps"])[record["maps_index"]]
        np.testing.assert_allclose(saved.cams, expected.cams, rtol=1e-5, atol=1e-5)
        assert saved.box(0) == expected.box(0) == tuple(record["classes"][0]["box"])


def test_compare_with_targets_contrast_and_report(photos, tmp_path):
    out = tmp_path / "cmp"
    proc = camcore_cli("compare", photos / "photos", "--targets", photos / "labels.csv", "--contrast", "finer",
                       "--report", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
    assert [r["classes"][0]["name"] for r in summary["images"]] == [LABELS[n] for n in sorted(LABELS)]
    page = (out / "report.html").read_text()
    assert "chelsea.compare.png" in page and "hirescam" in page
    proc = camcore_cli("compare", photos / "photos", "--contrast", "finer", "--methods", "gradcam,eigencam",
                       "--out", tmp_path / "refused")
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == ["camcore: error: contrastive targets need one of cam, gradcam, gradcam++, "
                                        "xgradcam, hirescam, layercam, gae (on a transformer); method 'eigencam' cannot explain a "
                                        "combination of logits"]
    assert not (tmp_path / "refused").exists()


def test_eval_contrast_maps_the_ground_truth_against_the_reference(tmp_path, capsys):
    from camcore.cli import main
    from camcore.evaluation import GRID, evaluate
    from camcore.maps import normalize, upsample
    from camcore.preprocess import read_image
    from camcore.wsol import read_dataset
    from tests.test_evaluation import WEIGHTS, explainer, textured_items, write_dataset

    items = textured_items(4, seed=5)
    meta = write_dataset(tmp_path, items)
    dataset = read_dataset(meta)
    model = explainer(size=64, cell=8)
    result = evaluate(model, dataset, tmp_path / "images", save_maps=tmp_path / "maps", contrast=4, method="cam")
    assert result["contrast"] == 4
    x, _ = model.preprocess.batch([read_image(tmp_path / "images" / s.image_id) for s in dataset.samples],
                                  layout="NCHW", dtype=np.float32)
    features, _ = model.forward({"x": x})
    for n, sample in enumerate(dataset.samples):
        by_hand = np.einsum("k,khw->hw", WEIGHTS[sample.label] - WEIGHTS[4], features[n])
        want = normalize(upsample(by_hand.astype(np.float64), (GRID, GRID), method="bicubic"))
        np.testing.assert_allclose(np.load(tmp_path / "maps" / f"{sample.image_id}.npy"), want, atol=1e-6)
    with pytest.raises(camcore.InvalidInput, match="contrastive targets need one of"):
        evaluate(model, dataset, tmp_path / "images", contrast="finer", method="eigencam")
    assert main(["eval", "--metadata", str(meta), "--images", str(tmp_path / "images"), "--contrast", "unicorn",
                 "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == "camcore: error: contrast: unknown class 'unicorn'"  # embedded model
