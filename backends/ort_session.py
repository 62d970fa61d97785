"""onnxruntime backend: runs a model with its feature tensor exposed as an extra output."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from camcore.backend import Head
from camcore.errors import CamError, InvalidInput, NotCamCompatible

from . import analysis_cache
from .ort_runtime import import_onnxruntime, make_session, provider_name, resolve_providers

# onnx_graph (and so onnx, whose import costs most of a one-image `camcore explain`) is
# imported only where the graph itself is needed: a cache miss, `model`, the head sessions.

# Session making lives in `ort_runtime`; re-exported here for existing imports.
__all__ = ["OrtBackend", "find_any_head", "import_onnxruntime", "resolve_providers", "make_session", "provider_name"]


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + ")"


class OrtBackend:
    """Runs an ONNX model under onnxruntime and returns ``(features, logits)``.

    The graph analysis of a model given as a path (its `head`, and the model with the
    feature and logits exposed as outputs) is kept in a disk cache
    (`backends.analysis_cache`); on a hit, `onnx` is not imported and `model` is read
    only when something needs the graph.  In-memory models and models with external
    data are analysed every time.

    Parameters
    ----------
    model : path or onnx.ModelProto
    providers : list, optional
        onnxruntime providers: names or ``(name, options)`` pairs.
    feature, logits : str, optional
        Tensor-name overrides (see `onnx_graph.find_head`).
    output : str, optional
        The model output to explain (default: the first).

    Attributes
    ----------
    cache_hit : bool
        Whether the analysis came from the cache.
    """

    def __init__(self, model, *, providers=None, feature=None, logits=None, output=None,
                 session_options=None):
        ort = import_onnxruntime()
        self._providers, self._session_options = providers, session_options
        self._head_sessions = {}
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
                                           onnxruntime_version=ort.__version__)
            hit = analysis_cache.lookup(key)
            if hit is not None:
                exposed, self.head = hit
                self.cache_hit = True
                self.session = make_session(exposed, providers, options=session_options)
                self._fetch = [self.head.feature, self.head.logits]
                return
        from . import onnx_graph

        proto, folder, external = onnx_graph.read_model(model, data)
        data = None  # the proto holds the model now
        self.__dict__.update(model=proto, folder=folder)  # what the cached properties would read
        head = find_any_head(proto, feature=feature, logits=logits, output=output)
        exposed = onnx_graph.expose_outputs(proto, [head.feature, head.logits]).SerializeToString()
        self.session = make_session(exposed, providers, options=session_options)
        self._fetch = [head.feature, head.logits]
        self.head: Head = self._with_concrete_shapes(head)
        self.cache_hit = False
        # The file's hash does not cover external data: such models are not cached.
        if key is not None and not external:
            analysis_cache.store(key, exposed, self.head)

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
        features, logits = self.session.run(self._fetch, feed)
        changes = {"num_classes": int(np.prod(logits.shape[1:])),
                   "channels": int(features.shape[1 if head.layout == "NCHW" else 3])}
        if static and not known:
            changes["feature_shape"] = (shape[0] if shape else "N", *features.shape[1:])
        return dataclasses.replace(head, **changes) if head.weights is None else \
            dataclasses.replace(head, feature_shape=changes.get("feature_shape", shape))

    @property
    def providers(self) -> list:
        return self.session.get_providers()

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
        try:
            features, logits = self.session.run(self._fetch, feed)
        except Exception as exc:
            raise CamError(f"onnxruntime failed: {str(exc).splitlines()[0]}") from None
        return features, logits.reshape(len(logits), -1)

    @functools.cached_property
    def folded_model(self):
        """`model` with its constant subgraphs folded (`onnx_graph.fold_constants`): what head cuts read."""
        from . import onnx_graph

        return onnx_graph.fold_constants(self.model)

    def _head_session(self, kind: str):
        """The head alone (target -> logits), built once per `kind`.

        ``"plain"``: from the target; ``"gradients"``: with the backward pass;
        ``"pooled"``: from the pooled tensor, or None when the target is not read only by
        a whole-map average pooling.  Returns ``(session, input spec, frontier specs,
        seed spec, scale)``.  When the target is read only by a whole-map average pooling,
        the gradient session starts at the pooled tensor (``scale`` is then
        ``pooled / mean_xy(target)``; else None): the gradient at the target is the pooled
        one spread over the map, and top-k classes cost k rows of K numbers instead of k
        copies of the feature map.
        """
        if kind not in self._head_sessions:
            from . import backprop, onnx_graph

            model = self.folded_model
            shortcut = onnx_graph.sole_average_pool(model, self.head.feature) if kind != "plain" else None
            if kind == "pooled" and shortcut is None:
                self._head_sessions[kind] = None
                return None
            start, scale = shortcut if shortcut else (self.head.feature, None)
            head, frontier = backprop.cut_head(model, start, self.head.logits)
            if kind == "gradients":
                head = backprop.add_backward(head, start, self.head.logits, seed=_SEED, grad=_GRAD)
            options = self._session_options
            if options is None:
                # No spinning: its idle threads would compete with the forward session's
                # for the cores (on 2 CPU cores that doubled Grad-CAM's overhead).
                options = import_onnxruntime().SessionOptions()
                options.log_severity_level = 3
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = make_session(head, self._providers, options=options)
            specs = {i.name: i for i in session.get_inputs()}
            self._head_sessions[kind] = (session, specs[start], [specs[name] for name in frontier],
                                         specs.get(_SEED), scale)
        return self._head_sessions[kind]

    def _pooled_rows(self, means: np.ndarray, start, scale) -> np.ndarray:
        """``(n, K)`` spatial means as the pooled tensor `start` holds them: times `scale`, its rank and dtype."""
        n = len(means)
        pooled = means.astype(np.float32) * np.float32(scale) if scale != 1 else means.astype(np.float32)
        shape = {2: (n, -1), 4: (n, -1, 1, 1) if self.head.layout == "NCHW" else (n, 1, 1, -1)}
        return pooled.reshape(shape[len(start.shape)]).astype(_ORT_DTYPES.get(start.type, np.float32), copy=False)

    def pooled_head(self):
        """``run((M, K) spatial means) -> (M, C)`` logits: the head from its average pooling on, or None.

        None when the target is not read only by a whole-map average pooling.  A copy of
        the feature map that keeps one position ``p`` pools to ``A[:, p] / (h w)``: the
        forward-only methods run the head on such rows (see `camcore.backend`).
        """
        entry = self._head_session("pooled")
        if entry is None:
            return None
        session, start, frontier, _, scale = entry

        def run(means):
            rows = self._pooled_rows(np.asarray(means), start, scale)
            return self._run_rows(session, start, rows, frontier, self.head.logits)

        return run

    def run_head(self, features: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
        """Run the head alone on any batch of feature maps; see `camcore.Backend.run_head`.

        Frontier inputs of the head are read only through ``Shape`` (a batch size for a
        Reshape): they get zeros of the right batch size.  A model exported with a fixed
        batch size runs in chunks of that size, the last one padded.  Gradients at a
        target read only by an average pooling come back as a read-only broadcast view.
        """
        if seeds is None:
            session, start, frontier, _, _ = self._head_session("plain")
            return self._run_rows(session, start, features, frontier, self.head.logits)
        session, start, frontier, seed_spec, scale = self._head_session("gradients")
        n, k, classes = seeds.shape
        spatial = (2, 3) if self.head.layout == "NCHW" else (1, 2)
        rows = features
        if scale is not None:
            rows = self._pooled_rows(features.astype(np.float32).mean(axis=spatial), start, scale)
        if k > 1:
            rows = np.repeat(rows, k, axis=0)  # row i*k + j: item i, seed j
        seed = seeds.reshape(n * k, classes).astype(_ORT_DTYPES.get(seed_spec.type, np.float32))
        seed = seed.reshape(n * k, -1, *[1] * (len(seed_spec.shape) - 2))
        grads = self._run_rows(session, start, rows, frontier, _GRAD, seed)
        if scale is None:
            return grads.reshape(n, k, *features.shape[1:])
        h, w = (features.shape[a] for a in spatial)
        per_channel = (grads.reshape(n, k, -1) * (scale / (h * w))).astype(features.dtype)
        per_channel = per_channel[..., None, None] if self.head.layout == "NCHW" else per_channel[:, :, None, None]
        return np.broadcast_to(per_channel, (n, k, *features.shape[1:]))

    def _run_rows(self, session, start, rows, frontier, fetch, seeds=None) -> np.ndarray:
        """Run `session` on `rows` (fed as `start`), chunked for fixed-batch models; `fetch` only."""
        fixed = self.head.input.shape[0] if self.head.input.shape else None
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(rows), 1)
        parts = []
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            n = len(part)
            pad = step - n if isinstance(fixed, int) and fixed > 0 else 0
            # Methods hand float32 rows (their dtype rule) to float16 heads too.
            feed = {start.name: np.ascontiguousarray(_pad(part, pad), dtype=_ORT_DTYPES.get(start.type, part.dtype))}
            for spec in frontier:
                dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
                feed[spec.name] = np.zeros([n + pad, *dims[1:]], _ORT_DTYPES.get(spec.type, np.float32))
            if seeds is not None:
                feed[_SEED] = np.ascontiguousarray(_pad(seeds[i:i + step], pad, zeros=True))
            try:
                (out,) = session.run([fetch], feed)
            except Exception as exc:
                raise CamError(f"onnxruntime failed on the head: {str(exc).splitlines()[0]}") from None
            parts.append(out[:n] if seeds is not None else out.reshape(n + pad, -1)[:n])
        return np.concatenate(parts)


def _pad(part: np.ndarray, pad: int, zeros: bool = False) -> np.ndarray:
    """`part` with `pad` more rows: copies of its last row, or zeros."""
    if not pad:
        return part
    extra = np.zeros_like(part[:1]).repeat(pad, axis=0) if zeros else np.repeat(part[-1:], pad, axis=0)
    return np.concatenate([part, extra])


_SEED, _GRAD = "cam_seed", "cam_grad"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


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
