"""Vision-transformer speed on CPU: Grad-CAM and ViT Recipro-CAM against plain inference, and
OpenVINO XAI's ViT Recipro-CAM on the same ONNX file.

The model is timm's ``vit_tiny_patch16_224`` (random weights, 1000 classes, 14x14 patches, one CLS
token), exported once with ``torch.onnx.export`` (TorchScript, opset 17, dynamic batch) by the
Python given as ``--torch-python`` (torch and timm), or read from ``--model``.  Rows, each the
fastest of ``--repeat`` interleaved timed calls after one warm-up (on a shared machine the slower
calls measure the other processes):

* ``ort plain``: onnxruntime inference of the unmodified model at ``--batch`` (16);
* ``camcore gradcam top-1``: ``Explainer.explain(method="gradcam")`` at the same batch (one
  forward that also returns the last block's input, then the head forward and backward);
  ratio = its throughput / plain's;
* ``camcore reciprocam``: ``Explainer.explain(method="reciprocam")`` (ViT Recipro-CAM: 196
  masked copies of the tokens at the last block's input, each through the last block and the
  head) at ``--recipro-batch`` images; ratio against ``ort plain`` at that batch;
* ``camcore reciprocam mask_at=normalized``: the same, masked where OpenVINO XAI masks (the last
  block's input and its first LayerNorm's output; see `camcore.methods.reciprocam`);
* with ``--openvino``: ``ov plain`` and ``camcore reciprocam (openvino)``, the same on camcore's
  OpenVINO backend at OpenVINO's default precision (bfloat16 on CPUs that have it), as OVX runs;
* ``ovx plain`` and ``ovx vit-reciprocam`` (with ``--ovx-python``, a Python with openvino-xai
  1.1.0): OpenVINO inference of the same ONNX file, and ``openvino_xai.Explainer`` with
  ``Method.VITRECIPROCAM`` (white-box, its own target layer search) on one image at a time
  (its inserted branch explains one image per call); ratio against ``ovx plain`` at batch 1.

With ``--ovx-python``, the ``pearson`` column compares each camcore Recipro-CAM row's map with
OpenVINO XAI's, on the first image and its top-1 class at the patch grid.  OpenVINO XAI's map for
it is computed at f32 (``INFERENCE_PRECISION_HINT``; its timed row keeps the plugin's default),
un-scaled; it reads logits where camcore reads softmax scores by default.

Each library is timed against its own runtime's plain inference; the ratios are what compares.
Prints a table and writes ``benchmarks/vit.json``::

    python benchmarks/bench_vit.py --torch-python /path/to/torch/python --ovx-python /path/to/ovx/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import camcore  # noqa: E402
from backends.ort_session import make_session  # noqa: E402

HERE = Path(__file__).resolve().parent

EXPORT = r'''
import sys, torch
sys.path.insert(0, sys.argv[2])
import export_torch  # declares torchvision's two op schemas, then imports timm
import timm
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
x = torch.randn(1, 3, 224, 224)
torch.onnx.export(model, x, sys.argv[1], dynamo=False, opset_version=17, input_names=["x"],
                  output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
'''

OVX = r'''
import json, sys, time
import numpy as np
import openvino as ov
import openvino.runtime
import openvino_xai as xai
from openvino_xai.explainer.explainer import ExplainMode
path, repeat, image, target, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
core = ov.Core()
model = core.read_model(path)
x = np.load(image)
compiled = core.compile_model(model, "CPU")
explainer = xai.Explainer(model=core.read_model(path), task=xai.Task.CLASSIFICATION,
                          explain_mode=ExplainMode.WHITEBOX, explain_method=xai.Method.VITRECIPROCAM,
                          device_name="CPU")

# The map compared with camcore's: raw (no scaling in the graph or after), computed at f32.  The
# CPU plugin's default precision is bf16 where the CPU has it, and bf16 rounds a random-weight
# ViT's map (its logits vary by ~1e-3 over the grid) to noise.
class _F32Core(openvino.runtime.Core):
    def compile_model(self, model, device_name=None, config=None, **kw):
        return super().compile_model(model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"})

default_core, openvino.runtime.Core = openvino.runtime.Core, _F32Core
try:
    f32 = xai.Explainer(model=core.read_model(path), task=xai.Task.CLASSIFICATION,
                        explain_mode=ExplainMode.WHITEBOX, explain_method=xai.Method.VITRECIPROCAM,
                        device_name="CPU", embed_scaling=False)
finally:
    openvino.runtime.Core = default_core
saliency = f32(x, targets=[target], resize=False, colormap=False, scaling=False).saliency_map[target]
np.save(out, np.asarray(saliency, np.float32))
def plain():
    compiled(x)
def explain():
    # maps at the patch grid, as camcore returns them: no resize, colour map or scaling
    explainer(x, targets=[0], resize=False, colormap=False, scaling=False)
for f in (plain, explain):
    f()
times = {"plain": [], "explain": []}
for _ in range(repeat):
    for name, f in (("plain", plain), ("explain", explain)):
        t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
print(json.dumps({k: min(v) for k, v in times.items()}))
'''


def export(torch_python: str, out: Path) -> None:
    subprocess.run([torch_python, "-c", EXPORT, str(out), str(ROOT / "tools" / "corpus")], check=True,
                   stdout=subprocess.DEVNULL)


def _median_times(calls: dict, repeat: int) -> dict:
    for f in calls.values():
        f()  # warm-up: sessions built, caches filled
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, f in calls.items():
            time.sleep(0.05)
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    # the fastest call: on a shared machine the others carry other processes' load
    return {name: min(v) for name, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a ViT ONNX file (default: export vit_tiny_patch16_224)")
    parser.add_argument("--torch-python", default=os.environ.get("CAMCORE_TORCH_PYTHON"))
    parser.add_argument("--ovx-python", default=os.environ.get("CAMCORE_OVX_PYTHON"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--recipro-batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--openvino", action="store_true",
                        help="also camcore's reciprocam on OpenVINO (its default precision) against plain OpenVINO")
    parser.add_argument("--json", type=Path, default=HERE / "vit.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            if not args.torch_python:
                parser.error("give --model, or --torch-python to export vit_tiny_patch16_224")
            path = Path(tmp) / "vit_tiny_patch16_224.onnx"
            export(args.torch_python, path)
        rows = run(path, args)
    width = max(len(r["config"]) for r in rows)
    print(f"{'config':<{width}}  {'batch':>5}  {'s/call':>8}  {'img/s':>8}  {'ratio':>6}  pearson with OVX's map")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
        pearson = f"{r['pearson_ovx']:.4f}" if r.get("pearson_ovx") is not None else "-"
        print(f"{r['config']:<{width}}  {r['batch']:>5}  {r['seconds']:>8.4f}  {r['images_per_s']:>8.2f}  {ratio:>6}  "
              f"{pearson}")
    print("ratio: throughput against its own runtime's plain inference at the same batch; pearson: the map of the "
          "first image's top-1 class against OpenVINO XAI's (computed at f32)")
    args.json.write_text(json.dumps({"model": "timm vit_tiny_patch16_224 (random weights)" if args.model is None
                                     else str(args.model), "repeat": args.repeat,
                                     "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def run(path: Path, args) -> list:
    explainer = camcore.load(str(path), providers=["cpu"])
    normalized = camcore.load(str(path), providers=["cpu"])
    normalized.method_options = {"mask_at": "normalized"}  # masked where OpenVINO XAI masks
    plain_session = make_session(path.read_bytes(), ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    big = rng.standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    small = big[:args.recipro_batch]
    calls = {
        "ort plain": lambda: plain_session.run(None, {"x": big}),
        "camcore gradcam top-1": lambda: explainer.explain(big, method="gradcam"),
    }
    t = _median_times(calls, args.repeat)
    recipro = {"camcore reciprocam": explainer, "camcore reciprocam mask_at=normalized": normalized}
    t_small = _median_times({"ort plain": lambda: plain_session.run(None, {"x": small}),
                             **{name: (lambda e=e: e.explain(small, method="reciprocam")) for name, e in recipro.items()}},
                            args.repeat)
    if args.openvino:  # camcore on OpenVINO at its default precision, as OVX runs
        from backends.ov_session import OvRuntime

        ov_explainer = camcore.load(str(path), backend="openvino")
        ov_plain = OvRuntime("CPU").compile(path.read_bytes())
        t_ov = _median_times({
            "ov plain": lambda: ov_plain.run(["logits"], {"x": small}),
            "camcore reciprocam (openvino)": lambda: ov_explainer.explain(small, method="reciprocam"),
        }, args.repeat)
    rows = [
        dict(config="ort plain", batch=args.batch, seconds=t["ort plain"], ratio=None),
        dict(config="camcore gradcam top-1", batch=args.batch, seconds=t["camcore gradcam top-1"],
             ratio=t["ort plain"] / t["camcore gradcam top-1"]),
        dict(config="ort plain", batch=args.recipro_batch, seconds=t_small["ort plain"], ratio=None),
    ]
    rows += [dict(config=name, batch=args.recipro_batch, seconds=t_small[name], ratio=t_small["ort plain"] / t_small[name])
             for name in recipro]
    if args.openvino:
        rows += [dict(config=f"ov plain ({ov_explainer.backend.precision})", batch=args.recipro_batch,
                      seconds=t_ov["ov plain"], ratio=None),
                 dict(config="camcore reciprocam (openvino)", batch=args.recipro_batch,
                      seconds=t_ov["camcore reciprocam (openvino)"],
                      ratio=t_ov["ov plain"] / t_ov["camcore reciprocam (openvino)"])]
    if args.ovx_python:
        # the maps compared: the first image, its top-1 class, at the patch grid
        image, target = big[:1], int(explainer.explain(big[:1]).classes[0, 0])
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "x.npy", image)
            out = subprocess.run([args.ovx_python, "-c", OVX, str(path), str(args.repeat), str(Path(tmp) / "x.npy"),
                                  str(target), str(Path(tmp) / "map.npy")], check=True, capture_output=True, text=True)
            theirs = np.load(Path(tmp) / "map.npy")
        ovx = json.loads(out.stdout.strip().splitlines()[-1])
        for r in rows:
            if r["config"] in recipro:
                ours = recipro[r["config"]].explain(image, classes=[target], method="reciprocam").maps[0, 0]
                r["pearson_ovx"] = _pearson(ours, theirs)
        rows += [dict(config="ovx plain", batch=1, seconds=ovx["plain"], ratio=None),
                 dict(config="ovx vit-reciprocam", batch=1, seconds=ovx["explain"],
                      ratio=ovx["plain"] / ovx["explain"])]
    for r in rows:
        r["images_per_s"] = r["batch"] / r["seconds"]
    return rows


if __name__ == "__main__":
    sys.exit(main())
