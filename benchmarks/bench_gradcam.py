"""Grad-CAM speed on CPU: camcore's in-graph gradients against plain inference and pytorch-grad-cam.

Interleaved rounds at one batch size, per model, with a short pause before each timed call
(so that no thread pool of the previous configuration is still spinning), and the torch
configurations timed in their own group, after the onnxruntime ones:

* ``plain``: onnxruntime inference of the unmodified model;
* ``gradcam top-1`` / ``gradcam top-5``: ``Explainer.explain(method="gradcam")``, maps at
  feature resolution (one backbone run per batch, then the head forward and backward on
  the features repeated k times);
* ``gradcam top-1 + 224``: the same, upsampled to 224x224 and min-max normalized, the work
  pytorch-grad-cam's ``GradCAM.__call__`` returns;
* ``fused gradcam top-1``: ``camcore.fuse(method="gradcam", size="input")`` under onnxruntime;
* ``torch plain`` and ``pytorch-grad-cam`` (when torch, timm and grad-cam are installed): the
  same architecture and weights in PyTorch eager mode, same thread count; ``GradCAM`` on the
  layer that feeds the global pooling, top-1 class, maps at 224x224.

Models: MobileNetV3-Large (timm ``mobilenetv3_large_100``, random weights with randomized
BatchNorm statistics, exported here with ``torch.onnx.export``; its head after the pooling is
conv + HardSwish, so CAM refuses it) and, without its torch twin, camcore's embedded
EfficientNet-Lite0.  Prints a table and writes ``benchmarks/gradcam.json``::

    /path/to/venv/bin/python benchmarks/bench_gradcam.py --repeat 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# torch's OpenMP threads busy-wait by default, which slows it on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import camcore  # noqa: E402
from backends.ort_session import make_session  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZE = (224, 224)


def torch_model():
    """timm MobileNetV3-Large with random weights and randomized BatchNorm statistics, or None."""
    try:
        import timm
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_large_100", pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def export(model, path: Path) -> None:
    import torch

    torch.onnx.export(model, torch.zeros(1, 3, *SIZE), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)


def camcore_steps(path, name: str, x: np.ndarray) -> dict:
    explainer = camcore.load(path, providers=["cpu"], batch_size=len(x))
    plain = make_session(camcore.load(path).backend.model, ["CPUExecutionProvider"])
    fused = make_session(camcore.fuse(path, method="gradcam", size="input"), ["CPUExecutionProvider"])
    feed = {explainer.head.input.name: x}

    def resized():
        maps = explainer.explain(x, top_k=1, method="gradcam").maps[:, 0]
        return camcore.normalize(camcore.upsample(maps, SIZE))

    return {
        (f"{name}: plain", len(x)): lambda: plain.run(None, feed),
        (f"{name}: gradcam top-1", len(x)): lambda: explainer.explain(x, top_k=1, method="gradcam"),
        (f"{name}: gradcam top-5", len(x)): lambda: explainer.explain(x, top_k=5, method="gradcam"),
        (f"{name}: gradcam top-1 + 224", len(x)): resized,
        (f"{name}: fused gradcam top-1", len(x)): lambda: fused.run(["cam_maps"], feed),
    }


def torch_steps(model, name: str, x: np.ndarray) -> tuple[dict, dict]:
    """Plain torch and pytorch-grad-cam steps, and their agreement with camcore."""
    import torch
    from pytorch_grad_cam import GradCAM

    tensor = torch.from_numpy(x)
    gradcam = GradCAM(model=model, target_layers=[model.blocks[-1]])

    def plain():
        with torch.no_grad():
            return model(tensor)

    return {(f"{name}: torch plain", len(x)): plain,
            (f"{name}: pytorch-grad-cam top-1", len(x)): lambda: gradcam(input_tensor=tensor, targets=None)}, {"gradcam": gradcam}


def agreement(explainer, gradcam, x: np.ndarray) -> dict:
    """pytorch-grad-cam's 224x224 maps against camcore's (Pearson correlation, per image)."""
    import torch

    theirs = gradcam(input_tensor=torch.from_numpy(x), targets=None)
    ours = camcore.normalize(camcore.upsample(explainer.explain(x, top_k=1, method="gradcam").maps[:, 0], SIZE))
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours, theirs)]
    return {"min_correlation": min(corr), "max_abs_diff": float(np.abs(ours - theirs).max())}


def time_rounds(steps: dict, *, repeat: int, warmup: int, pause: float = 0.05) -> dict:
    """``{name: callable}`` -> ``{name: [seconds]}``: interleaved rounds, order rotating, paused."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            start = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=str(HERE / "gradcam.json"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, *SIZE)).astype(np.float32)
    steps, torch_group, extra = {}, {}, {}
    model = torch_model()
    with tempfile.TemporaryDirectory() as tmp:
        if model is not None:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            path = Path(tmp) / "mobilenetv3.onnx"
            export(model, path)
            steps.update(camcore_steps(path, "MobileNetV3", x))
            torch_part, hooks = torch_steps(model, "MobileNetV3", x)
            torch_group.update(torch_part)
            extra["agreement"] = agreement(camcore.load(path, providers=["cpu"]), hooks["gradcam"], x)
            extra["torch_threads"] = torch.get_num_threads()
        else:
            extra["skipped"] = "MobileNetV3 and pytorch-grad-cam: torch, timm or grad-cam is not installed"
        from camcore import default_model

        steps.update(camcore_steps(default_model.path(), "Lite0", x))
        times = time_rounds({mode: fn for (mode, _), fn in steps.items()}, repeat=args.repeat, warmup=args.warmup)
        times.update(time_rounds({mode: fn for (mode, _), fn in torch_group.items()}, repeat=args.repeat,
                                 warmup=args.warmup))

    rate = {mode: args.batch / statistics.median(t) for mode, t in times.items()}
    rows, ratios = [], {}
    for model_name in ("MobileNetV3", "Lite0"):
        base = rate.get(f"{model_name}: plain")
        for mode, value in rate.items():
            if mode.startswith(model_name):
                ratio = value / base if base else None
                rows.append((mode, value, ratio))
                ratios[mode] = ratio
    if "MobileNetV3: pytorch-grad-cam top-1" in rate:
        ratios["camcore gradcam top-1 + 224 / pytorch-grad-cam"] = (
            rate["MobileNetV3: gradcam top-1 + 224"] / rate["MobileNetV3: pytorch-grad-cam top-1"])
        ratios["camcore gradcam top-1 / pytorch-grad-cam"] = (
            rate["MobileNetV3: gradcam top-1"] / rate["MobileNetV3: pytorch-grad-cam top-1"])
    print(f"batch {args.batch}, {args.repeat} interleaved rounds (medians), CPU threads {os.cpu_count()}")
    print(f"{'configuration':<42}{'img/s':>9}{'/ plain':>9}")
    for mode, value, ratio in rows:
        print(f"{mode:<42}{value:>9.1f}{'' if ratio is None else f'{ratio:>9.3f}'}")
    for key, value in ratios.items():
        if "/" in key:
            print(f"{key}: {value:.2f}")
    for key, value in extra.items():
        print(f"{key}: {value}")
    Path(args.json).write_text(json.dumps({"batch": args.batch, "repeat": args.repeat, "images_per_second": rate,
                                           "ratios": ratios, **extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
