"""Export paddle.vision classifiers (random weights) through paddle.jit.save + paddle2onnx, plus
Paddle's oracle.

Run by ``tools/corpus/build.py`` in the ``export-paddle`` venv. The oracle: a forward pre-hook on
the pooling layer reads its input (``features``, NCHW) and, to evaluate the head alone or take
gradients, substitutes a tensor of ours for it; gradients by ``paddle.grad``; the affine head
from the final ``Linear`` (``weight`` is stored (K, C) in Paddle).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import paddle
import paddle2onnx

import common

V = paddle.vision.models


class AvgPool7Head(paddle.nn.Layer):
    """resnet18's trunk at 192 px (a 6x6 map), pooled by one 7x7 window padded (0, 1) below and right
    (exclusive of the padding, so the mean of the map), then Linear: GoogLeNet's Caffe2 head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.trunk = V.resnet18(num_classes=0, with_pool=False)
        self.pool = paddle.nn.AvgPool2D(kernel_size=7, stride=7, padding=[0, 1, 0, 1], exclusive=True)
        self.fc = paddle.nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(paddle.flatten(self.pool(self.trunk(x)), 1))


# name: builder, options, input size, pooling layer attribute, dynamic spatial dims, refuse_ops
MODELS = {
    "resnet18": dict(build=V.resnet18, size=64, pool="avgpool", dynamic_hw=True),
    "mobilenet_v2_x0_25": dict(build=V.mobilenet_v2, kw={"scale": 0.25}, size=64, pool="pool2d_avg", dynamic_hw=True),
    "shufflenet_v2_x0_25": dict(build=V.shufflenet_v2_x0_25, size=64, pool="_pool2d_avg", dynamic_hw=False),
    # classifier: Dropout, Conv 1x1 to 10 channels, ReLU, then the pooling: the head after it is empty
    "squeezenet1_1": dict(build=V.squeezenet1_1, size=64, pool="_avg_pool", dynamic_hw=True, identity_head=True),
    "densenet121": dict(build=V.densenet121, size=64, pool="pool2d_avg", dynamic_hw=True),
    # three outputs (main, two auxiliary); camcore explains the first. The auxiliary heads' Linear
    # layers need a 12x12 map at Inception 4a: 192 px.
    "googlenet": dict(build=V.googlenet, size=192, pool="_pool_5", fc="_fc_out", dropout="_drop", dynamic_hw=False),
    "resnet18_avgpool7_pad": dict(build=AvgPool7Head, size=192, pool="pool", dynamic_hw=False),
    # GAP -> Linear -> Hardswish (paddle2onnx: x * HardSigmoid(x)) -> Linear
    "mobilenet_v3_small": dict(build=V.mobilenet_v3_small, kw={"scale": 0.5}, size=64, pool="avgpool",
                               dynamic_hw=True, refuse_ops=["HardSigmoid", "Mul"]),
}
OPSET = 13


class Tap:
    """Forward pre-hook: records the layer's input, or replaces it with ``self.replace``."""

    def __init__(self):
        self.seen = None
        self.replace = None

    def __call__(self, layer, inputs):
        self.seen = inputs[0]
        if self.replace is not None:
            return (self.replace,)
        return None


def randomize(model: paddle.nn.Layer, rng: np.random.Generator) -> None:
    """Random biases, BatchNorm affines and running stats, so the exporter cannot fold them away."""
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm)):
            layer._mean.set_value(rng.normal(0, 0.1, layer._mean.shape).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, layer._variance.shape).astype("float32"))
            if layer.weight is not None:
                layer.weight.set_value(rng.uniform(0.5, 1.5, layer.weight.shape).astype("float32"))
        bias = getattr(layer, "bias", None)
        if isinstance(bias, paddle.Tensor):
            bias.set_value(rng.normal(0, 0.1, bias.shape).astype("float32"))


def export(name: str, cfg: dict, out: Path) -> None:
    seed = common.seed(name)
    paddle.seed(seed % 2**31)
    rng = np.random.default_rng(seed)
    model = cfg["build"](num_classes=10, **cfg.get("kw", {}))
    randomize(model, rng)
    model.eval()
    size = cfg["size"]
    x = rng.standard_normal((common.BATCH, 3, size, size)).astype(np.float32)
    tap = Tap()
    handle = getattr(model, cfg["pool"]).register_forward_pre_hook(tap)

    def run(v=None):
        tap.replace = v
        result = model(paddle.to_tensor(x))
        return result[0] if isinstance(result, (list, tuple)) else result

    with paddle.no_grad():
        logits = run().numpy()
        features = tap.seen.numpy()
    f = paddle.to_tensor(features, stop_gradient=False)
    head_logits = run(f)
    classes = rng.integers(0, logits.shape[1], size=common.BATCH)
    selected = paddle.take_along_axis(head_logits, paddle.to_tensor(classes[:, None]), axis=1).sum()
    (grad,) = paddle.grad([selected], [f])
    np.testing.assert_allclose(head_logits.numpy(), logits, rtol=1e-5, atol=1e-5)

    def head(v):
        with paddle.no_grad():
            return run(paddle.to_tensor(v)).numpy()

    arrays = {"x": x, "logits": logits, "features": features, "grad_classes": classes.astype(np.int64),
              "grad": grad.numpy()}
    affine = common.is_affine(head, features, rng)
    handle.remove()
    if affine and cfg.get("identity_head"):
        arrays["weights"] = np.eye(logits.shape[1], dtype=np.float32)
        arrays["bias"] = np.zeros(logits.shape[1], np.float32)
    elif affine:
        fc = getattr(model, cfg["fc"]) if "fc" in cfg else [
            layer for layer in model.sublayers() if isinstance(layer, paddle.nn.Linear)][-1]
        arrays["weights"] = fc.weight.numpy().T.copy()
        arrays["bias"] = fc.bias.numpy()
        drop = getattr(model, cfg.get("dropout", ""), None)
        if drop is not None and drop.mode == "downscale_in_infer":
            arrays["weights"] *= np.float32(1.0 - drop.p)  # this Dropout scales its input at inference

    hw = None if cfg["dynamic_hw"] else size
    spec = [paddle.static.InputSpec([None, 3, hw, hw], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "inference")
        paddle.jit.save(model, prefix, input_spec=spec)
        model_file = next(p for p in (prefix + ".json", prefix + ".pdmodel") if Path(p).exists())
        paddle2onnx.export(model_file, prefix + ".pdiparams", str(out / f"{name}.onnx"), opset_version=OPSET)
    exporter = (f"paddle {paddle.__version__} jit.save input [None, 3, {hw}, {hw}] + paddle2onnx "
                f"{paddle2onnx.__version__} opset {OPSET}")
    common.write(out, "paddle", name, exporter=exporter, layout="NCHW", affine=affine, pooling="avg",
                 arrays=arrays, refuse_ops=cfg.get("refuse_ops", ()))


if __name__ == "__main__":
    common.main(MODELS, export, "paddle")
