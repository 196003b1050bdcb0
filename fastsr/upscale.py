"""Upscaling: whole images in memory (:func:`upscale_image`) and files of any size through a
streaming, resumable tile pipeline (:func:`upscale_file`).

The file pipeline::

    reader thread                 calling thread                 writer thread
    read tile windows  --queue-->  batch -> model -> uint  --queue-->  crop cores -> zarr chunks
    (region reads)                 (inference_mode; pinned            -> manifest line
                                    memory + CUDA stream on GPU)

Tiles are computed on windows that extend each tile by the model's receptive field
(:mod:`fastsr.tiling`), so the stitched output equals the whole-image output. Finished tiles
go into a zarr tile store in a hidden work folder next to the destination, and each finished
batch is appended to a manifest: after a crash (even ``kill -9``) ``resume=True`` computes
only the batches not in the manifest, in the same batch composition, so the final output is
identical to an uninterrupted run. The finished store becomes the output: renamed for
``.zarr``, streamed into a tiled BigTIFF (row-major tiles, optional pyramid) or, for outputs
that fit in memory, saved with Pillow. Host memory is bounded by a few batches of tiles,
independent of the image size.

Under ``torchrun`` (``WORLD_SIZE`` > 1) batches are sharded across ranks, which write
disjoint chunks of the same store (no locks) and one manifest each; rank 0 assembles the
final file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import imageio
from .backend import get_backend
from .errors import UserError
from .imageio import ImageSource, ImageWriteError
from .tiling import TilePlan, model_scale, plan_tiles, receptive_field

log = logging.getLogger("fastsr")

# Images up to this many pixels are upscaled whole by upscale_image(tile=None); larger ones in
# tiles of AUTO_TILE (the activations of a whole 4x SRResNet pass grow with the image).
AUTO_TILE = 512
AUTO_TILE_MAX_PIXELS = AUTO_TILE * AUTO_TILE
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WORK_SUFFIX = ".fastsr-partial"

_default_lock = threading.Lock()
_default_models: dict[str, nn.Module] = {}


class UpscaleError(UserError):
    """A bad argument to upscale_image / upscale_file (tile, halo, device, dtype, paths)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UpscaleError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UpscaleError("device cuda requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise UpscaleError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UpscaleError(f"unsupported compute dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    if str(dtype) not in DTYPES:
        raise UpscaleError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return DTYPES[str(dtype)]


def _load(model: nn.Module | str | os.PathLike | None) -> nn.Module:
    from .models.checkpoint import EMBEDDED, ModelFileError, load_model

    if isinstance(model, nn.Module):
        return model
    name = "default" if model is None else str(model)
    try:
        if name in EMBEDDED:
            # Loaded once per process; every call works on its own copy (see Upscaler).
            with _default_lock:
                if name not in _default_models:
                    _default_models[name] = load_model(name)
                return _default_models[name]
        return load_model(name)
    except ModelFileError as exc:
        raise UserError(str(exc)) from None


def _fuse(net: nn.Module) -> nn.Module:
    """BatchNorm folded into the convs and channels_last (fastsr.optimize) for fastsr models."""
    from .fusion import optimize

    return optimize(net)


def model_digest(model: nn.Module) -> str:
    """A hash of the model's architecture config and weights (identifies it in resume manifests)."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", type(model).__name__), sort_keys=True).encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Upscaler:
    """A model prepared for inference: its own copy on ``device`` in ``dtype`` (BN folded and
    channels_last where fastsr.optimize provides it), its ``scale`` and receptive ``radius``.

    ``forward(x)``: (B, C, h, w) float in [0, 1] on the device -> (B, C, h*s, w*s) float, C in
    1..4: gray is run as RGB and averaged back, alpha is upscaled with bicubic.
    ``run_uint(batch)``: (B, h, w, C) uint8/uint16 numpy -> (B, h*s, w*s, C) same dtype numpy.
    """

    def __init__(self, model=None, *, device=None, dtype=None, backend: str | None = None) -> None:
        source = _load(model)
        self.device, self.dtype, self.backend = resolve_device(device), resolve_dtype(dtype), backend
        self.scale, self.radius = model_scale(source), receptive_field(source)
        self.in_channels = int(getattr(source, "config", {}).get("in_channels", 3))
        self.source = source
        net = copy.deepcopy(source).eval().to(self.device)
        net = _fuse(net).to(self.device, self.dtype)
        self.net = net.to(memory_format=torch.channels_last)
        self.stream = None
        if self.device.type == "cuda":
            # Batches run on their own stream (copies overlap other threads' work); it must see
            # the weights that were just copied on the default stream.
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def halo(self, halo: int | str, channels: int) -> int:
        """The halo for ``halo`` ("auto" = the receptive field; bicubic alpha needs 2)."""
        need = max(self.radius, 2 if channels in (2, 4) else 0)
        if halo == "auto" or halo is None:
            return need
        try:
            value = int(halo)
        except (TypeError, ValueError):
            raise UpscaleError(f"halo must be 'auto' or a number of pixels, got {halo!r}") from None
        if value < 0:
            raise UpscaleError(f"halo must be >= 0, got {value}")
        if value < need:
            log.warning("halo %d is smaller than the model's receptive field radius %d: tiles will not match "
                        "whole-image output near their edges (seams)", value, need)
        return value

    def _backend(self):
        if self.backend in (None, "auto"):
            return nullcontext()
        from .backend import use_backend

        return use_backend(self.backend)

    def _ops(self, tensor: torch.Tensor):
        """The backend module serving ``tensor`` under this upscaler's backend choice."""
        from .backend import resolve

        return resolve(self.backend, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        color = x[:, :-1] if channels in (2, 4) else x
        if color.shape[1] == 1 and self.in_channels == 3:
            color = color.expand(-1, 3, -1, -1)
        with self._backend():
            out = self.net(color.to(self.dtype).contiguous(memory_format=torch.channels_last))
        if channels in (1, 2) and self.in_channels == 3:
            out = out.mean(dim=1, keepdim=True)
        if channels in (2, 4):
            alpha = F.interpolate(x[:, -1:].float(), scale_factor=self.scale, mode="bicubic", align_corners=False)
            out = torch.cat([out.to(alpha.dtype), alpha.clamp(0, 1)], dim=1)
        return out

    def run_uint(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, C) uint8/uint16 -> (B, h*s, w*s, C) of the same dtype (rounded, clamped)."""
        maxval = 255.0 if batch.dtype == np.uint8 else 65535.0
        host = torch.from_numpy(batch if batch.dtype == np.uint8 else batch.astype(np.int32))
        with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.stream else nullcontext()):
            if self.stream is not None:
                host = host.pin_memory()
            x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels_last
            y = self.forward(x.float().div_(maxval))
            fused = getattr(self._ops(y), "to_uint8", None) if batch.dtype == np.uint8 else None
            if fused is not None:  # one pass instead of four (about 5% of a small model's time)
                y = fused(y)
            else:
                y = y.float().clamp_(0, 1).mul_(maxval).round_().permute(0, 2, 3, 1)
                y = y.to(torch.uint8) if batch.dtype == np.uint8 else y.to(torch.int32)
            if self.stream is not None:
                out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                out.copy_(y, non_blocking=True)
                self.stream.synchronize()
            else:
                out = y.contiguous()
        array = out.numpy()
        return array if batch.dtype == np.uint8 else array.astype(np.uint16)


# ----------------------------------------------------------------------------- in memory


def _uint_tiles(up: Upscaler, source: ImageSource, plan: TilePlan, batch_size: int, out: np.ndarray) -> None:
    for group in plan.batches(batch_size):
        tiles = [plan.tile_at(i) for i in group]
        result = up.run_uint(np.stack([source.read(*t.window) for t in tiles]))
        for t, o in zip(tiles, result, strict=True):
            y0, y1, x0, x1 = t.output_box(plan.scale)
            out[y0:y1, x0:x1] = o[t.output_crop(plan.scale)]


def _tile_size(tile: int | None, height: int, width: int) -> int:
    if tile is None:
        return max(height, width) if height * width <= AUTO_TILE_MAX_PIXELS else AUTO_TILE
    if int(tile) < 1:
        raise UpscaleError(f"tile must be a positive number of pixels, got {tile}")
    return int(tile)


def upscale_image(image, model=None, *, device=None, dtype=None, tile: int | None = None, halo="auto",
                  batch_size: int | None = None, backend: str | None = None):
    """Upscale an image held in memory; returns the same kind of object.

    image: a PIL image (L, LA, RGB, RGBA, P, I;16), an (H, W) or (H, W, C) uint8/uint16 numpy
    array (C = 1..4), or a float tensor (N, C, H, W) / (C, H, W) in [0, 1] (output on the
    input's device and dtype, not clamped). model: a module, a model file, "default" or None
    (the embedded default). tile: None = whole image up to 512x512 pixels, tiles of 512
    beyond; an int forces tiles of that size (same output up to float rounding when the halo
    covers the receptive field, as with halo="auto"). Safe to call from several threads.
    """
    up = Upscaler(model, device=device, dtype=dtype, backend=backend)
    if batch_size is None:
        batch_size = 4 if up.device.type == "cuda" else 1
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(up, image, tile, halo, batch_size)
    pil_mode = None
    if isinstance(image, np.ndarray):
        array = image
    elif hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        pil_mode = image.mode
        array = imageio._pil_to_array("<PIL image>", image)
    else:
        raise UpscaleError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a numpy array or a tensor")
    source = imageio.array_source(array, "<array>", "array")
    plan = plan_tiles(source.height, source.width, tile=_tile_size(tile, source.height, source.width),
                      halo=up.halo(halo, source.channels), scale=up.scale)
    out = np.empty((*plan.output_shape, source.channels), dtype=source.dtype)
    _uint_tiles(up, source, plan, batch_size, out)
    if pil_mode is None:
        return out if array.ndim == 3 else out[..., 0]
    from PIL import Image

    return Image.fromarray(out[..., 0] if out.shape[2] == 1 else out)  # mode from shape and dtype


def _upscale_tensor(up: Upscaler, x: torch.Tensor, tile, halo, batch_size: int) -> torch.Tensor:
    if not x.is_floating_point() or x.dim() not in (3, 4) or x.shape[-3] not in imageio.MODES:
        raise UpscaleError(f"tensor input must be float (N, C, H, W) or (C, H, W) with C in 1..4, "
                           f"got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise UpscaleError(f"tensor input has zero size {tuple(x.shape)}")
    squeeze = x.dim() == 3
    x4 = x[None] if squeeze else x
    n, c, h, w = x4.shape
    plan = plan_tiles(h, w, tile=_tile_size(tile, h, w), halo=up.halo(halo, c), scale=up.scale)
    s = up.scale
    out = torch.empty((n, c, h * s, w * s), dtype=x.dtype, device=x.device)
    with torch.inference_mode():
        for i in range(n):
            for group in plan.batches(batch_size):
                tiles = [plan.tile_at(j) for j in group]
                windows = torch.stack([x4[i, :, t.window[0]:t.window[1], t.window[2]:t.window[3]] for t in tiles])
                result = up.forward(windows.to(up.device).float()).to(x.device, x.dtype)
                for t, o in zip(tiles, result, strict=True):
                    y0, y1, x0, x1 = t.output_box(s)
                    rows, cols = t.output_crop(s)
                    out[i, :, y0:y1, x0:x1] = o[:, rows, cols]
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- files


def _dist_info() -> tuple[int, int]:
    """(rank, world size): from torch.distributed if initialised, else torchrun's environment
    (the process group is then initialised here: gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FASTSR_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


class _WorkDir:
    """The resumable state next to the destination: ``tiles.zarr`` (the output, chunk = output
    tile) and ``done.rank<R>.txt`` manifests listing finished batch numbers, one per line, each
    written after its tiles are in the store (so a listed batch is always complete)."""

    def __init__(self, path: Path, header: dict, shape, chunks, dtype, *, resume: bool, rank: int,
                 world: int) -> None:
        self.path, self.rank = path, rank
        self.header_path, self.store_path = path / "header.json", path / "tiles.zarr"
        if rank == 0:
            self._prepare(header, shape, chunks, dtype, resume)
        _barrier(world)
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
        tmp = self.path / "header.json.tmp"
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, self.header_path)

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


def _writer_threads(device: torch.device) -> int:
    """Threads compressing finished tiles into the store. On a GPU the model outruns one thread
    by far (zstd level 1 packs a few hundred MB/s per core; a fast GPU makes GB/s of pixels),
    so several encode in parallel (the codecs release the GIL); on a CPU the model already uses
    every core and one writer is enough."""
    return min(4, max(1, (os.cpu_count() or 1) // 2)) if device.type == "cuda" else 1


def _pipeline(up: Upscaler, source: ImageSource, plan: TilePlan, groups: list[int], batch_size: int,
              work: _WorkDir, progress: bool, on_written=None, writers: int = 1) -> None:
    from tqdm import tqdm

    batches = plan.batches(batch_size)
    stop = threading.Event()
    inq: queue.Queue = queue.Queue(maxsize=2)
    outq: queue.Queue = queue.Queue(maxsize=2 * writers)
    s = plan.scale
    area = lambda t: (t.core[1] - t.core[0]) * (t.core[3] - t.core[2])
    total = sum(area(plan.tile_at(i)) for g in groups for i in batches[g])
    bar = tqdm(total=total * s * s / 1e6, unit="Mpx", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_noinv_fmt}]")

    def reader() -> None:
        try:
            for g in groups:
                tiles = [plan.tile_at(i) for i in batches[g]]
                try:
                    windows = np.stack([source.read(*t.window) for t in tiles])
                except Exception as exc:
                    raise imageio.ImageReadError(f"{source.path}: cannot read tiles {tiles[0].window} ... "
                                                 f"({exc})") from exc
                if not _put(inq, (g, tiles, windows), stop):
                    return
            _put(inq, None, stop)
        except BaseException as exc:  # noqa: B036 - handed to the calling thread
            _put(inq, _Failure(exc), stop)

    def writer() -> None:
        try:
            while True:
                try:
                    item = outq.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():  # the calling thread failed: what was queued is written
                        return
                    continue
                if item is None:
                    return
                g, tiles, result = item
                for t, o in zip(tiles, result, strict=True):
                    y0, y1, x0, x1 = t.output_box(s)
                    work.store[y0:y1, x0:x1] = o[t.output_crop(s)]  # whole chunks: no two writers share one
                with written:
                    work.mark(g)
                    if on_written is not None:
                        on_written(t.index for t in tiles)
                    bar.update(sum(map(area, tiles)) * s * s / 1e6)
        except BaseException as exc:  # noqa: B036 - handed to the calling thread
            failures.append(exc)
            stop.set()

    failures: list[BaseException] = []
    written = threading.Lock()  # manifest, tile tracker and progress bar: one writer at a time
    read_thread = threading.Thread(target=reader, name="fastsr-reader", daemon=True)
    write_threads = [threading.Thread(target=writer, name=f"fastsr-writer{i}", daemon=True) for i in range(writers)]
    for t in (read_thread, *write_threads):
        t.start()
    try:
        while (item := inq.get()) is not None:
            if isinstance(item, _Failure):
                raise item.exc
            g, tiles, windows = item
            if not _put(outq, (g, tiles, up.run_uint(windows)), stop):
                break  # a writer failed
        for _ in write_threads:  # one end marker per writer
            _put(outq, None, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        for t in write_threads:
            t.join()
        stop.set()
        while read_thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                inq.get_nowait()
            except queue.Empty:
                pass
            read_thread.join(timeout=0.1)
        bar.close()
    if failures:
        raise failures[0]


class _TileTracker:
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

    def __init__(self, store, tracker: _TileTracker) -> None:
        self.store, self.tracker = store, tracker
        self.shape, self.dtype = store.shape, store.dtype

    def __getitem__(self, key):
        rows, cols = key[0], key[1]
        self.tracker.wait((rows.start // self.tracker.tile) * self.tracker.cols + cols.start // self.tracker.tile)
        return self.store[key]


class _Assembler(threading.Thread):
    """Writes the TIFF output from the tile store in row-major order while tiles are produced."""

    def __init__(self, work: _WorkDir, tracker: _TileTracker, tmp: Path, out_tile: int, compression: str,
                 pyramid: bool) -> None:
        super().__init__(name="fastsr-tiff", daemon=True)
        self.work, self.tracker, self.tmp = work, tracker, tmp
        self.out_tile, self.compression, self.pyramid = out_tile, compression, pyramid
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            store = self.work.store
            levels = (lambda: imageio.build_pyramid(store, self.work.path, self.out_tile, self.out_tile)) \
                if self.pyramid else ()
            num = len(imageio.pyramid_shapes(tuple(store.shape), self.out_tile)) if self.pyramid else 0
            imageio.write_tiff(self.tmp, _WaitingArray(store, self.tracker), tile=self.out_tile,
                               compression=self.compression, levels=levels, num_levels=num)
        except BaseException as exc:  # noqa: B036 - reported by upscale_file
            self.error = exc


def upscale_file(src: str | os.PathLike, dst: str | os.PathLike, model=None, *, tile: int = 512,
                 halo: int | str = "auto", batch_size: int | None = None, device=None, dtype=None,
                 resume: bool = False, compression: str = "zstd", pyramid: bool = False, progress: bool = True,
                 backend: str | None = None) -> Path:
    """Upscale the image file ``src`` into ``dst`` in tiles, in bounded memory; returns ``dst``.

    src: TIFF/BigTIFF (tiled or stripped), a zarr array, a .npy file, or PNG/JPEG/...;
    uint8 or uint16; gray, gray+alpha, RGB, RGBA. dst: .tif (tiled BigTIFF; tiles of
    ``tile * scale`` pixels, ``compression`` none/deflate/zstd/jpeg, ``pyramid`` adds
    half-resolution levels as SubIFDs), .zarr (v3, chunks of ``tile * scale``) or
    .png/.jpg/.webp (in memory, limited size). ``halo="auto"`` is the model's receptive field,
    which makes the output equal to whole-image inference. ``resume=True`` continues a killed
    run from its manifest (same settings required). Raises :class:`fastsr.errors.UserError`
    subclasses for bad inputs and outputs, all checked before any work starts.
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve():
        raise ImageWriteError(f"output path {dst} is the input file; choose another output name")
    imageio.output_format(dst_path)
    rank, world = _dist_info()
    if world > 1 and resolve_device(device).type == "cuda" and torch.device(device or "cuda").index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"  # one GPU per rank
    up = Upscaler(model, device=device, dtype=dtype, backend=backend)
    if batch_size is None:
        batch_size = 4 if up.device.type == "cuda" else 1
    if int(batch_size) < 1:
        raise UpscaleError(f"batch size must be >= 1, got {batch_size}")
    with imageio.open_image(src_path) as source:
        tile = _tile_size(tile, source.height, source.width)
        plan = plan_tiles(source.height, source.width, tile=tile, halo=up.halo(halo, source.channels),
                          scale=up.scale)
        out_shape = (*plan.output_shape, source.channels)
        fmt = imageio.check_output(dst_path, shape=out_shape, dtype=source.dtype, compression=compression)
        out_tile = tile * up.scale
        if fmt == "tiff" and out_tile % 16:
            good = -(-tile * up.scale // 16) * 16 // up.scale
            raise UpscaleError(f"--tile {tile} gives output tiles of {out_tile} pixels; TIFF tiles must be a multiple "
                               f"of 16 pixels: use --tile {good} or another multiple of {16 // np.gcd(16, up.scale)}")
        imageio.check_disk_space(dst_path, imageio.estimate_output_bytes(out_shape, source.dtype, fmt, compression))
        st = src_path.stat()
        header = {"version": 1, "src": str(src_path.resolve()), "src_size": st.st_size, "src_mtime_ns": st.st_mtime_ns,
                  "model": model_digest(up.source), "tile": tile, "halo": plan.halo, "batch_size": int(batch_size),
                  "dtype": str(up.dtype), "device": up.device.type, "backend": backend or get_backend(),
                  "shape": list(out_shape), "scale": up.scale}
        work_path = dst_path.with_name(f".{dst_path.name}{WORK_SUFFIX}")
        work = _WorkDir(work_path, header, out_shape, (out_tile, out_tile, source.channels), source.dtype,
                        resume=resume, rank=rank, world=world)
        assembler = None
        if fmt == "tiff" and world == 1:
            # Encode the TIFF while the model runs; with several ranks, rank 0 does it at the end.
            tracker = _TileTracker(plan, work.done, int(batch_size))
            # Inside the work folder: a run killed while writing leaves nothing beside the output.
            assembler = _Assembler(work, tracker, work_path / f"output{dst_path.suffix}", out_tile, compression,
                                   pyramid)
            assembler.start()
        try:
            n = len(plan.batches(int(batch_size)))
            if work.done and rank == 0:
                log.info("resuming: %d of %d batches of tiles already done", len(work.done), n)
            groups = [g for g in range(rank, n, world) if g not in work.done]
            _pipeline(up, source, plan, groups, int(batch_size), work, progress and rank == 0,
                      on_written=tracker.add if assembler else None, writers=_writer_threads(up.device))
        except BaseException as exc:
            work.close()
            if assembler is not None:
                tracker.abort()
                assembler.join()
                imageio.remove_path(assembler.tmp)
            if isinstance(exc, UserError):
                if world == 1:
                    imageio.remove_path(work_path)
            else:
                log.warning("stopped; the finished tiles are kept in %s: rerun with --resume to continue", work_path)
            raise
        work.close()
    if assembler is not None:
        assembler.join()
        if assembler.error is not None:
            imageio.remove_path(assembler.tmp)
            raise assembler.error
        imageio.commit_path(assembler.tmp, dst_path)
        imageio.remove_path(work_path)
        return dst_path
    _barrier(world)
    if rank == 0:
        _finish(work, work_path, dst_path, fmt, out_tile, compression, pyramid)
    _barrier(world)
    return dst_path


def _finish(work: _WorkDir, work_path: Path, dst: Path, fmt: str, out_tile: int, compression: str,
            pyramid: bool) -> None:
    """Turn the complete tile store into the output file (atomic rename), then drop the work folder."""
    if fmt == "zarr":
        imageio.commit_path(work.store_path, dst)
        imageio.remove_path(work_path)
        return
    tmp = work_path / f"output{dst.suffix}"  # same folder as dst: the rename is atomic
    try:
        if fmt == "tiff":
            levels = imageio.build_pyramid(work.store, work_path, out_tile, out_tile) if pyramid else ()
            imageio.write_tiff(tmp, work.store, tile=out_tile, compression=compression, levels=tuple(levels))
        else:
            imageio.write_pillow(tmp, np.asarray(work.store[...]), imageio.pillow_format(dst))
        imageio.commit_path(tmp, dst)
    finally:
        imageio.remove_path(tmp)
    imageio.remove_path(work_path)
