"""Exit statuses, one-line errors and the progress bar of the `camcore` command.

Exit statuses: 0 success; 1 an error (including any image that could not be
explained); 2 a usage error or a model CAM cannot explain; 130 interrupted.
"""

from __future__ import annotations

import sys

from ..errors import CamError, NotCamCompatible
from ..outputs import one_line

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_REFUSED", "EXIT_INTERRUPTED", "Progress", "fail", "one_line",
           "run_command"]

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class Progress:
    """A tqdm progress bar on stderr.

    Shown only when there are more than `min_items` items, the stream is a terminal
    and `quiet` is false; otherwise every call is a no-op (and tqdm is not imported).
    """

    def __init__(self, total: int, label: str, *, quiet: bool = False, min_items: int = 8, stream=None):
        stream = stream or sys.stderr
        self.bar = None
        if not quiet and total > min_items and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=stream, unit="img", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fail(message: str) -> None:
    """Print one ``camcore: error: ...`` line on stderr."""
    print(f"camcore: error: {message}", file=sys.stderr)


def run_command(fn, args) -> int:
    """Run ``fn(args) -> int`` and turn expected failures into one stderr line and an exit status.

    NotCamCompatible -> 2, other CamError and OSError -> 1, KeyboardInterrupt -> 130.
    """
    try:
        return int(fn(args) or 0)
    except NotCamCompatible as exc:
        fail(one_line(exc))
        return EXIT_REFUSED
    except CamError as exc:
        fail(one_line(exc))
        return EXIT_ERROR
    except OSError as exc:
        fail(one_line(exc) if exc.filename is None else f"{exc.strerror or exc}: {exc.filename}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Objects half-built by the interrupted call (imageio plugins) complain when freed.
        sys.unraisablehook = lambda unraisable: None
        fail("interrupted")
        return EXIT_INTERRUPTED
