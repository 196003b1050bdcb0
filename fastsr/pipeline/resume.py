"""The resumable state of a file run: a hidden work folder next to the destination holding the
header (the run's settings), the tile store and one manifest per rank."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from .. import imageio
from ..atomic import atomic_path, one_writer
from ..distributed import DistInfo, barrier
from ..tiling import Tile, TilePlan
from .engine import UpscaleError

log = logging.getLogger("fastsr")
WORK_SUFFIX = ".fastsr-partial"


HEADER_NAME = "header.json"


def work_path(dst: Path) -> Path:
    """The work folder of destination ``dst`` (hidden, in the same folder: renames are atomic)."""
    return dst.with_name(f".{dst.name}{WORK_SUFFIX}")


def interrupted_header(dst: Path) -> dict | None:
    """The settings of an interrupted run for ``dst`` (its work folder's header), or None."""
    try:
        return json.loads((work_path(dst) / HEADER_NAME).read_text())
    except (OSError, ValueError):
        return None


class WorkDir:
    """The resumable state next to the destination: ``tiles.zarr`` (the output, chunk = output
    tile) and ``done.rank<R>.txt`` manifests listing finished batches, one per line: the batch
    number and the CRC-32 of each of its chunk files (``-`` for an all-zero tile, which zarr does
    not write). A line is written after its chunks are fsynced, and fsynced itself, so a listed
    batch is complete on disk; resume recomputes any batch whose chunks no longer match.
    ``done``: the finished batches, those of the run resumed and those marked since."""

    def __init__(self, path: Path, header: dict, shape, chunks, dtype, *, resume: bool, dist: DistInfo,
                 restart: bool = False) -> None:
        if resume and restart:
            raise UpscaleError("--resume and --restart exclude each other: --resume continues the interrupted run, "
                               "--restart discards its finished tiles")
        rank = dist.rank
        self.path, self.rank = path, rank
        self.header_path, self.store_path = path / HEADER_NAME, path / "tiles.zarr"
        if rank == 0:
            self._prepare(header, shape, chunks, dtype, resume, restart)
        barrier(dist)
        self.store = imageio.create_zarr(self.store_path, shape, chunks, dtype, mode="a")
        self.done = self._read_done()
        self._manifest_path = path / f"done.rank{rank}.txt"
        self._manifest = _open_manifest(self._manifest_path)

    def _prepare(self, header, shape, chunks, dtype, resume: bool, restart: bool) -> None:
        if self.path.exists() and resume:
            try:
                old = json.loads(self.header_path.read_text())
            except (OSError, ValueError):
                old = None
            if old == header:
                log.info("resuming from %s", self.path)
                return
            if old is None and self._read_done():  # finished tiles, but no settings to check them against
                raise UpscaleError(f"cannot resume: {self.header_path} is missing or damaged, so the finished tiles "
                                   f"in {self.path} cannot be matched to these settings; rerun with --restart to "
                                   "discard them and start over")
            if old is not None:
                diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
                raise UpscaleError(f"cannot resume: the partial output {self.path} was made with other settings "
                                   f"({diff}); rerun with those settings, or with --restart to discard it and "
                                   "start over")
        elif resume:
            log.info("nothing to resume (%s does not exist); starting from the beginning", self.path)
        elif not restart:
            self._refuse_to_discard()
        imageio.remove_path(self.path)
        self.path.mkdir()
        imageio.create_zarr(self.store_path, shape, chunks, dtype)
        # The header goes last: a work folder without it is never resumed from.
        with atomic_path(self.header_path) as tmp:
            tmp.write_text(json.dumps(header, indent=1))

    def _refuse_to_discard(self) -> None:
        """A run without --resume or --restart never silently throws away an interrupted run's
        finished tiles (hours of work on a large image): it stops and names both choices."""
        try:
            old = json.loads(self.header_path.read_text())
        except (OSError, ValueError):
            return  # no header: nothing a run could resume from
        done = self._read_done()
        if not done:
            return
        tiles = _tiles_in(old, done)
        found = f"{len(done)} finished batches" + (f" ({tiles} tiles)" if tiles is not None else "")
        raise UpscaleError(f"{self.path} holds {found} of an interrupted run of this output; rerun with --resume to "
                           f"continue it, or with --restart to discard them and start over")

    def _read_done(self) -> set[int]:
        """Finished batches; their chunks' checksums go to ``self.checksums``."""
        done, self.checksums = set(), {}
        for f in self.path.glob("done.rank*.txt"):
            # The last element is "" or a line cut short by a kill (no newline yet): ignored.
            for line in f.read_text().split("\n")[:-1]:
                group, _, sums = line.partition(" ")
                if group.isdigit():
                    done.add(int(group))
                    self.checksums[int(group)] = sums.split(",") if sums else None
        return done

    def mark(self, group: int, tiles: list[Tile]) -> None:
        """Record batch ``group`` as finished: its chunks (``tiles``') fsynced and checksummed, then
        one unbuffered write of the line, fsynced (survives kill -9 and a power cut)."""
        sums = ",".join(self._sync_chunk(self.chunk_path(t)) for t in tiles)
        line = f"{group} {sums}\n".encode()
        written = os.write(self._manifest, line)
        if written != len(line):  # the disk filled up mid-line: take the piece back, the batch is not done
            os.ftruncate(self._manifest, os.fstat(self._manifest).st_size - written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._manifest_path))
        os.fsync(self._manifest)
        self.done.add(group)
        self.checksums[group] = sums.split(",")

    @staticmethod
    def _sync_chunk(path: Path) -> str:
        """fsync a chunk file and return its CRC-32 (hex), or "-" where zarr wrote none (all zero)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return "-"
        try:
            os.fsync(fd)
            crc = 0
            while block := os.read(fd, 1 << 20):
                crc = zlib.crc32(block, crc)
            return f"{crc:08x}"
        finally:
            os.close(fd)

    def chunk_path(self, tile: Tile) -> Path:
        """The file of ``tile``'s output in the store: chunk (row, col, 0) (chunk = output tile)."""
        return self.store_path / "c" / str(tile.row) / str(tile.col) / "0"

    def verify(self, plan: TilePlan, batch_size: int) -> None:
        """Drop from ``done`` the batches whose tiles are not all intact in the store (a chunk
        deleted, truncated or lost in a crash), so that they are computed again: a resumed output
        never has black or broken tiles. Costs one read of the finished tiles."""
        batches = plan.batches(batch_size)
        bad = {g for g in self.done if not self._batch_intact(g, [plan.tile_at(i) for i in batches[g]], plan.scale)}
        if bad:
            log.warning("resume: %d of %d finished batches have missing or damaged tiles in %s; computing them "
                        "again", len(bad), len(self.done), self.store_path)
        self.done -= bad

    def _batch_intact(self, group: int, tiles: list[Tile], scale: int) -> bool:
        """Every chunk of the batch has the checksum the manifest recorded (a line of an older
        manifest without checksums: every chunk exists and decodes)."""
        sums = self.checksums.get(group)
        if sums is None:
            return all(self._tile_intact(t, scale) for t in tiles)
        return len(sums) == len(tiles) and all(self._sync_chunk(self.chunk_path(t)) == crc
                                               for t, crc in zip(tiles, sums, strict=True))

    def _tile_intact(self, tile: Tile, scale: int) -> bool:
        if not self.chunk_path(tile).is_file():
            return False  # deleted, or an all-zero tile zarr never writes: computing it again is safe
        y0, y1, x0, x1 = tile.output_box(scale)
        try:
            self.store[y0:y1, x0:x1]
        except Exception:  # a truncated or corrupt chunk fails to decode
            return False
        return True

    def close(self) -> None:
        os.close(self._manifest)


def _open_manifest(path: Path) -> int:
    """A manifest opened for appending, without a line cut short at its end (by a full disk or a
    power cut): appending after such a piece would join the two into a wrong batch number."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, 64), size - min(size, 64))  # a line is a batch number: < 64 bytes
    if tail and not tail.endswith(b"\n"):
        os.ftruncate(fd, size - len(tail) + tail.rfind(b"\n") + 1)
    return fd


def _tiles_in(header: dict, done: set[int]) -> int | None:
    """How many tiles the batches ``done`` of the run described by ``header`` hold (row-major
    batches of ``batch_size`` tiles, the last one shorter); None for a header without the sizes."""
    try:
        height, width = header["shape"][0] // header["scale"], header["shape"][1] // header["scale"]
        tile, size = int(header["tile"]), int(header["batch_size"])
        count = -(-height // tile) * -(-width // tile)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return sum(max(0, min(size, count - g * size)) for g in done)


@contextlib.contextmanager
def output_lock(dst: Path, dist: DistInfo) -> Iterator[None]:
    """One run per destination (:func:`fastsr.atomic.one_writer`), so the work folder belongs to
    one run only. Under torchrun rank 0 holds it for the job."""
    if dist.rank != 0:
        yield
        return
    with one_writer(dst):
        yield
