"""Export Keras applications (random weights) through tf2onnx, plus TensorFlow's oracle.

Run by ``tools/corpus/build.py`` in the ``export-tf`` venv. Two tf2onnx paths:
``tf2onnx.convert.from_keras`` and a SavedModel (``model.export``) through the command line
``python -m tf2onnx.convert --saved-model``. tf2onnx has no switch for its ONNX optimizers:
the Python API takes ``optimizers={}``; for the command line, ``optimize_graph`` reads its
table from ``tf2onnx.optimizer._optimizers``, so "opt off" runs ``tf2onnx.convert.main()``
with that table emptied (see ``_CLI_NO_OPT``).

The oracle: ``features`` is the input of the model's ``GlobalAveragePooling2D`` (or of the
pooling layer named in the config), NHWC; the head is the chain of layers after it, checked
against the model's own output; gradients by ``tf.GradientTape``; the affine head from the
final ``Dense`` layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

import common  # noqa: E402

_CLI_NO_OPT = ("import sys, tf2onnx.convert, tf2onnx.optimizer; tf2onnx.optimizer._optimizers.clear(); "
               "sys.argv[0] = 'tf2onnx.convert'; tf2onnx.convert.main()")

A = keras.applications


def _vgg16_gap(input_shape, classes, classifier_activation, weights):
    base = A.VGG16(include_top=False, weights=weights, input_shape=input_shape, pooling="avg")
    out = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(base.output)
    return keras.Model(base.input, out, name="vgg16_gap")


def _mobilenetv2_avgpool7(input_shape, classes, classifier_activation, weights):
    # A 6x6 map (192 px / 32) pooled by one 7x7 window with 'same' padding: a global mean.
    base = A.MobileNetV2(include_top=False, weights=weights, input_shape=input_shape, alpha=0.35)
    x = keras.layers.AveragePooling2D(pool_size=7, padding="same", name="avg_pool_7x7")(base.output)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(base.input, out, name="mobilenetv2_avgpool7")


# name: builder, options, input size, tf2onnx path, optimizers on/off, opset, pooling layer type
MODELS = {
    "resnet50_fromkeras_opt": dict(build=A.ResNet50, size=64, path="from_keras", opt=True, opset=15),
    "mobilenetv2_035_fromkeras_noopt": dict(build=A.MobileNetV2, kw={"alpha": 0.35}, size=64, path="from_keras",
                                            opt=False, opset=15),
    "efficientnetb0_cli_opt": dict(build=A.EfficientNetB0, size=64, path="cli", opt=True, opset=17),
    "densenet121_cli_noopt": dict(build=A.DenseNet121, size=64, path="cli", opt=False, opset=18),
    "vgg16_gap_cli_noopt": dict(build=_vgg16_gap, size=64, path="cli", opt=False, opset=18),
    # GAP -> Conv 1x1 -> hard_swish -> Conv 1x1: tf2onnx writes hard_swish as x * Clip(x + 3, 0, 6) / 6
    "mobilenetv3small_cli_opt": dict(build=A.MobileNetV3Small, kw={"minimalistic": False}, size=64, path="cli",
                                     opt=True, opset=17, refuse_ops=["Clip", "Mul"]),
    "mobilenetv3small_fromkeras_noopt": dict(build=A.MobileNetV3Small, kw={"minimalistic": False}, size=64,
                                             path="from_keras", opt=False, opset=15, refuse_ops=["Clip", "Mul"]),
    "mobilenetv2_avgpool7_cli_noopt": dict(build=_mobilenetv2_avgpool7, size=192, path="cli", opt=False, opset=18,
                                           pool_layer="AveragePooling2D"),
    "mobilenetv2_avgpool7_fromkeras_opt": dict(build=_mobilenetv2_avgpool7, size=192, path="from_keras", opt=True,
                                               opset=15, pool_layer="AveragePooling2D"),
}


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Random biases, BatchNorm affines and running stats, so tf2onnx cannot fold them away."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
        elif isinstance(layer, keras.layers.LayerNormalization):
            gamma, beta = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape)])
        elif getattr(layer, "bias", None) is not None:
            weights = layer.get_weights()
            weights[-1] = rng.normal(0, 0.1, weights[-1].shape)
            layer.set_weights(weights)


def convert(model: keras.Model, cfg: dict, path, size: int) -> str:
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="x"),)
    if cfg["path"] == "from_keras":
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=cfg["opset"], output_path=str(path),
                                   optimizers=None if cfg["opt"] else {})
        return f"tf2onnx {tf2onnx.__version__} from_keras opt {'on' if cfg['opt'] else 'off (optimizers={})'}"
    with tempfile.TemporaryDirectory() as saved:
        model.export(saved, format="tf_saved_model", input_signature=list(spec), verbose=False)
        args = ["--saved-model", saved, "--opset", str(cfg["opset"]), "--output", str(path)]
        code = ["-m", "tf2onnx.convert"] if cfg["opt"] else ["-c", _CLI_NO_OPT]
        subprocess.run([sys.executable, *code, *args], check=True, capture_output=True)
    return (f"tf2onnx {tf2onnx.__version__} saved-model CLI opt "
            + ("on" if cfg["opt"] else "off (optimizer table emptied)"))


def export(name: str, cfg: dict, out) -> None:
    seed = common.seed(name)
    keras.utils.set_random_seed(seed % 2**31)
    rng = np.random.default_rng(seed)
    size = cfg["size"]
    model = cfg["build"](input_shape=(size, size, 3), classes=10, classifier_activation=None, weights=None,
                         **cfg.get("kw", {}))
    randomize(model, rng)
    x = rng.standard_normal((common.BATCH, size, size, 3)).astype(np.float32)

    kind = getattr(keras.layers, cfg.get("pool_layer", "GlobalAveragePooling2D"))
    index = max(i for i, layer in enumerate(model.layers) if isinstance(layer, kind))
    pool = model.layers[index]
    head_layers = model.layers[index:]

    def head(v):
        for layer in head_layers:
            v = layer(v)  # outside fit() layers run in inference mode
        return v

    logits = model(x, training=False).numpy()
    features = keras.Model(model.inputs, pool.input)(x, training=False).numpy()
    np.testing.assert_allclose(head(tf.constant(features)).numpy(), logits, rtol=1e-5, atol=1e-5)
    classes = rng.integers(0, logits.shape[1], size=common.BATCH)
    f = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(f)
        selected = tf.gather(head(f), classes, axis=1, batch_dims=1)
    grad = tape.gradient(selected, f).numpy()

    arrays = {"x": x, "logits": logits, "features": features, "grad_classes": classes.astype(np.int64), "grad": grad}
    affine = common.is_affine(lambda v: head(tf.constant(v)).numpy(), features, rng)
    if affine:
        dense = head_layers[-1]
        kernel, bias = dense.get_weights()
        arrays["weights"], arrays["bias"] = kernel.T.copy(), bias

    exporter = convert(model, cfg, out / f"{name}.onnx", size)
    exporter += f" opset {cfg['opset']}, keras {keras.__version__} {model.name}"
    common.write(out, "keras", name, exporter=exporter, layout="NHWC", affine=affine, pooling="avg",
                 arrays=arrays, refuse_ops=cfg.get("refuse_ops", ()))


if __name__ == "__main__":
    common.main(MODELS, export, "keras")
