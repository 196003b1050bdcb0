"""Upscaling files of any size (:func:`upscale_file`): the composition of the pipeline's parts.

Tiles are computed on windows that extend each tile by the model's receptive field
(:mod:`fastsr.tiling`), so the stitched output equals the whole-image output. Finished tiles go
into a zarr tile store in a hidden work folder next to the destination (:mod:`.resume`), and
each finished batch is appended to a manifest: after a crash (even ``kill -9``) ``resume=True``
computes only the batches not in the manifest, in the same batch composition, so the final
output is identical to an uninterrupted run. The finished store becomes the output
(:mod:`.assemble`): renamed for ``.zarr``, streamed into a tiled BigTIFF (row-major tiles,
optional pyramid) or, for outputs that fit in memory, saved with Pillow. Host memory is bounded
by a few batches of tiles, independent of the image size.

Under ``torchrun`` (``WORLD_SIZE`` > 1) batches are sharded across ranks, which write disjoint
chunks of the same store (no locks) and one manifest each; rank 0 assembles the final file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import imageio
from ..atomic import commit
from ..distributed import DistInfo, barrier, broadcast_object, process_group
from ..errors import UserError
from ..imageio import DiskFullError, ImageSource
from ..ops.dispatch import get_backend
from ..tiling import TilePlan
from .assemble import Assembler, Output, SpaceWatch, TileTracker, finish
from .engine import UpscaleError, Upscaler, model_digest, resolve_device
from .halo import HaloChoice, pick_halo, plan_for, source_reader
from .memory import tile_size
from .options import UpscaleOptions
from .resume import WorkDir, interrupted_header, output_lock, work_path
from .stream import run_batches, writer_threads

log = logging.getLogger("fastsr")


@dataclass(frozen=True)
class _Run:
    """One file run's settings, derived from the arguments and checked before any work starts."""

    output: Output
    plan: TilePlan
    batch_size: int
    header: dict  # what a resumed run must match

    @property
    def chunks(self) -> tuple[int, int, int]:
        return self.output.out_tile, self.output.out_tile, self.header["shape"][2]


def upscale_file(src: str | os.PathLike, dst: str | os.PathLike, model=None, options: UpscaleOptions | None = None,
                 **changes) -> Path:
    """Upscale the image file ``src`` into ``dst`` in tiles, in bounded memory; returns ``dst``.

    src: TIFF/BigTIFF (tiled or stripped), a zarr array, a .npy file, or PNG/JPEG/...;
    uint8 or uint16; gray, gray+alpha, RGB, RGBA. dst: .tif (tiled BigTIFF; tiles of
    ``tile * scale`` pixels, ``compression`` none/deflate/zstd/jpeg, ``pyramid`` adds
    half-resolution levels as SubIFDs), .zarr (v3, chunks of ``tile * scale``) or
    .png/.jpg/.webp (in memory, limited size). ``halo="auto"`` is the model's receptive field
    (output equal to whole-image inference) where that is affordable, else a halo measured on the
    image (:mod:`fastsr.pipeline.halo`: deep models such as RRDBNet). ``border``: "mirror"
    (default; the image is padded by 10 pixels of its mirror image, so a flat image stays flat),
    "reflect" (mirrored without repeating the edge) or "zero" (the
    plain model's zero padding at the border). ``resume=True`` continues a killed
    run from its manifest (same settings required); ``restart=True`` discards such a run's
    finished tiles and starts over (without either, finding them is an error). An existing ``dst``
    is replaced only with ``overwrite=True``, and a folder only if it is a zarr fastsr wrote
    (docs/safety.md); ``dst`` may not be, lie inside or contain ``src``. Raises
    :class:`fastsr.errors.UserError` subclasses for bad inputs and outputs, all checked before
    any work starts.

    The options (:class:`~fastsr.pipeline.options.UpscaleOptions`: ``tile``, ``halo``, ``border``,
    ``batch_size``, ``device``, ``dtype``, ``backend``, ``compression``, ``pyramid``, ``resume``,
    ``restart``, ``overwrite``, ``progress``) come as one ``options`` object, as keywords, or both
    (keywords change the object's values).
    """
    opts = UpscaleOptions.of("upscale_file", options, **changes)
    src_path, dst_path = Path(src), Path(dst)
    imageio.check_destination(dst_path, [src_path], overwrite=opts.overwrite)
    with process_group(resolve_device(opts.device)) as dist:
        up = Upscaler(model, device=dist.device, dtype=opts.dtype, backend=opts.backend)
        with imageio.open_image(src_path) as source:
            run = _plan_run(up, source, src_path, dst_path, opts, dist)
            with _space_to_start(dst_path), output_lock(dst_path, dist):  # after the checks: the folder is writable
                work = WorkDir(work_path(dst_path), run.header, tuple(run.header["shape"]), run.chunks,
                               source.dtype, resume=opts.resume, dist=dist, restart=opts.restart)
                work.verify(run.plan, run.batch_size)
                space = SpaceWatch(work, run.output, run.plan, run.batch_size, dist.world_size)
                with space.stop_when_full():  # a full disk: one line, the finished tiles kept for --resume
                    assembler = _start_assembler(run, work, dist)
                    _compute(up, source, run, work, dist, assembler, opts.progress, space)
                    _commit(run, work, dist, assembler)
    return dst_path


@contextlib.contextmanager
def _space_to_start(dst: Path) -> Iterator[None]:
    """A full disk while taking the lock or making the work folder: one line, nothing computed yet."""
    try:
        yield
    except OSError as exc:
        if not imageio.is_disk_full(exc):
            raise
        raise DiskFullError(f"{dst}: no space left to start the run in {dst.parent} ({exc.strerror}); free some "
                            "space and run again") from None


def _plan_run(up: Upscaler, source: ImageSource, src: Path, dst: Path, opts: UpscaleOptions,
              dist: DistInfo) -> _Run:
    """The tile plan, the output checks (format, TIFF tile size, disk space) and the resume header."""
    batch_size = opts.batch_for(up.device)
    # The space check first, in Python integers: before a plan is made for a declared size.
    out_shape = (source.height * up.scale, source.width * up.scale, source.channels)
    fmt = imageio.check_output(dst, shape=out_shape, dtype=source.dtype, compression=opts.compression)
    imageio.check_disk_space(dst, imageio.estimate_output_bytes(out_shape, source.dtype, fmt, opts.compression))
    if opts.pyramid and fmt != "tiff":
        raise UpscaleError(f"--pyramid: {dst} is not a TIFF; pyramid levels are written into .tif outputs only")
    plan = _tile_plan(up, source, dst, opts, dist)
    _check_tiff_tile(fmt, plan.tile, up.scale)
    if up.device.type == "cpu" and up.dtype != torch.float32:
        log.warning("%s on the CPU: several times slower than fp32 for these models (measured 5-8x); fp32 is "
                    "the default", str(up.dtype).removeprefix("torch."))
    st = src.stat()
    resolved = {"tile": plan.tile, "halo": plan.halo, "batch_size": batch_size, "dtype": str(up.dtype),
                "device": up.device.type, "backend": opts.backend or get_backend()}
    header = {"version": 1, "src": str(src.resolve()), "src_size": st.st_size, "src_mtime_ns": st.st_mtime_ns,
              "model": model_digest(up.source), **opts.header(resolved), "shape": list(out_shape),
              "scale": up.scale}
    metadata = source.metadata.scaled(up.scale, out_shape[1], out_shape[0])  # the same physical size and place
    output = Output(dst, fmt, plan.tile * up.scale, opts.compression, opts.pyramid, metadata, opts.overwrite)
    return _Run(output, plan, batch_size, header)


def _tile_plan(up: Upscaler, source: ImageSource, dst: Path, opts: UpscaleOptions, dist: DistInfo) -> TilePlan:
    """The tiles of the run; a run resumed with "auto" (or a folder's halo measured on another file)
    keeps the halo it started with, and under torchrun every rank takes rank 0's."""
    shape = {"height": source.height, "width": source.width, "channels": source.channels,
             "tile": tile_size(opts.tile, source.height, source.width)}
    keeps_stored = opts.resume and (opts.halo in ("auto", None) or isinstance(opts.halo, HaloChoice))
    stored = (interrupted_header(dst) or {}).get("halo") if keeps_stored else None
    if stored is None and dist.world_size > 1:
        stored = _halo_of_rank_0(up, opts.halo, source, shape, dist)
    return plan_for(up, halo=opts.halo, border=opts.border, read=source_reader(source), stored_halo=stored, **shape)


def _check_tiff_tile(fmt: str, tile: int, scale: int) -> None:
    """TIFF tiles are multiples of 16 pixels: name the nearest --tile that gives such output tiles."""
    out_tile = tile * scale
    if fmt == "tiff" and out_tile % 16:
        step = 16 // int(np.gcd(16, scale))  # the tiles whose output is a multiple of 16
        raise UpscaleError(f"--tile {tile} gives output tiles of {out_tile} pixels; TIFF tiles must be a multiple "
                           f"of 16 pixels: use --tile {-(-tile // step) * step} or another multiple of {step}")


def _halo_of_rank_0(up: Upscaler, halo, source: ImageSource, shape: dict, dist: DistInfo) -> int:
    """Every rank must cut the same tiles: rank 0 chooses the halo (a measured one could differ
    between ranks) and the others take it; an error there is raised on every rank, none waits."""
    mine: int | UserError | None = None
    if dist.rank == 0:
        try:
            mine = pick_halo(up, halo, read=source_reader(source), **shape)
        except UserError as exc:
            mine = exc
    chosen = broadcast_object(mine, dist)
    if isinstance(chosen, UserError):
        raise chosen
    return chosen


def _start_assembler(run: _Run, work: WorkDir, dist: DistInfo) -> Assembler | None:
    """A single process writing a TIFF encodes it while the model runs (with several ranks, rank 0
    does it at the end). Its file lives in the work folder until complete, so a killed run leaves
    nothing beside the output."""
    if run.output.fmt != "tiff" or dist.world_size > 1:
        return None
    tracker = TileTracker(run.plan, work.done, run.batch_size)
    assembler = Assembler(work, tracker, work.path / f"output{run.output.dst.suffix}", run.output)
    assembler.start()
    return assembler


def _compute(up: Upscaler, source: ImageSource, run: _Run, work: WorkDir, dist: DistInfo,
             assembler: Assembler | None, progress: bool, space: SpaceWatch) -> None:
    """This rank's batches not done yet. On a user error (bad input found while reading) the work
    folder goes; on a full disk or anything else (a crash, Ctrl-C) it stays for ``--resume``."""
    n = len(run.plan.batches(run.batch_size))
    if work.done and dist.rank == 0:
        log.info("resuming: %d of %d batches of tiles already done", len(work.done), n)
    groups = [g for g in range(dist.rank, n, dist.world_size) if g not in work.done]
    try:
        run_batches(up, source, run.plan, groups, run.batch_size, work, progress and dist.rank == 0,
                    on_written=assembler.tracker.add if assembler else None, writers=writer_threads(up.device),
                    space=space)
    except BaseException as exc:
        work.close()
        if assembler is not None:
            assembler.abort()
        if isinstance(exc, UserError):
            if dist.world_size == 1 and not isinstance(exc, DiskFullError):  # its message says how to resume
                imageio.remove_path(work.path)
        elif work.done or dist.world_size > 1:  # (other ranks may have finished some)
            log.warning("stopped; the finished tiles are kept in %s: rerun with --resume to continue", work.path)
        raise
    work.close()


def _commit(run: _Run, work: WorkDir, dist: DistInfo, assembler: Assembler | None) -> None:
    """The complete output onto its destination (an atomic rename), then the work folder goes."""
    if assembler is not None:
        assembler.join()
        if assembler.error is not None:
            imageio.remove_path(assembler.tmp)
            raise assembler.error
        commit(assembler.tmp, run.output.dst, overwrite=run.output.overwrite)
        imageio.remove_path(work.path)
        return
    barrier(dist)  # every rank's tiles are in the store
    if dist.rank == 0:
        finish(work, run.output)
    barrier(dist)
