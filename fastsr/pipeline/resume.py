"""The resumable state of a file run: a hidden work folder next to the destination holding the
header (the run's settings), the tile store and one manifest per rank."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import imageio
from ..atomic import atomic_path
from ..distributed import DistInfo, barrier
from .engine import UpscaleError

log = logging.getLogger("fastsr")
WORK_SUFFIX = ".fastsr-partial"


def work_path(dst: Path) -> Path:
    """The work folder of destination ``dst`` (hidden, in the same folder: renames are atomic)."""
    return dst.with_name(f".{dst.name}{WORK_SUFFIX}")


class WorkDir:
    """The resumable state next to the destination: ``tiles.zarr`` (the output, chunk = output
    tile) and ``done.rank<R>.txt`` manifests listing finished batch numbers, one per line, each
    written after its tiles are in the store (so a listed batch is always complete)."""

    def __init__(self, path: Path, header: dict, shape, chunks, dtype, *, resume: bool, dist: DistInfo) -> None:
        rank = dist.rank
        self.path, self.rank = path, rank
        self.header_path, self.store_path = path / "header.json", path / "tiles.zarr"
        if rank == 0:
            self._prepare(header, shape, chunks, dtype, resume)
        barrier(dist)
        self.store = imageio.create_zarr(self.store_path, shape, chunks, dtype, mode="a")
        self.done = self._read_done()
        self._manifest = open(path / f"done.rank{rank}.txt", "a")

    def _prepare(self, header, shape, chunks, dtype, resume: bool) -> None:
        if self.path.exists() and resume:
            try:
                old = json.loads(self.header_path.read_text())
            except (OSError, ValueError):
                old = None
            if old == header:
                log.info("resuming from %s", self.path)
                return
            if old is not None:
                diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
                raise UpscaleError(f"cannot resume: the partial output {self.path} was made with other settings "
                                   f"({diff}); run without --resume to start over")
        elif resume:
            log.info("nothing to resume (%s does not exist); starting from the beginning", self.path)
        imageio.remove_path(self.path)
        self.path.mkdir()
        imageio.create_zarr(self.store_path, shape, chunks, dtype)
        # The header goes last: a work folder without it is never resumed from.
        with atomic_path(self.header_path) as tmp:
            tmp.write_text(json.dumps(header, indent=1))

    def _read_done(self) -> set[int]:
        done = set()
        for f in self.path.glob("done.rank*.txt"):
            # The last element is "" or a line cut short by a kill (no newline yet): ignored.
            done.update(int(line) for line in f.read_text().split("\n")[:-1] if line.isdigit())
        return done

    def mark(self, group: int) -> None:
        self._manifest.write(f"{group}\n")
        self._manifest.flush()  # in the page cache: survives kill -9 of this process

    def close(self) -> None:
        self._manifest.close()
