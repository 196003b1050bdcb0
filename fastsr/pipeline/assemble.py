"""Turning the tile store into the output file: a TIFF encoded while tiles are still produced
(:class:`Assembler`), or, at the end, a zarr rename, a TIFF or a Pillow image (:func:`finish`);
always under a temporary name in the work folder, renamed onto the destination when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import imageio
from ..atomic import commit
from ..tiling import TilePlan
from .resume import WorkDir

# Beyond the estimate: metadata, manifests, TIFF directories, and some error in the estimate itself.
SPACE_MARGIN_BYTES = 128 << 10
SPACE_MARGIN_FRACTION = 0.02


class TileTracker:
    """Which output tiles are in the store; lets the TIFF assembler wait for the next one, so
    the final file is encoded while the model still runs (instead of in a pass at the end)."""

    def __init__(self, plan: TilePlan, done_groups: set[int], batch_size: int) -> None:
        self.done = np.zeros(len(plan), dtype=bool)
        for g in done_groups:
            self.done[list(plan.batches(batch_size)[g])] = True
        self.cols, self.tile = plan.cols, plan.tile * plan.scale
        self.cond = threading.Condition()
        self.aborted = False

    def add(self, indices) -> None:
        with self.cond:
            self.done[list(indices)] = True
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def wait(self, index: int) -> None:
        with self.cond:
            while not self.done[index]:
                if self.aborted:
                    raise RuntimeError("tile pipeline stopped")
                self.cond.wait()


class _WaitingArray:
    """The tile store as an array whose reads wait until the tile-aligned block is written."""

    def __init__(self, store, tracker: TileTracker) -> None:
        self.store, self.tracker = store, tracker
        self.shape, self.dtype = store.shape, store.dtype

    def __getitem__(self, key):
        rows, cols = key[0], key[1]
        self.tracker.wait((rows.start // self.tracker.tile) * self.tracker.cols + cols.start // self.tracker.tile)
        return self.store[key]


@dataclass(frozen=True)
class Output:
    """What the finished tile store becomes: ``dst`` in format ``fmt`` ("tiff", "zarr" or a Pillow
    format), TIFF tiles of ``out_tile`` pixels, and what the input carried besides its pixels,
    scaled to the output (:meth:`fastsr.imageio.Metadata.scaled`)."""

    dst: Path
    fmt: str
    out_tile: int
    compression: str
    pyramid: bool
    metadata: imageio.Metadata = imageio.Metadata()
    overwrite: bool = False  # an existing dst may be replaced (docs/safety.md)


class Assembler(threading.Thread):
    """Writes the TIFF output from the tile store in row-major order while tiles are produced."""

    def __init__(self, work: WorkDir, tracker: TileTracker, tmp: Path, output: Output) -> None:
        super().__init__(name="fastsr-tiff", daemon=True)
        self.work, self.tracker, self.tmp, self.output = work, tracker, tmp, output
        self.error: BaseException | None = None

    def abort(self) -> None:
        """The run failed: stop waiting for tiles and leave no partial output behind."""
        self.tracker.abort()
        self.join()
        imageio.remove_path(self.tmp)

    def run(self) -> None:
        try:
            store, out = self.work.store, self.output
            levels = (lambda: imageio.build_pyramid(store, self.work.path, out.out_tile, out.out_tile)) \
                if out.pyramid else ()
            num = len(imageio.pyramid_shapes(tuple(store.shape), out.out_tile)) if out.pyramid else 0
            imageio.write_tiff(self.tmp, _WaitingArray(store, self.tracker), tile=out.out_tile,
                               compression=out.compression, levels=levels, num_levels=num,
                               metadata=out.metadata)
        except BaseException as exc:  # noqa: B036 - reported by upscale_file
            self.error = exc


def _store_is_the_output(work: WorkDir, out: Output) -> bool:
    """A plain zarr output of a colour image is the (H, W, C) tile store itself, renamed."""
    return out.fmt == "zarr" and not out.metadata.ome_zarr and work.store.shape[2] > 1


def finish(work: WorkDir, out: Output) -> None:
    """Turn the complete tile store into the output file (atomic rename), then drop the work folder."""
    if _store_is_the_output(work, out):
        commit(work.store_path, out.dst, overwrite=out.overwrite)
        imageio.remove_path(work.path)
        return
    tmp = work.path / f"output{out.dst.suffix}"  # same folder as dst: the rename is atomic
    try:
        if out.fmt == "zarr" and out.metadata.ome_zarr:  # OME-Zarr in, OME-Zarr out: planes and metadata
            imageio.write_ome_zarr(tmp, work.store, out.metadata.ome_zarr, out.out_tile)
        elif out.fmt == "zarr":  # gray: (H, W), not the store's (H, W, 1)
            imageio.write_gray_zarr(tmp, work.store, out.out_tile)
        elif out.fmt == "tiff":
            levels = imageio.build_pyramid(work.store, work.path, out.out_tile, out.out_tile) if out.pyramid else ()
            imageio.write_tiff(tmp, work.store, tile=out.out_tile, compression=out.compression, levels=tuple(levels),
                               metadata=out.metadata)
        else:
            imageio.write_pillow(tmp, np.asarray(work.store[...]), imageio.pillow_format(out.dst), out.metadata)
        commit(tmp, out.dst, overwrite=out.overwrite)
    finally:
        imageio.remove_path(tmp)
    imageio.remove_path(work.path)


class SpaceWatch:
    """The disk space a run still needs, judged from what it has written: the up-front check can
    only assume a compression ratio, and a noisy image compresses far worse than a photo. After each
    batch the bytes still to come (the rest of the tile store, the output file, pyramid levels) are
    estimated from the bytes per output pixel of the chunks so far; when they will not fit in the
    free space the run stops with its finished batches intact, rather than on a write that fails."""

    def __init__(self, work: WorkDir, output: Output, plan: TilePlan, batch_size: int, world_size: int) -> None:
        self.work, self.output, self.plan, self.world = work, output, plan, world_size
        self.batches = plan.batches(batch_size)
        self.total_px = plan.output_shape[0] * plan.output_shape[1]
        self.raw_bpp = work.store.shape[2] * work.store.dtype.itemsize
        self.allocated = self.stored = self.sampled_px = 0  # the chunks measured: disk blocks, bytes, pixels
        for g in work.done:  # a resumed run: what is there already is the best sample
            self._measure(g)
        self.start_px, self.marked_px = self.sampled_px, 0

    def _measure(self, group: int) -> int:
        """Add batch ``group``'s chunks to the sample; returns its output pixels."""
        px = 0
        for i in self.batches[group]:
            tile = self.plan.tile_at(i)
            y0, y1, x0, x1 = tile.output_box(self.plan.scale)
            px += (y1 - y0) * (x1 - x0)
            with contextlib.suppress(FileNotFoundError):  # an all-zero tile has no chunk: 0 bytes
                st = os.stat(self.work.chunk_path(tile))
                self.allocated += st.st_blocks * 512
                self.stored += st.st_size
        self.sampled_px += px
        return px

    def batch_done(self, group: int) -> None:
        """Batch ``group`` is in the store and the manifest: measure it and check the space left."""
        self.marked_px += self._measure(group)
        self.check()

    def check(self) -> None:
        """Raise :class:`DiskFullError` when the rest of the run will not fit. Judged once 1% of
        the output is written: a first tile of sky says little about the rest."""
        if self.sampled_px * 100 < self.total_px:
            return
        needed, free = self.needed(), self.free()
        if needed > free:
            raise self._error("not enough disk space", needed, free)

    def needed(self) -> int:
        """Bytes still to be written until the run is done, margin included (all ranks: the
        others are assumed as far along as this one)."""
        measured = self.sampled_px > 0
        store_bpp = self.allocated / self.sampled_px if measured else 0.6 * self.raw_bpp  # else the up-front guess
        file_bpp = self._file_bpp(self.stored / self.sampled_px if measured else 0.6 * self.raw_bpp)
        levels = 1 / 3 if self.output.pyramid else 0.0  # halving levels: 1/4 + 1/16 + ... of the base
        remaining = max(0, self.total_px - self.start_px - self.world * self.marked_px)
        store = store_bpp * (remaining + levels * self.total_px)
        out = max(0.0, file_bpp * self.total_px * (1 + levels) - self._file_written())
        return int((store + out) * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES

    def _file_bpp(self, store_bpp: float) -> float:
        """Bytes per pixel of the output file, from the store's (zstd): about the same for lossless
        codecs, raw for uncompressed ones, at most half of raw for lossy ones; nothing for .zarr
        (the store is renamed, unless it becomes an OME-Zarr or a 2-D gray image)."""
        out, suffix = self.output, self.output.dst.suffix.lower()
        if _store_is_the_output(self.work, out):
            return 0.0
        if (out.fmt == "tiff" and out.compression == "none") or suffix == ".bmp":
            return float(self.raw_bpp)
        if (out.fmt == "tiff" and out.compression == "jpeg") or suffix in (".jpg", ".jpeg", ".webp"):
            return min(store_bpp, self.raw_bpp / 2)
        return store_bpp

    def _file_written(self) -> int:
        """Bytes of the output file written so far (the TIFF encoded while tiles are produced)."""
        try:
            return os.stat(self.work.path / f"output{self.output.dst.suffix}").st_blocks * 512
        except FileNotFoundError:
            return 0

    def free(self) -> int:
        return shutil.disk_usage(self.work.path).free

    def error(self, exc: OSError) -> imageio.DiskFullError:
        """The one-line error for a write that failed for want of space (``exc``)."""
        return self._error((exc.strerror or str(exc)).lower(), self.needed(), self.free())

    def _error(self, reason: str, needed: int, free: int) -> imageio.DiskFullError:
        done = len(self.work.done)
        return imageio.DiskFullError(
            f"{self.output.dst}: {reason}: the rest of the run needs about {imageio.format_bytes(needed)}, "
            f"{imageio.format_bytes(free)} free in {self.work.path.parent}; {done} of {len(self.batches)} batches "
            f"are finished and kept in {self.work.path}: free some space and rerun with --resume")

    @contextlib.contextmanager
    def stop_when_full(self) -> Iterator[None]:
        """A write in the block failing for want of space becomes the one-line :meth:`error`."""
        try:
            yield
        except OSError as exc:
            if not imageio.is_disk_full(exc):
                raise
            raise self.error(exc) from None
