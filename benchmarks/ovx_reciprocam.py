"""OpenVINO XAI's Recipro-CAM on one ONNX classifier, timed as `bench_openvino.py` times camcore.

Runs in its own environment, never in camcore's: OpenVINO XAI 1.1 pins OpenVINO 2024.4
and numpy 1.x::

    python3 -m venv .venvs/ovx && .venvs/ovx/bin/pip install openvino-xai==1.1.0
    .venvs/ovx/bin/python benchmarks/ovx_reciprocam.py camcore/data/efficientnet_lite0.onnx \\
        --precision f32 --json ovx-f32.json

What is timed: ``Explainer.explain(x, targets=[c], resize=False, colormap=False)`` of the
white-box Recipro-CAM (OVX inserts the masking into the graph and runs one inference per
call), batch 1, on a random standard-normal input (seed 0) at the model's input size, the
top-1 class ``c`` of that input; the model is reshaped to that static shape first (OVX 1.1
fails to insert its branch into this dynamic-batch file otherwise).  `--precision default` keeps OVX's own compilation
(OpenVINO's default precision for the device); ``f32`` recompiles the same XAI model with
``INFERENCE_PRECISION_HINT=f32`` (OVX exposes no precision setting).  Timing as camcore's
benchmarks: ``time.perf_counter`` around each call, `warmup` untimed calls, the median of
`repeat`.  Writes JSON: the versions, the precision read back from the compiled model,
every time, and the top-1 map (feature resolution, OVX's uint8 scaling) for agreement.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="ONNX classifier")
    parser.add_argument("--precision", choices=("default", "f32", "bf16", "f16"), default="default")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import openvino as ov
    import openvino_xai as xai
    from openvino_xai.explainer import ExplainMode

    core = ov.Core()
    model = core.read_model(args.model)
    shape = [d.get_length() if d.is_static else 1 for d in model.inputs[0].get_partial_shape()]
    shape[0] = 1
    model.reshape({model.inputs[0].get_any_name(): shape})  # batch 1, static: OVX's inserter needs it
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    explainer = xai.Explainer(model=model, task=xai.Task.CLASSIFICATION, explain_mode=ExplainMode.WHITEBOX,
                              explain_method=xai.Method.RECIPROCAM, device_name=args.device)
    method = explainer.method
    if args.precision != "default":
        method._model_compiled = core.compile_model(method._model, args.device,
                                                    {"INFERENCE_PRECISION_HINT": args.precision})
    compiled = method._model_compiled
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    ran = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # "f32", "bf16"

    top1 = int(np.argmax(core.compile_model(model, args.device)(x)[0]))  # the original model's logits

    def step():
        return explainer.explain(x, targets=[top1], resize=False, colormap=False)

    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = step()
        seconds.append(time.perf_counter() - start)
    saliency = result.saliency_map
    top_map = np.asarray(saliency[top1] if isinstance(saliency, dict) else saliency).squeeze()
    json.dump({
        "tool": "openvino_xai", "openvino_xai": xai.__version__ if hasattr(xai, "__version__") else "1.1.0",
        "openvino": ov.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "device": args.device, "requested_precision": args.precision, "precision": ran,
        "model": args.model, "batch": 1, "input_shape": shape, "class": top1,
        "timed": "Explainer.explain(x, targets=[top1], resize=False, colormap=False), white-box Recipro-CAM",
        "warmup": args.warmup, "repeat": args.repeat, "seconds": seconds,
        "ms_per_image": 1000 * statistics.median(seconds), "map": top_map.astype(float).tolist(),
    }, open(args.json, "w"), indent=1)
    print(f"OVX Recipro-CAM, {ran}, batch 1: {1000 * statistics.median(seconds):.2f} ms per image "
          f"(median of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
