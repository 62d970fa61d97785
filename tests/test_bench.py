"""`camcore bench` (camcore/benchmark.py, camcore/cli/bench.py): the figures' structure, never their speed."""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import camcore
from camcore import benchmark as bench
from camcore.cli import bench as bench_command
from backends.ort_session import make_session
from camcore.errors import InvalidInput
from tests.zoo import CASES

BATCHES = (1, 3)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return CASES["dynamic_batch"]().save(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def result(model_path):
    return bench.run_benchmark(model_path, batches=BATCHES, providers=("cpu", "cuda", "no-such"), repeat=2,
                               warmup=1)


def test_cpu_figures_are_consistent(result):
    cpu = result["providers"][0]
    assert cpu["name"] == "cpu" and cpu["status"] == "ok"
    assert cpu["session_providers"][0] == "CPUExecutionProvider"
    assert cpu["io_binding"] is False
    assert [run["batch"] for run in cpu["runs"]] == list(BATCHES)
    for run in cpu["runs"]:
        for mode in bench.MODES:
            figures = run[mode]
            assert len(figures["seconds"]) == 2 and min(figures["seconds"]) > 0
            assert figures["images_per_s"] == statistics.median(run["batch"] / s for s in figures["seconds"])
            assert figures["images_per_s"] > 0
            # Whole-process peaks from a fresh subprocess: running never lowers the peak.
            assert 10 < figures["setup_rss_mib"] <= figures["peak_rss_mib"] < 4096
        for mode in ("explain", "fused"):
            assert run["ratios"][mode] == run[mode]["images_per_s"] / run["plain"]["images_per_s"]


def test_unavailable_providers_are_skipped_with_the_reason(result):
    cuda, unknown = result["providers"][1:]
    assert cuda == {"name": "cuda", "status": "skipped", "reason": cuda["reason"]}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "'CUDAExecutionProvider' is not available here" in cuda["reason"]
    assert unknown["status"] == "skipped" and "unknown provider 'no-such'" in unknown["reason"]


def test_settings_and_machine_are_recorded(result, model_path):
    assert result["model"] == str(model_path)
    assert result["settings"]["batches"] == list(BATCHES)
    assert result["settings"]["repeat"] == 2 and result["settings"]["warmup"] == 1
    m = result["machine"]
    assert m["onnxruntime"] == ort.__version__ and m["numpy"] == np.__version__
    assert "CPUExecutionProvider" in m["onnxruntime_providers"]
    assert m["cores"] >= 1 and m["cpu"]
    json.dumps(result)  # every figure is JSON-serialisable


def test_table_lists_every_run_and_skip(result):
    table = bench.format_table(result)
    rows = [line.split() for line in table.splitlines() if line.startswith("cpu ")]
    assert [r[1] for r in rows] == ["f32"] * len(BATCHES)  # the precision that ran
    assert [int(r[2]) for r in rows] == list(BATCHES)
    first = result["providers"][0]["runs"][0]
    assert float(rows[0][3]) == pytest.approx(first["plain"]["images_per_s"], abs=0.06)
    assert float(rows[0][5]) == pytest.approx(first["ratios"]["explain"], abs=6e-4)
    assert "cuda: skipped (" in table
    assert "no-such: skipped (unknown provider" in table


def test_command_line_writes_json(model_path, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args([str(model_path), "--batch", "2", "--providers", "cpu,cuda", "--repeat", "1",
                              "--warmup", "0", "--no-memory", "--json", str(out)])
    assert bench_command.main(args) == 0
    written = json.loads(out.read_text())
    assert written["settings"]["batches"] == [2] and written["settings"]["memory"] is False
    run = written["providers"][0]["runs"][0]
    assert run["batch"] == 2 and len(run["plain"]["seconds"]) == 1 and "peak_rss_mib" not in run["plain"]
    assert "cpu " in capsys.readouterr().out


def test_command_line_defaults():
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    args = parser.parse_args([])
    assert args.model is None and bench_command._int_list(args.batch) == (1, 16, 64)
    assert args.providers == "cpu" and args.repeat == 10 and args.warmup == 2 and args.json is None
    assert args.methods == ""


def test_methods_are_timed_with_their_ratio_to_plain(model_path, capsys):
    result = bench.run_benchmark(model_path, batches=(2,), providers=("cpu",), repeat=2, warmup=0, memory=False,
                                 methods=("gradcam", "reciprocam"))
    cpu = result["providers"][0]
    assert cpu["runtime"] == "onnxruntime" and cpu["precision"] == "f32"
    assert result["settings"]["methods"] == ["gradcam", "reciprocam"]
    run = cpu["runs"][0]
    for method in ("gradcam", "reciprocam"):
        assert len(run[method]["seconds"]) == 2 and "peak_rss_mib" not in run[method]
        assert run["ratios"][method] == run[method]["images_per_s"] / run["plain"]["images_per_s"]
    table = bench.format_table(result)
    line = next(row for row in table.splitlines() if row.startswith("reciprocam "))
    assert f"{1000 / run['reciprocam']['images_per_s']:.2f} ({run['ratios']['reciprocam']:.2f})" in line
    with pytest.raises(InvalidInput, match="methods must be among .* got \\['nocam'\\]"):
        bench.run_benchmark(model_path, batches=(1,), methods=("nocam",), memory=False)


@pytest.mark.parametrize("name, parsed", [("cpu", ("onnxruntime", "cpu")), ("openvino", ("openvino", "CPU", None)),
                                          ("openvino:f32", ("openvino", "CPU", "f32")),
                                          ("openvino:GPU:f16", ("openvino", "GPU", "f16"))])
def test_runtime_names(name, parsed):
    assert bench.parse_runtime(name) == parsed


def test_openvino_runs_at_the_precision_it_reports_or_says_why_not(model_path):
    """OpenVINO at its default and at f32: the precision read back, or skipped with the reason."""
    result = bench.run_benchmark(model_path, batches=(2,), providers=("openvino", "openvino:f32"), repeat=1,
                                 warmup=0, memory=False, methods=("cam",))
    default, f32 = result["providers"]
    try:
        import openvino  # noqa: F401
        from backends import ov_session  # noqa: F401
    except ImportError:
        assert default["status"] == f32["status"] == "skipped"
        assert "openvino" in default["reason"].lower() or "OpenVINO" in default["reason"]
        return
    assert default["status"] == f32["status"] == "ok"
    assert f32["precision"] == "f32" and f32["requested_precision"] == "f32"
    assert default["requested_precision"] is None and default["precision"] in ("f32", "bf16", "f16")
    for entry in (default, f32):
        assert entry["explainer_precision"] == entry["precision"]
        run = entry["runs"][0]
        assert run["plain"]["images_per_s"] > 0 and run["cam"]["images_per_s"] > 0
    assert "auto" not in bench.available_runtimes() and bench.available_runtimes()[-2:] == ["openvino", "openvino:f32"]


@pytest.mark.parametrize("batches", [(), (0, 4), ("a",)])
def test_bad_batches_are_refused(model_path, batches):
    with pytest.raises(InvalidInput, match="batches must be positive integers"):
        bench.run_benchmark(model_path, batches=batches, repeat=1, warmup=0, memory=False)


def test_io_binding_matches_session_run_on_cpu(model_path):
    """The CUDA code path (IO binding), run on the CPU: same outputs as `session.run`."""
    fused = make_session(camcore.fuse(str(model_path), top_k=1, size="input"), ["cpu"])
    plain = make_session(onnx.load(str(model_path)), ["cpu"])
    x = CASES["dynamic_batch"]().random_input(seed=3, shape=(5, 3, 8, 8))
    for session, outputs in ((plain, None), (fused, list(bench.CAM_OUTPUTS))):
        feed = {session.get_inputs()[0].name: x}
        expected = session.run(outputs, feed)
        bound = bench.session_runner(session, feed, outputs, io_binding=True)()
        direct = bench.session_runner(session, feed, outputs, io_binding=False)()
        assert len(bound) == len(expected) == len(direct)
        for a, b, c in zip(bound, expected, direct):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(c, b)
    # Only the outputs asked for are bound and copied back.
    assert [o.shape for o in bench.session_runner(fused, {fused.get_inputs()[0].name: x}, ["cam_maps"],
                                                  io_binding=True)()] == [(5, 1, 8, 8)]


def test_forced_io_binding_on_cpu_runs_the_benchmark(model_path):
    result = bench.run_benchmark(model_path, batches=(2,), repeat=1, warmup=0, memory=False, io_binding=True)
    cpu = result["providers"][0]
    assert cpu["io_binding"] is True and cpu["runs"][0]["fused"]["images_per_s"] > 0


def test_explain_step_gives_one_box_per_image(model_path):
    """The benchmarked NumPy path ends in the largest box of each image, inside the input."""
    explainer = camcore.load(model_path, providers=["cpu"])
    feed = bench.random_feed(explainer.head.inputs, 4)
    found = bench.explain_step(explainer, feed, (8, 8))
    assert len(found) == 4
    for b in found:
        assert b.shape == (1, 4)
        x0, y0, x1, y1 = b[0]
        assert 0 <= x0 < x1 <= 8 and 0 <= y0 < y1 <= 8


def test_memory_probe_reports_the_child_not_the_parent(model_path, tmp_path):
    """A small child of a large parent reports its own peak (ru_maxrss would report the parent's)."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    parent = bench.peak_rss_mib()
    assert parent > 400
    plain, fused = bench.prepare_models(onnx.load(str(model_path)), tmp_path)
    probe = bench._memory_probe({"plain": str(plain), "fused": str(fused), "chain": ["CPUExecutionProvider"],
                                 "io_binding": False, "mode": "plain", "batch": 2})
    assert 10 < probe["setup_rss_mib"] <= probe["peak_rss_mib"] < parent - 300
    del ballast
