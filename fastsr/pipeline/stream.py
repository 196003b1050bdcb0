"""The streaming part of a file run: a reader thread reads tile windows, the calling thread runs
the model on each batch, writer threads paste the tiles into the store and mark the batch done::

    reader thread                 calling thread                 writer threads
    read tile windows  --queue-->  batch -> model -> uint  --queue-->  tile centres -> zarr chunks
    (region reads)                 (inference_mode; pinned            -> manifest line
                                    memory + CUDA stream on GPU)
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch

from .. import imageio
from ..imageio import ImageSource
from ..tiling import TilePlan, paste
from .engine import Upscaler
from .resume import WorkDir


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """The next item of ``q``; None once ``stop`` is set and ``q`` is empty: the thread that would
    have filled it may have stopped too (a reader stops when a writer fails), so a plain blocking
    get could wait for ever."""
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return None


def writer_threads(device: torch.device) -> int:
    """Threads compressing finished tiles into the store. On a GPU the model outruns one thread
    by far (zstd level 1 packs a few hundred MB/s per core; a fast GPU makes GB/s of pixels),
    so several encode in parallel (the codecs release the GIL); on a CPU the model already uses
    every core and one writer is enough."""
    return min(4, max(1, (os.cpu_count() or 1) // 2)) if device.type == "cuda" else 1


def run_batches(up: Upscaler, source: ImageSource, plan: TilePlan, groups: list[int], batch_size: int,
                work: WorkDir, progress: bool, on_written=None, writers: int = 1, space=None) -> None:
    """Compute the batches ``groups`` of ``plan`` and put their tiles in ``work``'s store, marking each
    batch done once its tiles are written; ``on_written(tile indices)`` after each batch. ``space``
    (a :class:`~.assemble.SpaceWatch`) checks the free space before the first batch and after each,
    and turns a write that fails for want of space into its one-line error."""
    _Stream(up, source, plan, plan.batches(batch_size), work, on_written, writers, space).run(groups, progress)


def _area(tile) -> int:
    return (tile.core[1] - tile.core[0]) * (tile.core[3] - tile.core[2])


class _Stream:
    """The three kinds of thread of one run and the queues between them. A failure in any thread
    stops the others (``stop``) and is raised in the calling thread."""

    def __init__(self, up: Upscaler, source: ImageSource, plan: TilePlan, batches, work: WorkDir, on_written,
                 writers: int, space) -> None:
        self.up, self.source, self.plan, self.batches, self.work = up, source, plan, batches, work
        self.on_written, self.writers, self.space = on_written, writers, space
        self.stop = threading.Event()
        self.inq: queue.Queue = queue.Queue(maxsize=2)
        self.outq: queue.Queue = queue.Queue(maxsize=2 * writers)
        self.failures: list[BaseException] = []
        self.written = threading.Lock()  # manifest, tile tracker and progress bar: one writer at a time
        self.bar = None

    def run(self, groups: list[int], progress: bool) -> None:
        from tqdm import tqdm

        if self.space is not None:
            self.space.check()  # a resumed run knows its compressed sizes already
        # Whole output pixels, scaled by tqdm (k, M, G): exact counts, so a small image shows its
        # pixels (not 0.0/0.0 Mpx) and the bar never passes its total (no negative ETA).
        total = sum(_area(self.plan.tile_at(i)) for g in groups for i in self.batches[g]) * self.plan.scale ** 2
        self.bar = tqdm(total=total, unit="px", unit_scale=True, disable=not progress, dynamic_ncols=True)
        read_thread = threading.Thread(target=self.reader, args=(groups,), name="fastsr-reader", daemon=True)
        write_threads = [threading.Thread(target=self.writer, name=f"fastsr-writer{i}", daemon=True)
                         for i in range(self.writers)]
        for t in (read_thread, *write_threads):
            t.start()
        try:
            self.compute()
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.shut_down(read_thread, write_threads)
        if self.failures:
            raise self.failures[0]

    def compute(self) -> None:
        """The calling thread: each batch of windows through the model, on to the writers."""
        while (item := _get(self.inq, self.stop)) is not None:
            if isinstance(item, _Failure):
                raise item.exc
            g, tiles, windows = item
            if not _put(self.outq, (g, tiles, self.up.run_uint(windows)), self.stop):
                break  # a writer failed
        for _ in range(self.writers):  # one end marker per writer
            _put(self.outq, None, self.stop)

    def reader(self, groups: list[int]) -> None:
        try:
            for g in groups:
                tiles = [self.plan.tile_at(i) for i in self.batches[g]]
                try:
                    windows = np.stack([self.plan.read(self.source.read, t) for t in tiles])
                except Exception as exc:
                    raise imageio.ImageReadError(f"{self.source.path}: cannot read tiles {tiles[0].window} ... "
                                                 f"({exc})") from exc
                if not _put(self.inq, (g, tiles, windows), self.stop):
                    return
            _put(self.inq, None, self.stop)
        except BaseException as exc:  # noqa: B036 - handed to the calling thread
            _put(self.inq, _Failure(exc), self.stop)

    def writer(self) -> None:
        try:
            # Once the calling thread failed, what was queued before is still written.
            while (item := _get(self.outq, self.stop)) is not None:
                self._write(*item)
        except BaseException as exc:  # noqa: B036 - handed to the calling thread
            if self.space is not None and imageio.is_disk_full(exc):
                exc = self.space.error(exc)  # the batch being written is not marked: a resume redoes it
            self.failures.append(exc)
            self.stop.set()

    def _write(self, g: int, tiles, result: np.ndarray) -> None:
        """Batch ``g``'s tiles into the store, then into the manifest; then the space left is checked."""
        for t, o in zip(tiles, result, strict=True):
            paste(self.work.store, t, o, self.plan.scale)  # whole chunks: no two writers share one
        with self.written:
            self.work.mark(g, tiles)
            if self.on_written is not None:
                self.on_written(t.index for t in tiles)
            self.bar.update(sum(map(_area, tiles)) * self.plan.scale ** 2)
            if self.space is not None:
                self.space.batch_done(g)

    def shut_down(self, read_thread: threading.Thread, write_threads: list[threading.Thread]) -> None:
        for t in write_threads:
            t.join()
        self.stop.set()
        while read_thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                self.inq.get_nowait()
            except queue.Empty:
                pass
            read_thread.join(timeout=0.1)
        self.bar.close()
