"""Reading wsolevaluation metadata folders and Pascal-VOC XML annotations (camcore.wsol)."""

from pathlib import Path

import numpy as np
import pytest

from camcore.errors import InvalidInput
from camcore.wsol import read_dataset, read_synsets, read_voc, read_wsol_metadata


def write_meta(folder: Path, image_ids: str, class_labels: str, localization: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "image_ids.txt").write_text(image_ids)
    (folder / "class_labels.txt").write_text(class_labels)
    (folder / "localization.txt").write_text(localization)
    return folder


VOC = """<annotation>
  <folder>val</folder>
  <filename>{name}</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
{objects}</annotation>
"""
OBJECT = """  <object>
    <name>{synset}</name>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>
  </object>
"""


def write_voc(folder: Path, name: str, objects, stem=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(OBJECT.format(synset=s, x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for s, b in objects)
    path = folder / f"{stem or Path(name).stem}.xml"
    path.write_text(VOC.format(name=name, objects=body))
    return path


def test_wsol_boxes_several_per_image_and_unannotated(tmp_path):
    meta = write_meta(
        tmp_path,
        "val/a.jpg\nval/b.jpg\n\nval/c.jpg\nval/d.jpg\n",
        "val/a.jpg,7\nval/b.jpg,0\nval/c.jpg,2\nother/x.jpg,1\n",
        "val/a.jpg,1,2,30,40\nval/b.jpg,0,0,9,9\nval/a.jpg,5,6,7,8\nval/d.jpg,1,1,2,2\n",
    )
    ds = read_wsol_metadata(meta)
    assert [s.image_id for s in ds.samples] == ["val/a.jpg", "val/b.jpg"]
    assert [s.label for s in ds.samples] == [7, 0]
    assert ds.samples[0].boxes.tolist() == [[1, 2, 30, 40], [5, 6, 7, 8]]
    assert ds.samples[0].boxes.dtype == np.int64
    # c has a label but no box, d a box but no label: both reported, in listing order
    assert ds.unannotated == ["val/c.jpg", "val/d.jpg"]
    assert (ds.kind, ds.source) == ("boxes", "wsolevaluation")
    assert read_dataset(meta).samples[1].boxes.tolist() == [[0, 0, 9, 9]]


def test_wsol_masks_layout_of_openimages(tmp_path):
    # wsolevaluation's OpenImages localization.txt: path,mask,ignore; the ignore mask only on the first line
    meta = write_meta(
        tmp_path,
        "val/0bt_c3/1.jpg\nval/0bt_c3/2.jpg\n",
        "val/0bt_c3/1.jpg,0\nval/0bt_c3/2.jpg,0\n",
        "val/0bt_c3/1.jpg,val/0bt_c3/1_m0bt_c3_a.png,val/0bt_c3/1_ignore.png\n"
        "val/0bt_c3/1.jpg,val/0bt_c3/1_m0bt_c3_b.png,\n"
        "val/0bt_c3/2.jpg,val/0bt_c3/2_m0bt_c3_c.png,\n",
    )
    ds = read_wsol_metadata(meta)
    assert ds.kind == "masks" and ds.unannotated == []
    first, second = ds.samples
    assert first.masks == ("val/0bt_c3/1_m0bt_c3_a.png", "val/0bt_c3/1_m0bt_c3_b.png")
    assert first.ignore == "val/0bt_c3/1_ignore.png"
    assert second.masks == ("val/0bt_c3/2_m0bt_c3_c.png",) and second.ignore is None
    assert first.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "file, content, line, fragment",
    [
        ("class_labels.txt", "a.jpg,1\nb.jpg\n", 2, "expected 'path,class_index'"),
        ("class_labels.txt", "a.jpg,one\n", 1, "class_index must be an integer"),
        ("class_labels.txt", "a.jpg,-1\n", 1, "class_index must be >= 0"),
        ("class_labels.txt", "a.jpg,1\n\na.jpg,2\n", 3, "already has class 1"),
        ("localization.txt", "a.jpg,1,2,3,4\na.jpg,1,2,3\n", 2, "expected 'path,x0,y0,x1,y1'"),
        ("localization.txt", "a.jpg,1,2,3,4.5\n", 1, "y1 must be an integer"),
        ("localization.txt", "a.jpg,5,2,3,4\n", 1, "0 <= x0 <= x1"),
        ("localization.txt", "a.jpg,-1,2,3,4\n", 1, "0 <= x0 <= x1"),
        ("localization.txt", "a.jpg,1,2,3,4\na.jpg,m.png,\n", 2, "expected 'path,x0,y0,x1,y1'"),
        ("localization.txt", "a.jpg,m.png,i.png\na.jpg,n.png,j.png\n", 2, "already has an ignore mask"),
        ("image_ids.txt", "a.jpg\nb.jpg\na.jpg\n", 3, "already listed on line 1"),
        ("image_ids.txt", "a.jpg\n../b.jpg\n", 2, "relative image path inside the root"),
        ("image_ids.txt", "/abs/b.jpg\n", 1, "relative image path inside the root"),
    ],
)
def test_wsol_malformed_lines_name_file_and_line(tmp_path, file, content, line, fragment):
    files = {"image_ids.txt": "a.jpg\nb.jpg\n", "class_labels.txt": "a.jpg,1\nb.jpg,1\n",
             "localization.txt": "a.jpg,1,2,3,4\n"}
    files[file] = content
    meta = write_meta(tmp_path, files["image_ids.txt"], files["class_labels.txt"], files["localization.txt"])
    with pytest.raises(InvalidInput) as info:
        read_wsol_metadata(meta)
    message = str(info.value)
    assert f"{meta / file}, line {line}:" in message
    assert fragment in message


def test_wsol_missing_file(tmp_path):
    write_meta(tmp_path, "a.jpg\n", "a.jpg,0\n", "a.jpg,0,0,1,1\n")
    (tmp_path / "class_labels.txt").unlink()
    with pytest.raises(InvalidInput, match="has no class_labels.txt"):
        read_wsol_metadata(tmp_path)


def test_synsets_by_line_and_duplicates(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850\n")
    assert read_synsets(path) == {"n01440764": 0, "n01443537": 1, "n01484850": 2}
    path.write_text("n01440764 tench\nn01443537\nn01440764 again\n")
    with pytest.raises(InvalidInput, match=r"LOC_synset_mapping.txt, line 3: synset 'n01440764' is already on line 1"):
        read_synsets(path)


def test_voc_imagenet_style(tmp_path):
    ann, images = tmp_path / "ann", tmp_path / "images"
    images.mkdir()
    (images / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    (images / "ILSVRC2012_val_00000002.png").write_bytes(b"")
    (ann / "synsets.txt").parent.mkdir()
    (ann / "synsets.txt").write_text("n01\nn02\nn03\n")
    write_voc(ann, "ILSVRC2012_val_00000001", [("n03", (10, 20, 110, 220)), ("n03", (0, 0, 5, 5))])
    write_voc(ann, "ILSVRC2012_val_00000002", [("n01", (1, 2, 3, 4))])
    write_voc(ann, "ILSVRC2012_val_00000003", [])  # no object: reported
    write_voc(ann, "2007_000027.jpg", [("n02", (174, 101, 349, 351))])  # Pascal VOC keeps the extension
    ds = read_dataset(ann, images_root=images)
    assert ds.source == "voc" and ds.kind == "boxes"
    assert [(s.image_id, s.label) for s in ds.samples] == [
        ("2007_000027.jpg", 1), ("ILSVRC2012_val_00000001.JPEG", 2), ("ILSVRC2012_val_00000002.png", 0)]
    assert ds.samples[1].boxes.tolist() == [[10, 20, 110, 220], [0, 0, 5, 5]]
    assert ds.unannotated == ["ILSVRC2012_val_00000003.JPEG"]


@pytest.mark.parametrize(
    "objects, raw, line, fragment",
    [
        ([("n09", (1, 2, 3, 4))], None, 5, "synset 'n09' is not in the synset file"),
        ([("n01", (1, 2, 3, 4)), ("n01", ("x", 2, 3, 4))], None, 11, "numeric bndbox/xmin"),
        ([("n01", (5, 2, 3, 4))], None, 5, "0 <= x0 <= x1"),
        (None, "<annotation>\n<filename>a</filename>\n<object>\n</annotation>\n", 4, "malformed XML"),
    ],
)
def test_voc_malformed_names_file_and_line(tmp_path, objects, raw, line, fragment):
    if raw is None:
        path = write_voc(tmp_path, "a.JPEG", objects)
    else:
        path = tmp_path / "a.xml"
        path.write_text(raw)
    with pytest.raises(InvalidInput) as info:
        read_voc(tmp_path, {"n01": 0})
    assert f"{path}, line {line}:" in str(info.value)
    assert fragment in str(info.value)


def test_read_dataset_needs_a_layout(tmp_path):
    with pytest.raises(InvalidInput, match="neither image_ids.txt"):
        read_dataset(tmp_path)
    write_voc(tmp_path, "a.JPEG", [("n01", (1, 2, 3, 4))])
    with pytest.raises(InvalidInput, match="need a synset file"):
        read_dataset(tmp_path)
    with pytest.raises(InvalidInput, match="metadata folder not found"):
        read_dataset(tmp_path / "nope")
