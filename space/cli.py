"""Shared command-line plumbing: one-line errors with exit status 2, never a traceback for bad input."""

from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import SpaceError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
            errors: tuple[type[Exception], ...] = ()) -> int:
    """Run ``main`` offline; bad input (SpaceError, a missing file, or one of ``errors``) is one line, exit 2."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        return main(argv)
    except (SpaceError, FileNotFoundError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
