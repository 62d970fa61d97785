"""`camcore.evaluation` and `camcore eval` on synthetic datasets with models whose answers are known."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import camcore
from camcore import Explainer, Head, Preprocess, TensorSpec
from camcore.cli import main as cli_main
from camcore.errors import InvalidInput
from camcore.evaluation import GRID, evaluate, grid_boxes, grid_mask
from camcore.metrics import box_accuracies
from camcore.preprocess import Geometry
from camcore.wsol import read_dataset
from tests.fakes import gap_linear_head

FIGURES = ("top1_loc", "top5_loc", "gt_known_loc", "max_box_acc_v1", "max_box_acc_v2", "pxap", "top1_cls",
           "top5_cls")
# classes 0-2 read the R, G, B channels; 3-5 weigh every channel negatively, so they rank last
WEIGHTS = np.concatenate([np.eye(3), -np.ones((3, 3))]).astype(np.float32)


class ColorBackend:
    """GAP + linear model in NumPy: features are the input's channels averaged over `cell` x `cell` blocks.

    The CAM of class c < 3 is channel c of the image at 1/`cell` resolution, so a
    red object is found by class 0, green by 1, blue by 2.  `fixed` gives the
    input a fixed batch size; `constant` and `center` replace the features by a
    constant or by a centred bump that ignores the image (the center baseline).
    """

    def __init__(self, size=224, cell=1, fixed=None, features="image"):
        batch = "N" if fixed is None else fixed
        spec = TensorSpec("x", (batch, 3, size, size), np.dtype(np.float32))
        self.head = Head(weights=WEIGHTS, bias=np.zeros(6, np.float32), feature="f", logits="logits",
                         layout="NCHW", pooling="GlobalAveragePool", input=spec, inputs=(spec,), scoring="softmax")
        self.cell, self.features, self.calls = cell, features, []

    def run(self, inputs):
        x = inputs["x"]
        n, c, h, w = x.shape
        if self.head.input.shape[0] != "N":
            assert n == self.head.input.shape[0]
        self.calls.append(n)
        f = x.reshape(n, c, h // self.cell, self.cell, w // self.cell, self.cell).mean(axis=(3, 5))
        logits = f.mean(axis=(2, 3)) @ WEIGHTS.T
        if self.features == "constant":
            f = np.ones_like(f)
        elif self.features == "center":
            yy, xx = np.mgrid[: f.shape[2], : f.shape[3]]
            bump = np.exp(-(((yy - (f.shape[2] - 1) / 2) ** 2 + (xx - (f.shape[3] - 1) / 2) ** 2) / (f.shape[2] ** 2 / 8)))
            f = np.broadcast_to(bump, f.shape).astype(np.float32)
        return f, logits

    def run_head(self, features, seeds=None):
        return gap_linear_head(features, WEIGHTS, np.zeros(6, np.float32), "NCHW", seeds)


def explainer(**kwargs):
    size = kwargs.get("size", 224)
    return Explainer(ColorBackend(**kwargs), preprocess=Preprocess(size, mean=0, std=1))


def paint(shape, objects, texture_seed=None):
    """An RGB uint8 image: black or a gray texture, with (channel, inclusive box) rectangles at 255."""
    if texture_seed is None:
        image = np.zeros(shape + (3,), np.uint8)
    else:
        rng = np.random.default_rng(texture_seed)
        image = np.repeat(rng.integers(20, 60, shape, dtype=np.uint8)[..., None], 3, axis=2)
    for channel, (x0, y0, x1, y1) in objects:
        image[y0 : y1 + 1, x0 : x1 + 1] = 0
        image[y0 : y1 + 1, x0 : x1 + 1, channel] = 255
    return image


def write_dataset(root: Path, items, fmt="wsol"):
    """`items`: (image_id, label, objects, gt_boxes). Writes images and metadata; returns the metadata folder."""
    images, meta = root / "images", root / f"meta-{fmt}"
    meta.mkdir(parents=True)
    for image_id, _, image, _ in items:
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(images / image_id, image)
    if fmt == "wsol":
        (meta / "image_ids.txt").write_text("".join(f"{i[0]}\n" for i in items))
        (meta / "class_labels.txt").write_text("".join(f"{i[0]},{i[1]}\n" for i in items))
        (meta / "localization.txt").write_text(
            "".join(f"{i[0]},{','.join(map(str, b))}\n" for i in items for b in i[3]))
    else:
        (meta / "LOC_synset_mapping.txt").write_text("".join(f"n{c:08d} class {c}\n" for c in range(6)))
        for image_id, label, _, gt in items:
            objects = "".join(
                f"<object><name>n{label:08d}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>\n" for b in gt)
            (meta / f"{Path(image_id).stem}.xml").write_text(
                f"<annotation>\n<filename>{image_id}</filename>\n{objects}</annotation>\n")
    return meta


def hand_items():
    """Four 224 x 224 images whose figures are worked out by hand (see test_hand_computed_figures)."""
    shape = (GRID, GRID)
    return [
        ("a.png", 0, paint(shape, [(0, (20, 30, 79, 79))]), [(20, 30, 79, 79)]),
        ("b.png", 1, paint(shape, [(1, (100, 100, 159, 199))]), [(100, 100, 159, 199)]),
        # green object labelled blue: misclassified, and the blue CAM is all zeros
        ("c.png", 2, paint(shape, [(1, (50, 50, 99, 99))]), [(50, 50, 99, 99)]),
        # two red objects, only the small one annotated: V2 finds it, V1 and the heuristic take the big one
        ("d.png", 0, paint(shape, [(0, (10, 10, 109, 109)), (0, (150, 150, 169, 169))]), [(150, 150, 169, 169)]),
    ]


def figures(result):
    return {key: result[key] for key in FIGURES}


@pytest.mark.parametrize("fmt", ["wsol", "voc"])
def test_hand_computed_figures(tmp_path, fmt):
    meta = write_dataset(tmp_path, hand_items(), fmt)
    result = evaluate(explainer(), read_dataset(meta, images_root=tmp_path / "images"), tmp_path / "images")
    # a, b: right class, exact map. c: class 1 wins (2 is third, in the top 5), zero map for class 2.
    # d: the largest contour / component is the unannotated object.
    # Maps are exactly 1 on the objects and 0 elsewhere, so every threshold gives the same boxes.
    assert figures(result) == {"top1_loc": 50.0, "top5_loc": 50.0, "gt_known_loc": 50.0, "max_box_acc_v1": 50.0,
                               "max_box_acc_v2": 75.0, "pxap": None, "top1_cls": 75.0, "top5_cls": 100.0}
    assert result["errors"]["top1_cls"] == 25.0 and result["errors"]["pxap"] is None
    assert result["max_box_acc_v2_per_iou"] == {"0.3": 75.0, "0.5": 75.0, "0.7": 75.0}
    assert result["optimal_thresholds"] == {"max_box_acc_v1": 0.0,
                                            "max_box_acc_v2": {"0.3": 0.0, "0.5": 0.0, "0.7": 0.0}}
    assert result["counts"] == {"evaluated": 4, "unannotated": 0, "listed": 4}
    assert result["dataset"]["source"] == ("voc" if fmt == "voc" else "wsolevaluation")
    assert len(result["thresholds"]) == 100 and result["iou_thresholds"] == [0.3, 0.5, 0.7]


def test_perfect_maps_give_100(tmp_path):
    meta = write_dataset(tmp_path, hand_items()[:2])
    result = evaluate(explainer(), read_dataset(meta), tmp_path / "images")
    assert all(result[key] == 100.0 for key in FIGURES if key != "pxap")


def test_constant_and_center_baselines(tmp_path):
    shape = (GRID, GRID)
    centred = (72, 72, 151, 151)  # 80 x 80 around the centre
    items = [("c1.png", 0, paint(shape, [(0, centred)]), [centred]),
             ("c2.png", 1, paint(shape, [(1, centred)]), [centred]),
             ("off.png", 2, paint(shape, [(2, (0, 0, 49, 49))]), [(0, 0, 49, 49)])]
    meta = write_dataset(tmp_path, items)
    dataset = read_dataset(meta)
    # a constant CAM normalizes to zeros (wsolevaluation's normalize_scoremap): no box at all
    constant = evaluate(explainer(features="constant"), dataset, tmp_path / "images")
    assert [constant[k] for k in ("top1_loc", "gt_known_loc", "max_box_acc_v1", "max_box_acc_v2")] == [0.0] * 4
    assert constant["top1_cls"] == 100.0
    # the center baseline (one centred bump for every image) localizes exactly the centred objects
    center = evaluate(explainer(features="center"), dataset, tmp_path / "images")
    assert center["max_box_acc_v1"] == pytest.approx(200 / 3)
    assert center["max_box_acc_v2_per_iou"]["0.5"] == pytest.approx(200 / 3)


def textured_items(n=11, seed=0):
    """Objects of random colour and size pasted onto gray textures, images of assorted sizes."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
        label = int(rng.integers(0, 3))
        bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
        extra = [(label, (0, 0, 5, 5))] if i % 4 == 0 else []  # a small distractor in a corner
        items.append((f"set/{i:02d}.png", label, paint((h, w), [(label, box)] + extra, texture_seed=i), [box]))
    return items


def test_figures_independent_of_batch_size_and_fixed_batches(tmp_path):
    meta = write_dataset(tmp_path, textured_items())
    dataset = read_dataset(meta)
    runs = [evaluate(explainer(size=64, cell=8), dataset, tmp_path / "images", batch_size=b) for b in (1, 3, 16)]
    fixed = explainer(size=64, cell=8, fixed=4)
    runs.append(evaluate(fixed, dataset, tmp_path / "images", batch_size=1))
    assert fixed.backend.calls == [4, 4, 4]  # 11 images: the last chunk is padded
    strip = ("seconds", "images_per_second")
    first = {k: v for k, v in runs[0].items() if k not in strip}
    for other in runs[1:]:
        assert {k: v for k, v in other.items() if k not in strip} == first
    # the model finds the objects: sensible, not perfect (8x8 features)
    assert first["top1_cls"] == 100.0 and first["max_box_acc_v2"] > 50


def test_save_maps_layout_and_cross_check(tmp_path):
    items = textured_items(5, seed=3)
    meta = write_dataset(tmp_path, items)
    dataset = read_dataset(meta)
    maps_dir = tmp_path / "scoremaps"
    result = evaluate(explainer(size=64, cell=8), dataset, tmp_path / "images", save_maps=maps_dir)
    # wsolevaluation's CamDataset reads <root>/<image_id>.npy, float64, 224 x 224, in [0, 1]
    loaded = [np.load(maps_dir / f"{s.image_id}.npy") for s in dataset.samples]
    assert all(m.dtype == np.float64 and m.shape == (GRID, GRID) for m in loaded)
    assert all(m.min() == 0 and m.max() == 1 for m in loaded)
    geometries = [Geometry((img.shape[0], img.shape[1]), (0, 0, img.shape[1], img.shape[0]), (64, 64))
                  for _, _, img, _ in items]
    again = box_accuracies(np.stack(loaded), [grid_boxes(s.boxes, g) for s, g in zip(dataset.samples, geometries)])
    assert again.all.value == result["max_box_acc_v2"]
    assert again.largest.per_iou[1] == result["max_box_acc_v1"]


def test_masks_give_pxap(tmp_path):
    shape = (GRID, GRID)
    images, meta = tmp_path / "images", tmp_path / "meta"
    (images / "val").mkdir(parents=True)
    meta.mkdir()
    lines = []
    for i, channel in enumerate((0, 1)):
        box = (30 + 20 * i, 40, 120 + 20 * i, 150)
        iio.imwrite(images / f"val/{i}.png", paint(shape, [(channel, box)]))
        mask = np.zeros(shape, np.uint8)
        mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = 255
        iio.imwrite(images / f"val/{i}_m.png", mask)
        lines.append(f"val/{i}.png,val/{i}_m.png,\n")
    (meta / "image_ids.txt").write_text("val/0.png\nval/1.png\n")
    (meta / "class_labels.txt").write_text("val/0.png,0\nval/1.png,1\n")
    (meta / "localization.txt").write_text("".join(lines))
    result = evaluate(explainer(), read_dataset(meta), images)
    assert result["pxap"] == 100.0
    assert result["max_box_acc_v2"] is None and result["top1_loc"] is None and result["top1_cls"] == 100.0
    # the ignore region drops pixels from the count: a wrong class map scored against the masks
    ignore = np.zeros(shape, np.uint8)
    ignore[:, :112] = 255
    iio.imwrite(images / "val/ignore.png", ignore)
    (meta / "class_labels.txt").write_text("val/0.png,1\nval/1.png,1\n")  # image 0: green CAM is all zeros
    constant = evaluate(explainer(), read_dataset(meta), images)["pxap"]
    (meta / "localization.txt").write_text(lines[0].replace(",\n", ",val/ignore.png\n") + lines[1])
    ignored = evaluate(explainer(), read_dataset(meta), images)["pxap"]
    assert 0 < constant < ignored < 100


def test_grid_boxes_and_masks_follow_the_geometry():
    stretch = Geometry((375, 500), (0, 0, 500, 375), (224, 224))
    # wsolevaluation's resize_bbox: int(x * 224 / 500), int(y * 224 / 375)
    assert grid_boxes([[156, 163, 318, 230], [0, 0, 499, 374]], stretch).tolist() == [
        [69, 97, 142, 137], [0, 0, 223, 223]]
    crop = Geometry((300, 400), (50, 0, 350, 300), (224, 224))
    assert grid_boxes([[50, 0, 349, 299], [0, 10, 60, 20], [360, 0, 399, 10]], crop).tolist() == [
        [0, 0, 223, 223], [0, 7, 7, 14], [223, 0, 223, 7]]
    mask = np.arange(300 * 400).reshape(300, 400)
    out = grid_mask(mask, crop)
    assert out.shape == (224, 224) and out[0, 0] == 50 and out[-1, -1] == mask[298, 50 + 298]


def test_evaluate_validates(tmp_path):
    meta = write_dataset(tmp_path, hand_items()[:1])
    dataset = read_dataset(meta)
    with pytest.raises(InvalidInput, match="top_k must be an int in"):
        evaluate(explainer(), dataset, tmp_path / "images", top_k=7)
    (meta / "class_labels.txt").write_text("a.png,9\n")
    with pytest.raises(InvalidInput, match="has class 9, but the model has 6 classes"):
        evaluate(explainer(), read_dataset(meta), tmp_path / "images")


# ----------------------------------------------------------------- command line (embedded model)


def test_cli_eval_json_warning_and_maps(tmp_path, capsys):
    items = hand_items()[:2]
    meta = write_dataset(tmp_path, items)
    (meta / "image_ids.txt").write_text("a.png\nb.png\nlonely.png\n")
    out = tmp_path / "out.json"
    code = cli_main(["eval", "--metadata", str(meta), "--images", str(tmp_path / "images"), "--json", str(out),
                     "--save-maps", str(tmp_path / "maps"), "--batch-size", "1", "--thresholds", "0:1:0.05"])
    captured = capsys.readouterr()
    assert code == 0
    assert "1 listed images have no annotations and are left out (first: lonely.png)" in captured.err
    assert "MaxBoxAccV2" in captured.out
    result = json.loads(out.read_text())
    assert set(FIGURES) <= set(result) and result["pxap"] is None
    assert result["unannotated"] == ["lonely.png"] and result["counts"]["listed"] == 3
    assert len(result["thresholds"]) == 20
    assert result["model"]["path"].endswith("efficientnet_lite0.onnx") and len(result["model"]["sha256"]) == 64
    assert result["preprocess"]["resize"] == "stretch" and result["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.png.npy", "b.png.npy"]


def test_cli_eval_errors(tmp_path, capsys):
    meta = write_dataset(tmp_path, hand_items()[:1])
    (meta / "localization.txt").write_text("a.png,1,2,3\n")
    code = cli_main(["eval", "--metadata", str(meta), "--images", str(tmp_path / "images")])
    assert code == 1
    assert f"{meta / 'localization.txt'}, line 1: expected 'path,x0,y0,x1,y1'" in capsys.readouterr().err
    code = cli_main(["eval", "model.pt", "--metadata", str(meta), "--images", str(tmp_path / "images")])
    assert code == 1 and "MODEL must be an .onnx file" in capsys.readouterr().err
    (meta / "localization.txt").write_text("a.png,1,2,3,4\n")
    (tmp_path / "images" / "a.png").unlink()
    code = cli_main(["eval", "--metadata", str(meta), "--images", str(tmp_path / "images")])
    assert code == 1 and "image not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", "--metadata", str(meta), "--images", "x", "--thresholds", "0:2:0.1"])


# ----------------------------------------------------------------- real photos (embedded model)


def test_real_photos_with_the_embedded_model(tmp_path):
    from skimage import data

    images, meta = tmp_path / "images", tmp_path / "meta"
    images.mkdir()
    meta.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        iio.imwrite(images / f"{name}.png", getattr(data, name)())
    (meta / "image_ids.txt").write_text("chelsea.png\ncoffee.png\nrocket.png\n")
    # hand-made boxes: the cat fills the middle and left; the cup on its saucer; rocket left unannotated
    (meta / "class_labels.txt").write_text("chelsea.png,285\ncoffee.png,967\n")
    (meta / "localization.txt").write_text("chelsea.png,0,0,399,299\ncoffee.png,75,15,480,390\n")
    ex = camcore.load()
    result = evaluate(ex, read_dataset(meta), images)
    assert result["unannotated"] == ["rocket.png"]
    assert result["top1_cls"] == 100.0 and result["top5_cls"] == 100.0
    assert result["top1_loc"] == 100.0 and result["gt_known_loc"] == 100.0
    assert result["max_box_acc_v1"] == 100.0 and result["max_box_acc_v2"] >= 50.0
    assert 0 <= result["optimal_thresholds"]["max_box_acc_v1"] < 0.6


def test_cli_eval_with_an_onnx_model(tmp_path, capsys):
    import hashlib

    from tests.zoo import CASES

    zm = CASES["hot_spot_nchw"]()  # input fixed to (1, 3, 9, 7): batches of one, padded
    model = zm.save(tmp_path)
    meta = write_dataset(tmp_path, hand_items()[:3])
    out = tmp_path / "out.json"
    code = cli_main(["eval", str(model), "--metadata", str(meta), "--images", str(tmp_path / "images"),
                     "--json", str(out), "--top-k", "2", "--quiet"])
    assert code == 0 and capsys.readouterr().out == ""
    result = json.loads(out.read_text())
    assert result["model"] == {"path": str(model), "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert result["counts"]["evaluated"] == 3 and result["top_k"] == 2
    assert result["top5_loc"] is None and result["top5_cls"] is None
    assert result["preprocess"]["size"] == [9, 7] and result["preprocess"]["resize"] == "crop"
    assert all(0 <= result[k] <= 100 for k in ("top1_loc", "gt_known_loc", "max_box_acc_v2", "top1_cls"))


def test_faithfulness_figures_by_hand(tmp_path):
    """Exact maps (1 on the object, 0 elsewhere) of a black image: masking by them changes nothing."""
    meta = write_dataset(tmp_path, hand_items()[:2])
    result = evaluate(explainer(), read_dataset(meta), tmp_path / "images", faithfulness=True, steps=16,
                      batch_size=7)
    faithful = result["faithfulness"]
    assert faithful["average_drop"] == pytest.approx(0, abs=1e-9)
    assert faithful["increase_in_confidence"] == 0.0  # equal scores are no increase
    assert faithful["pointing_game"] == 100.0

    def p(m):  # class c reads mean m of its channel: logits m, 0, 0, -m, -m, -m
        return np.exp(m) / (np.exp(m) + 2 + 3 * np.exp(-m))

    pixels, step = GRID * GRID, GRID * GRID // 16
    # a: 60 x 50 red pixels, all removed at step 1; b: 60 x 100 green pixels, removed in two steps
    curve_a = [p(3000 / pixels)] + [1 / 6] * 16
    curve_b = [p(6000 / pixels), p((6000 - step) / pixels)] + [1 / 6] * 15
    auc = [(sum(c) - (c[0] + c[-1]) / 2) / 16 for c in (curve_a, curve_b)]
    assert faithful["deletion_auc"] == pytest.approx(np.mean(auc), rel=1e-5)
    assert 1 / 6 - 1e-6 <= faithful["insertion_auc"] <= max(curve_a + curve_b)
    assert faithful["steps"] == 16 and faithful["insertion_baseline"] == "blur"
    assert evaluate(explainer(), read_dataset(meta), tmp_path / "images")["faithfulness"] is None


def test_cli_eval_faithfulness(tmp_path, capsys):
    meta = write_dataset(tmp_path, hand_items()[:1])
    out = tmp_path / "out.json"
    code = cli_main(["eval", "--metadata", str(meta), "--images", str(tmp_path / "images"), "--json", str(out),
                     "--faithfulness", "--steps", "2"])
    assert code == 0
    assert "deletion AUC" in capsys.readouterr().out
    faithful = json.loads(out.read_text())["faithfulness"]
    assert set(faithful) >= {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc",
                             "pointing_game"} and faithful["steps"] == 2
    assert 0 <= faithful["deletion_auc"] <= 1 and 0 <= faithful["average_drop"] <= 100
