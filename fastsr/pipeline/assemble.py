"""Turning the tile store into the output file: a TIFF encoded while tiles are still produced
(:class:`Assembler`), or, at the end, a zarr rename, a TIFF or a Pillow image (:func:`finish`);
always under a temporary name in the work folder, renamed onto the destination when complete."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import imageio
from ..tiling import TilePlan
from .resume import WorkDir


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
    format), TIFF tiles of ``out_tile`` pixels, and the color profile the input carried."""

    dst: Path
    fmt: str
    out_tile: int
    compression: str
    pyramid: bool
    icc_profile: bytes | None = None


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
                               icc_profile=out.icc_profile)
        except BaseException as exc:  # noqa: B036 - reported by upscale_file
            self.error = exc


def finish(work: WorkDir, out: Output) -> None:
    """Turn the complete tile store into the output file (atomic rename), then drop the work folder."""
    if out.fmt == "zarr":
        imageio.commit_path(work.store_path, out.dst)
        imageio.remove_path(work.path)
        return
    tmp = work.path / f"output{out.dst.suffix}"  # same folder as dst: the rename is atomic
    try:
        if out.fmt == "tiff":
            levels = imageio.build_pyramid(work.store, work.path, out.out_tile, out.out_tile) if out.pyramid else ()
            imageio.write_tiff(tmp, work.store, tile=out.out_tile, compression=out.compression, levels=tuple(levels),
                               icc_profile=out.icc_profile)
        else:
            imageio.write_pillow(tmp, np.asarray(work.store[...]), imageio.pillow_format(out.dst), out.icc_profile)
        imageio.commit_path(tmp, out.dst)
    finally:
        imageio.remove_path(tmp)
    imageio.remove_path(work.path)
