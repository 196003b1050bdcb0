"""Writing a file so that a reader never sees it half-written; depends on nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write the file to. When the block ends without an
    error it is renamed onto ``path`` (atomic on one filesystem); otherwise it is removed. A crash
    mid-write leaves the previous file at ``path`` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would: some writers create 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o22)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
