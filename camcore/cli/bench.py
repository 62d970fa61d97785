"""`camcore bench`: plain inference, `explain`, the fused graph and methods per runtime and precision.

See `camcore.benchmark`.
"""

from __future__ import annotations

from ..benchmark import DEFAULT_METHODS, format_table, run_benchmark
from ..errors import CamError, InvalidInput
from ..outputs import write_json
from .options import PRECISIONS

__all__ = ["add_arguments", "main"]


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInput(f"--batch must be comma-separated integers, got {text!r}") from None


def backend_runtime(args):
    """The runtime name (`camcore.benchmark.parse_runtime`) of ``--backend --device --precision``; None without them.

    >>> import argparse
    >>> backend_runtime(argparse.Namespace(backend="openvino", device=None, precision="f32"))
    'openvino:f32'
    """
    backend, device, precision = args.backend, args.device, args.precision
    if precision is not None and precision not in PRECISIONS:
        raise CamError(f"--precision must be one of {', '.join(PRECISIONS)} (or left out for the runtime's "
                       f"default), got {precision!r}")
    if backend is None and device is None and precision is None:
        return None
    backend = backend or "openvino"  # --device and --precision alone are OpenVINO's
    if backend == "openvino":
        return ":".join(["openvino"] + [v for v in (device, precision) if v is not None])
    if backend != "onnxruntime":
        raise CamError(f"--backend must be onnxruntime or openvino, got {backend!r}")
    if device is not None or precision is not None:
        raise CamError("--device and --precision are OpenVINO's: with --backend onnxruntime, "
                       "name providers in --runtimes (onnxruntime runs the model's types)")
    return "cpu"


def add_arguments(parser) -> None:
    """Add the ``camcore bench`` arguments to an argparse parser."""
    parser.add_argument("model", nargs="?", default=None,
                        help="ONNX model (default: the embedded EfficientNet-Lite0)")
    parser.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (default: 1,16,64)")
    parser.add_argument("--providers", "--runtimes", dest="providers", default="cpu",
                        help="comma-separated runtimes: onnxruntime's cpu, cuda, tensorrt (or full provider names), "
                             "openvino (its default precision), openvino:f32, openvino:bf16, openvino:f16, or auto "
                             "(every runtime present) (default: cpu)")
    # the shared runtime flags (add_runtime_arguments) name one more runtime, timed after those of --runtimes;
    # their --providers is this command's runtime list
    parser.add_argument("--backend", metavar="NAME",
                        help="a runtime to time besides --runtimes, as the other commands take it: onnxruntime "
                             "or openvino (with --device and --precision)")
    parser.add_argument("--device", metavar="NAME", help="OpenVINO device of --backend openvino (default: CPU)")
    parser.add_argument("--precision", metavar="|".join(PRECISIONS),
                        help="OpenVINO precision of --backend openvino (default: the device's own)")
    parser.add_argument("--methods", default="",
                        help="comma-separated methods timed besides, or 'default' for every method but scorecam "
                             "(default: none)")
    parser.add_argument("--repeat", type=int, default=10, help="timed rounds; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-RSS subprocesses")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure to FILE as JSON")


def main(args) -> int:
    """Run ``camcore bench`` from parsed arguments; print the table, write the JSON."""
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    chosen = backend_runtime(args)
    if chosen is not None and chosen not in providers:
        providers.append(chosen)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = list(DEFAULT_METHODS) if methods == ["default"] else methods
    result = run_benchmark(args.model, batches=_int_list(args.batch), providers=providers, repeat=args.repeat,
                           warmup=args.warmup, memory=not args.no_memory, methods=methods)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0 if any(e["status"] == "ok" for e in result["providers"]) else 1
