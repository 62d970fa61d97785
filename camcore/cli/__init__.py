"""The `camcore` command: a table of subcommands, each in its own module, imported only when chosen.

Exit statuses: 0 success; 1 an error (including any image that could not be
explained); 2 a usage error or a model CAM cannot explain; 130 interrupted.

Each command module provides ``add_arguments(parser)`` and ``main(args) -> int``;
`camcore --help` imports none of them (nor NumPy).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import CamError
from .console import EXIT_ERROR, fail, one_line, run_command

__all__ = ["COMMANDS", "main", "build_parser"]

# name -> (module, help), in the order `camcore --help` lists them.
COMMANDS = {
    "demo": ("camcore.cli.demo", "explain three sample photos with the embedded model"),
    "explain": ("camcore.cli.explain", "explain images with a model (default: the embedded one)"),
    "inspect": ("camcore.cli.inspect", "show the head found in a model, and its candidate target layers"),
    "fuse": ("camcore.cli.fuse", "write a model that computes its own class maps (CAM or Grad-CAM)"),
    "bench": ("camcore.cli.bench", "benchmark plain inference, explain and the fused graph per runtime"),
    "eval": ("camcore.cli.eval", "localization accuracy on a wsolevaluation-style dataset"),
    "compare": ("camcore.cli.compare", "every method side by side: grids, time per image, faithfulness"),
    "drift": ("camcore.cli.drift", "how the explanations of a deployed form (int8, float16...) moved from the float model's"),
    "report": ("camcore.cli.report", "write report.html to browse an explain or compare folder offline"),
}


def _chosen_command(argv) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _command_module(name: str):
    """Import the module behind a subcommand, or raise CamError saying it is missing."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) in (module_name, module_name.rsplit(".", 1)[0])
        reason = f"{module_name} is not installed" if missing else one_line(exc)
        raise CamError(f"the '{name}' command is not available: {reason}") from None


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The `camcore` argument parser; a subcommand's arguments are built only when it is chosen in `argv`.

    Raises CamError when the chosen command's module cannot be imported.
    """
    parser = argparse.ArgumentParser(
        prog="camcore", description="Class Activation Maps for exported ONNX models.")
    parser.add_argument("--version", action="version", version=f"camcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _command_module(name)
            module.add_arguments(p)
            p.set_defaults(func=module.main)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except CamError as exc:
        fail(str(exc))
        return EXIT_ERROR
    args = parser.parse_args(argv)
    return run_command(args.func, args)
