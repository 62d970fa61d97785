"""Benchmark measurements behind `camcore bench`: plain inference, `explain`, the fused graph and each method.

For each runtime and batch size, these configurations run on the same inputs:

* ``plain``: the unmodified model in its own session (compiled model);
* ``explain``: the NumPy path, ``Explainer.explain(top_k=1)`` (one run with the
  feature tensor exposed), then `camcore.upsample` of the map to the input size,
  `camcore.normalize` and the largest box per image (`camcore.boxes`);
* ``fused``: ``camcore.fuse(model, top_k=1, size="input")`` in its own session;
* each method of `methods`: ``Explainer.explain(top_k=1, method=...)``, the maps at
  feature resolution.

Runtimes: onnxruntime providers (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or full names),
and OpenVINO as ``"openvino"`` (the device's default precision: the model as deployed,
bf16 on CPUs with AVX512-BF16 or AMX) or ``"openvino:f32"``, ``"openvino:bf16"``,
``"openvino:f16"`` (``INFERENCE_PRECISION_HINT``), on OpenVINO's ``CPU`` device unless
named (``"openvino:GPU:f16"``).  Each runtime's entry records the precision read back
from the compiled model.  ``"auto"`` stands for every runtime present here: onnxruntime
on each of CPU, CUDA and TensorRT it has, and OpenVINO at its default and at f32 when the
``openvino`` backend is installed.

Timing is interleaved: each round runs every batch size and every configuration
once (the configuration order rotates from round to round), so a noisy machine
slows all of them alike.  After `warmup` rounds, `repeat` rounds are kept and the
throughput reported is the median of the per-round images per second.

Peak memory: a process's peak resident set size (see `peak_rss_mib`) only grows,
so one process cannot give each configuration its own peak.  Each
configuration is therefore measured in a fresh Python subprocess that sets it up,
records its peak RSS (``setup_rss_mib``), runs it three times and records the
peak again (``peak_rss_mib``).  Both are whole-process figures (Python, numpy,
onnxruntime and the model included).

All sessions are made by `backends.ort_session.make_session` with the same default
``SessionOptions``.  On CUDA and TensorRT the plain and fused models run with IO
binding: the input is bound once on the device and only the outputs the caller
needs (the logits, or ``cam_classes``/``cam_scores``/``cam_maps``) are copied
back, so the fused path's features never leave the device.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import numpy as np

from . import default_model
from .api import fuse, load
from .errors import CamError, InvalidInput
from .localize import boxes
from .maps import normalize, upsample

# Application code: the backends (onnxruntime sessions, graph loading) are imported
# inside the functions that use them.

__all__ = ["run_benchmark", "format_table", "session_runner", "machine", "Configurations", "OpenVinoConfigurations",
           "prepare_models", "time_interleaved", "median_throughput", "provider_chain", "random_feed", "explain_step",
           "peak_rss_mib", "method_step", "DEFAULT_METHODS", "available_runtimes", "parse_runtime"]

MODES = ("plain", "explain", "fused")
# Every registered method but Score-CAM (K whole-model runs per image: 1280 for Lite0), which
# `methods=` can still name.
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "ablationcam",
                   "reciprocam")
CAM_OUTPUTS = ("cam_classes", "cam_scores", "cam_maps")
# Execution providers tried in order for each benchmarked provider (onnxruntime's
# recommended fallbacks: TensorRT falls back to CUDA for unsupported nodes).
_CHAINS = {
    "CPUExecutionProvider": ["CPUExecutionProvider"],
    "CUDAExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_DYNAMIC_SIZE = 224  # stands for dynamic spatial axes


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """Where the benchmark ran: platform, CPU, cores, Python, numpy and onnxruntime."""
    from backends.ort_session import import_onnxruntime

    ort = import_onnxruntime()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gib": _memory_gib(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "openvino": _openvino_version(),
    }


def _openvino_version():
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def _memory_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB.

    On Linux, ``VmHWM`` from ``/proc/self/status``: the peak of the current process
    image.  ``getrusage().ru_maxrss`` is not used there because it carries over the
    forking parent's resident size across ``exec``, so a small child of a large
    parent would report the parent's size.  Elsewhere, ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


# --------------------------------------------------------------------------- runners


def _device(session) -> str:
    return "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"


def session_runner(session, feed: dict, outputs=None, *, io_binding: bool = False):
    """A no-argument callable that runs `session` on `feed` and returns `outputs` as numpy arrays.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
    feed : dict of str to ndarray
    outputs : list of str, optional
        Outputs to return (default: all, in graph order).
    io_binding : bool
        Bind the inputs once on the session's device and bind `outputs` to that
        device, copying them to the host after each run.  Outputs that are not
        asked for are not bound, so they are neither fetched nor copied.

    Returns
    -------
    callable
        ``run() -> list of ndarray``, in the order of `outputs`.
    """
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    if not io_binding:
        return lambda: session.run(names, feed)
    from backends.ort_session import import_onnxruntime

    ort = import_onnxruntime()
    device = _device(session)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
    for name in names:
        binding.bind_output(name, device)

    def run():
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return run


def _input_hw(shape: tuple) -> tuple:
    """(H, W) of a 4-D image input, NCHW when axis 1 holds 1 or 3 channels, else NHWC."""
    return tuple(shape[2:4]) if shape[1] in (1, 3) else tuple(shape[1:3])


def random_feed(specs, batch: int, seed: int = 0) -> dict:
    """Random inputs for every graph input; dynamic non-batch axes become 224."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [batch] + [d if isinstance(d, int) and d > 0 else _DYNAMIC_SIZE for d in spec.shape[1:]]
        if np.dtype(spec.dtype).kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, spec.dtype)
    return feed


def explain_step(explainer, feed: dict, size: tuple) -> list:
    """The NumPy path: top-1 CAM, upsample to the input size, normalize, largest box.

    The whole batch goes to onnxruntime in one run, as in plain inference.
    """
    batch = len(next(iter(feed.values())))
    out = explainer.explain(feed, top_k=1, batch_size=batch)
    maps = normalize(upsample(out.maps[:, 0], size))
    return [boxes(m) for m in maps]


def method_step(explainer, feed: dict, method: str):
    """A no-argument callable: ``explain(top_k=1, method=method)`` on the whole batch, maps at feature size."""
    batch = len(next(iter(feed.values())))
    return lambda: explainer.explain(feed, top_k=1, batch_size=batch, method=method).maps


def _onnx_graph():
    from backends import onnx_graph

    return onnx_graph


def _session(path, chain):
    """An onnxruntime session for the model file at `path` on the providers `chain`."""
    from backends.ort_session import make_session

    return make_session(_onnx_graph().load_model(path)[0], chain)


class Configurations:
    """The three configurations of one provider, built from saved model files.

    Each configuration's session is made on first use, so that a memory probe
    holds only the one it measures.

    Parameters
    ----------
    plain_path, fused_path : path
        The unmodified model and its fused copy (see `prepare_models`).
    chain : list
        onnxruntime providers for every session.
    io_binding : bool
        Run plain and fused through IO binding (see `session_runner`).
    """

    def __init__(self, plain_path, fused_path, chain, io_binding: bool):
        self.paths = {"plain": plain_path, "fused": fused_path}
        self.chain = chain
        self.io_binding = io_binding
        self.specs = _onnx_graph().graph_inputs(_onnx_graph().load_model(plain_path)[0])

    @cached_property
    def plain(self):
        return _session(self.paths["plain"], self.chain)

    @cached_property
    def fused(self):
        return _session(self.paths["fused"], self.chain)

    @cached_property
    def explainer(self):
        return load(self.paths["plain"], providers=self.chain)

    runtime = "onnxruntime"

    @property
    def precision(self) -> str:
        """onnxruntime runs every op at the model's own types."""
        return "f32" if all(np.dtype(s.dtype) == np.float32 for s in self.specs) else "model's own types"

    def step(self, mode: str, batch: int):
        """A no-argument callable running `mode` (one of `MODES`, or a method name) on random inputs."""
        feed = random_feed(self.specs, batch)
        if mode == "plain":
            return session_runner(self.plain, feed, io_binding=self.io_binding)
        if mode == "fused":
            return session_runner(self.fused, feed, CAM_OUTPUTS, io_binding=self.io_binding)
        if mode != "explain":
            return method_step(self.explainer, feed, mode)
        size = _input_hw(feed[self.explainer.head.input.name].shape)
        return lambda: explain_step(self.explainer, feed, size)


class OpenVinoConfigurations(Configurations):
    """The configurations on OpenVINO: plain and fused compiled by the backend's runtime adapter.

    Every model is compiled by ``backends.ov_session.OvRuntime`` with the settings the
    ``openvino`` backend uses (its performance hint, `precision`), so plain inference and
    camcore run alike.

    Parameters
    ----------
    plain_path, fused_path : path
    device : str
        OpenVINO device, e.g. ``"CPU"``.
    precision : {None, "f32", "bf16", "f16"}
        None: the device's default.
    """

    runtime = "openvino"

    def __init__(self, plain_path, fused_path, device: str, precision):
        super().__init__(plain_path, fused_path, chain=[], io_binding=False)
        try:
            from backends.ov_session import OvRuntime
        except ImportError as exc:
            if getattr(exc, "name", "") == "openvino":
                raise CamError("openvino is not installed (pip install camcore[openvino])") from None
            raise CamError("this camcore has no OpenVINO backend (backends.ov_session)") from None
        self.device, self.requested = device, precision
        self.adapter = OvRuntime(device, precision=precision)

    def _compiled(self, key):
        return self.adapter.compile(Path(self.paths[key]).read_bytes(), role="model")

    @cached_property
    def plain(self):
        return self._compiled("plain")

    @cached_property
    def fused(self):
        return self._compiled("fused")

    @cached_property
    def explainer(self):
        return load(self.paths["plain"], backend="openvino", device=self.device, precision=self.requested)

    @property
    def precision(self) -> str:
        """The precision read back from the compiled plain model."""
        return self.adapter.precision(self.plain)

    def step(self, mode: str, batch: int):
        feed = random_feed(self.specs, batch)
        if mode in ("plain", "fused"):
            compiled = self.plain if mode == "plain" else self.fused
            fetch = [o.get_any_name() for o in compiled.compiled_model.outputs] if mode == "plain" else \
                list(CAM_OUTPUTS)
            return lambda: compiled.run(fetch, feed)
        return super().step(mode, batch)


def parse_runtime(name: str) -> tuple:
    """``("onnxruntime", provider)`` or ``("openvino", device, precision)`` for a runtime name.

    Examples
    --------
    >>> parse_runtime("cuda")
    ('onnxruntime', 'cuda')
    >>> parse_runtime("openvino")
    ('openvino', 'CPU', None)
    >>> parse_runtime("openvino:GPU:f16")
    ('openvino', 'GPU', 'f16')
    """
    parts = name.split(":")
    if parts[0].lower() != "openvino":
        return ("onnxruntime", name)
    device, precision = "CPU", None
    for part in parts[1:]:
        if part.lower() in ("f32", "bf16", "f16"):
            precision = part.lower()
        elif part:
            device = part
    return ("openvino", device, precision)


def available_runtimes() -> list:
    """The runtimes present here: ``"cpu"`` (and ``"cuda"``, ``"tensorrt"``), ``"openvino"`` and ``"openvino:f32"``."""
    from backends.ort_session import import_onnxruntime

    available = import_onnxruntime().get_available_providers()
    names = ["cpu"] + [alias for alias, full in (("cuda", "CUDAExecutionProvider"),
                                                 ("tensorrt", "TensorrtExecutionProvider")) if full in available]
    try:
        import openvino  # noqa: F401

        from backends import ov_session  # noqa: F401
    except ImportError:
        return names
    return names + ["openvino", "openvino:f32"]


# --------------------------------------------------------------------------- benchmark


def time_interleaved(steps: dict, *, repeat: int, warmup: int, settle: int = 1) -> dict:
    """Time ``{(mode, batch): callable}`` in interleaved rounds.

    Each round runs every batch size and, for each, every mode it has once;
    the mode order rotates from round to round.  Returns ``{(mode, batch): [seconds]}``
    for the `repeat` rounds kept after `warmup` untimed ones.  Each timed call follows
    `settle` untimed calls of the same mode: a runtime's worker threads keep spinning for a
    while after a run (onnxruntime's, OpenVINO's), and the first call of another session
    after it paid for them (on 2 cores, plain inference at batch 1 measured 1.5-2x slower
    than alone).
    """
    modes = tuple(dict.fromkeys(mode for mode, _ in steps))
    batches = tuple(dict.fromkeys(batch for _, batch in steps))
    times = {key: [] for key in steps}
    for r in range(warmup + repeat):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for batch in batches:
            for mode in (m for m in order if (m, batch) in steps):
                for _ in range(settle):
                    steps[mode, batch]()
                start = time.perf_counter()
                steps[mode, batch]()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[mode, batch].append(elapsed)
    return times


def _memory_probe(spec: dict) -> dict:
    """Run in a fresh subprocess: peak RSS after setting up and after running one configuration."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from camcore.benchmark import _probe_main; _probe_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CamError(f"memory probe for {spec['mode']} at batch {spec['batch']} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_main(argument: str) -> None:
    spec = json.loads(argument)
    if spec.get("runtime") == "openvino":
        setup = OpenVinoConfigurations(spec["plain"], spec["fused"], spec["device"], spec["precision"])
    else:
        setup = Configurations(spec["plain"], spec["fused"], spec["chain"], spec["io_binding"])
    step = setup.step(spec["mode"], spec["batch"])
    setup_rss = peak_rss_mib()
    for _ in range(3):
        step()
    print(json.dumps({"setup_rss_mib": round(setup_rss, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def provider_chain(name: str) -> list:
    """The providers to create sessions with, or CamError saying why `name` cannot run here."""
    from backends.ort_session import import_onnxruntime, provider_name, resolve_providers

    ort = import_onnxruntime()
    full = provider_name(name)
    resolve_providers([full])  # unknown or unavailable -> CamError with the reason
    return [p for p in _CHAINS.get(full, [full]) if p in ort.get_available_providers()]


def _check_batches(batches) -> tuple:
    try:
        values = tuple(int(b) for b in batches)
    except (TypeError, ValueError):
        raise InvalidInput(f"batches must be positive integers, got {batches!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"batches must be positive integers, got {batches!r}")
    return values


def _check_methods(methods) -> tuple:
    from .methods import METHODS

    if methods is None:
        return ()
    if isinstance(methods, str):
        methods = [methods]
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS or m == "auto"]
    if unknown:
        raise InvalidInput(f"methods must be among {', '.join(m for m in METHODS if m != 'auto')}, got {unknown}")
    return methods


def _setup(name: str, plain_path, fused_path, io_binding):
    """``(Configurations, entry fields)`` for the runtime `name`; CamError says why it cannot run."""
    from backends.ort_session import provider_name

    parsed = parse_runtime(name)
    if parsed[0] == "openvino":
        setup = OpenVinoConfigurations(plain_path, fused_path, parsed[1], parsed[2])
        setup.plain  # compiled here: its errors mean skipped
        return setup, {"runtime": "openvino", "version": setup.adapter.version, "device": parsed[1],
                       "requested_precision": parsed[2], "precision": setup.precision,
                       "session_providers": [f"openvino:{parsed[1]}"], "io_binding": False}
    chain = provider_chain(name)
    bound = (provider_name(name) != "CPUExecutionProvider") if io_binding is None else bool(io_binding)
    setup = Configurations(plain_path, fused_path, chain, bound)
    used = setup.plain.get_providers()  # sessions are made here: their errors mean skipped
    if used[0] != chain[0]:
        raise CamError(f"onnxruntime fell back to {used[0]} instead of {chain[0]}")
    return setup, {"runtime": "onnxruntime", "version": machine()["onnxruntime"], "precision": setup.precision,
                   "session_providers": used, "io_binding": bound}


def run_benchmark(model=None, *, batches=(1, 16, 64), providers=("cpu",), repeat: int = 10, warmup: int = 2,
                  memory: bool = True, io_binding: bool | None = None, methods=()) -> dict:
    """Measure plain inference, `explain`, the fused model and `methods` per runtime and batch size.

    Parameters
    ----------
    model : path, onnx.ModelProto or None
        None means camcore's embedded default (EfficientNet-Lite0).
    batches : sequence of int
    providers : sequence of str
        Runtimes: onnxruntime provider names or the aliases ``"cpu"``, ``"cuda"``,
        ``"tensorrt"``; ``"openvino"``, ``"openvino:f32"``, ``"openvino:bf16"``,
        ``"openvino:f16"`` (optionally with a device: ``"openvino:GPU:f16"``); ``"auto"``
        for every runtime present (`available_runtimes`).  One that cannot run here is
        reported as skipped, with the reason.
    repeat : int
        Timed rounds; the figure is their median.
    warmup : int
        Untimed rounds first.
    memory : bool
        Measure the peak RSS of plain, explain and fused in a fresh subprocess each.
    io_binding : bool, optional
        Run plain and fused through IO binding (default: on CUDA and TensorRT only).
    methods : sequence of str, optional
        Methods timed besides (``Explainer.explain(top_k=1, method=...)``), e.g.
        `DEFAULT_METHODS`.

    Returns
    -------
    dict
        ``model``, ``date``, ``machine``, ``settings``, and ``providers``: one entry
        per requested runtime, ``{"name", "status": "skipped", "reason"}`` or
        ``{"name", "status": "ok", "runtime", "version", "precision",
        "session_providers", "io_binding", "runs"}`` (OpenVINO adds ``device`` and
        ``requested_precision``) where ``precision`` is what ran, and each run holds
        ``batch``, per mode and method ``images_per_s`` (median) and ``seconds`` (every
        timed round), ``peak_rss_mib`` and ``setup_rss_mib`` for the modes, and
        ``ratios`` (images/s of every mode but plain and of every method, over ``plain``).
    """
    batches = _check_batches(batches)
    methods = _check_methods(methods)
    if int(repeat) < 1 or int(warmup) < 0:
        raise InvalidInput(f"repeat must be >= 1 and warmup >= 0, got repeat={repeat!r}, warmup={warmup!r}")
    if isinstance(providers, str):
        providers = [providers]
    providers = [r for name in providers for r in (available_runtimes() if name == "auto" else [name])]
    source = default_model.path() if model is None else model
    proto, _ = _onnx_graph().load_model(source)
    result = {
        "model": str(source) if not hasattr(source, "SerializeToString") else "<onnx.ModelProto>",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"batches": list(batches), "providers": list(providers), "repeat": int(repeat),
                     "warmup": int(warmup), "memory": bool(memory), "fuse": {"top_k": 1, "size": "input"},
                     "explain": "explain(top_k=1), upsample to the input size (bilinear), normalize, largest box",
                     "methods": list(methods)},
        "providers": [],
    }
    with tempfile.TemporaryDirectory(prefix="camcore-bench-") as folder:
        plain_path, fused_path = prepare_models(proto, folder)
        for name in providers:
            entry = {"name": name}
            result["providers"].append(entry)
            try:
                setup, fields = _setup(name, plain_path, fused_path, io_binding)
            except CamError as exc:
                entry.update(status="skipped", reason=str(exc))
                continue
            modes = MODES + methods
            steps = {(mode, b): setup.step(mode, b) for mode in modes for b in batches}
            times = time_interleaved(steps, repeat=int(repeat), warmup=int(warmup))
            runs = []
            for b in batches:
                run = {"batch": b}
                for mode in modes:
                    seconds = times[mode, b]
                    run[mode] = {"images_per_s": median_throughput(b, seconds), "seconds": seconds}
                    if memory and mode in MODES:
                        probe = {"plain": str(plain_path), "fused": str(fused_path), "mode": mode, "batch": b}
                        if fields["runtime"] == "openvino":
                            probe.update(runtime="openvino", device=fields["device"],
                                         precision=fields["requested_precision"])
                        else:
                            probe.update(chain=setup.chain, io_binding=fields["io_binding"])
                        run[mode].update(_memory_probe(probe))
                plain = run["plain"]["images_per_s"]
                run["ratios"] = {mode: run[mode]["images_per_s"] / plain for mode in modes if mode != "plain"}
                runs.append(run)
            if fields["runtime"] == "openvino" and methods:
                fields["explainer_precision"] = setup.explainer.backend.precision
            entry.update(status="ok", **fields, runs=runs)
    return result


def prepare_models(model, folder) -> tuple:
    """Save `model` (a ``ModelProto``) and ``camcore.fuse(model, top_k=1, size="input")`` into `folder`."""
    import onnx

    plain_path, fused_path = Path(folder) / "plain.onnx", Path(folder) / "fused.onnx"
    onnx.save_model(model, str(plain_path))
    onnx.save_model(fuse(model, top_k=1, size="input"), str(fused_path))
    return plain_path, fused_path


def median_throughput(batch: int, seconds) -> float:
    """Images per second: the median over rounds of ``batch / seconds``.

    Examples
    --------
    >>> median_throughput(16, [0.5, 0.4, 1.0])
    32.0
    """
    return statistics.median(batch / s for s in seconds)


# --------------------------------------------------------------------------- output


def format_table(result: dict) -> str:
    """The benchmark as plain-text tables: images/s, ratios to plain, peak RSS in MiB; ms per image by method."""
    head = (f"{'runtime':<14} {'prec':<5} {'batch':>5} {'plain img/s':>12} {'explain img/s':>14} {'ratio':>6} "
            f"{'fused img/s':>12} {'ratio':>6}   peak RSS MiB (plain/explain/fused)")
    lines = [head, "-" * len(head)]
    skipped, ok = [], [e for e in result["providers"] if e["status"] == "ok"]
    for entry in result["providers"]:
        if entry["status"] != "ok":
            skipped.append(f"{entry['name']}: skipped ({entry['reason']})")
            continue
        for run in entry["runs"]:
            rss = "/".join(f"{run[m]['peak_rss_mib']:.0f}" if "peak_rss_mib" in run[m] else "-" for m in MODES)
            lines.append(
                f"{entry['name']:<14} {entry.get('precision', '?'):<5} {run['batch']:>5} "
                f"{run['plain']['images_per_s']:>12.1f} "
                f"{run['explain']['images_per_s']:>14.1f} {run['ratios']['explain']:>6.3f} "
                f"{run['fused']['images_per_s']:>12.1f} {run['ratios']['fused']:>6.3f}   {rss}")
    methods = result["settings"].get("methods") or []
    if ok and methods:
        lines.append("")
        columns = [(e, run) for e in ok for run in e["runs"]]
        names = [f"{e['name']} {e.get('precision', '?')} b{run['batch']}" for e, run in columns]
        width = max(12, *(len(n) for n in names))
        lines.append(f"{'ms per image':<12} " + " ".join(f"{n:>{width}}" for n in names))
        for mode in ("plain",) + tuple(methods):
            cells = []
            for _, run in columns:
                ms = 1000 / run[mode]["images_per_s"]
                cells.append(f"{ms:.2f}" if mode == "plain" else f"{ms:.2f} ({run['ratios'][mode]:.2f})")
            lines.append(f"{mode:<12} " + " ".join(f"{c:>{width}}" for c in cells))
        lines.append("(ratio: images/s over plain inference on the same runtime, precision and batch)")
    m = result["machine"]
    lines.append("")
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; onnxruntime {m['onnxruntime']} "
                 f"({', '.join(m['onnxruntime_providers'])}), openvino {m.get('openvino') or 'not installed'}, "
                 f"numpy {m['numpy']}")
    lines.append(f"median of {result['settings']['repeat']} interleaved rounds after "
                 f"{result['settings']['warmup']} warm-up rounds")
    lines.extend(skipped)
    return "\n".join(lines)
