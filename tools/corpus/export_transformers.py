"""Export vision transformers (timm and Hugging Face ``transformers``, random weights, tiny
configs) with ``torch.onnx.export`` (TorchScript and dynamo) and optimum, plus torch's oracle.

Run by ``tools/corpus/build.py`` in the ``export-transformers`` venv. Attention is eager (timm's
fused attention off, ``attn_implementation="eager"``), so every attention probability is a
Softmax output in the graph; one timm ViT keeps fused attention and is exported at opset 23,
where it becomes ONNX ``Attention`` ops with no probabilities to read. The oracle is torch's, on one fixed batch of two images, with
``seed[n] = one-hot(top-1 class of item n)`` (see tests/corpus.py for the arrays):

- ``block_input``: the input of the last block (pytorch-grad-cam's ``blocks[-1].norm1`` input);
- ``norm_input``: the last block's output, i.e. the input of the final norm where there is one;
- ``spatial`` (hierarchical models): the channels-last map ``(N, gh, gw, C)`` the pooling reads;
- ``features``: the tensor the head pools (what ``pooling`` names), as in the CNN corpus;
- ``attn_LL``: every Softmax output of the forward pass ``(N', heads, T, T')``, in call order,
  with ``attn_grad_LL`` its gradient (the inputs of attention rollout and of Chefer et al.'s GAE).

Each tensor is captured by a hook on the torch module that produces or takes it, and every
gradient is ``torch.autograd.grad`` of ``sum_n logits[n, top1[n]]`` w.r.t. it.

Some (model, exporter) pairs do not export; they are listed in ``FAILS`` with what happens,
and ``--failing`` retries them (nothing is written for them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TIMM_FUSED_ATTN"] = "0"  # explicit q @ k -> Softmax, as eager attention

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402

# One thread: tiny models gain nothing from more, and on a shared machine two oversubscribed
# threads ran a forward pass 20x slower than one.
torch.set_num_threads(1)

# torchvision's PyPI wheel for torch 2.13 cannot load its C++ ops on the CPU build (see
# export_torch.py): declaring the two schemas its import registers unguarded lets it through.
_TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TORCHVISION_OPS.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402
import transformers  # noqa: E402

FRAMEWORK = "transformers"
NUM_CLASSES = 10
TS = {"exporter": "ts", "opset": 17}
DYNAMO = {"exporter": "dynamo", "opset": 18}
DYNAMO23 = {"exporter": "dynamo", "opset": 23}  # scaled_dot_product_attention -> ONNX Attention
OPTIMUM = {"exporter": "optimum", "opset": 17}

# timm: tiny configs through create_model's keyword overrides.
_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TIMM = {
    "vit": dict(arch="vit_tiny_patch16_224", kw=_VIT, size=32),
    "deit_distilled": dict(arch="deit_tiny_distilled_patch16_224", kw=_VIT, size=32),
    "beit": dict(arch="beit_base_patch16_224", kw=_VIT, size=32),
    "vit_reg4": dict(arch="vit_tiny_patch16_224", kw={**_VIT, "reg_tokens": 4}, size=32),
    # timm's fused attention (F.scaled_dot_product_attention): no Softmax to read in the graph
    "vit_sdpa": dict(arch="vit_tiny_patch16_224", kw=_VIT, size=32, fused=True, exporters=(DYNAMO23,)),
    "vit_reg4_gap": dict(arch="vit_tiny_patch16_224",
                         kw={**_VIT, "reg_tokens": 4, "global_pool": "avg", "class_token": False}, size=32),
    "swin": dict(arch="swin_tiny_patch4_window7_224",
                 kw=dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                         num_heads=(1, 2)), size=32),
    "levit": dict(arch="levit_128s", kw=dict(img_size=128, embed_dim=(32, 48), key_dim=8, num_heads=(2, 2),
                                            depth=(1, 1)), size=128),
}

# Hugging Face: (model class, config class, config options), all eager attention.
_HF_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64)
_HF_SWIN = dict(image_size=32, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2])
HF = {
    "vit": ("ViTForImageClassification", "ViTConfig", _HF_VIT),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _HF_VIT),
    "beit": ("BeitForImageClassification", "BeitConfig",
             {**_HF_VIT, "use_mean_pooling": True, "use_relative_position_bias": True}),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", _HF_VIT),
    "dinov2_reg": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                   {**_HF_VIT, "num_register_tokens": 4}),
    "swin": ("SwinForImageClassification", "SwinConfig", _HF_SWIN),
    "swinv2": ("Swinv2ForImageClassification", "Swinv2Config", _HF_SWIN),
    "cvt": ("CvtForImageClassification", "CvtConfig",
            dict(image_size=64, embed_dim=[16, 32, 48], num_heads=[1, 2, 2], depth=[1, 2, 3])),
    "levit": ("LevitForImageClassificationWithTeacher", "LevitConfig",
              dict(image_size=192, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2], depths=[1, 1, 1],
                   key_dim=[8, 8, 8])),
    "pvt_v2": ("PvtV2ForImageClassification", "PvtV2Config",
               dict(image_size=128, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1],
                    num_attention_heads=[1, 1, 2, 2])),
    "focalnet": ("FocalNetForImageClassification", "FocalNetConfig",
                 dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
                      focal_windows=[3, 3])),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(image_size=128, width_coefficient=0.1, depth_coefficient=0.2, hidden_dim=128)),
}

# name: (library, family, exporter options); every pair is tried, FAILS are left out.
CANDIDATES = {}
for _family in TIMM:
    for _opts in TIMM[_family].get("exporters", (TS, DYNAMO)):
        CANDIDATES[f"timm_{_family}_{_opts['exporter']}"] = ("timm", _family, _opts)
for _family in HF:
    for _opts in (TS, DYNAMO, OPTIMUM):
        CANDIDATES[f"hf_{_family}_{_opts['exporter']}"] = ("hf", _family, _opts)

# The pairs that do not export, and how they fail (retry with ``--failing [NAME...]``).
FAILS = {
    "hf_dinov2_reg_ts": "torch.onnx.errors.UnsupportedOperatorError: Exporting the operator "
                        "'aten::_upsample_bicubic2d_aa' to ONNX opset version 17 is not supported "
                        "(the antialiased bicubic position-embedding interpolation)",
    "hf_dinov2_reg_optimum": "ValueError: Trying to export a dinov2_with_registers model, that is a custom or "
                             "unsupported architecture, but no custom onnx configuration was passed",
    "hf_pvt_v2_optimum": "ValueError: Trying to export a pvt_v2 model, that is a custom or unsupported "
                         "architecture, but no custom onnx configuration was passed",
    "hf_focalnet_optimum": "ValueError: Trying to export a focalnet model, that is a custom or unsupported "
                           "architecture, but no custom onnx configuration was passed",
}
MODELS = {k: v for k, v in CANDIDATES.items() if k not in FAILS}


# ----------------------------------------------------------------------------------------------
# What each family pools, and where its tensors are.

def _last(seq):
    return list(seq)[-1]


def timm_spec(family: str, model) -> dict:
    """Modules (last block, the pooled tensor's producer) and the expected facts."""
    if family in ("vit", "deit_distilled", "beit", "vit_reg4", "vit_reg4_gap", "vit_sdpa"):
        prefix = model.num_prefix_tokens
        pooling = {"vit": "cls", "vit_reg4": "cls", "vit_sdpa": "cls", "deit_distilled": "cls_dist_mean",
                   "beit": "token_mean_no_prefix", "vit_reg4_gap": "token_mean_no_prefix"}[family]
        return dict(block=model.blocks[-1], pool_in=model.norm, pooling=pooling,
                    prefix=prefix, grid=tuple(model.patch_embed.grid_size), hidden=model.embed_dim,
                    attention="fused" if TIMM[family].get("fused") else "global")
    if family == "swin":
        # NHWC throughout; the head averages the normed map over H and W (channels-last).
        return dict(block=model.layers[-1].blocks[-1], pool_in=model.norm,
                    pooling="spatial_mean", prefix=0, grid=None, hidden=model.num_features,
                    attention="windowed", spatial="nhwc")
    if family == "levit":
        # No final norm: the last stage's tokens are averaged, then BN+Linear heads, averaged.
        stage = model.stages[-1]
        r = TIMM["levit"]["size"] // 16  # the stem's four stride-2 convs
        for _ in model.stages[1:]:
            r = (r - 1) // 2 + 1  # each later stage starts with a stride-2 subsampling attention
        return dict(block=stage.blocks[-1], pool_in=stage, pooling="token_mean", prefix=0,
                    grid=(r, r),
                    hidden=model.num_features, attention="global", spatial="tokens")
    raise KeyError(family)


def hf_spec(family: str, model) -> dict:
    cfg = model.config
    if family in ("vit", "deit_teacher", "beit", "dinov2", "dinov2_reg"):
        base = getattr(model, {"vit": "vit", "deit_teacher": "deit", "beit": "beit", "dinov2": "dinov2",
                               "dinov2_reg": "dinov2_with_registers"}[family])
        prefix = {"vit": 1, "deit_teacher": 2, "beit": 1, "dinov2": 1,
                  "dinov2_reg": 1 + getattr(cfg, "num_register_tokens", 0)}[family]
        pooling = {"vit": "cls", "deit_teacher": "cls_dist_mean", "beit": "token_mean_no_prefix",
                   "dinov2": "cls_concat_mean", "dinov2_reg": "cls_concat_mean"}[family]
        g = cfg.image_size // cfg.patch_size
        # BEiT with mean pooling: the encoder's layernorm is Identity, the pooler norms the mean.
        return dict(block=base.encoder.layer[-1], pool_in=base.layernorm,
                    pooling=pooling, prefix=prefix, grid=(g, g), hidden=cfg.hidden_size, attention="global")
    if family in ("swin", "swinv2", "focalnet"):
        base = getattr(model, family)
        stages = base.encoder.layers if family != "focalnet" else base.encoder.stages
        last = stages[-1]
        block = last.blocks[-1] if family != "focalnet" else last.layers[-1]
        g = cfg.image_size // cfg.patch_size // 2 ** (len(cfg.depths) - 1)
        # (N, L, C) tokens, layernorm, then AdaptiveAvgPool1d over L: a mean over all tokens.
        return dict(block=block, pool_in=base.layernorm, pooling="token_mean",
                    prefix=0, grid=(g, g), hidden=base.num_features,
                    attention="none" if family == "focalnet" else "windowed", spatial="tokens")
    if family == "cvt":
        stage = model.cvt.encoder.stages[-1]
        g = cfg.image_size
        for p, s in zip(cfg.patch_sizes, cfg.patch_stride):
            g = (g + 2 * (p // 2) - p) // s + 1  # the conv embeddings' padding is patch_padding
        # The last stage carries a CLS token; the head norms it alone (the mean is over one token).
        return dict(block=stage.layers[-1], pool_in=model.layernorm, pooling="cls",
                    prefix=1, grid=(g, g), hidden=cfg.embed_dim[-1], attention="global")
    if family == "levit":
        # The last stage alternates attention and MLP residual layers: its last block starts at
        # layers[-2]. No final norm: the stage's tokens are averaged, then BN+Linear heads.
        stage = model.levit.encoder.stages[-1]
        return dict(block=stage.layers[-2], block_last=stage.layers[-1], pool_in=stage, pooling="token_mean",
                    prefix=0, grid=(stage.get_resolution(),) * 2,
                    hidden=cfg.hidden_sizes[-1], attention="global", spatial="tokens")
    if family == "pvt_v2":
        layer = model.pvt_v2.encoder.layers[-1]
        g = HF["pvt_v2"][2]["image_size"] // 32  # strides 4, 2, 2, 2
        return dict(block=layer.blocks[-1], pool_in=layer.layer_norm,
                    pooling="token_mean", prefix=0, grid=(g, g), hidden=cfg.hidden_sizes[-1],
                    attention="global", spatial="tokens")
    if family == "efficientnet":
        enc = model.efficientnet.encoder
        return dict(block=None, pool_in=enc.top_activation, pooling="gap", prefix=0, grid=None,
                    hidden=cfg.hidden_dim, attention="none", spatial="nchw")
    raise KeyError(family)


# ----------------------------------------------------------------------------------------------
# Capturing tensors in torch.

def _first_tensor(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(
        v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0]  # a ModelOutput


@contextlib.contextmanager
def capture(spec: dict, replace=None):
    """Record the last block's input and output and the pooled tensor in ``store``, and
    every Softmax output; with ``replace``, the pooled tensor is swapped for it (the head alone)."""
    store = {"attn": []}
    handles = []
    if spec.get("block") is not None:
        handles.append(spec["block"].register_forward_pre_hook(
            lambda m, a, k: store.__setitem__("block_input", _first_tensor(a, k)), with_kwargs=True))
        handles.append(spec.get("block_last", spec["block"]).register_forward_hook(
            lambda m, a, o: store.__setitem__("norm_input", _output_tensor(o))))

    def pooled(m, a, o):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"the pooled tensor's module returns {type(o).__name__}, not a tensor")
        store["pool_in"] = o if replace is None else replace
        return replace

    handles.append(spec["pool_in"].register_forward_hook(pooled))
    softmax, tensor_softmax = torch.nn.functional.softmax, torch.Tensor.softmax

    depth = [0]

    def record(fn, *a, **k):
        depth[0] += 1  # F.softmax calls Tensor.softmax: record the outermost call once
        try:
            out = fn(*a, **k)
        finally:
            depth[0] -= 1
        if depth[0] == 0 and out.ndim == 4:
            store["attn"].append(out)
        return out

    torch.nn.functional.softmax = lambda *a, **k: record(softmax, *a, **k)
    torch.Tensor.softmax = lambda self, *a, **k: record(tensor_softmax, self, *a, **k)
    try:
        yield store
    finally:
        torch.nn.functional.softmax, torch.Tensor.softmax = softmax, tensor_softmax
        for h in handles:
            h.remove()


class Logits(torch.nn.Module):
    """A Hugging Face classifier as ``x -> logits`` (what the torch exporters see)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def build_model(lib: str, family: str, seed: int):
    torch.manual_seed(seed)
    if lib == "timm":
        cfg = TIMM[family]
        timm.layers.set_fused_attn(cfg.get("fused", False))  # read by each Attention at init
        model = timm.create_model(cfg["arch"], pretrained=False, num_classes=NUM_CLASSES, **cfg["kw"])
        timm.layers.set_fused_attn(False)
        size = cfg["size"]
    else:
        cls, config_cls, kw = HF[family]
        config = getattr(transformers, config_cls)(num_labels=NUM_CLASSES, **kw)
        config._attn_implementation = "eager"
        model = getattr(transformers, cls)(config)
        size = kw["image_size"]
    randomize(model)
    return model.eval(), size


def randomize(model: torch.nn.Module) -> None:
    """`common.randomize_torch`, and random learned tokens, so nothing folds away and the prefix
    tokens differ from each other."""
    common.randomize_torch(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.abs().max() == 0 or leaf in ("cls_token", "dist_token", "reg_token", "register_tokens",
                                              "distillation_token", "mask_token", "pos_embed",
                                              "position_embeddings"):
                p.normal_(0.0, 0.5)


# ----------------------------------------------------------------------------------------------
# The oracle.

def oracle(model, spec: dict, x: torch.Tensor, call) -> tuple:
    with capture(spec) as store:
        logits = call(x)
    top1 = logits.argmax(1)
    names = [k for k in ("block_input", "norm_input", "pool_in") if k in store]
    tensors = [store[k] for k in names] + store["attn"]
    grads = torch.autograd.grad(logits[torch.arange(len(top1)), top1].sum(), tensors, allow_unused=True)
    arrays = {"x": x.numpy(), "logits": logits.detach().numpy(), "grad_classes": top1.numpy().astype(np.int64)}
    for k, t, g in zip(names, tensors, grads):
        arrays[k] = t.detach().numpy()
        arrays[f"grad_{k}"] = np.zeros_like(arrays[k]) if g is None else g.numpy()
    for i, (t, g) in enumerate(zip(store["attn"], grads[len(names):])):
        arrays[f"attn_{i:02d}"] = t.detach().numpy()
        arrays[f"attn_grad_{i:02d}"] = np.zeros_like(arrays[f"attn_{i:02d}"]) if g is None else g.numpy()
    return arrays, store


def head_is_affine(model, spec, x, call, features: np.ndarray, rng) -> bool:
    def head(v):
        with torch.no_grad(), capture(spec, replace=torch.from_numpy(v)):
            return call(x).numpy()
    return common.is_affine(head, features, rng)


_MEAN_AXES = {"gap": (2, 3), "spatial_mean": (1, 2), "token_mean": (1,)}


def affine_head(spec, call, x, features: np.ndarray, pooling: str) -> tuple:
    """``W (C, K)`` and ``b (C,)`` of an affine head after a mean pooling, read off the head by
    feeding it constant maps: ``b = head(0)``, ``W[:, k] = head(e_k) - b``."""
    channel = 1 if pooling == "gap" else -1
    k = features.shape[channel]

    def run(vectors):  # (2, K) -> the logits of maps equal to those vectors everywhere
        shape = [2] + [1] * (features.ndim - 1)
        shape[channel] = k
        maps = np.broadcast_to(vectors.reshape(shape), (2, *features.shape[1:])).astype(features.dtype)
        with torch.no_grad(), capture(spec, replace=torch.from_numpy(np.ascontiguousarray(maps))):
            return call(x).numpy().astype(np.float64)

    bias = run(np.zeros((2, k)))[0]
    eye, columns = np.eye(k), []
    for i in range(0, k, 2):  # two unit vectors per run (the batch of x is two)
        out = run(eye[[i, min(i + 1, k - 1)]]) - bias
        columns += [out[0], out[1]] if i + 1 < k else [out[0]]
    return np.stack(columns, 1).astype(np.float32), bias.astype(np.float32)


def cam_identity(arrays: dict, pooling: str) -> None:
    """Raise unless ``mean(features) @ W.T + b`` gives the logits (1e-4 of max |logit| per row)."""
    pooled = arrays["features"].astype(np.float64).mean(_MEAN_AXES[pooling])
    predicted = pooled @ arrays["weights"].T.astype(np.float64) + arrays["bias"]
    logits = arrays["logits"]
    err = float((np.abs(predicted - logits).max(1) / np.abs(logits).max(1)).max())
    if err > 1e-4:
        raise RuntimeError(f"the affine head does not reproduce the logits: rel err {err:.2e}")


# ----------------------------------------------------------------------------------------------
# Exporters.

def export_onnx(model, x, path: Path, opts: dict, lib: str) -> str:
    module = model if lib == "timm" else Logits(model).eval()
    if opts["exporter"] == "optimum":
        from optimum.exporters.onnx import onnx_export_from_model
        import optimum.version
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as pre:
            # optimum's DINOv2 input generator reads the crop size from the preprocessor saved
            # beside the model (IndexError without one), as in a hub checkpoint: save one.
            size = x.shape[-1]
            transformers.BitImageProcessor(size={"shortest_edge": size},
                                           crop_size={"height": size, "width": size}).save_pretrained(pre)
            model.config._name_or_path = pre
            onnx_export_from_model(model, tmp, opset=opts["opset"], task="image-classification",
                                   do_validation=False)
            files = sorted(os.listdir(tmp))
            if [f for f in files if f != "model.onnx" and not f.endswith(".json") and not f.endswith(".txt")]:
                raise RuntimeError(f"optimum wrote more than one graph file: {files}")
            shutil.move(os.path.join(tmp, "model.onnx"), path)
        return f"optimum-onnx (optimum {optimum.version.__version__}) opset {opts['opset']}, every input axis dynamic"
    kwargs = dict(input_names=["x"], output_names=["logits"], opset_version=opts["opset"],
                  dynamo=opts["exporter"] == "dynamo")
    if opts["exporter"] == "ts":
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "logits": {0: "batch"}}
    else:
        kwargs["external_data"] = False
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), **kwargs)
    dyn = " dynamic batch" if opts["exporter"] == "ts" else " batch 2"
    return f"torch {torch.__version__} dynamo={opts['exporter'] == 'dynamo'} opset {opts['opset']}{dyn}"


def export(name: str, cfg: tuple, out: Path) -> None:
    lib, family, opts = cfg
    seed = common.seed(name)
    model, size = build_model(lib, family, seed)
    spec = (timm_spec if lib == "timm" else hf_spec)(family, model)
    torch.manual_seed(seed)
    x = torch.randn(common.BATCH, 3, size, size)
    call = model if lib == "timm" else (lambda v: model(pixel_values=v).logits)

    arrays, store = oracle(model, spec, x, call)
    with torch.no_grad():
        torch.testing.assert_close(call(x), torch.from_numpy(arrays["logits"]), rtol=0, atol=0)

    # the grid: from the config, checked against the tokens (never from a square root)
    pool_in = arrays["pool_in"]
    layout = spec.get("spatial", "tokens")
    if layout == "nhwc":
        grid = tuple(pool_in.shape[1:3])
        arrays["spatial"], arrays["grad_spatial"] = pool_in, arrays["grad_pool_in"]
    elif layout == "nchw":
        grid = tuple(pool_in.shape[2:4])
    else:
        grid = spec["grid"]
        t = arrays.get("norm_input", pool_in)
        if grid is None:
            raise RuntimeError(f"{name}: no grid")
        if t.shape[1] != spec["prefix"] + grid[0] * grid[1]:
            raise RuntimeError(f"{name}: {t.shape[1]} tokens, expected {spec['prefix']} + {grid}")
        if spec.get("spatial") == "tokens" and pool_in.shape[1] == grid[0] * grid[1]:
            arrays["spatial"] = pool_in.reshape(pool_in.shape[0], *grid, pool_in.shape[-1])
            arrays["grad_spatial"] = arrays["grad_pool_in"].reshape(arrays["spatial"].shape)
    arrays["features"], arrays["grad"] = arrays.pop("pool_in"), arrays.pop("grad_pool_in")

    rng = np.random.default_rng(seed)
    head_affine = head_is_affine(model, spec, x, call, arrays["features"], rng)
    mean_pooled = spec["pooling"] in ("gap", "spatial_mean", "token_mean", "token_mean_no_prefix")
    affine = bool(head_affine and mean_pooled)
    if affine:
        arrays["weights"], arrays["bias"] = affine_head(spec, call, x, arrays["features"], spec["pooling"])
        cam_identity(arrays, spec["pooling"])

    # Under CLS pooling the patch tokens' gradient after the last block is exactly zero.
    patch_grad_max = None
    if "grad_norm_input" in arrays and layout == "tokens":
        patch_grad_max = float(np.abs(arrays["grad_norm_input"][:, spec["prefix"]:]).max())

    path = out / f"{name}.onnx"
    model.train()  # drops caches filled by the oracle's run (LeViT's attention biases)
    model.eval()
    start = time.perf_counter()
    exporter = export_onnx(model, x, path, opts, lib)
    seconds = time.perf_counter() - start
    exporter += f", {lib} {timm.__version__ if lib == 'timm' else transformers.__version__} " + (
        TIMM[family]["arch"] if lib == "timm" else HF[family][0])

    attn = sorted(k for k in arrays if k.startswith("attn_") and not k.startswith("attn_grad_"))
    targets = {k: {"shape": list(arrays[k].shape), "grad": "grad" if k == "features" else f"grad_{k}"}
               for k in ("block_input", "norm_input", "spatial", "features") if k in arrays}
    facts = common.onnx_facts(path)
    np.savez(out / f"{name}.npz", **arrays)
    entry = {
        "name": name, "file": f"{FRAMEWORK}/{name}.onnx", "framework": FRAMEWORK, "exporter": exporter,
        "opset": facts["opset"], "input": facts["input"],
        "layout": {"tokens": "NLC", "nhwc": "NHWC", "nchw": "NCHW"}[layout], "affine": affine,
        "pooling": spec["pooling"], "refuse_ops": [], "patterns": facts["patterns"],
        "feature_shape": list(arrays["features"].shape), "num_classes": int(arrays["logits"].shape[1]),
        "notes": "",
        # transformer facts
        "library": lib, "family": family, "export_kind": opts["exporter"], "model_class":
            TIMM[family]["arch"] if lib == "timm" else HF[family][0],
        "head_affine": head_affine, "prefix_tokens": int(spec["prefix"]), "grid": list(grid),
        "hidden_size": int(spec["hidden"]), "image_size": int(size), "attention_kind": spec["attention"],
        "attention": [{"name": k, "grad": k.replace("attn_", "attn_grad_"), "shape": list(arrays[k].shape)}
                      for k in attn],
        "targets": targets, "patch_grad_max_norm_input": patch_grad_max,
        "export_seconds": round(seconds, 2), "file_bytes": path.stat().st_size,
    }
    (out / f"{name}.json").write_text(json.dumps(entry, indent=1))


def main() -> None:
    if "--failing" in sys.argv:  # retry the known failures; nothing is kept
        names = sys.argv[sys.argv.index("--failing") + 1:] or sorted(FAILS)
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                try:
                    export(name, CANDIDATES[name], Path(tmp))
                    print(f"{name}: exported (remove it from FAILS)", flush=True)
                except Exception as exc:  # noqa: BLE001 - report every failure, go on
                    print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        return
    common.main(MODELS, export, FRAMEWORK)


if __name__ == "__main__":
    main()
