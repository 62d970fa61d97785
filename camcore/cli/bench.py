"""`camcore bench`: plain inference, `explain`, the fused graph and methods per runtime and precision.

See `camcore.benchmark`.
"""

from __future__ import annotations

from ..benchmark import DEFAULT_METHODS, format_table, run_benchmark
from ..errors import InvalidInput
from ..outputs import write_json

__all__ = ["add_arguments", "main"]


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInput(f"--batch must be comma-separated integers, got {text!r}") from None


def add_arguments(parser) -> None:
    """Add the ``camcore bench`` arguments to an argparse parser."""
    parser.add_argument("model", nargs="?", default=None,
                        help="ONNX model (default: the embedded EfficientNet-Lite0)")
    parser.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (default: 1,16,64)")
    parser.add_argument("--providers", "--runtimes", dest="providers", default="cpu",
                        help="comma-separated runtimes: onnxruntime's cpu, cuda, tensorrt (or full provider names), "
                             "openvino (its default precision), openvino:f32, openvino:bf16, openvino:f16, or auto "
                             "(every runtime present) (default: cpu)")
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = list(DEFAULT_METHODS) if methods == ["default"] else methods
    result = run_benchmark(args.model, batches=_int_list(args.batch), providers=providers, repeat=args.repeat,
                           warmup=args.warmup, memory=not args.no_memory, methods=methods)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0 if any(e["status"] == "ok" for e in result["providers"]) else 1
