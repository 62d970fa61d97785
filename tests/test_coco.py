"""camcore.coco: boxes as COCO detections, read back by pycocotools."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from camcore import InvalidInput, Preprocess
from camcore.coco import coco_detections, write_coco
from tests.test_explainer import make


@pytest.mark.parametrize("top_k, sizes", [(1, ((20, 30), (31, 17))), (3, ((8, 8), (40, 12), (9, 33)))])
def test_pycocotools_reads_the_boxes_of_each_result(tmp_path, top_k, sizes):
    explainer, rng = make(k=3, c=5)
    (tmp_path / "photos").mkdir()
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(tmp_path / "photos" / f"im{i}.png"))
        image = np.zeros((h, w, 3), np.uint8)
        image[h // 4: h // 2, w // 3: w // 2] = rng.integers(100, 255, 3)  # a spot, so boxes are not the whole image
        Image.fromarray(image).save(paths[-1])
    paths.append(str(tmp_path / "photos" / "missing.png"))
    results = list(explainer.iter_explain_images(paths, top_k=top_k, errors="report",
                                                 preprocess=Preprocess(8, mean=(0, 0, 0), std=(1, 1, 1))))
    path = write_coco(tmp_path / "coco.json", results, class_name=lambda c: f"class{c}", num_classes=5,
                      root=tmp_path / "photos")
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == [0, 1, 2, 3, 4]
    assert coco.loadCats(3)[0]["name"] == "class3"
    detections = coco.loadRes(json.loads(path.read_text())["annotations"])
    explained = [r for r in results if r.error is None]
    assert coco.getImgIds() == list(range(1, len(explained) + 1))  # the failed image is left out
    count = 0
    for image_id, result in zip(coco.getImgIds(), explained):
        info = coco.loadImgs(image_id)[0]
        assert (info["height"], info["width"]) == tuple(result.size)
        assert tmp_path / "photos" / info["file_name"] == tmp_path / "photos" / result.source.rsplit("/", 1)[1]
        for db in (coco, detections):
            anns = db.loadAnns(db.getAnnIds(imgIds=image_id))
            by_class = {a["category_id"]: a for a in anns}
            assert len(by_class) == len(anns)
            for j, c in enumerate(result.classes):
                x0, y0, x1, y1 = result.box(j)
                x, y, w, h = by_class[int(c)]["bbox"]
                assert (x, y, x + w, y + h) == (x0, y0, x1, y1)
                assert by_class[int(c)]["score"] == pytest.approx(float(result.scores[j]), abs=1e-6)
                assert by_class[int(c)]["area"] == w * h
        count += len(result.classes)
    assert len(detections.getAnnIds()) == count


def test_constant_maps_give_no_annotation_and_categories_default_to_the_used_classes():
    from camcore.explainer import ImageExplanation

    r = ImageExplanation("a.png", (4, 4), np.array([2, 7]), np.array([0.5, 0.25], np.float32),
                         [np.zeros((0, 4), np.int64), np.array([[0, 1, 3, 4]])], np.zeros((2, 2, 2), np.float32), None)
    coco = coco_detections([r])
    assert [c["id"] for c in coco["categories"]] == [2, 7]
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(7, [0, 1, 3, 3])]
    record = {"path": "a.png", "width": 4, "height": 4, "error": None, "classes": [
        {"index": 2, "name": "two", "score": 0.5, "box": None}, {"index": 7, "name": "seven", "score": 0.25,
                                                                  "box": [0, 1, 3, 4]}]}
    assert coco_detections([record]) == {**coco, "categories": [{"id": 2, "name": "two", "supercategory": ""},
                                                                 {"id": 7, "name": "seven", "supercategory": ""}]}
    with pytest.raises(InvalidInput, match="ImageExplanation"):
        coco_detections([{"path": "a.png"}])
