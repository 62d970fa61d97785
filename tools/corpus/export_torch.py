"""Export timm classifiers (random weights) with both torch.onnx exporters, plus torch's oracle.

Run by ``tools/corpus/build.py`` in the ``export-torch`` venv. The oracle comes from torch:
``features = model.forward_features(x)`` (what timm's head pools, NCHW), ``logits =
model.forward_head(features)``, gradients by ``torch.autograd.grad``, the affine head from
``model.get_classifier()`` (checked against the logits before anything is written).
"""

from __future__ import annotations

import numpy as np
import torch

import common

# torchvision's PyPI wheel for torch 2.13 links libtorch_cuda, which the CPU build lacks, so its
# C++ ops never load and its import dies registering fake kernels for nms/qnms (the only two it
# registers unguarded). timm needs only torchvision's Python side: declaring the two schemas first
# lets that import through. No torchvision op is ever run.
_TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TORCHVISION_OPS.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402

TS = {"dynamo": False, "opset": 17}
DYNAMO = {"dynamo": True, "opset": 18}

# name: timm model, constructor options, input size, exporter, dynamic batch, refuse_ops
MODELS = {
    "resnet18_ts": dict(arch="resnet18", size=64, **TS, dynamic=True),
    "resnet18_dynamo": dict(arch="resnet18", size=64, **DYNAMO, dynamic=True),
    "resnet18_maxpool_ts": dict(arch="resnet18", kw={"global_pool": "max"}, size=64, **TS, dynamic=True,
                                pooling="max", refuse_ops=["MaxPool"]),
    "resnext26ts_ts": dict(arch="resnext26ts", size=64, **TS, dynamic=False),
    "efficientnet_b0_ts": dict(arch="efficientnet_b0", size=64, **TS, dynamic=True),
    "efficientnet_b0_dynamo": dict(arch="efficientnet_b0", size=64, **DYNAMO, dynamic=False),
    "mobilenetv2_050_dynamo": dict(arch="mobilenetv2_050", size=64, **DYNAMO, dynamic=True),
    # GAP -> 1x1 conv_head -> HardSwish -> classifier
    "mobilenetv3_small_050_ts": dict(arch="mobilenetv3_small_050", size=64, **TS, dynamic=True,
                                     refuse_ops=["HardSwish"]),
    "mobilenetv3_small_050_dynamo": dict(arch="mobilenetv3_small_050", size=64, **DYNAMO, dynamic=True,
                                         refuse_ops=["HardSwish"]),
    "densenet121_ts": dict(arch="densenet121", size=64, **TS, dynamic=True),
    "inception_v3_ts": dict(arch="inception_v3", size=75, **TS, dynamic=True),
    "regnetx_002_dynamo": dict(arch="regnetx_002", size=64, **DYNAMO, dynamic=True),
    # GAP -> LayerNorm2d -> fc
    "convnext_atto_ts": dict(arch="convnext_atto", size=64, **TS, dynamic=True,
                             refuse_ops=["LayerNormalization"]),
    "convnext_atto_dynamo": dict(arch="convnext_atto", size=64, **DYNAMO, dynamic=True,
                                 refuse_ops=["LayerNormalization"]),
    # GAP -> 1x1 conv_head -> ReLU -> classifier
    "ghostnet_050_ts": dict(arch="ghostnet_050", size=64, **TS, dynamic=True, refuse_ops=["Relu"]),
    # class token: no spatial pooling at all
    "vit_tiny_ts": dict(arch="vit_tiny_patch16_224", kw={"img_size": 64}, size=64, **TS, dynamic=True,
                        pooling="token"),
}


def export(name: str, cfg: dict, out) -> None:
    seed = common.seed(name)
    torch.manual_seed(seed)
    model = timm.create_model(cfg["arch"], pretrained=False, num_classes=10, **cfg.get("kw", {}))
    common.randomize_torch(model)
    model.eval()
    x = torch.randn(common.BATCH, 3, cfg["size"], cfg["size"])

    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=1e-5, atol=1e-5)
    f = features.detach().requires_grad_()
    head_logits = model.forward_head(f)
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, logits.shape[1], size=common.BATCH)
    (grad,) = torch.autograd.grad(head_logits[torch.arange(common.BATCH), torch.as_tensor(classes)].sum(), f)

    pooling = cfg.get("pooling", "avg")
    arrays = {"x": x.numpy(), "logits": logits.numpy(), "features": features.numpy(),
              "grad_classes": classes.astype(np.int64), "grad": grad.numpy()}

    def head(v):
        with torch.no_grad():
            return model.forward_head(torch.from_numpy(v)).numpy()

    # Affine for CAM: a 4-D map, global average pooled, then an affine function.
    affine = pooling == "avg" and features.ndim == 4 and common.is_affine(head, arrays["features"], rng)
    if affine:
        fc = model.get_classifier()
        arrays["weights"] = fc.weight.detach().numpy().reshape(fc.weight.shape[0], -1)
        arrays["bias"] = fc.bias.detach().numpy()

    path = out / f"{name}.onnx"
    kwargs = dict(input_names=["x"], output_names=["logits"], opset_version=cfg["opset"], dynamo=cfg["dynamo"])
    if cfg["dynamic"]:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "logits": {0: "batch"}}
    if cfg["dynamo"]:
        kwargs["external_data"] = False
    torch.onnx.export(model, (x,), str(path), **kwargs)
    exporter = (f"torch {torch.__version__} dynamo={cfg['dynamo']} opset {cfg['opset']}, timm {timm.__version__} "
                f"{cfg['arch']}" + (" dynamic batch" if cfg["dynamic"] else " batch 2"))
    common.write(out, "torch", name, exporter=exporter, layout="NCHW" if features.ndim == 4 else "NLC",
                 affine=affine, pooling=pooling, arrays=arrays, refuse_ops=cfg.get("refuse_ops", ()))


if __name__ == "__main__":
    common.main(MODELS, export, "torch")
