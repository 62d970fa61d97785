"""Which graphs run, for every runtime: the `Backend` shared by the runtime adapters.

`GraphBackend` decides the ONNX models a backend needs and how their inputs and
outputs map onto `camcore.Backend`: the model with its feature and logits exposed
(from the analysis cache when possible), the head cut at the target layer for the
forward-only methods, the head with its backward pass for the gradient methods
(starting at the pooled vector when the target is read only by an average pooling),
input checking, concrete-shape filling and fixed-batch chunking.  A runtime adapter
(`backends.runtime.Runtime`) only compiles and runs them; `OrtBackend`
(`backends.ort_session`) and `OvBackend` (`backends.ov_session`) are this class on
onnxruntime and on OpenVINO.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Mapping

import numpy as np

from camcore.backend import Head
from camcore.errors import CamError, InvalidInput, NotCamCompatible

from . import analysis_cache

# onnx_graph (and so onnx, whose import costs most of a one-image `camcore explain`) is
# imported only where the graph itself is needed: a cache miss, `model`, the head graphs.

__all__ = ["GraphBackend", "HeadGraph", "head_graph", "find_any_head", "SEED", "GRAD"]

SEED, GRAD = "cam_seed", "cam_grad"


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + ")"


def _analysis_version() -> str:
    """onnxruntime's version, read from package metadata: the graph analysis probes with it."""
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "none"


@dataclasses.dataclass(frozen=True)
class HeadGraph:
    """The head as an ONNX model: what `run_head` compiles and feeds.

    Attributes
    ----------
    model : onnx.ModelProto
    start : TensorSpec
        The input fed with feature maps (or pooled vectors, see `scale`).
    frontier : tuple of TensorSpec
        Other inputs, read only through ``Shape``: fed zeros of the batch size.
    seed : TensorSpec or None
        The seed input of the backward graph (gradients only).
    scale : float or None
        ``pooled / mean_xy(target)`` when the gradient graph starts at the pooled tensor.
    """

    model: object
    start: object
    frontier: tuple
    seed: object
    scale: float | None


def head_graph(folded, head: Head, gradients: bool, *, pooled: bool = False) -> HeadGraph | None:
    """The head alone (target -> logits) as ONNX, with the backward pass when asked.

    When the target is read only by a whole-map average pooling, the gradient graph
    starts at the pooled tensor: the gradient at the target is the pooled one spread
    over the map, and top-k classes cost k rows of K numbers instead of k copies of
    the feature map.  With `pooled`, the forward head starts there too (`scale` set),
    or None when the target has no such pooling.  `folded` is the model with its
    constants folded.
    """
    from . import backprop, onnx_graph

    shortcut = onnx_graph.sole_average_pool(folded, head.feature) if gradients or pooled else None
    if pooled and shortcut is None:
        return None
    start, scale = shortcut if shortcut else (head.feature, None)
    model, frontier = backprop.cut_head(folded, start, head.logits)
    if gradients:
        model = backprop.add_backward(model, start, head.logits, seed=SEED, grad=GRAD)
    specs = {s.name: s for s in onnx_graph.graph_inputs(model)}
    return HeadGraph(model, specs[start], tuple(specs[name] for name in frontier), specs.get(SEED), scale)


class GraphBackend:
    """Runs an ONNX model on a `runtime` and returns ``(features, logits)``.

    The graph analysis of a model given as a path (its `head`, and the model with the
    feature and logits exposed as outputs) is kept in a disk cache
    (`backends.analysis_cache`), shared by every runtime; on a hit, `onnx` is not
    imported and `model` is read only when something needs the graph.  In-memory
    models and models with external data are analysed every time.

    Parameters
    ----------
    model : path or onnx.ModelProto
    runtime : backends.runtime.Runtime
        Compiles and runs the graphs.
    feature, logits : str, optional
        Tensor-name overrides (see `onnx_graph.find_head`).
    output : str, optional
        The model output to explain (default: the first).

    Attributes
    ----------
    cache_hit : bool
        Whether the analysis came from the cache.
    compiled : backends.runtime.Compiled
        The model with its feature and logits exposed, compiled.
    precision : str
        The precision the model runs at, as the runtime reports it.
    """

    def __init__(self, model, runtime, *, feature=None, logits=None, output=None):
        self.runtime = runtime
        self._heads = {}
        self._path = self._digest = None
        data = key = None
        if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
            self._path = Path(model).resolve()
            if analysis_cache.folder() is not None:  # no cache, no hash of the whole file
                try:
                    data = self._path.read_bytes()
                except OSError:
                    data = None  # read_model reports it
        if data is not None:
            self._digest = analysis_cache.digest(data)
            key = analysis_cache.entry_key(self._digest, feature=feature, logits=logits, output=output,
                                           onnxruntime_version=_analysis_version())
            hit = analysis_cache.lookup(key)
            if hit is not None:
                exposed, self.head = hit
                self.cache_hit = True
                self._fetch = [self.head.feature, self.head.logits]
                self.compiled = runtime.compile(exposed, role="model")
                return
        from . import onnx_graph

        proto, folder, external = onnx_graph.read_model(model, data)
        data = None  # the proto holds the model now
        self.__dict__.update(model=proto, folder=folder)  # what the cached properties would read
        head = find_any_head(proto, feature=feature, logits=logits, output=output)
        exposed = onnx_graph.expose_outputs(proto, [head.feature, head.logits]).SerializeToString()
        self.compiled = runtime.compile(exposed, role="model")
        self._fetch = [head.feature, head.logits]
        self.head: Head = self._with_concrete_shapes(head)
        self.cache_hit = False
        # The file's hash does not cover external data: such models are not cached.
        if key is not None and not external:
            analysis_cache.store(key, exposed, self.head)

    @property
    def precision(self) -> str:
        return self.runtime.precision(self.compiled)

    @functools.cached_property
    def model(self):
        """The model as an ``onnx.ModelProto`` (after a cache hit, read from the file on first use).

        Raises
        ------
        CamError
            The file changed since the backend was made (its sha256 differs).
        """
        from . import onnx_graph

        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise CamError(f"cannot read {self._path} again: {exc.strerror or exc}") from None
        found = analysis_cache.digest(data)
        if found != self._digest:
            raise CamError(f"model file {self._path} changed since it was loaded: sha256 {self._digest[:16]}... "
                           f"expected, {found[:16]}... found; load it again")
        proto, _, _ = onnx_graph.read_model(self._path, data)
        return proto

    @functools.cached_property
    def folder(self):
        """The model's folder (None for an in-memory model)."""
        return self._path.parent if self._path is not None else None

    def _with_concrete_shapes(self, head: Head) -> Head:
        """Fill what shape inference left unknown (feature dims, C, K) by one batch-1 run.

        The feature shape is filled only for inputs of static size (apart from the batch
        axis), since otherwise the feature size follows the input size; C and K are read
        from a run at 224 pixels per dynamic axis when inference did not give them.
        """
        shape = head.feature_shape
        known = len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
        static = all(isinstance(d, int) for spec in head.inputs for d in spec.shape[1:])
        if (known or not static) and head.num_classes and head.channels:
            return head
        feed = {spec.name: np.zeros([d if isinstance(d, int) else (1 if axis == 0 else 224)
                                     for axis, d in enumerate(spec.shape)], spec.dtype) for spec in head.inputs}
        features, logits = self.compiled.run(self._fetch, feed)
        changes = {"num_classes": int(np.prod(logits.shape[1:])),
                   "channels": int(features.shape[1 if head.layout == "NCHW" else 3])}
        if static and not known:
            changes["feature_shape"] = (shape[0] if shape else "N", *features.shape[1:])
        return dataclasses.replace(head, **changes) if head.weights is None else \
            dataclasses.replace(head, feature_shape=changes.get("feature_shape", shape))

    def check_inputs(self, inputs) -> dict:
        """Return the feed dict, or raise `InvalidInput` naming what the model expects."""
        specs = self.head.inputs
        if not isinstance(inputs, Mapping):
            if len(specs) != 1:
                raise InvalidInput(f"inputs must be a dict for this model; it takes {[s.name for s in specs]}")
            inputs = {specs[0].name: inputs}
        missing = [s.name for s in specs if s.name not in inputs]
        unknown = [n for n in inputs if n not in {s.name for s in specs}]
        if missing or unknown:
            raise InvalidInput(f"inputs must be {[s.name for s in specs]}, got {list(inputs)}")
        feed = {}
        for spec in specs:
            arr = np.asarray(inputs[spec.name])
            static_ok = arr.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, arr.shape))
            if arr.dtype != spec.dtype or not static_ok:
                raise InvalidInput(
                    f"input {spec.name!r} must be {spec.dtype} with shape {_shape_text(spec.shape)}, "
                    f"got {arr.dtype} with shape {arr.shape}")
            feed[spec.name] = arr
        return feed

    def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feed = self.check_inputs(inputs)
        features, logits = self.compiled.run(self._fetch, feed)
        return features, logits.reshape(len(logits), -1)

    @functools.cached_property
    def folded_model(self):
        """`model` with its constant subgraphs folded (`onnx_graph.fold_constants`): what head cuts read."""
        from . import onnx_graph

        return onnx_graph.fold_constants(self.model)

    def head_graph(self, gradients: bool) -> HeadGraph:
        """The head graph `run_head` runs (see `head_graph`), built once."""
        return self._head(gradients)[0]

    def _head(self, gradients: bool, pooled: bool = False):
        key = "pooled" if pooled else gradients
        if key not in self._heads:
            graph = head_graph(self.folded_model, self.head, gradients, pooled=pooled)
            compiled = None if graph is None else self.runtime.compile(
                graph.model.SerializeToString(), role="gradients" if gradients else "head")
            self._heads[key] = (graph, compiled)
        return self._heads[key]

    def _pooled_rows(self, means: np.ndarray, graph: HeadGraph) -> np.ndarray:
        """``(n, K)`` spatial means as the pooled tensor holds them: times `scale`, at its rank and dtype."""
        n = len(means)
        pooled = means.astype(np.float32)
        if graph.scale != 1:
            pooled = pooled * np.float32(graph.scale)
        shape = {2: (n, -1), 4: (n, -1, 1, 1) if self.head.layout == "NCHW" else (n, 1, 1, -1)}
        return pooled.reshape(shape[len(graph.start.shape)]).astype(graph.start.dtype, copy=False)

    def pooled_head(self):
        """``run((M, K) spatial means) -> (M, C)`` logits: the head from its average pooling on, or None.

        None when the target is not read only by a whole-map average pooling.  A copy of
        the feature map that keeps one position ``p`` pools to ``A[:, p] / (h w)``: the
        forward-only methods run the head on such rows (see `camcore.backend`).
        """
        graph, compiled = self._head(False, pooled=True)
        if graph is None:
            return None

        def run(means):
            return self._run_rows(compiled, graph, self._pooled_rows(np.asarray(means), graph), self.head.logits)

        return run

    def run_head(self, features: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
        """Run the head alone on any batch of feature maps; see `camcore.Backend.run_head`.

        Frontier inputs of the head are read only through ``Shape`` (a batch size for a
        Reshape): they get zeros of the right batch size.  A model exported with a fixed
        batch size runs in chunks of that size, the last one padded.  Gradients at a
        target read only by an average pooling come back as a read-only broadcast view.
        """
        if seeds is None:
            graph, compiled = self._head(False)
            return self._run_rows(compiled, graph, features, self.head.logits)
        graph, compiled = self._head(True)
        n, k, classes = seeds.shape
        spatial = (2, 3) if self.head.layout == "NCHW" else (1, 2)
        rows = features
        if graph.scale is not None:
            rows = self._pooled_rows(features.astype(np.float32).mean(axis=spatial), graph)  # (n, K)
        if k > 1:
            rows = np.repeat(rows, k, axis=0)  # row i*k + j: item i, seed j
        seed = seeds.reshape(n * k, classes).astype(graph.seed.dtype)
        seed = seed.reshape(n * k, -1, *[1] * (len(graph.seed.shape) - 2))
        grads = self._run_rows(compiled, graph, rows, GRAD, seed)
        if graph.scale is None:
            return grads.reshape(n, k, *features.shape[1:])
        h, w = (features.shape[a] for a in spatial)
        per_channel = (grads.reshape(n, k, -1) * (graph.scale / (h * w))).astype(features.dtype)
        per_channel = per_channel[..., None, None] if self.head.layout == "NCHW" else per_channel[:, :, None, None]
        return np.broadcast_to(per_channel, (n, k, *features.shape[1:]))

    def _run_rows(self, compiled, graph: HeadGraph, rows, fetch, seeds=None) -> np.ndarray:
        """Run `compiled` on `rows` (fed as the graph's start), chunked for fixed-batch models; `fetch` only."""
        fixed = self.head.input.shape[0] if self.head.input.shape else None
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(rows), 1)
        parts = []
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            n = len(part)
            pad = step - n if isinstance(fixed, int) and fixed > 0 else 0
            # Methods hand float32 rows (their dtype rule) to float16 heads too.
            feed = {graph.start.name: np.ascontiguousarray(_pad(part, pad), dtype=graph.start.dtype)}
            for spec in graph.frontier:
                dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
                feed[spec.name] = np.zeros([n + pad, *dims[1:]], spec.dtype)
            if seeds is not None:
                feed[SEED] = np.ascontiguousarray(_pad(seeds[i:i + step], pad, zeros=True))
            (out,) = compiled.run([fetch], feed)
            parts.append(out[:n] if seeds is not None else out.reshape(n + pad, -1)[:n])
        return np.concatenate(parts)


def _pad(part: np.ndarray, pad: int, zeros: bool = False) -> np.ndarray:
    """`part` with `pad` more rows: copies of its last row, or zeros."""
    if not pad:
        return part
    extra = np.zeros_like(part[:1]).repeat(pad, axis=0) if zeros else np.repeat(part[-1:], pad, axis=0)
    return np.concatenate([part, extra])


def find_any_head(model, *, feature=None, logits=None, output=None) -> Head:
    """The CAM head when the model has one, else the target layer of the gradient methods.

    Raises `NotCamCompatible` only when neither can be found, with both reasons.
    """
    from . import onnx_graph

    try:
        return onnx_graph.find_head(model, feature=feature, logits=logits, output=output)
    except NotCamCompatible as refusal:
        try:
            return onnx_graph.find_target(model, feature=feature, logits=logits, output=output,
                                          cam_refusal=str(refusal))
        except NotCamCompatible as exc:
            raise NotCamCompatible(f"{refusal}; no target layer for gradient methods either: {exc}") from None
