"""The `camcore` command line, end to end in subprocesses, on the embedded model and zoo models."""

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data
from skimage import io as skio

import camcore
from camcore import cli, default_model, outputs
from camcore.cli import console, options
from camcore.cli.demo import DEMO_IMAGES
from camcore.errors import CamError, NotCamCompatible
from tests.zoo import CASES, REFUSED, vector_classifier

ROOT = Path(__file__).resolve().parents[1]

# Hand-measured on skimage.data.chelsea() (451 x 300): the cat's head spans the
# image from the left edge to its right ear; eyes and nose centers.
CAT_BOX = (0, 0, 400, 300)
CAT_FACE = [(170, 115), (320, 135), (262, 240)]


def camcore_cli(*args, cwd=None, check_clean=True):
    """Run ``python -m camcore.cli`` in a subprocess; stderr never holds a traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "camcore.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check_clean:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("camcore: error:")]


def check_record(record, explainer_names, k):
    """Schema of one results.json image entry, boxes inside the image, scores sorted."""
    assert set(record) >= {"path", "width", "height", "error", "classes"}
    assert record["error"] is None
    w, h = record["width"], record["height"]
    assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
    assert len(record["classes"]) == k
    scores = [c["score"] for c in record["classes"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for c in record["classes"]:
        assert set(c) == {"index", "name", "score", "box"}
        assert c["name"] == explainer_names(c["index"])
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def dynamic_batch(zm, directory: Path) -> Path:
    """Save a zoo model with its batch dimension made symbolic (the zoo fixes it to 2)."""
    model = onnx.ModelProto()
    model.CopyFrom(zm.model)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    path = directory / f"{zm.name}_dynamic.onnx"
    onnx.save_model(model, path)
    return path


# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def default_explainer():
    return camcore.load(providers=["cpu"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = camcore_cli("demo", "--out", out, "--providers", "cpu")
    return proc, out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder: two photos (one in a subfolder), a gray image, a corrupt PNG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    skio.imsave(root / "cat.png", data.chelsea())
    skio.imsave(root / "sub" / "astronaut.jpg", data.astronaut()[::2, ::2], check_contrast=False)
    skio.imsave(root / "gray.png", data.camera()[::4, ::4], check_contrast=False)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def explained(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("explained") / "out"
    proc = camcore_cli("explain", photos, "--out", out, "--top-k", "2", "--json", "--providers", "cpu")
    return proc, out


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


# ----------------------------------------------------------------- demo

def test_demo_table_json_and_overlays(demo, default_explainer):
    proc, out = demo
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["image", "class", "score", "box"]
    for name in DEMO_IMAGES:
        assert any(line.startswith(f"skimage.data.{name}") for line in lines)
    results = json.loads((out / "results.json").read_text())
    assert results["threshold"] == 0.2
    assert [r["path"] for r in results["images"]] == [f"skimage.data.{n}" for n in DEMO_IMAGES]
    for name, record in zip(DEMO_IMAGES, results["images"]):
        check_record(record, default_explainer.class_name, 1)
        image = getattr(data, name)()
        assert (record["height"], record["width"]) == image.shape[:2]
        png = skio.imread(out / f"{name}.cam.png")
        h, w = image.shape[:2]
        assert png.shape == (outputs.title_height(w) + h, w, 3) and png.dtype == np.uint8
        top = record["classes"][0]
        assert f"{top['index']} {top['name']}" in proc.stdout
    assert no_temp_files(out)


def test_demo_finds_the_cat(demo):
    _, out = demo
    cat = json.loads((out / "results.json").read_text())["images"][0]
    top = cat["classes"][0]
    assert 281 <= top["index"] <= 285 and top["score"] > 0.5
    box = top["box"]
    assert camcore.metrics.iou(box, CAT_BOX)[0, 0] >= 0.7
    for x, y in CAT_FACE:
        assert box[0] <= x < box[2] and box[1] <= y < box[3]


def test_demo_overlay_shows_map_box_and_title(demo):
    _, out = demo
    png = skio.imread(out / "chelsea.cam.png")
    t = outputs.title_height(451)
    strip, picture = png[:t], png[t:]
    top = json.loads((out / "results.json").read_text())["images"][0]["classes"][0]
    np.testing.assert_array_equal(strip, outputs.title_strip(f"{top['name']} {100 * top['score']:.1f}%", 451))
    # light gray text (anti-aliased) on the dark background, nothing of the picture
    assert (strip[:, -3:] == (32, 32, 32)).all() and (strip == strip[..., :1]).all()
    assert (strip > 200).all(axis=2).sum() > 50
    # The box outline (green) on the top row of the box.
    x0, y0, x1, y1 = top["box"]
    np.testing.assert_array_equal(picture[y0, x0:x1], np.tile([0, 255, 0], (x1 - x0, 1)))
    # The heat map is blended in: the picture is not the photo.
    assert np.abs(picture.astype(int) - data.chelsea()).mean() > 10


def test_readme_picture_is_the_demo_output(demo):
    """docs/chelsea_cam.png is what `camcore demo` renders (so the README shows the real thing)."""
    _, out = demo
    shipped = skio.imread(ROOT / "docs" / "chelsea_cam.png")
    rendered = skio.imread(out / "chelsea.cam.png")
    assert shipped.shape == rendered.shape
    assert np.abs(shipped.astype(int) - rendered).mean() < 1.0
    assert (ROOT / "docs" / "chelsea_cam.png").stat().st_size < 300_000


# ----------------------------------------------------------------- explain on the embedded model

def test_explain_folder_reports_corrupt_image_and_goes_on(explained, photos):
    proc, out = explained
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == ["camcore: error: 1 of 4 images could not be explained"]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("camcore: warning:")]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    results = json.loads(proc.stdout)
    assert results == json.loads((out / "results.json").read_text())
    paths = [Path(r["path"]).relative_to(photos).as_posix() for r in results["images"]]
    assert paths == ["broken.png", "cat.png", "gray.png", "sub/astronaut.jpg"]  # sorted, recursive, .txt ignored
    broken = results["images"][0]
    assert broken["classes"] == [] and broken["width"] is None and broken["height"] is None
    assert "broken.png" in broken["error"] and "\n" not in broken["error"]
    # --format auto: JPEG photos get JPEG overlays, the others PNG
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.cam.jpg", "cat.cam.png", "gray.cam.png",
                                                     "results.json"]


def test_explain_results_schema_boxes_and_pngs(explained, default_explainer):
    proc, out = explained
    results = json.loads(proc.stdout)
    assert results["model"] == "embedded:efficientnet_lite0" and results["threshold"] == 0.2
    for record in results["images"][1:]:
        check_record(record, default_explainer.class_name, 2)
        png = skio.imread(out / record["overlay"])
        w, h = record["width"], record["height"]
        assert png.shape == (outputs.title_height(w) + h, 2 * w, 3)


def test_explain_matches_the_python_api(explained, photos, default_explainer):
    proc, _ = explained
    record = json.loads(proc.stdout)["images"][1]
    [expected] = default_explainer.explain_images([photos / "cat.png"], top_k=2)
    assert [c["index"] for c in record["classes"]] == expected.classes.tolist()
    np.testing.assert_allclose([c["score"] for c in record["classes"]], expected.scores, atol=1e-5)
    assert [tuple(c["box"]) for c in record["classes"]] == [expected.box(0), expected.box(1)]


@pytest.mark.parametrize("image_format, workers", [("jpg", "0"), ("webp", "1"), ("png", "3")])
def test_explain_formats_and_workers(tmp_path, photos, explained, image_format, workers, capsys):
    """Any format and thread count: the same results.json as the default run, overlays in that format
    that decode to the overlay drawn from the Python API's maps (exactly for PNG)."""
    from PIL import Image

    out = tmp_path / "o"
    status = cli.main(["explain", str(photos), "--out", str(out), "--top-k", "2", "--json", "--providers", "cpu",
                       "--format", image_format, "--workers", workers])
    assert status == 1  # the broken PNG
    results = json.loads(capsys.readouterr().out)
    default = json.loads(explained[0].stdout)
    for record in default["images"]:
        if "overlay" in record:
            record["overlay"] = record["overlay"].rsplit(".", 1)[0] + f".{image_format}"
    assert results == default
    explainer = camcore.load(providers=["cpu"])
    record = results["images"][1]
    [result] = explainer.explain_images([record["path"]], top_k=2)
    drawn = outputs.render(data.chelsea(), result, explainer)
    written = np.asarray(Image.open(out / record["overlay"]).convert("RGB"))
    assert Image.open(out / record["overlay"]).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[image_format]
    error = np.abs(written.astype(int) - drawn)
    assert error.max() == 0 if image_format == "png" else error.mean() < 8
    assert sorted(p.suffix for p in out.iterdir()) == sorted([f".{image_format}"] * 3 + [".json"])
    assert no_temp_files(out)


def test_explain_missing_file_and_bad_arguments(tmp_path, photos):
    proc = camcore_cli("explain", tmp_path / "nope.jpg", photos / "gray.png", "--out", tmp_path / "o", "--quiet")
    assert proc.returncode == 1 and proc.stdout == ""
    assert error_lines(proc.stderr) == ["camcore: error: 1 of 2 images could not be explained"]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "image not found" in results["images"][0]["error"] and results["images"][1]["error"] is None



def test_explain_usage_errors_in_process(tmp_path, photos, capsys):
    (tmp_path / "empty").mkdir()
    for args, status, message in [
        ([tmp_path / "empty"], 1, "no images found in folder"),
        ([tmp_path / "model.onnx"], 1, "no images given"),
        ([tmp_path / "missing.onnx", photos / "cat.png"], 1, "missing.onnx"),
        ([photos / "cat.png", "--threshold", "1.5"], 2, "--threshold"),
        ([photos / "cat.png", "--top-k", "0"], 2, "--top-k"),
    ]:
        argv = ["explain", *map(str, args), "--out", str(tmp_path / "bad")]
        if status == 2:  # argparse usage errors
            with pytest.raises(SystemExit) as exit_info:
                cli.main(argv)
            assert exit_info.value.code == 2
        else:
            assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith(("camcore: error:", "camcore explain: error:"))
        if status == 1:
            assert len(err) == 1
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------- explain with user models

def test_explain_user_model_applies_preprocessing_flags(tmp_path, photos):
    zm = CASES["dynamic_batch_hw"]()
    path = zm.save(tmp_path)
    proc = camcore_cli("explain", path, photos / "cat.png", photos / "gray.png", "--out", tmp_path / "o",
                       "--top-k", "3", "--size", "16x12", "--resize", "crop", "--mean", "0.5", "--std", "0.25",
                       "--bgr", "--threshold", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results["model"] == str(path) and results["threshold"] == 0.5
    preprocess = camcore.Preprocess((16, 12), resize="crop", mean=0.5, std=0.25, channel_order="BGR")
    explainer = camcore.load(path, providers=["cpu"])
    expected = explainer.explain_images([photos / "cat.png", photos / "gray.png"], preprocess=preprocess,
                                        top_k=3, threshold=0.5)
    for record, want in zip(results["images"], expected):
        check_record(record, explainer.class_name, 3)
        assert [c["index"] for c in record["classes"]] == want.classes.tolist()
        assert [c["name"] for c in record["classes"]] == [str(i) for i in want.classes]
        np.testing.assert_allclose([c["score"] for c in record["classes"]], want.scores, atol=1e-5)
        assert [tuple(c["box"]) for c in record["classes"]] == [want.box(j) for j in range(3)]
    # Without flags the result differs (the flags really reach the model).
    plain = explainer.explain_images([photos / "cat.png"], top_k=3)[0]
    assert not np.allclose(plain.scores, expected[0].scores)


def test_explain_nhwc_model(tmp_path, photos):
    zm = CASES["nhwc_transpose_gap"]()
    path = dynamic_batch(zm, tmp_path)
    proc = camcore_cli("explain", path, photos / "cat.png", "--out", tmp_path / "o", "--size", "9x7")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "o" / "results.json").read_text())["images"][0]
    check_record(record, str, 1)
    assert skio.imread(tmp_path / "o" / "cat.cam.png").shape == (outputs.title_height(451) + 300, 451, 3)
    assert proc.stdout.splitlines()[0].split() == ["image", "class", "score", "box"]


# ----------------------------------------------------------------- inspect

def test_inspect_json_on_zoo_models(zoo_dir):
    for name in ("gap_gemm", "nhwc_transpose_gap"):
        zm = CASES[name]()
        proc = camcore_cli("inspect", zm.save(zoo_dir), "--json")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert set(info) >= {"input", "feature", "pooling", "logits", "num_classes", "channels", "providers"}
        assert info["input"]["name"] == zm.input_name
        assert info["input"]["shape"] == list(zm.input_shape)
        assert info["input"]["layout"] == ("NHWC" if name.startswith("nhwc") else "NCHW")
        assert info["feature"]["name"] == zm.feature and info["feature"]["shape"][1] == 8
        assert info["pooling"] == zm.pooling and info["logits"] == zm.logits
        assert (info["num_classes"], info["channels"]) == zm.weights.shape
        assert "CPUExecutionProvider" in info["providers"]


@pytest.mark.parametrize("name, shape, detail", [
    # paddle2onnx's dim_value -1 axes are dynamic (null), never a batch of -1.
    ("paddle_minus_one_dims", [None, 3, None, None], "GlobalAveragePool over H and W"),
    ("avgpool_padded_include_pad", [2, 3, 6, 6], "AveragePool 7x7 with pads (0, 0, 1, 1) over the whole 6x6 map"),
    ("nhwc_reducemean_cast_axes_opset18", [2, 9, 7, 3], "ReduceMean over H and W (axes 1, 2)"),
])
def test_inspect_json_pooling_and_dynamic_axes(name, shape, detail, zoo_dir):
    zm = CASES[name]()
    proc = camcore_cli("inspect", zm.save(zoo_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["input"]["shape"] == shape
    assert info["pooling_detail"] == detail and info["pooling_node"]
    assert info["feature"]["shape"][1 if zm.layout == "NCHW" else 3] == 8


def test_inspect_embedded_model_text():
    proc = camcore_cli("inspect", default_model.path())
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert fields["input"].startswith("input (batch, 3, 224, 224) NCHW")
    assert fields["feature"].endswith(", 1280, 7, 7) NCHW")
    assert fields["pooling"].startswith("GlobalAveragePool over H and W at node ")
    assert fields["classes"] == "1000" and fields["channels"] == "1280"
    assert "CPUExecutionProvider" in fields["providers"]


def test_inspect_unexplainable_model_exits_2_with_one_line(tmp_path):
    path = tmp_path / "vector.onnx"
    onnx.save(vector_classifier(), str(path))
    proc = camcore_cli("inspect", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc.stderr) == proc.stderr.strip().splitlines()
    [line] = error_lines(proc.stderr)
    assert "no global average pooling" in line and "no 4-D feature map" in line


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_inspect_cam_refused_models_show_reason_and_layers(name, zoo_dir, capsys):
    zm = REFUSED[name]()
    assert cli.main(["inspect", str(zm.save(zoo_dir)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cam"]["exact"] is False and zm.refuse in info["cam"]["reason"]
    assert info["default_method"] == "gradcam"
    names = [layer["name"] for layer in info["layers"]]
    assert info["feature"]["name"] in names and all(len(layer["shape"]) == 4 for layer in info["layers"])
    assert cli.main(["inspect", str(zoo_dir / f"{name}.onnx")]) == 0
    fields = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if not line.startswith(" "))
    assert fields["cam"] == f"no: {info['cam']['reason']}"


def test_inspect_errors_exit_1(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    for path in (corrupt, tmp_path / "missing.onnx"):
        proc = camcore_cli("inspect", path)
        assert proc.returncode == 1
        assert len(error_lines(proc.stderr)) == 1 == len(proc.stderr.strip().splitlines())


# ----------------------------------------------------------------- fuse

def test_fuse_writes_a_runnable_model(tmp_path):
    zm = CASES["dynamic_batch"]()
    out = tmp_path / "fused.onnx"
    proc = camcore_cli("fuse", zm.save(tmp_path), "-o", out, "--top-k", "2", "--size", "16", "12")
    assert proc.returncode == 0, proc.stderr
    assert "cam_maps" in proc.stdout and no_temp_files(tmp_path)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = zm.random_input(shape=(3, 3, 8, 8))
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {zm.input_name: x})))
    assert outputs["cam_classes"].shape == (3, 2) and outputs["cam_maps"].shape == (3, 2, 16, 12)
    # Normalized maps (the fused graph normalizes before resizing: float rounding around 0 and 1).
    maps = outputs["cam_maps"]
    assert maps.min() >= 0 and maps.max() <= 1
    np.testing.assert_allclose(maps.min(axis=(2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(maps.max(axis=(2, 3)), 1, atol=1e-6)

    raw = tmp_path / "raw.onnx"
    assert cli.main(["fuse", str(zm.save(tmp_path)), "-o", str(raw), "--no-normalize", "--size", "input"]) == 0
    session = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    maps = session.run(["cam_maps"], {zm.input_name: x})[0]
    assert maps.shape == (3, 1, 8, 8) and maps.max() > 1


def test_fuse_refused_and_bad_size(tmp_path):
    zm = REFUSED["global_max_pool"]()
    out = tmp_path / "fused.onnx"
    proc = camcore_cli("fuse", zm.save(tmp_path), "-o", out, "--method", "cam")
    assert proc.returncode == 2 and zm.refuse in proc.stderr
    assert not out.exists() and no_temp_files(tmp_path)
    proc = camcore_cli("fuse", zm.save(tmp_path), "-o", out, "--method", "gradcam", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    fused = onnx.load(str(out))
    assert [o.name for o in fused.graph.output][-3:] == ["cam_classes", "cam_scores", "cam_maps"]
    assert any(n.name.startswith("cam_grad_") for n in fused.graph.node)
    out.unlink()
    proc = camcore_cli("fuse", CASES["gap_gemm"]().save(tmp_path), "-o", out, "--size", "16")
    assert proc.returncode == 1 and "--size" in proc.stderr
    assert not out.exists() and no_temp_files(tmp_path)


# ----------------------------------------------------------------- top level

def test_version_help_and_console_script():
    script = Path(sys.executable).parent / ("camcore.exe" if os.name == "nt" else "camcore")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"camcore {camcore.__version__}"
    proc = camcore_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "explain", "inspect", "fuse", "bench", "eval"):
        assert command in proc.stdout
    proc = camcore_cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


def test_parser_and_help_do_not_import_onnxruntime():
    code = ("import sys, contextlib, io\n"
            "from camcore import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['explain', '--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules, 'imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_help_imports_no_numpy_and_method_choices_are_the_methods():
    from camcore.methods import METHODS

    parser = cli.build_parser(["explain"])
    [action] = [a for a in parser._subparsers._group_actions[0].choices["explain"]._actions
                if a.dest == "method"]
    assert tuple(action.choices) == METHODS and "gradcam" in action.choices and "nope" not in action.choices
    code = ("import sys, contextlib, io\n"
            "from camcore import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'numpy' not in sys.modules, 'imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_missing_plugin_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "nope", ("camcore._no_such_module", "a missing plugin"))
    assert cli.main(["nope", "--help"]) == 1
    err = capsys.readouterr().err
    assert err == "camcore: error: the 'nope' command is not available: camcore._no_such_module is not installed\n"


def test_plugins_are_registered_with_add_arguments_and_main(monkeypatch, capsys):
    class Plugin:
        @staticmethod
        def add_arguments(parser):
            parser.add_argument("--n", type=int, default=1)

        @staticmethod
        def main(args):
            print(f"ran with n={args.n}")
            return 3

    monkeypatch.setitem(sys.modules, "camcore._fake_plugin", Plugin)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("camcore._fake_plugin", "a fake plugin"))
    assert cli.main(["fake", "--n", "4"]) == 3
    assert capsys.readouterr().out == "ran with n=4\n"


# ----------------------------------------------------------------- helpers

def test_run_command_maps_errors_to_statuses(capsys):
    def raiser(exc):
        def fn(_):
            raise exc
        return fn

    cases = [(NotCamCompatible("no global average pooling"), 2), (CamError("bad\nsecond line"), 1),
             (FileNotFoundError(2, "No such file or directory", "x.onnx"), 1), (KeyboardInterrupt(), 130)]
    for exc, status in cases:
        assert console.run_command(raiser(exc), None) == status
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("camcore: error: ") and "second line" not in line
    assert console.run_command(lambda args: None, None) == 0


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "results.json"
    outputs.atomic_write_text(target, "old")
    assert target.read_text() == "old"
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask

    for exc in (OSError("disk full"), KeyboardInterrupt()):
        def broken_replace(src, dst, exc=exc):
            raise exc
        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(type(exc)):
            outputs.atomic_write_bytes(target, b"new contents")
        monkeypatch.undo()
        assert target.read_text() == "old"
        assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_explain_into_unwritable_output_is_one_line(tmp_path, photos):
    out = tmp_path / "o"
    (out / "results.json").mkdir(parents=True)  # os.replace onto a folder fails
    proc = camcore_cli("explain", photos / "gray.png", "--out", out, "--quiet")
    assert proc.returncode == 1
    assert len(error_lines(proc.stderr)) == 1 == len(proc.stderr.strip().splitlines())
    assert sorted(p.name for p in out.iterdir()) == ["gray.cam.png", "results.json"] and no_temp_files(out)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet():
    shown = _Terminal()
    progress = console.Progress(20, "explain", stream=shown)
    for _ in range(20):
        progress.update()
    progress.close()
    final = shown.getvalue().rstrip("\n").split("\r")[-1]
    assert final.startswith("explain: 100%") and "20/20" in final

    for stream, total, quiet in [(_Terminal(), 20, True), (io.StringIO(), 20, False), (_Terminal(), 5, False)]:
        progress = console.Progress(total, "explain", quiet=quiet, stream=stream)
        progress.update(total)
        progress.close()
        assert stream.getvalue() == ""


def test_preprocess_from_args(default_explainer):
    parser = cli.build_parser(["explain"])
    args = parser.parse_args(["explain", "x.png"])
    assert options.preprocess_from_args(args, default_explainer) == default_explainer.default_preprocess()
    args = parser.parse_args(["explain", "x.png", "--size", "256x192", "--resize", "crop", "--mean", "0.1",
                              "0.2", "0.3", "--std", "0.5", "--scale", "1", "--bgr", "--interpolation", "bicubic"])
    p = options.preprocess_from_args(args, default_explainer)
    assert p == camcore.Preprocess((256, 192), resize="crop", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5),
                                   scale=1.0, channel_order="BGR", interpolation="bicubic",
                                   crop_fraction=default_explainer.default_preprocess().crop_fraction)
    assert parser.parse_args(["explain", "x.png", "--size", "300"]).size == (300, 300)
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "x.png", "--size", "0x3"])


def test_title_strip_draws_the_text_with_pillows_font():
    width = 451
    text = "Egyptian cat 79.1%"
    strip = outputs.title_strip(text, width)
    height = outputs.title_height(width)
    assert strip.shape == (height, width, 3) and strip.dtype == np.uint8
    ink = (strip > 128).all(axis=2)
    cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
    # Left-aligned after a margin of a quarter of the height, as long as Pillow measures the text,
    # and vertically inside the strip.
    margin = height // 4
    font = outputs._font(outputs._font_size(width))
    assert margin <= cols[0] <= margin + 2
    assert abs((cols[-1] + 1 - cols[0]) - font.getlength(text)) <= 3
    assert rows[0] > 0 and rows[-1] < height - 1
    assert not (outputs.title_strip("", width) > 128).any()
    assert not np.array_equal(strip, outputs.title_strip("Egyptian cat 79.2%", width))
    # Text that does not fit is cut before the right margin.
    long = (outputs.title_strip("x" * 200, 100) > 128).all(axis=2)
    assert 80 < np.flatnonzero(long.any(axis=0))[-1] < 100 - outputs.title_height(100) // 4


def test_explain_fixed_batch_one_model_runs_image_by_image(tmp_path, photos, capsys):
    zm = CASES["hot_spot_nchw"]()  # input fixed to (1, 3, 9, 7)
    argv = ["explain", str(zm.save(tmp_path)), str(photos / "cat.png"), str(photos / "gray.png"),
            "--out", str(tmp_path / "o"), "--json", "--top-k", "2"]
    assert cli.main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    explainer = camcore.load(zm.model, providers=["cpu"])
    for record, image in zip(results["images"], ("cat.png", "gray.png")):
        check_record(record, explainer.class_name, 2)
        [want] = explainer.explain_images([photos / image], top_k=2)
        assert [c["index"] for c in record["classes"]] == want.classes.tolist()


def test_ctrl_c_exits_130_without_partial_files(tmp_path):
    """SIGINT once the first overlay exists: status 130, one line, no temp files, no results.json."""
    import signal
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(600):
        skio.imsave(folder / f"{i:04d}.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                    check_contrast=False)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "camcore.cli", "explain", str(folder), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not (out / "0000.cam.png").exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["camcore: error: interrupted"]
    written = sorted(p.name for p in out.iterdir())
    assert "results.json" not in written and 0 < len(written) < 600 and no_temp_files(out)
    for name in written:
        assert skio.imread(out / name).shape == (outputs.title_height(24) + 24, 24, 3)


def test_explain_same_stem_in_two_folders_gets_two_overlays(tmp_path, capsys):
    zm = CASES["dynamic_batch"]()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        skio.imsave(tmp_path / folder / "cat.png", data.chelsea()[::4, ::4])
    out = tmp_path / "o"
    assert cli.main(["explain", str(zm.save(tmp_path)), str(tmp_path / "a"), str(tmp_path / "b"),
                     "--out", str(out), "--size", "8", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["images"]
    assert [r["overlay"] for r in records] == ["cat.cam.png", "cat-2.cam.png"]
    assert sorted(p.name for p in out.iterdir()) == ["cat-2.cam.png", "cat.cam.png", "results.json"]


@pytest.mark.parametrize("source, requested, expected", [
    ("a/cat.jpg", "auto", "jpg"), ("CAT.JPEG", "auto", "jpg"), (Path("cat.png"), "auto", "png"),
    ("cat.webp", "auto", "png"), ("cat.tif", "auto", "png"), (np.zeros((2, 2, 3), np.uint8), "auto", "png"),
    ("cat.jpg", "png", "png"), ("cat.png", "webp", "webp"), ("cat.png", "jpg", "jpg"),
])
def test_overlay_format_follows_jpeg_inputs_unless_asked(source, requested, expected):
    assert outputs.overlay_format(source, requested) == expected



# Every command that loads a model takes the shared runtime flags (options.add_runtime_arguments;
# `camcore bench` names one more runtime with them). `fuse` writes a graph and runs none.
RUNTIME_COMMANDS = {
    "explain": ["images"], "demo": [], "inspect": ["model.onnx"], "compare": ["images"],
    "eval": ["--metadata", "meta", "--images", "images"], "drift": ["embedded", "model.onnx", "images"],
    "bench": ["model.onnx"],
}


@pytest.mark.parametrize("command", sorted(RUNTIME_COMMANDS))
def test_every_model_command_takes_the_runtime_flags(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output folders would land here
    args = RUNTIME_COMMANDS[command]
    parsed = cli.build_parser([command]).parse_args([command, *args, "--backend", "openvino", "--device", "GPU",
                                                     "--precision", "bf16"])
    assert (parsed.backend, parsed.device, parsed.precision) == ("openvino", "GPU", "bf16")
    # a bad precision: one error line, before anything is read or written
    assert cli.main([command, *args, "--precision", "fp32"]) == 1
    assert capsys.readouterr().err == ("camcore: error: --precision must be one of f32, bf16, f16 (or left out for "
                                       "the runtime's default), got 'fp32'\n")
    assert list(tmp_path.iterdir()) == []


def test_bench_times_the_runtime_the_shared_flags_name():
    from camcore.cli.bench import backend_runtime
    from camcore.benchmark import parse_runtime

    def named(**flags):
        return backend_runtime(argparse.Namespace(**{"backend": None, "device": None, "precision": None, **flags}))

    assert named() is None
    assert named(backend="openvino") == "openvino"
    assert parse_runtime(named(backend="openvino", device="GPU", precision="f16")) == ("openvino", "GPU", "f16")
    assert parse_runtime(named(precision="f32")) == ("openvino", "CPU", "f32")
    assert named(backend="onnxruntime") == "cpu"
    with pytest.raises(CamError, match="--device and --precision are OpenVINO's"):
        named(backend="onnxruntime", precision="f32")
    with pytest.raises(CamError, match="--backend must be onnxruntime or openvino, got 'tensorrt'"):
        named(backend="tensorrt")
