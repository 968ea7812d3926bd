"""The search engine's one bad-input exception; the CLI turns it into a one-line message and exit status 2."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator


class SearchError(ValueError):
    """A setting, dataset or storage the search cannot use; the message says what to change."""


DISK_FAULTS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


AGAIN = "free space there (or pass --out on another disk) and run the same command again"


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what caused it, innermost last (a library's error wraps the driver's or the system's)."""
    seen: BaseException | None = err
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        yield seen
        seen = seen.__cause__ or seen.__context__


def disk_error(err: BaseException) -> OSError | None:
    """The full-disk, over-quota or read-only OSError behind ``err`` (itself or what caused it), or None."""
    return next((seen for seen in causes(err) if isinstance(seen, OSError) and seen.errno in DISK_FAULTS), None)


def disk_fault(err: BaseException, doing: str, where: str | Path, then: str = AGAIN) -> SearchError | None:
    """``err`` as a one-line SearchError when the disk under ``where`` is full, over quota or read-only (``doing``
    says what was being written, ``then`` what to do); None for any other error."""
    found = disk_error(err)
    if found is None:
        return None
    return SearchError(f"{DISK_FAULTS[found.errno]} on the device of {where} while {doing}; {then}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError inside names ``path`` (a failed ``write()`` names no file), so its message can say what failed."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
