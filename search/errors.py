"""The search engine's one bad-input exception; the CLI turns it into a one-line message and exit status 2."""

from __future__ import annotations

import errno
from pathlib import Path


class SearchError(ValueError):
    """A setting, dataset or storage the search cannot use; the message says what to change."""


_DISK_FAULTS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


def disk_fault(err: OSError, doing: str, where: str | Path) -> SearchError | None:
    """``err`` as a one-line SearchError when the disk under ``where`` is full, over quota or read-only (``doing``
    says what was being written); None for any other error."""
    what = _DISK_FAULTS.get(err.errno)
    if what is None:
        return None
    return SearchError(f"{what} on the device of {where} while {doing}; free space there (or pass --out on "
                       "another disk) and run the same command again")
