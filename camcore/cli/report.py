"""`camcore report OUT`: write report.html into a finished explain or compare folder."""

from __future__ import annotations

import argparse

from .console import EXIT_OK

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `camcore report` arguments."""
    parser.description = ("Write OUT/report.html: one self-contained page (no server) to browse the images, their "
                          "maps, classes, scores and boxes, from OUT/results.json and OUT/compare.json.")
    parser.add_argument("out", metavar="OUT", help="the output folder of camcore explain or compare (--out)")


def main(args) -> int:
    """Run `camcore report` with parsed `args`; returns the exit status."""
    from ..report import write_report

    print(f"wrote {write_report(args.out)}")
    return EXIT_OK
