"""Explain datasets of images on Ray Data: `explain_dataset`, and the engine of ``--engine ray``.

Ray's batch-inference pattern: ``Dataset.map_batches`` with a callable class
whose ``__init__`` loads the model once per actor (an onnxruntime session cannot
be pickled, so each actor builds its own) and whose ``__call__`` explains one
batch through `Explainer.iter_explain_images`, the single-process path, so
results are the same bit for bit.  Ray is imported lazily (``pip install
'camcore[ray]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import InvalidInput, missing_dependency
from .methods import METHODS
from .outputs import _record, _umask, _unique_name, encode_image, overlay_format, render
from .preprocess import EncodedImage, Preprocess

__all__ = ["explain_dataset", "path_dataset", "read_options"]

# Actor retries: a killed actor is restarted and its in-flight batches run again.
RETRIES = {"max_restarts": 4, "max_task_retries": 4}


def import_ray():
    """``ray`` with Ray Data, or `MissingDependency` naming the ``ray`` extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise missing_dependency("ray", "ray") from None
    return ray


@contextlib.contextmanager
def ray_session(address=None):
    """The CLI's Ray: connected to `address` (a cluster), or a local instance started here and shut down after.

    When Ray is already initialized (a notebook, a test), it is used as it is and left running.
    Ray Data's progress bars are off inside and its console shows errors only (the CLI
    has its own progress bar); its log file in the session folder keeps everything.
    """
    import logging

    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    progress_bars, levels = context.enable_progress_bars, [h.level for h in consoles]
    context.enable_progress_bars = False
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.ERROR))
    try:
        yield ray
    finally:
        context.enable_progress_bars = progress_bars
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)
        if started:
            ray.shutdown()


def _explain_options(method, top_k, preprocess, threshold, upsample) -> dict:
    """Keyword arguments of `Explainer.iter_explain_images`, validated; the one place `method` goes."""
    if method not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInput(f"top_k must be a positive int, got {top_k!r}")
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise InvalidInput(f"preprocess must be a camcore.Preprocess, got {type(preprocess).__name__}")
    if not 0 <= float(threshold) <= 1:
        raise InvalidInput(f"threshold must be in [0, 1], got {threshold!r}")
    if upsample not in ("nearest", "bilinear", "bicubic"):
        raise InvalidInput(f"upsample must be one of 'nearest', 'bilinear', 'bicubic', got {upsample!r}")
    return {"method": method, "top_k": int(top_k), "preprocess": preprocess, "threshold": threshold,
            "upsample": upsample}


def _dataset_targets(classes):
    """`explain_dataset`'s `classes`, checked before Ray starts: None, the same ``(k,)`` classes for every
    image, or a `camcore.targets.Targets`, whose per-image rows are keyed by path (`Targets.keyed`)
    and are re-keyed here by absolute path, as `path_dataset` names the rows.

    Class indices are checked against the model by `_check_targets`.
    """
    from .targets import Targets

    if classes is None:
        return None
    if isinstance(classes, Targets):
        if classes.rows is None:
            return classes
        by_key = getattr(classes, "by_key", None)
        if by_key is None:
            raise InvalidInput("per-image targets on a Ray Dataset must be keyed by the images' paths: "
                               "Targets(rows).keyed(paths) (the dataset's row order is its own)")
        keyed = classes[slice(None)]
        keyed.by_key = {os.path.abspath(k): row for k, row in by_key.items()}
        return keyed
    try:
        chosen = np.asarray(classes)
    except (TypeError, ValueError):
        chosen = np.asarray(None)
    if chosen.ndim != 1 or chosen.size == 0 or chosen.dtype.kind not in "iu":
        raise InvalidInput(f"classes must be the same (k,) class indices for every image, or a "
                           f"camcore.targets.Targets (per-image rows keyed by path), got {classes!r}")
    return [int(c) for c in chosen]


def _check_targets(targets, model, *, feature, preprocess, method) -> None:
    """Check `targets` against the model here, before Ray starts: a bad class fails in one line
    (`InvalidInput`) rather than inside an actor, wrapped in Ray's exceptions.  The model's head is
    found on onnxruntime's CPU provider: the classes do not depend on the runtime."""
    from .explainer import _class_selection

    explainer = _load_in_actor(model, ["cpu"], feature, None, size=preprocess.size if preprocess is not None else None)
    num_classes = explainer.head.num_classes
    if isinstance(targets, list):
        _class_selection(targets, 1, num_classes)
        return
    targets.validate(len(targets), num_classes)
    targets.check_method(explainer.resolve_method(method), num_classes)


def read_options(concurrency, *, files: int | None = None, batch_size: int = 64) -> dict:
    """Options of ``ray.data.read_*`` feeding `concurrency` actors.

    Reading bytes is I/O (decoding runs in the actors): 0 CPUs, so that actors holding
    every CPU never leave the reads waiting, and at most 2 read tasks per actor, as Ray
    would otherwise start a worker process for every 0-CPU read task at once.  Given the
    number of `files`, blocks of about four batches each (`num_blocks`).
    """
    actors = _pool_sizes(concurrency)[-1]
    options = {"num_cpus": 0, "concurrency": 2 * actors}
    if files is not None:
        options["override_num_blocks"] = num_blocks(concurrency, files, batch_size)
    return options


def num_blocks(concurrency, files: int, batch_size: int = 64) -> int:
    """Blocks for `files` images feeding `concurrency` actors: about four batches each, at least two per actor.

    Ray's default of at least 200 blocks costs each a task's overhead, which on 2 cores
    made the actor's calls 15-20 % slower (1,000 JPEGs: 18.6-20.2 s busy against
    15.9-17.0 s in 8 blocks).
    """
    actors = _pool_sizes(concurrency)[-1]
    return max(1, min(files, max(2 * actors, -(-files // (4 * batch_size)))))


def path_dataset(paths, concurrency=1, *, batch_size: int = 64):
    """A Ray Dataset of image files by `path` alone, for `explain_dataset`: the actors read the files.

    The cheapest input when every node sees the files (a local run, a shared
    filesystem): no read tasks, no bytes in Ray's object store, no per-file listing
    on the driver (``read_binary_files`` of 1,500 paths spends 0.3 s there).  Files
    that are missing or corrupt become rows with an ``error``.  Relative paths are made
    absolute: the actors do not share the driver's working directory.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise InvalidInput(f"paths must be a list of paths, got the single path {paths!r}")
    _check_batch_size(batch_size)
    paths = [os.path.abspath(p) for p in paths]
    blocks = num_blocks(concurrency, max(1, len(paths)), batch_size)  # validates concurrency, before Ray
    return import_ray().data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInput(f"batch_size must be a positive int, got {batch_size!r}")


def _providers(num_gpus) -> list:
    return ["cuda", "cpu"] if num_gpus else ["cpu"]


def _runtime(backend="onnxruntime", device=None, precision=None) -> dict:
    """The `camcore.load` arguments that pick the runtime, as the actors get them."""
    return {"backend": backend, "device": device, "precision": precision}


def _load_in_actor(model, providers, feature, runtime, size=None):
    """`camcore.load` in an actor: onnxruntime's providers apply to onnxruntime only; `size` is the
    input size a dynamic-size transformer is analysed at."""
    from .api import load

    runtime = runtime or _runtime()
    if runtime.get("backend", "onnxruntime") != "onnxruntime":
        providers = None
    return load(model, providers=providers, feature=feature, size=size, **runtime)


class ExplainBatch:
    """The ``map_batches`` callable: one model per actor, one batch of images per call.

    A batch holds ``bytes`` (`ray.data.read_binary_files`, decoded as
    `camcore.preprocess.read_image` decodes files) or ``image`` arrays
    (`ray.data.read_images`), and optionally ``path``; or only ``path``, files that
    the actor reads (`path_dataset`).  With ``output="cli"`` it
    returns the CLI's results.json records and encoded overlays instead of arrays.
    """

    def __init__(self, model, *, providers, feature=None, options: dict, maps=False, output: str = "columns",
                 image_format: str = "auto", maps_dtype=None, runtime=None):
        preprocess = options.get("preprocess")  # a dynamic-size transformer is analysed at its size
        self.explainer = _load_in_actor(model, providers, feature, runtime,
                                        size=preprocess.size if preprocess is not None else None)
        self.options, self.maps, self.output, self.image_format = dict(options), maps, output, image_format
        self.targets = self.options.pop("classes", None)  # (k,) ints, or a camcore.targets.Targets keyed by path
        self.maps_dtype = maps_dtype

    def __call__(self, batch: dict):
        import pyarrow as pa

        key = next((k for k in ("bytes", "image", "path") if k in batch), None)
        if key is None:
            raise InvalidInput(f"the dataset must have a 'bytes', an 'image' or a 'path' column, got {sorted(batch)}")
        n = len(batch[key])
        paths = [None if p is None else str(p) for p in batch["path"]] if "path" in batch else [None] * n
        # Read and decoded in the explainer's reader threads, ahead of inference, as locally.
        if key == "path":
            images = paths
        else:
            images = [EncodedImage(item, path or "<bytes>") if key == "bytes" else np.asarray(item)
                      for path, item in zip(paths, batch[key])]
        classes = self.targets.for_keys(paths) if hasattr(self.targets, "for_keys") else self.targets
        stream = self.explainer._explain_image_stream(
            images, classes=classes, batch_size=None, errors="report", workers=None,
            keep_pixels=self.output == "cli", **self.options)
        rows = [self._row(path, None if kept is None else kept[0], result)
                for path, (result, kept) in zip(paths, stream)]
        if self.output == "cli":
            columns = {"path": pa.array(paths, pa.string()),
                       "record": pa.array([r[0] for r in rows], pa.string()),
                       "overlay": pa.array([r[1] for r in rows], pa.binary())}
            if self.maps_dtype is not None:
                columns["maps"] = pa.array([r[2] for r in rows], pa.binary())
            return pa.table(columns)
        return self._table(rows)

    def _row(self, path, pixels, result):
        if self.output == "cli":
            overlay = maps = None
            if result.error is None:
                overlay = encode_image(render(pixels, result, self.explainer), overlay_format(path, self.image_format))
                if self.maps_dtype is not None:
                    from .saved_maps import save_maps

                    maps = save_maps(None, [result], dtype=self.maps_dtype, class_names=self.explainer.class_name)
            return json.dumps(_record(path, result, self.explainer)), overlay, maps
        row = {"path": path, "height": None, "width": None, "classes": result.classes, "scores": result.scores,
               "boxes": [b[0].tolist() if len(b) else [] for b in result.boxes], "error": result.error}
        if result.error is None:
            row["height"], row["width"] = (int(v) for v in result.size)
        if self.maps:
            row["maps"] = result.cams if self.maps == "feature" else result.maps
        return row

    def _table(self, rows):
        import pyarrow as pa
        from ray.data.extensions import ArrowVariableShapedTensorArray

        columns = {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "height": pa.array([r["height"] for r in rows], pa.int64()),
            "width": pa.array([r["width"] for r in rows], pa.int64()),
            "classes": pa.array([r["classes"] for r in rows], pa.list_(pa.int64())),
            "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float32())),
            "boxes": pa.array([r["boxes"] for r in rows], pa.list_(pa.list_(pa.int64()))),
            "error": pa.array([r["error"] for r in rows], pa.string()),
        }
        if self.maps:
            columns["maps"] = ArrowVariableShapedTensorArray.from_numpy([r["maps"] for r in rows])
        return pa.table(columns)


def explain_dataset(ds, model=None, *, method: str = "auto", top_k: int = 1, preprocess: Preprocess | None = None,
                    batch_size: int = 64, concurrency=1, num_gpus: float = 0, maps=False, threshold: float = 0.2,
                    upsample: str = "bilinear", num_cpus: float = 1, feature: str | None = None,
                    backend: str = "onnxruntime", device: str | None = None, precision: str | None = None,
                    classes=None):
    """Explain every image of a Ray Dataset (CAM or another `method`) on a pool of Ray actors.

    Each actor loads the model once (``concurrency`` actors, ``num_gpus`` GPUs
    each, onnxruntime's CUDA provider when GPUs are given) and explains
    ``batch_size`` images per call with `Explainer.iter_explain_images`: the
    results are those of `Explainer.explain_images` on the same images, bit for
    bit.  An image that cannot be decoded or preprocessed becomes a row with an
    ``error``; it never fails the job.  A killed actor is restarted and its
    batches run again.

    Parameters
    ----------
    ds : ray.data.Dataset
        A ``bytes`` column (``ray.data.read_binary_files(..., include_paths=True)``,
        the robust choice: corrupt files become error rows) or an ``image``
        column (``ray.data.read_images(..., include_paths=True, mode="RGB")``,
        decoded by Ray, which fails the read on a corrupt file; without
        ``mode="RGB"`` a batch mixing gray and color images is mangled); ``path``
        is kept when present.  A ``path`` column alone (`path_dataset`) has the
        actors read the files, as the local engine does: the fastest input where
        every node sees the files.
    model : path, onnx.ModelProto or None
        None is the embedded EfficientNet-Lite0.  A path must be readable on every node.
    method : str
        As in `Explainer.explain`: "auto" (CAM where the head is GAP + affine, else
        Grad-CAM), "cam", a gradient method ("gradcam", ...) or a forward-only one.
    top_k : int
    classes : None, (k,) sequence of int, or camcore.targets.Targets, optional
        Which classes to explain, as `Explainer.explain_images` takes them (instead of
        `top_k`): the same classes for every image, or a `Targets` (named classes,
        multi-label thresholds, contrastive and negated targets).  A `Targets` of
        per-image rows must be keyed by the images' paths (``Targets(rows).keyed(paths)``,
        matched as absolute paths against the ``path`` column): the rows of a Dataset come
        in Ray's order.  They are checked against the model before Ray starts (its head
        is found here once, on onnxruntime's CPU provider).
    preprocess : Preprocess, optional
        Default: the model's (`Explainer.default_preprocess`).
    batch_size : int
        Images per actor call (the unit Ray retries); the model runs on chunks of the
        explainer's batch size (32) of them, so that decoding overlaps inference.
    concurrency : int or (min, max)
        Actors in the pool (Ray's ``concurrency``).
    num_gpus : float
        GPUs per actor; 0 runs on CPUs.
    feature : str, optional
        Target layer (`camcore.load`'s `feature`).
    backend, device, precision : str, optional
        The runtime each actor loads the model on (`camcore.load`'s): e.g.
        ``backend="openvino", precision="f32"``.  onnxruntime's providers apply to
        onnxruntime only.
    num_cpus : float
        CPUs Ray reserves per actor.  Leave some to the read tasks of `ds`
        (``concurrency * num_cpus`` below the cluster's CPUs, or read with
        ``**read_options(concurrency, files=len(paths))``): actors holding every CPU leave the reads
        waiting forever.
    maps : {False, True, "full", "feature"}
        Add a ``maps`` column: ``(k, H0, W0)`` float32 maps in [0, 1] on the original
        image (True or "full"), or the raw ``(k, h, w)`` CAMs at feature resolution.
    threshold : float in [0, 1]
        Box threshold, as in `Explainer.explain_images`.
    upsample : {"nearest", "bilinear", "bicubic"}

    Returns
    -------
    ray.data.Dataset
        Lazy; one row per image with ``path`` (str or None), ``height``, ``width``,
        ``classes`` (k int64), ``scores`` (k float32), ``boxes`` (k lists: ``[x0, y0,
        x1, y1]`` half-open in original-image pixels, or ``[]`` for a constant map),
        ``error`` (None, or why the image could not be explained, then ``classes``
        is empty) and, when asked, ``maps``.  Row order is Ray's.
    """
    options = _explain_options(method, top_k, preprocess, threshold, upsample)
    targets = _dataset_targets(classes)
    if targets is not None:
        options["classes"] = targets
    _check_batch_size(batch_size)
    for name, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
            raise InvalidInput(f"{name} must be a number >= 0, got {value!r}")
    if not (isinstance(maps, bool) or maps in ("full", "feature")):
        raise InvalidInput(f"maps must be False, True, 'full' or 'feature', got {maps!r}")
    _pool_sizes(concurrency)
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        model = str(Path(model).resolve())  # actors do not share the driver's working directory
    if targets is not None:
        _check_targets(targets, model, feature=feature, preprocess=preprocess, method=method)
    import_ray()
    return _map(ds, ExplainBatch, batch_size=int(batch_size), concurrency=concurrency, num_gpus=num_gpus,
                num_cpus=num_cpus, model=model, providers=_providers(num_gpus), feature=feature, options=options,
                runtime=_runtime(backend, device, precision),
                maps="full" if maps is True else maps, output="columns")


def _map(ds, actor, *, batch_size, concurrency, num_gpus, num_cpus=1, **constructor_kwargs):
    """``ds.map_batches`` on a pool of `actor` (`ExplainBatch`, `EvaluateBatch`): the one place Ray runs them.

    An actor runs one call at a time: two at once (each decoding while the other runs
    the model) measured 8-15 points more overhead against the local engine, their
    thread pools contending for the same cores (benchmarks/README.md).
    """
    ray = import_ray()
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote kwargs as a whole, yet documents these as the way to
        # bound the actor pool's retries (its default retries forever, also on a batch that kills the actor)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            actor, batch_size=batch_size, batch_format="numpy", compute=_pool(ray, concurrency),
            num_gpus=num_gpus or None, num_cpus=num_cpus, fn_constructor_kwargs=constructor_kwargs, **RETRIES)


def _pool_sizes(concurrency) -> tuple:
    sizes = tuple(concurrency) if isinstance(concurrency, (tuple, list)) else (concurrency,)
    if len(sizes) not in (1, 2) or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                                          for n in sizes) or sizes[0] > sizes[-1]:
        raise InvalidInput(f"concurrency must be a positive int or (min, max) ints, got {concurrency!r}")
    return tuple(int(n) for n in sizes)


def _pool(ray, concurrency):
    """Ray's actor pool for `concurrency`: n actors, or an autoscaling (min, max) pool."""
    sizes = _pool_sizes(concurrency)
    size = {"size": sizes[0]} if len(sizes) == 1 else {"min_size": sizes[0], "max_size": sizes[1]}
    return ray.data.ActorPoolStrategy(**size)


# ----------------------------------------------------------------- the CLI engine

STAGING = ".camcore-ray"  # per-block results of an unfinished run, inside the output folder


def _as_given(record: str, path: str, given: str) -> str:
    """A record made on an actor, which read the absolute `path`, naming the image as the user gave it."""
    if path == given:
        return record
    record = json.loads(record)
    record["path"] = given
    if record["error"] is not None:  # "cannot read image PATH: ...", "image not found: PATH"
        record["error"] = record["error"].replace(path, given, 1)
    return json.dumps(record)


class _Blocks:
    """The output folder's staging area: one folder per complete block, renamed into place atomically.

    A block is ``size`` consecutive images of the run; its folder name holds a hash of
    its paths and of the settings, so a rerun of an interrupted run, with the same output
    folder and settings, skips the blocks already complete (other settings recompute
    them).  Once every block is complete, `merge` moves the overlays into the output
    folder and removes the staging area.
    """

    def __init__(self, out: Path, paths: list, size: int, settings: dict):
        self.root = out / STAGING
        key = json.dumps(settings, sort_keys=True, default=str)
        self.blocks = []
        for start in range(0, len(paths), size):
            members = paths[start:start + size]
            digest = hashlib.sha256("\n".join([key] + members).encode()).hexdigest()[:16]
            self.blocks.append((f"block-{start // size:06d}-{digest}", members))

    def pending(self) -> list:
        """``(name, paths)`` of the blocks not yet complete; leftovers of interrupted writes are removed."""
        if self.root.is_dir():
            for leftover in self.root.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        return [(name, members) for name, members in self.blocks if not (self.root / name).is_dir()]

    def write(self, name: str, records: list, overlays: list, maps: list = ()) -> None:
        """Write one block (JSON records in order, overlay bytes or None each, and with `maps` the
        images' raw maps as one ``maps.npz``) as a folder, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
            for j, overlay in enumerate(overlays):
                if overlay is not None:
                    (tmp / f"{j}.overlay").write_bytes(overlay)
            if any(m is not None for m in maps):  # one file per block: the images' maps in block order
                import io

                from .saved_maps import load_maps, save_maps

                results = [r for m in maps if m is not None for r in load_maps(io.BytesIO(m))]
                save_maps(tmp / "maps.npz", results)
            (tmp / "records.jsonl").write_text("".join(r + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def merge(self, out: Path, unique_name, image_format: str, maps: bool = False) -> list:
        """Move the overlays into `out` under the local engine's names, and each block's maps to
        ``maps-NNNNNN.npz``; return every record in order."""
        records, taken = [], set()
        for number, (name, members) in enumerate(self.blocks):
            folder = self.root / name
            lines = (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
            maps_name, index = f"maps-{number:06d}.npz", 0
            if (folder / "maps.npz").is_file():
                os.replace(folder / "maps.npz", out / maps_name)
            has_maps = maps and (out / maps_name).is_file()
            for j, (path, line) in enumerate(zip(members, lines)):
                record = json.loads(line)
                if record["error"] is None:
                    filename = unique_name(Path(path).stem, taken, overlay_format(path, image_format))
                    staged = folder / f"{j}.overlay"
                    if staged.is_file():  # else moved by an earlier, interrupted merge
                        os.replace(staged, out / filename)
                    record["overlay"] = filename
                    if has_maps:
                        record["maps"], record["maps_index"] = maps_name, index
                        index += 1
                records.append(record)
        shutil.rmtree(self.root)  # the run is complete: its results are in `out`
        return records


def explain_files(model, paths: list, out, *, options: dict, batch_size: int = 64, concurrency=1,
                  num_gpus: float = 0, providers=None, address=None, feature=None, image_format: str = "auto",
                  progress=None, maps_dtype=None, backend: str = "onnxruntime", device=None,
                  precision=None) -> list:
    """Explain image files on Ray and write their overlays into `out`: the engine of ``--engine ray``.

    Returns the results.json records in the order of `paths`, the same as the local
    engine's.  Blocks of `batch_size` images are staged in ``out/.camcore-ray`` as
    they complete, so an interrupted run resumes where it stopped.  Without
    `address` (and no Ray already initialized) a local Ray instance is started and
    shut down.  `progress` is called with the number of images done.
    """
    from .explainer import ImageExplanation

    import_ray()
    out = Path(out)
    if isinstance(model, (str, os.PathLike)):
        model = str(Path(model).resolve())  # actors do not share the driver's working directory
    settings = {"model": model, "feature": feature, "image_format": image_format, "maps": maps_dtype, **options}
    blocks = _Blocks(out, [str(p) for p in paths], batch_size, settings)
    todo = blocks.pending()
    if progress is not None:
        progress(len(paths) - sum(len(m) for _, m in todo))
    wanted = {p for _, members in todo for p in members}
    missing = {p for p in wanted if not Path(p).is_file()}
    results = {}
    for p in missing:  # what read_image says; Ray would fail the whole read
        error = ImageExplanation(p, (0, 0), np.zeros(0, np.int64), np.zeros(0, np.float32), [],
                                 np.zeros((0, 0, 0), np.float32), None, error=f"image not found: {p}")
        results[p] = (json.dumps(_record(p, error, None)), None, None)
    owner = {str(Path(p).resolve()): p for p in wanted - missing}  # the path Ray reports -> as given
    waiting = {name: set(members) for name, members in todo}
    members_of = dict(todo)
    blocks_of = {}
    for name, members in todo:
        for p in members:
            blocks_of.setdefault(p, []).append(name)

    def arrived(path):
        for name in blocks_of[path]:
            waiting[name].discard(path)
            if not waiting[name]:
                rows = [results[p] for p in members_of[name]]
                blocks.write(name, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        for p in {p for name in blocks_of[path] if not waiting[name] for p in members_of[name]}:
            if not any(waiting[b] for b in blocks_of[p]):
                results.pop(p, None)  # its blocks are on disk

    if options.get("classes") is not None:  # the actors look each image's targets up by its absolute path
        options = {**options, "classes": options["classes"].keyed([str(Path(p).resolve()) for p in paths])}
    with ray_session(address) if owner else contextlib.nullcontext():
        for p in missing:
            arrived(p)
        if owner:
            ds = path_dataset(sorted(owner), concurrency, batch_size=batch_size)
            ds = _map(ds, ExplainBatch, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                      model=model, providers=providers or _providers(num_gpus), feature=feature,
                      options=options, maps=False, output="cli", image_format=image_format, maps_dtype=maps_dtype,
                      runtime=_runtime(backend, device, precision))
            columns = ("path", "record", "overlay") + (("maps",) if maps_dtype is not None else ())
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for path, record, overlay, *maps in zip(*(batch.column(c).to_pylist() for c in columns)):
                    given = owner[path]
                    results[given] = (_as_given(record, path, given), overlay, maps[0] if maps else None)
                    arrived(given)
                    if progress is not None:
                        progress(1)
    return blocks.merge(out, _unique_name, image_format, maps=maps_dtype is not None)


# ----------------------------------------------------------------- evaluation

class EvaluateBatch:
    """The ``map_batches`` callable of ``camcore eval --engine ray``: the counts of pickled sample batches."""

    def __init__(self, model, *, providers, feature, scorer, size=None, runtime=None):
        self.explainer = _load_in_actor(model, providers, feature, runtime, size=size)
        self.scorer = scorer

    def __call__(self, batch: dict):
        import pyarrow as pa

        counts = []
        for blob in batch["samples"]:
            index, samples = pickle.loads(blob)
            *run, faithfulness = self.scorer.forward(self.explainer, samples)
            counts.append(pickle.dumps((index, self.scorer.score(samples, *run) + (faithfulness,))))
        return pa.table({"counts": pa.array(counts, pa.binary())})


def evaluate_engine(model, *, concurrency=1, num_gpus: float = 0, providers=None, feature=None, size=None,
                    backend: str = "onnxruntime", device=None, precision=None):
    """An `engine` for `camcore.evaluation.evaluate` that runs the batches on a Ray actor pool.

    Call it inside `ray_session`.  Images (and masks, and ``save_maps``) are read from
    the paths of the dataset, so on a cluster they must be on storage every node sees.
    """
    _pool_sizes(concurrency)
    if isinstance(model, (str, os.PathLike)):
        model = str(Path(model).resolve())

    def engine(scorer, batches):
        ray = import_ray()
        ds = ray.data.from_items([{"samples": pickle.dumps((i, b))} for i, b in enumerate(batches)])
        ds = _map(ds, EvaluateBatch, batch_size=1, concurrency=concurrency, num_gpus=num_gpus, model=model,
                  providers=providers or _providers(num_gpus), feature=feature, scorer=scorer, size=size,
                  runtime=_runtime(backend, device, precision))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for blob in batch.column("counts").to_pylist():
                yield pickle.loads(blob)

    return engine
