"""Entry points that reach a backend: `load`, `fuse` and what `camcore inspect` shows (backends are imported lazily)."""

from __future__ import annotations

import importlib

from .backend import get_backend
from .errors import CamError
from .explainer import Explainer
from .preprocess import Preprocess

__all__ = ["load", "fuse", "candidate_layers", "available_providers"]


def load(model=None, *, providers=None, feature=None, logits=None, backend: str = "onnxruntime",
         output=None, preprocess: Preprocess | None = None, class_names=None, batch_size: int = 32,
         device: str | None = None, precision: str | None = None) -> Explainer:
    """Load a model and find its CAM head.

    Parameters
    ----------
    model : path, onnx.ModelProto or None
        The model; None means the embedded default (EfficientNet-Lite0, ImageNet),
        which comes with its own preprocessing and class names.
    providers : list, optional
        onnxruntime providers: names (``"CUDAExecutionProvider"``, or the aliases
        ``"cpu"``, ``"cuda"``, ``"tensorrt"``) or ``(name, options)`` pairs.  Default:
        CUDA then CPU when CUDA is available, otherwise CPU.
    feature, logits : str, optional
        Tensor-name overrides for ambiguous graphs.
    backend : str
        A name from the backend registry (`camcore.register_backend`).
    output : str, optional
        The model output to explain (default: the first).
    preprocess : Preprocess, optional
        Default preprocessing for `Explainer.explain_images`.
    class_names : sequence of str, optional
    batch_size : int
        Chunk size for large batches.
    device : str, optional
        The runtime's device, for runtimes that take one: OpenVINO's ``"CPU"`` (its
        default), ``"GPU"``, ``"NPU"``, ``"AUTO"``.  onnxruntime picks devices by `providers`.
    precision : {None, "f32", "bf16", "f16"}
        None runs the model as the runtime deploys it: onnxruntime at the model's own
        types, OpenVINO at the device's default (bf16 on CPUs with AVX512-BF16 or
        AMX).  The others set OpenVINO's ``INFERENCE_PRECISION_HINT``; onnxruntime
        accepts only ``"f32"``.  ``explainer.backend.precision`` says what ran.

    Returns
    -------
    Explainer

    Raises
    ------
    NotCamCompatible
        The model has no global average pooling, or its head is not affine.
    CamError
        Unreadable model, missing external data, unknown provider.

    Notes
    -----
    What is found in a model given as a path (the head, and the model with its
    feature and logits tensors exposed as outputs) is cached on disk, keyed by the
    file's sha256, `feature`, `logits`, `output` and the versions of camcore, onnx and
    onnxruntime, so that loading it again does not import `onnx`.  The cache lives in
    ``$CAMCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/camcore``, else
    ``~/.cache/camcore``; ``CAMCORE_CACHE_DIR=off`` disables it.  In-memory models and
    models with external data are not cached; deleting the folder is always safe
    (see ``backends/analysis_cache.py``).
    """
    from . import default_model

    if model is None:
        model = default_model.path()
        preprocess = preprocess or default_model.preprocess()
        class_names = class_names if class_names is not None else default_model.class_names()
    if precision is not None and precision not in ("f32", "bf16", "f16"):
        raise CamError(f"precision must be None (the runtime's default), 'f32', 'bf16' or 'f16', got {precision!r}")
    factory = get_backend(backend)
    chosen = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    runtime = factory(model, providers=providers, feature=feature, logits=logits, output=output, **chosen)
    source = str(model) if not hasattr(model, "SerializeToString") else None
    return Explainer(runtime, preprocess=preprocess, class_names=class_names, batch_size=batch_size,
                     source=source)


def fuse(model=None, *, top_k: int = 1, size=None, normalize: bool = True, method: str = "auto", feature=None):
    """Build a model that computes its own class maps: see `backends.fuse_graph.fuse`.

    Returns an ``onnx.ModelProto`` that keeps every original output and adds
    ``cam_classes (N, k)`` int64, ``cam_scores (N, k)`` float32 and ``cam_maps``
    ``(N, k, h, w)`` float32 (``(N, k, H, W)`` when `size` is given).  With a
    gradient `method` ("gradcam", ...; "auto" picks it for heads CAM cannot
    explain) the gradients are computed inside the graph: the model runs on plain
    onnxruntime or Triton, without camcore.
    """
    fuse_graph = importlib.import_module("backends.fuse_graph")
    return fuse_graph.fuse(model, top_k=top_k, size=size, normalize=normalize, method=method, feature=feature)


def candidate_layers(explainer: Explainer) -> list:
    """The target layers of `explainer`'s model: ``(name, shape, layout)``, in graph order.

    The 4-D tensors its logits depend on (`backends.onnx_graph.candidate_layers`);
    any of them can be ``load(model, feature=name)``.
    """
    onnx_graph = importlib.import_module("backends.onnx_graph")
    head = explainer.head
    return onnx_graph.candidate_layers(explainer.backend.model, logits=head.logits, output=head.output)


def available_providers() -> list:
    """The onnxruntime execution providers available here, by their full names."""
    ort_session = importlib.import_module("backends.ort_session")
    return ort_session.import_onnxruntime().get_available_providers()
