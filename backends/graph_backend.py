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
    from . import backprop, contrib_ops, onnx_graph, precision, quant_graph

    shortcut = onnx_graph.sole_average_pool(folded, head.feature) if gradients or pooled else None
    if pooled and shortcut is None:
        return None
    start, scale = shortcut if shortcut else (head.feature, None)
    # int8 logits: the gradient is taken before their own output quantization
    of = head.logits
    if gradients:
        folded, of = quant_graph.output_quantization_bypassed(folded, head.logits)
    model, frontier = backprop.cut_head(folded, start, of)
    if head.tokens is not None:  # a one-token head: its MLP on that token alone
        from .token_gather import push_token_gather

        model = push_token_gather(model)
    if gradients and precision.has_float16(model):  # float16 models: the backward pass in float32
        model = precision.as_float32(model)
    if gradients:  # onnxruntime's fused nodes (offline-optimized models) as the ops they fused
        model = contrib_ops.as_standard_ops(model)
        model = backprop.add_backward(model, start, of, seed=SEED, grad=GRAD)
        # The backward pass reads weights through Transposes and other constant subgraphs: folded
        # here, so no runtime sees them (OpenVINO 2026.4 at f32 gave a ViT's gradients 1 % off
        # through a Transpose of a weight the forward MatMul shares; folded, 1e-7).
        model = onnx_graph.fold_constants(model)
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
    size : int or (H, W), optional
        The input size a model with dynamic spatial input axes is analysed at (a vision
        transformer's patch grid depends on it).

    Attributes
    ----------
    cache_hit : bool
        Whether the analysis came from the cache.
    compiled : backends.runtime.Compiled
        The model with its feature and logits exposed, compiled.
    precision : str
        The precision the model runs at, as the runtime reports it.
    """

    def __init__(self, model, runtime, *, feature=None, logits=None, output=None, size=None):
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
            if size is not None:  # the input size a model with dynamic spatial axes is analysed at
                key["size"] = list(size) if isinstance(size, (tuple, list)) else size
            hit = analysis_cache.lookup(key)
            if hit is not None:
                exposed, self.head = hit
                self.cache_hit = True
                self._fetch = [self.head.feature, self.head.logits]
                self.compiled = runtime.compile(exposed, role="model")
                return
        from . import onnx_graph, quant_graph

        proto, folder, external = onnx_graph.read_model(model, data)
        data = None  # the proto holds the model now
        proto = quant_graph.runnable(proto)  # QOperator ops as DQ -> float op -> Q
        self.__dict__.update(model=proto, folder=folder)  # what the cached properties would read
        head = find_any_head(proto, feature=feature, logits=logits, output=output, size=size)
        exposed = onnx_graph.expose_outputs(proto, [head.feature, head.logits]).SerializeToString()
        self.compiled = runtime.compile(exposed, role="model")
        self._fetch = [head.feature, head.logits]
        self.head: Head = self._with_concrete_shapes(head, size)
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
        from . import onnx_graph, quant_graph

        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise CamError(f"cannot read {self._path} again: {exc.strerror or exc}") from None
        found = analysis_cache.digest(data)
        if found != self._digest:
            raise CamError(f"model file {self._path} changed since it was loaded: sha256 {self._digest[:16]}... "
                           f"expected, {found[:16]}... found; load it again")
        proto, _, _ = onnx_graph.read_model(self._path, data)
        return quant_graph.runnable(proto)  # as in __init__

    @functools.cached_property
    def folder(self):
        """The model's folder (None for an in-memory model)."""
        return self._path.parent if self._path is not None else None

    def _with_concrete_shapes(self, head: Head, size=None) -> Head:
        """Fill what shape inference left unknown (feature dims, C, K) by one batch-1 run.

        The feature shape is filled only for inputs of static size (apart from the batch
        axis), since otherwise the feature size follows the input size; C and K are read
        from a run at 224 pixels per dynamic axis when inference did not give them.
        """
        shape = head.feature_shape
        known = len(shape) in (3, 4) and all(isinstance(d, int) for d in shape[1:])
        static = all(isinstance(d, int) for spec in head.inputs for d in spec.shape[1:])
        if (known or not static) and head.num_classes and head.channels:
            return head
        from .token_graph import input_feed_shape

        if head.tokens is not None and head.tokens.input_size:
            size = size or tuple(head.tokens.input_size)
        try:  # the input size from the model or `size`, the channels from the first Conv
            feed = {spec.name: np.zeros(input_feed_shape(self.model, spec, size), spec.dtype)
                    for spec in head.inputs}
        except CamError:  # a CNN with dynamic spatial axes: any size gives C and K
            feed = {spec.name: np.zeros(input_feed_shape(self.model, spec, 224), spec.dtype) for spec in head.inputs}
        try:
            features, logits = self.compiled.run(self._fetch, feed)
        except CamError as exc:
            shapes = ", ".join(f"{k} {v.shape}" for k, v in feed.items())
            raise CamError(f"the model failed on a zero input ({shapes}): {exc}") from None
        changes = {"num_classes": int(np.prod(logits.shape[1:])),
                   "channels": int(features.shape[{"NCHW": 1, "NHWC": 3}.get(head.layout, -1)])}
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
            if graph is not None:
                graph = dataclasses.replace(graph, frontier=tuple(self._frontier_spec(s) for s in graph.frontier))
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

    def normalized_head(self):
        """``(normalize, run)`` for masking a transformer's tokens after a block's first norm.

        ``normalize((M, T, C) tokens) -> (M, T, C)``: the first ``LayerNormalization`` of the
        block the target enters, applied to them; ``run((M, T, C) tokens, (M, T, C) normalized)
        -> (M, C)`` logits: the head with that norm's output fed as given (OpenVINO XAI's ViT
        Recipro-CAM; see `token_graph.split_at_block_norm`).  Raises `NotCamCompatible` where the
        target enters no such block.
        """
        if "normalized" not in self._heads:
            from .token_graph import split_at_block_norm

            graph, _ = self._head(False)
            split, norm, name = split_at_block_norm(graph.model, graph.start.name)
            self._heads["normalized"] = (graph, name, self.runtime.compile(split.SerializeToString(), role="head"),
                                         self.runtime.compile(norm.SerializeToString(), role="head"))
        graph, name, compiled, norm = self._heads["normalized"]
        start = graph.start

        def normalize(tokens):
            (out,) = norm.run([name], {start.name: np.ascontiguousarray(tokens, dtype=start.dtype)})
            return out

        def run(tokens, normalized):
            return self._run_rows(compiled, graph, tokens, self.head.logits, extra={name: normalized})

        return normalize, run

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

    def _frontier_spec(self, spec):
        """`spec` of a head input read only through Shape, its dynamic dims (past the batch) read from
        one run of the model: a Reshape fed by it then gets the shape the model itself computes (a
        transformer's computed Reshapes and Resizes fail on dummy dims of 1)."""
        if self.head.tokens is None or all(isinstance(d, int) and d > 0 for d in spec.shape[1:]):
            return spec
        from . import onnx_graph
        from .token_graph import input_feed_shape

        size = tuple(self.head.tokens.input_size) or None
        feed = {s.name: np.zeros(input_feed_shape(self.model, s, size), s.dtype) for s in self.head.inputs}
        try:
            compiled = self.runtime.compile(onnx_graph.expose_outputs(self.model, [spec.name]).SerializeToString(),
                                            role="head")
            (value,) = compiled.run([spec.name], feed)
        except CamError as exc:
            raise CamError(f"cannot read the shape of head input {spec.name!r}: {exc}") from None
        return dataclasses.replace(spec, shape=(spec.shape[0], *value.shape[1:]))

    def _attention(self, gradients: bool, tokens: int | None):
        """The whole model with its attention probabilities (and their gradients) as outputs; built once."""
        key = ("attention", gradients, tokens)
        if key not in self._heads:
            from . import attention_graph, contrib_ops, onnx_graph, precision, quant_graph

            model = self.folded_model
            names = attention_graph.attention_probabilities(model, tokens)
            logits = self.head.logits
            if gradients:  # as for the head: fused nodes unfused, int8 logits before their rounding
                model = contrib_ops.as_standard_ops(model)
                model, logits = quant_graph.output_quantization_bypassed(model, logits)
            built = attention_graph.attention_model(model, names, logits, gradients=gradients)
            if gradients and precision.has_float16(built):  # the float16 forward kept (it is the deployed one)
                built = precision.float32_scatter_adds(built)
            if gradients:  # constant subgraphs of the backward pass folded, as for the head (see `head_graph`)
                built = onnx_graph.fold_constants(built)
            seed = next((s for s in onnx_graph.graph_inputs(built) if s.name == attention_graph.ATTENTION_SEED), None)
            self._heads[key] = (self.runtime.compile(built.SerializeToString(), role="gradients"), names, seed)
        return self._heads[key]

    def run_attention(self, inputs, seeds: np.ndarray | None = None, *, tokens: int | None = None):
        """The attention probabilities of `inputs` and, with `seeds`, their gradients.

        Parameters
        ----------
        inputs : ndarray or dict of ndarray
            Model-ready inputs for ``N`` items.
        seeds : (N, k, C) ndarray, optional
            ``k`` seeds per item (one-hot rows for the top-k classes).
        tokens : int, optional
            The image's token count: attention over other counts (windows) is left out.

        Returns
        -------
        probabilities : tuple of (N, heads, T, T) ndarray
            Every self-attention layer's, first layer first.
        gradients : tuple of (N, k, heads, T, T) ndarray, or None
            ``gradients[l][n, j] = d (seeds[n, j] . logits[n]) / d probabilities[l][n]``.
        """
        from .attention_graph import ATTENTION_SEED, gradient_name, refuse

        feed = self.check_inputs(inputs)
        compiled, names, seed_spec = self._attention(seeds is not None, tokens)
        fetch = list(names)
        n = len(next(iter(feed.values())))
        if seeds is not None:
            k = seeds.shape[1]
            fetch += [gradient_name(a) for a in names]
            feed = {key: np.repeat(v, k, axis=0) for key, v in feed.items()}  # row i*k + j: item i, seed j
            feed[ATTENTION_SEED] = seeds.reshape(n * k, -1).astype(seed_spec.dtype)
        fixed = self.head.input.shape[0] if self.head.input.shape else None
        rows = len(next(iter(feed.values())))
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(rows, 1)
        parts = []
        for i in range(0, rows, step):
            part = {key: v[i:i + step] for key, v in feed.items()}
            m = len(next(iter(part.values())))
            pad = step - m if isinstance(fixed, int) and fixed > 0 else 0  # a fixed-batch export: pad the last
            part = {key: np.ascontiguousarray(_pad(v, pad, zeros=key == ATTENTION_SEED)) for key, v in part.items()}
            try:
                got = compiled.run(fetch, part)
            except CamError:
                # Windowed attention (Swin) is refused as such on every runtime: OpenVINO fails on
                # its gradient graph's scatters before the shapes below can tell; the forward does.
                if seeds is not None:
                    self.run_attention(inputs, tokens=tokens)
                raise
            for name, v in zip(names, got):
                if v.shape[0] != m + pad or (tokens is not None and v.shape[-2:] != (tokens, tokens)):
                    refuse(f"{name!r} is {v.shape} for {m + pad} rows (attention per window, as in Swin)")
            parts.append([v[:m] for v in got])
        values = [np.concatenate([p[j] for p in parts]) for j in range(len(fetch))]
        count = len(names)
        if seeds is None:
            return tuple(values), None
        probabilities = tuple(v[::k] for v in values[:count])
        grads = tuple(v.reshape(n, k, *v.shape[1:]) for v in values[count:])
        return probabilities, grads

    def _run_rows(self, compiled, graph: HeadGraph, rows, fetch, seeds=None, extra=None) -> np.ndarray:
        """Run `compiled` on `rows` (fed as the graph's start, and `extra`'s arrays, row for row, as the
        inputs they name), chunked for fixed-batch models; `fetch` only."""
        fixed = self.head.input.shape[0] if self.head.input.shape else None
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(rows), 1)
        parts = []
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            n = len(part)
            pad = step - n if isinstance(fixed, int) and fixed > 0 else 0
            # The head's own input type: methods hand float32 copies of an fp16 model's features.
            feed = {graph.start.name: np.ascontiguousarray(_pad(part, pad), dtype=graph.start.dtype)}
            for name, values in (extra or {}).items():
                feed[name] = np.ascontiguousarray(_pad(values[i:i + step], pad), dtype=graph.start.dtype)
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


def find_any_head(model, *, feature=None, logits=None, output=None, size=None) -> Head:
    """The CAM head when the model has one, else the target layer of the gradient methods.

    A vision transformer (its head pools tokens) gets its token head (`token_graph.find_token_head`);
    `size` is the input size for a model whose spatial input axes are dynamic.
    Raises `NotCamCompatible` only when neither can be found, with both reasons.
    """
    from . import onnx_graph, token_graph

    head = token_graph.find_token_head(model, feature=feature, logits=logits, output=output, size=size)
    if head is not None:
        return head

    try:
        return onnx_graph.find_head(model, feature=feature, logits=logits, output=output)
    except NotCamCompatible as refusal:
        try:
            return onnx_graph.find_target(model, feature=feature, logits=logits, output=output,
                                          cam_refusal=str(refusal))
        except NotCamCompatible as exc:
            raise NotCamCompatible(f"{refusal}; no target layer for gradient methods either: {exc}") from None
