"""`camcore.distributed` on a local Ray cluster started here: equality with the single-process path,
corrupt images, a killed actor, the CLI's ``--engine ray`` and resuming an interrupted run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from skimage import io as skio

import camcore
from camcore import distributed
from camcore.errors import InvalidInput, MissingDependency
from camcore.methods import METHODS
from camcore.targets import Targets

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ("chelsea", "coffee", "astronaut", "camera", "rocket", "cat")


def write_photos(folder: Path, n_generated: int = 12) -> tuple:
    """scikit-image's photos (JPEG and PNG), generated JPEGs of several sizes, and corrupt files.

    Returns (good paths, corrupt paths), sorted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for name in SAMPLES:
        image = getattr(data, name)()
        skio.imsave(folder / f"{name}.jpg", image, quality=90)
        good.append(folder / f"{name}.jpg")
    skio.imsave(folder / "chelsea.png", data.chelsea(), check_contrast=False)
    good.append(folder / "chelsea.png")
    rng = np.random.default_rng(0)
    astronaut = data.astronaut()
    for i in range(n_generated):
        h, w = int(rng.integers(60, 400)), int(rng.integers(60, 400))
        y, x = int(rng.integers(0, 512 - h)), int(rng.integers(0, 512 - w))
        path = folder / f"gen-{i:03d}.jpg"
        skio.imsave(path, astronaut[y:y + h, x:x + w], quality=int(rng.integers(60, 95)))
        good.append(path)
    corrupt = [folder / "garbage.jpg", folder / "empty.png", folder / "truncated.jpg"]
    corrupt[0].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    corrupt[1].write_bytes(b"")
    corrupt[2].write_bytes((folder / "coffee.jpg").read_bytes()[:300])
    return sorted(map(str, good)), sorted(map(str, corrupt))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'camcore[ray]')")
    # Ray puts the driver's working directory on the workers' path: make it this checkout
    cwd = os.getcwd()
    os.chdir(ROOT)
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()
    os.chdir(cwd)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def explainer():
    return camcore.load(providers=["cpu"])


def reference(explainer, paths, **options):
    """The single-process results, by path."""
    return {r.source: r for r in explainer.iter_explain_images(paths, errors="report", **options)}


def check_equal(rows, expected, *, maps=None):
    """Rows of explain_dataset equal the single-process results, bit for bit, once per path."""
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(expected) and len(set(paths)) == len(paths)
    for row in rows:
        want = expected[row["path"]]
        assert row["error"] == want.error
        np.testing.assert_array_equal(np.asarray(row["classes"], np.int64), want.classes)
        assert np.asarray(row["scores"]).tolist() == want.scores.astype(np.float64).tolist()
        assert [list(b) for b in row["boxes"]] == [b[0].tolist() if len(b) else [] for b in want.boxes]
        if want.error is None:
            assert (row["height"], row["width"]) == tuple(want.size)
        else:
            assert row["height"] is None and len(row["classes"]) == 0
        if maps == "full":
            np.testing.assert_array_equal(row["maps"], want.maps)
            assert row["maps"].dtype == np.float32
        elif maps == "feature":
            np.testing.assert_array_equal(row["maps"], want.cams)


# ----------------------------------------------------------------- no cluster needed

def test_import_camcore_loads_neither_ray_nor_onnxruntime():
    code = ("import sys, camcore, camcore.distributed\n"
            "print([m for m in ('ray', 'onnxruntime', 'onnx', 'pyarrow') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependency, match=r"camcore\[ray\]"):
        distributed.import_ray()
    with pytest.raises(MissingDependency, match=r"camcore\[ray\]"):
        distributed.explain_dataset(object())


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lime"}, "method must be one of " + ", ".join(map(repr, METHODS)) + ", got 'lime'"),
    ({"top_k": 0}, "top_k must be a positive int, got 0"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"concurrency": 0}, "concurrency must be a positive int or (min, max) ints, got 0"),
    ({"concurrency": (3, 1)}, "concurrency must be a positive int or (min, max) ints, got (3, 1)"),
    ({"num_gpus": -1}, "num_gpus must be a number >= 0, got -1"),
    ({"num_cpus": "1"}, "num_cpus must be a number >= 0, got '1'"),
    ({"maps": "half"}, "maps must be False, True, 'full' or 'feature', got 'half'"),
    ({"threshold": 2}, "threshold must be in [0, 1], got 2"),
    ({"preprocess": 224}, "preprocess must be a camcore.Preprocess, got int"),
    ({"classes": [[281], [285]]}, "classes must be the same (k,) class indices for every image, or a "
                                  "camcore.targets.Targets (per-image rows keyed by path), got [[281], [285]]"),
    ({"classes": ["tabby"]}, "classes must be the same (k,) class indices for every image, or a "
                             "camcore.targets.Targets (per-image rows keyed by path), got ['tabby']"),
    ({"classes": Targets([[281], [285]])}, "per-image targets on a Ray Dataset must be keyed by the images' "
                                           "paths: Targets(rows).keyed(paths) (the dataset's row order is its own)"),
])
def test_explain_dataset_validates_before_ray(kwargs, message):
    with pytest.raises(InvalidInput) as info:
        distributed.explain_dataset(object(), **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("args, kwargs, message", [
    (("a.jpg",), {}, "paths must be a list of paths, got the single path 'a.jpg'"),
    ((["a.jpg"],), {"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ((["a.jpg"], 0), {}, "concurrency must be a positive int or"),
])
def test_path_dataset_validates_before_ray(args, kwargs, message):
    with pytest.raises(camcore.InvalidInput, match=message):
        distributed.path_dataset(*args, **kwargs)


@pytest.mark.parametrize("concurrency, files, batch_size, blocks", [
    (1, None, 64, None), (1, 2000, 64, 8), (2, 2000, 64, 8), (4, 100, 64, 8), ((1, 3), 10_000, 128, 20),
    (1, 1, 64, 1), (8, 5, 4, 5),
])
def test_read_options_make_blocks_of_about_four_batches(concurrency, files, batch_size, blocks):
    options = distributed.read_options(concurrency, files=files, batch_size=batch_size)
    actors = concurrency[-1] if isinstance(concurrency, tuple) else concurrency
    assert options["num_cpus"] == 0 and options["concurrency"] == 2 * actors
    assert options.get("override_num_blocks") == blocks


def test_an_actor_reads_a_path_only_batch_as_it_decodes_the_bytes(photos, tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow comes with the ray extra")
    good, corrupt = photos
    missing = str(tmp_path / "missing.jpg")
    options = distributed._explain_options("auto", 2, None, 0.2, "bilinear")
    actor = distributed.ExplainBatch(None, providers=["cpu"], options=options, maps="feature")
    by_path = actor({"path": good + corrupt + [missing]}).to_pylist()
    by_bytes = actor({"path": good + corrupt, "bytes": [Path(p).read_bytes() for p in good + corrupt]}).to_pylist()
    assert [r["path"] for r in by_path] == good + corrupt + [missing]
    assert by_path[-1]["error"] == f"image not found: {missing}" and by_path[-1]["classes"] == []
    for a, b in zip(by_path, by_bytes):
        assert {k: v for k, v in a.items() if k != "maps"} == {k: v for k, v in b.items() if k != "maps"}
        np.testing.assert_array_equal(np.asarray(a["maps"]), np.asarray(b["maps"]))
    assert sum(r["error"] is not None for r in by_path) == len(corrupt) + 1


def test_a_batch_without_images_names_the_columns_it_takes():
    pytest.importorskip("pyarrow", reason="pyarrow comes with the ray extra")
    actor = distributed.ExplainBatch(None, providers=["cpu"], options=distributed._explain_options(
        "auto", 1, None, 0.2, "bilinear"))
    with pytest.raises(camcore.InvalidInput, match="'bytes', an 'image' or a 'path' column, got \\['item'\\]"):
        actor({"item": ["a.jpg"]})


# ----------------------------------------------------------------- on the cluster

def test_equal_to_the_single_process_path(ray_cluster, photos, explainer):
    good, corrupt = photos
    ds = ray_cluster.data.read_binary_files(good + corrupt, include_paths=True)
    # two actors of half a CPU leave one CPU to the reads
    rows = distributed.explain_dataset(ds, top_k=2, batch_size=5, concurrency=2, num_cpus=0.5, maps=True).take_all()
    expected = reference(explainer, good + corrupt, top_k=2)
    assert all(expected[p].error is not None for p in corrupt)
    assert all(expected[p].error is None for p in good)
    check_equal(rows, expected, maps="full")


def test_a_path_dataset_is_read_by_the_actors(ray_cluster, photos, explainer, tmp_path, monkeypatch):
    good, corrupt = photos
    missing = str(tmp_path / "missing.jpg")
    monkeypatch.chdir(Path(good[0]).parent)
    relative = [Path(good[0]).name]  # made absolute: the actors have another working directory
    ds = distributed.path_dataset(relative + good[1:] + corrupt + [missing], 2, batch_size=4)
    assert ds.num_blocks() == distributed.num_blocks(2, len(good + corrupt) + 1, 4) > 2
    rows = distributed.explain_dataset(ds, top_k=2, batch_size=4, concurrency=2, num_cpus=0.5, maps=True).take_all()
    expected = reference(explainer, good + corrupt, top_k=2)
    assert [r["error"] for r in rows if r["path"] == missing] == [f"image not found: {missing}"]
    check_equal([r for r in rows if r["path"] != missing], expected, maps="full")


@pytest.mark.parametrize("target", ["fixed", "contrast"])
def test_chosen_targets_on_ray_equal_the_local_path(ray_cluster, photos, explainer, target):
    """`classes` as `Explainer.explain_images` takes it: the same two classes for every image, or per-image
    classes explained against a reference class (Targets keyed by path); feature maps bit for bit."""
    good, corrupt = photos
    paths = good + corrupt
    if target == "fixed":
        ours = theirs = [967, 281]  # espresso, tabby
        ds = ray_cluster.data.read_binary_files(paths, include_paths=True)
    else:
        rows = [[(285, 967, 409)[i % 3]] for i in range(len(paths))]  # Egyptian cat, espresso, analog clock
        theirs = Targets(rows, contrast=281)  # each against tabby
        ours = theirs.keyed(paths)
        ds = distributed.path_dataset(paths, 2, batch_size=4)
    rows = distributed.explain_dataset(ds, classes=ours, batch_size=4, concurrency=2, num_cpus=0.5,
                                       maps="feature").take_all()
    expected = reference(explainer, paths, classes=theirs)
    check_equal(rows, expected, maps="feature")
    explained = [np.asarray(r["classes"]).tolist() for r in rows if r["error"] is None]
    assert len(explained) == len(good)
    if target == "fixed":
        assert explained == [[967, 281]] * len(good)
    else:
        by_path = dict(zip(paths, [[(285, 967, 409)[i % 3]] for i in range(len(paths))]))
        assert all(np.asarray(r["classes"]).tolist() == by_path[r["path"]] for r in rows if r["error"] is None)
        # a contrast is not the class alone: the maps differ from the plain class's
        plain = reference(explainer, good[:1], classes=by_path[good[0]])[good[0]]
        mine = next(r for r in rows if r["path"] == good[0])
        assert not np.allclose(mine["maps"], plain.cams)


@pytest.mark.parametrize("classes, method, message", [
    ([1000], "auto", r"classes must be in \[0, 1000\), got 1000"),
    (Targets([[5], [1000]]).keyed(["a.jpg", "b.jpg"]), "auto", r"class 1000 is out of range: the model has 1000"),
    (Targets(contrast=1000), "auto", r"the contrast class must be in \[0, 1000\), got 1000"),
    (Targets(contrast=281), "eigencam", r"contrastive targets need one of cam, gradcam.* method 'eigencam'"),
])
def test_targets_are_checked_against_the_model_before_ray(classes, method, message, monkeypatch):
    monkeypatch.setattr(distributed, "import_ray", lambda: pytest.fail("Ray was reached"))
    with pytest.raises(InvalidInput, match=message):
        distributed.explain_dataset(object(), classes=classes, method=method)


def test_read_images_column_a_preprocess_and_gradcam(ray_cluster, photos, explainer):
    good, _ = photos
    preprocess = camcore.Preprocess.imagenet(224, resize="stretch")
    # mode="RGB": Ray stacks the ragged images of a batch with one ndim (a gray image comes as (1, H, W))
    ds = ray_cluster.data.read_images(good, include_paths=True, mode="RGB")
    rows = distributed.explain_dataset(ds, preprocess=preprocess, top_k=3, batch_size=64, threshold=0.5,
                                       maps="feature", method="gradcam").take_all()
    assert {r["path"] for r in rows} == set(good)
    expected = reference(explainer, good, preprocess=preprocess, top_k=3, threshold=0.5, method="gradcam")
    assert all(r.method == "gradcam" for r in expected.values())
    check_equal(rows, expected, maps="feature")


def explain_batch_pids() -> set:
    """Processes of the explain actors (Ray titles them after the callable class)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::MapWorker(MapBatches(ExplainBatch))"):
            found.add(int(pid))
    return found


def test_a_killed_actor_is_retried_and_the_output_is_complete(ray_cluster, photos, explainer, tmp_path):
    good, corrupt = photos
    paths = (good * 8 + corrupt)  # ~160 images, so the run outlasts the kill
    expected = reference(explainer, sorted(set(paths)))
    ds = ray_cluster.data.read_binary_files(paths, include_paths=True)
    seen, running = set(), threading.Event()

    def watch():  # every actor process that ever ran: a restart shows as a second pid
        while not running.is_set():
            seen.update(explain_batch_pids())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    batches = iter(distributed.explain_dataset(ds, batch_size=2, concurrency=1).iter_batches(batch_size=None))
    rows = []
    first = next(batches)
    rows += [dict(zip(first, values)) for values in zip(*first.values())]
    victims = explain_batch_pids()
    assert len(victims) == 1 and len(rows) < len(paths)
    os.kill(victims.pop(), signal.SIGKILL)
    for batch in batches:
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
    running.set()
    watcher.join()
    assert len(seen) >= 2, "the actor was not restarted: the kill came after the run"
    assert sorted(r["path"] for r in rows) == sorted(paths)  # complete, no duplicates
    for row in rows:
        want = expected[row["path"]]
        assert row["error"] == want.error
        assert np.asarray(row["classes"]).tolist() == want.classes.tolist()
        assert np.asarray(row["scores"]).tolist() == want.scores.astype(np.float64).tolist()


# ----------------------------------------------------------------- the CLI

def camcore_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "camcore.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def local_run(photos, tmp_path_factory):
    good, corrupt = photos
    folder = Path(good[0]).parent
    out = tmp_path_factory.mktemp("local")
    proc = camcore_cli("explain", folder, "--out", out, "--top-k", "2", "--quiet")
    assert proc.returncode == 1 and f"{len(corrupt)} of {len(good) + len(corrupt)} images" in proc.stderr
    return folder, out


def test_cli_ray_engine_writes_what_the_local_engine_writes(ray_cluster, local_run, tmp_path):
    folder, local = local_run
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "ray"
    proc = camcore_cli("explain", folder, "--out", out, "--top-k", "2", "--quiet", "--engine", "ray",
                       "--address", address, "--concurrency", "2", "--batch-size", "4")
    assert proc.returncode == 1, proc.stderr
    assert "Running Dataset" not in proc.stderr and "\tINFO " not in proc.stderr  # Ray Data's console: errors only
    assert "\tWARNING " not in proc.stderr
    assert outputs(out) == outputs(local)  # results.json and every overlay, byte for byte
    # --format auto: the PNG photo's overlay is a PNG, the JPEG photos' are JPEGs
    assert sorted(n.rsplit(".", 1)[1] for n in outputs(out) if ".cam." in n) == ["jpg"] * 18 + ["png"]
    assert not (out / distributed.STAGING).exists()


def test_results_as_json_lines_and_parquet(local_run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the ray extra")
    from camcore.outputs import write_results

    results = json.loads((local_run[1] / "results.json").read_text())
    records = results["images"]
    assert {r["error"] is None for r in records} == {True, False}
    write_results(tmp_path, results, "jsonl")
    write_results(tmp_path, results, "parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "results.parquet"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.to_pylist() == [{**{"overlay": None}, **r} for r in records]
    assert results["runtime"]["backend"] == "onnxruntime"  # which runtime and precision ran
    assert table.schema.metadata == {b"model": results["model"].encode(), b"method": b"cam", b"threshold": b"0.2",
                                     b"runtime": json.dumps(results["runtime"]).encode()}


def test_an_interrupted_run_resumes_with_the_blocks_not_yet_complete(ray_cluster, local_run, tmp_path):
    folder, local = local_run
    paths = [str(p) for p in sorted(folder.iterdir())]
    preprocess = camcore.load(providers=["cpu"]).default_preprocess()
    options = distributed._explain_options("cam", 2, preprocess, 0.2, "bilinear")
    out = tmp_path / "ray"
    calls = []

    def interrupt_at_10(n):
        calls.append(n)
        if sum(calls) >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distributed.explain_files(None, paths, out, options=options, batch_size=4, progress=interrupt_at_10)
    staging = out / distributed.STAGING
    done = sorted(staging.iterdir())
    assert 1 <= len(done) < 6 and not list(out.glob("*.cam.*")) and not list(out.glob("*.json"))
    assert all((b / "records.jsonl").is_file() for b in done)
    # a half-written block of a killed run is thrown away
    (staging / ".tmp-half").mkdir()
    (staging / ".tmp-half" / "records.jsonl").write_text("{")
    calls.clear()
    records = distributed.explain_files(None, paths, out, options=options, batch_size=4, progress=calls.append)
    assert calls[0] == 4 * len(done) and sum(calls[1:]) == len(paths) - 4 * len(done)  # only the rest ran
    assert not staging.exists()
    expected = json.loads((local / "results.json").read_text())["images"]
    assert records == expected
    assert outputs(out) == {n: b for n, b in outputs(local).items() if ".cam." in n}


def test_cli_eval_ray_engine_gives_the_local_figures(ray_cluster, photos, explainer, tmp_path, capsys):
    from camcore.cli import main as cli_main

    good, _ = photos
    images = Path(good[0]).parent
    rng = np.random.default_rng(1)
    predicted = {r.source: int(r.classes[0]) for r in explainer.explain_images(good)}
    lines = {"image_ids.txt": [], "class_labels.txt": [], "localization.txt": []}
    for i, path in enumerate(good):
        name = Path(path).name
        h, w = skio.imread(path).shape[:2]
        label = predicted[path] if i % 3 else int(rng.integers(0, 1000))  # some right, some wrong
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        lines["image_ids.txt"].append(name)
        lines["class_labels.txt"].append(f"{name},{label}")
        lines["localization.txt"].append(f"{name},{x0},{y0},{int(rng.integers(x0 + 1, w))},{int(rng.integers(y0 + 1, h))}")
    meta = tmp_path / "meta"
    meta.mkdir()
    for filename, rows in lines.items():
        (meta / filename).write_text("".join(r + "\n" for r in rows))
    figures = {}
    for engine in ("local", "ray"):
        args = ["eval", "--metadata", meta, "--images", images, "--json", tmp_path / f"{engine}.json",
                "--save-maps", tmp_path / f"maps-{engine}", "--batch-size", "4", "--quiet", "--engine", engine,
                "--faithfulness", "--steps", "2"]
        assert cli_main([str(a) for a in args]) == 0
        figures[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
        for key in ("seconds", "images_per_second"):
            figures[engine].pop(key)
    assert figures["ray"] == figures["local"]
    assert figures["local"]["counts"]["evaluated"] == len(good)
    assert 0 < figures["local"]["top1_cls"] < 100 and 0 < figures["local"]["max_box_acc_v2"] < 100
    assert 0 < figures["local"]["faithfulness"]["deletion_auc"] < 1
    for saved in (tmp_path / "maps-local").iterdir():
        assert saved.read_bytes() == (tmp_path / "maps-ray" / saved.name).read_bytes()
    assert ray_cluster.is_initialized()  # an engine started elsewhere is left running


@pytest.mark.parametrize("command", ["explain", "eval"])
@pytest.mark.parametrize("flags, message", [
    (["--address", "auto"], "--address needs --engine ray"),
    (["--concurrency", "2"], "--concurrency needs --engine ray"),
    (["--num-gpus", "1", "--engine", "local"], "--num-gpus needs --engine ray"),
])
def test_ray_options_need_the_ray_engine(command, flags, message, tmp_path, capsys):
    from camcore.cli import main as cli_main

    args = [str(tmp_path)] if command == "explain" else ["--metadata", str(tmp_path), "--images", str(tmp_path)]
    assert cli_main([command, *args, *flags]) == 1
    assert capsys.readouterr().err == f"camcore: error: {message}\n"
    assert list(tmp_path.iterdir()) == []
