"""The README's code cannot rot: its Python blocks run, its commands run or are checked."""

import importlib.util
import json
import re
import shlex
import shutil
from importlib.metadata import metadata
from pathlib import Path

import pytest
from skimage import data
from skimage import io as skio

from camcore import cli, default_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)

SETUP = 'pip install ".[cpu]" && camcore demo'
TESTS = 'pip install -e ".[cpu,test,ray]" && python -m pytest'


def blocks(language: str, *, run: bool = True) -> list:
    """Bodies of the README's fenced blocks in `language`; ``no-run`` ones when `run` is False."""
    found = []
    for info, body in FENCE.findall(README):
        words = info.split()
        if words and words[0] == language and ("no-run" not in words) == run:
            found.append(body)
    return found


def shell_commands() -> list:
    """Every command of the runnable sh blocks, ``a && b`` split in two."""
    return [part.strip() for body in blocks("sh") for line in body.splitlines() if line.strip()
            for part in line.split("&&")]


def test_setup_commands_are_exact_and_ci_runs_the_second():
    first, second = blocks("sh")[:2]
    assert first.strip() == SETUP and second.strip() == TESTS
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith("#")][-1] == TESTS


def test_every_shell_command_is_known():
    extras = set(metadata("camcore").get_all("Provides-Extra"))
    for command in shell_commands():
        words = shlex.split(command)
        if words[0] == "pip":
            assert words[:2] == ["pip", "install"] and words[-1].startswith(".[")
            assert set(words[-1][2:-1].split(",")) <= extras, command
        else:
            assert words[0] == "camcore" or command == "python -m pytest", command


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The files the README's commands name: photo.jpg, photos/, model.onnx."""
    monkeypatch.chdir(tmp_path)
    skio.imsave(tmp_path / "photo.jpg", data.chelsea())
    (tmp_path / "photos").mkdir()
    skio.imsave(tmp_path / "photos" / "coffee.png", data.coffee())
    skio.imsave(tmp_path / "photos" / "rocket.jpg", data.rocket())
    (tmp_path / "labels.csv").write_text("image,label\ncoffee.png,espresso\nrocket.jpg,space shuttle\n")
    shutil.copy(default_model.path(), tmp_path / "model.onnx")
    # A one-image wsolevaluation metadata folder: chelsea, class 285, the cat's box.
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "image_ids.txt").write_text("photo.jpg\n")
    (tmp_path / "meta" / "class_labels.txt").write_text("photo.jpg,285\n")
    (tmp_path / "meta" / "localization.txt").write_text("photo.jpg,0,0,399,299\n")
    return tmp_path


def test_camcore_commands_run(workdir, capsys):
    commands = [c for c in shell_commands() if c.startswith("camcore")]
    assert {shlex.split(c)[1] for c in commands} >= {"demo", "explain", "inspect", "fuse"}
    for command in commands:
        argv = shlex.split(command)[1:]
        if "--help" in argv:
            with pytest.raises(SystemExit) as exit_info:
                cli.main(argv)
            status = exit_info.value.code
        else:
            status = cli.main(argv)
        captured = capsys.readouterr()
        if "ray" in argv and importlib.util.find_spec("ray") is None:  # CI installs the ray extra
            assert status == 1 and "pip install 'camcore[ray]'" in captured.err, captured.err
            continue
        assert status == 0, (command, captured.err)
        assert captured.out, command
    assert (workdir / "camcore-demo" / "chelsea.cam.png").is_file()
    assert (workdir / "cams" / "results.json").is_file()
    if importlib.util.find_spec("ray") is not None:
        records = json.loads((workdir / "cams-ray" / "results.json").read_text())["images"]
        assert [r["path"] for r in records] == ["photos/coffee.png", "photos/rocket.jpg"]
        assert sorted(p.name for p in (workdir / "cams-ray").iterdir()) == \
            ["coffee.cam.png", "results.json", "rocket.cam.jpg"]
    assert (workdir / "model_cam.onnx").is_file()
    audit = json.loads((workdir / "audit" / "results.json").read_text())["images"]
    assert [c["name"] for r in audit for c in r["classes"]] == ["espresso", "space shuttle"]
    assert all((workdir / "audit" / r["maps"]).is_file() for r in audit)
    assert (workdir / "audit" / "report.html").is_file() and (workdir / "audit" / "coco.json").is_file()
    compared = json.loads((workdir / "compare" / "compare.json").read_text())
    assert compared["methods"] == ["cam", "eigencam", "ablationcam", "reciprocam"]
    assert (workdir / "compare" / "photo.compare.png").is_file()
    bench = json.loads((workdir / "bench.json").read_text())
    cpu = bench["providers"][0]
    assert (cpu["name"], cpu["status"]) == ("cpu", "ok") and [r["batch"] for r in cpu["runs"]] == [1, 16]
    assert all(r[kind]["images_per_s"] > 0 for r in cpu["runs"] for kind in ("plain", "explain", "fused"))
    figures = json.loads((workdir / "eval.json").read_text())
    assert figures["top1_cls"] == 100 and figures["gt_known_loc"] == 100


def test_python_blocks_run(workdir, capsys):
    namespace = {"__name__": "readme"}
    code = blocks("python")
    assert len(code) >= 4
    for body in code:
        exec(compile(body, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Egyptian cat ")
    assert "{'top_k_loc': 1.0, 'gt_known_loc': 1.0}" in out
    assert "(1, 3) (1, 3) (1, 3, 224, 224)" in out
    assert "(1, 1, 7, 7) True (1, 17)" in out
    assert "[[967], [812]]" in out  # load_maps of the true classes read from labels.csv
    assert namespace["picture"].shape == (300, 451, 3)


def test_export_snippets_compile():
    """The exporter snippets need torch / tf2onnx, which the tests do not install: they must parse."""
    python = blocks("python", run=False)
    assert len(python) == 3 and "torch.onnx.export" in python[1] and "explain_dataset" in python[2]
    assert "fo.types.COCODetectionDataset" in python[0]  # FiftyOne's database cannot start here
    for body in python:
        compile(body, "README.md", "exec")
    shell, ray = blocks("sh", run=False)
    assert shell.strip().startswith("python -m tf2onnx.convert")
    for command in ray.splitlines():  # they need a cluster: their options must parse
        argv = shlex.split(command)
        assert argv[0] == "camcore" and cli.build_parser(argv[1:]).parse_args(argv[1:]).engine == "ray"
