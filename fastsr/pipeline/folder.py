"""Upscaling a folder of images (:func:`upscale_folder`): every image under a folder into the same
relative path under another, one file at a time through :func:`.files.upscale_file`.

It loses nothing. A file that fails (unreadable, corrupt, an unsupported mode) is reported on one
line and the others go on. Each output is written under a temporary name and renamed when complete,
so an output that exists is finished: a rerun skips it and computes only what is missing. The
model is loaded once for all files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import imageio
from ..atomic import atomic_path
from ..distributed import DistInfo
from ..errors import BackendUnavailableError, UserError
from ..imageio import PILLOW_SUFFIXES, TIFF_SUFFIXES
from ..tiling import align_up
from . import halo as halo_mod
from .engine import NonFiniteOutputError, Upscaler, model_digest
from .files import upscale_file
from .memory import tile_size
from .options import UpscaleOptions
from .resume import output_lock, work_path

log = logging.getLogger("fastsr")

# The images a folder run reads: files with these suffixes (any case) and zarr arrays (folders
# named *.zarr). Everything else (.npy arrays, text, sidecar files) is left alone.
INPUT_SUFFIXES = (*PILLOW_SUFFIXES, *TIFF_SUFFIXES, ".zarr")
# The record of what folder runs wrote into an output folder OUT: relative output path -> the
# digest of the model that made it, in the hidden file .OUT.fastsr-folder.json beside OUT (beside,
# not inside: OUT holds only the outputs). A rerun skips only outputs recorded with its own model;
# any other file at an output path is not fastsr's to skip or replace without --overwrite.
RECORD_SUFFIX = ".fastsr-folder.json"


class FolderError(UserError):
    """A folder run that cannot start (the folders, the format, nothing to read, clashing names)."""


@dataclass(frozen=True)
class Failure:
    """A file that was not upscaled: why (one line), and whether it was the file's fault (a
    :class:`~fastsr.errors.UserError`: unreadable input, unsupported mode, unwritable output) rather
    than a crash."""

    src: Path
    reason: str
    user_error: bool


@dataclass
class FolderSummary:
    """What a folder run did: the inputs upscaled, skipped (output already there) and failed."""

    dst_dir: Path
    upscaled: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def line(self) -> str:
        """e.g. ``upscaled 12 files into out, skipped 3 already done, 1 failed: see above``."""
        parts = [f"upscaled {_files(len(self.upscaled))} into {self.dst_dir}"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} already done")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: see above")
        return ", ".join(parts)


def is_image_folder(path: str | os.PathLike) -> bool:
    """A folder of images, as opposed to a file or a zarr array (which is one image)."""
    p = Path(path)
    zarr = p.suffix.lower() == ".zarr" or (p / "zarr.json").exists() or (p / ".zarray").exists()
    return p.is_dir() and not zarr


def find_inputs(src_dir: Path, exclude: Path | None = None) -> list[Path]:
    """The images under ``src_dir`` as sorted relative paths. Hidden files and folders (a leading
    dot: editors' and macOS' sidecars such as ``._photo.jpg``, fastsr's own work folders) and the
    folder ``exclude`` (an output folder inside the input folder) are not read; symlinked folders
    are not followed (no loops)."""
    found = []
    for root, dirs, files in os.walk(src_dir):
        here = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)]
        arrays = [d for d in dirs if d.lower().endswith(".zarr")]
        dirs[:] = sorted(set(dirs) - set(arrays))  # a zarr array is one image: its chunks are not looked into
        names = arrays + [f for f in files if not f.startswith(".") and Path(f).suffix.lower() in INPUT_SUFFIXES]
        found.extend((here / name).relative_to(src_dir) for name in names)
    return sorted(found)


def upscale_folder(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, model=None,
                   options: UpscaleOptions | None = None, **changes) -> FolderSummary:
    """Upscale every image under ``src_dir`` (recursively, see :data:`INPUT_SUFFIXES`) into the same
    relative path under ``dst_dir``; returns a :class:`FolderSummary`.

    Outputs keep their input's suffix, or all get ``.{fmt}`` (one of :data:`.options.OUTPUT_FORMATS`).
    Existing outputs that an earlier folder run made with the same model are skipped (they are
    complete: :func:`upscale_file` renames a finished file into place); any other existing output
    (another model's, or a file fastsr did not write) stops the run before any work unless
    ``overwrite`` (docs/safety.md). A file that fails is logged on one line and the run goes on.
    ``dst_dir`` may lie inside ``src_dir`` (it is not read), not the other way round; an output
    whose folder is a symlink leading out of ``dst_dir`` fails. ``pyramid`` applies to the TIFF
    outputs; ``resume`` continues (``restart`` discards) the finished tiles of a file an interrupted
    run left unfinished. The options (:class:`~fastsr.pipeline.options.UpscaleOptions`) are
    :func:`upscale_file`'s and ``fmt``, as one ``options`` object and/or keywords. ``progress``: one
    bar over the files, with the output pixel throughput.
    """
    opts = UpscaleOptions.of("upscale_folder", options, **changes)
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    pairs = _plan(src_dir, dst_dir, opts.fmt)
    # The model loaded once, and the settings shared by every file (device, dtype, halo) checked
    # once: a bad one is one error, not one per file.
    up = Upscaler(model, device=opts.device, dtype=opts.dtype, backend=opts.backend)
    up.halo(opts.halo, 3)
    dst_dir.mkdir(parents=True, exist_ok=True)
    # One folder run per output folder: a second one would report the first's file locks as failures.
    with output_lock(dst_dir.resolve(), DistInfo(0, 1, torch.device("cpu"))):
        record = _Record(dst_dir, model_digest(up.source))
        done, todo = _sort_existing(pairs, dst_dir, record, opts.overwrite)
        summary = FolderSummary(dst_dir, skipped=done)
        _run(todo, up, opts, summary, record)
    return summary


def record_path(dst_dir: Path) -> Path:
    """The record of the folder runs into ``dst_dir`` (see :data:`RECORD_SUFFIX`)."""
    dst_dir = dst_dir.resolve()  # "." has no name to put beside
    return dst_dir.with_name(f".{dst_dir.name}{RECORD_SUFFIX}")


class _Record:
    """The outputs folder runs wrote into ``dst_dir`` and the model of each (:func:`record_path`)."""

    def __init__(self, dst_dir: Path, digest: str) -> None:
        self.path, self.dst_dir, self.digest = record_path(dst_dir), dst_dir, digest
        try:
            outputs = json.loads(self.path.read_text()).get("outputs", {})
        except (OSError, ValueError, AttributeError):
            outputs = {}
        self.outputs: dict[str, str] = outputs if isinstance(outputs, dict) else {}

    def model_of(self, dst: Path) -> str | None:
        return self.outputs.get(dst.relative_to(self.dst_dir).as_posix())

    def add(self, dst: Path) -> None:
        """``dst`` was written with this run's model; the record rewritten atomically."""
        self.outputs[dst.relative_to(self.dst_dir).as_posix()] = self.digest
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"version": 1, "outputs": self.outputs}, indent=1))


def _sort_existing(pairs: list[tuple[Path, Path]], dst_dir: Path, record: _Record,
                   overwrite: bool) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(inputs whose output is done, pairs to compute). An output made by this model is done; an
    existing one made by another model or not by a folder run is refused in one line for the whole
    run (before any work) unless ``overwrite``, when it is computed again and replaced."""
    done, todo, foreign = [], [], []
    for src, dst in pairs:
        if not os.path.lexists(dst):
            todo.append((src, dst))
        elif record.model_of(dst) == record.digest:
            done.append(src)
        else:
            foreign.append((src, dst))
    if foreign and not overwrite:
        dst = foreign[0][1]
        why = "made with another model" if record.model_of(dst) else "not written by a fastsr folder run"
        raise FolderError(f"{len(foreign)} output(s) exist that this run did not make, e.g. {dst} ({why}); pass "
                          "--overwrite to replace them, or choose another output folder")
    return done, todo + foreign


def _check(src_dir: Path, dst_dir: Path, fmt: str | None) -> None:
    """The folders and the format, before anything is read or written."""
    if not src_dir.is_dir():
        raise FolderError(f"{src_dir}: not a folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FolderError("folders are upscaled in one process; torchrun shares out the tiles of one large file")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise FolderError(f"{dst_dir}: exists and is not a folder; the input is a folder, so the output is one too")
    if not dst_dir.exists() and dst_dir.suffix.lower() in (*PILLOW_SUFFIXES, *TIFF_SUFFIXES):
        raise FolderError(f"{dst_dir}: an image name; the input is a folder, so the output is one too")
    if dst_dir.resolve() == src_dir.resolve():
        raise FolderError(f"{dst_dir}: the output folder is the input folder; choose another one (it may be "
                          "inside the input folder)")
    if dst_dir.resolve() in src_dir.resolve().parents:
        raise FolderError(f"{src_dir}: the input folder lies inside the output folder {dst_dir}; outputs could land "
                          "on inputs: choose an output folder outside it")


def _plan(src_dir: Path, dst_dir: Path, fmt: str | None) -> list[tuple[Path, Path]]:
    """(input, output) of every image, after the checks that need no model."""
    _check(src_dir, dst_dir, fmt)
    rels = find_inputs(src_dir, exclude=dst_dir.resolve())
    if not rels:
        raise FolderError(f"no images under {src_dir} (looked for {' '.join(INPUT_SUFFIXES)})")
    pairs, seen = [], {}
    for rel in rels:
        dst = dst_dir / (rel if fmt is None else rel.with_suffix(f".{fmt}"))
        if dst in seen:  # photo.png and photo.jpg with --format tif: one would overwrite the other
            raise FolderError(f"{src_dir / seen[dst]} and {src_dir / rel} would both be written to {dst}; "
                              "rename one, or keep their formats (no --format)")
        seen[dst] = rel
        pairs.append((src_dir / rel, dst))
    return pairs


def _run(todo: list[tuple[Path, Path]], up: Upscaler, opts: UpscaleOptions, summary: FolderSummary,
         record: _Record) -> None:
    """Each file in turn under one progress bar; failures are logged (above the bar) and recorded."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    started, pixels = time.perf_counter(), 0
    with tqdm(total=len(todo), unit="file", disable=not opts.progress, dynamic_ncols=True) as bar, \
            logging_redirect_tqdm():
        for src, dst in todo:
            failure, opts = _upscale_one(src, dst, up, opts, summary.dst_dir)
            if failure is None:
                record.add(dst)
                summary.upscaled.append(src)
                pixels += _input_pixels(src) * up.scale ** 2
            else:
                summary.failed.append(failure)
                log.error("error: %s: %s", src, failure.reason)
            bar.update(1)
            if pixels:
                rate = pixels / (time.perf_counter() - started)
                bar.set_postfix_str(f"{tqdm.format_sizeof(pixels)}px out, {tqdm.format_sizeof(rate)}px/s")


def _upscale_one(src: Path, dst: Path, up: Upscaler, opts: UpscaleOptions,
                 dst_dir: Path) -> tuple[Failure | None, UpscaleOptions]:
    """One file; its failure (or None) and the options for the next file (a halo measured here is
    kept). A backend that cannot run, or a model that makes NaN, is no fault of the file and stops
    the run (every file would fail the same way), as does Ctrl-C (not an Exception)."""
    escape = _leaves_folder(dst, dst_dir)
    if escape is not None:
        return Failure(src, f"{dst}: {escape}; fastsr writes only inside the output folder", True), opts
    created = _make_parents(dst)
    try:
        opts = _measure_halo_once(src, up, opts)
        upscale_file(src, dst, up.source, _for_file(dst, opts))
    except (BackendUnavailableError, NonFiniteOutputError):
        raise
    except Exception as exc:
        for folder in created:  # folders made for this output only, innermost first
            _remove_if_empty(folder)
        return Failure(src, _reason(exc, src), isinstance(exc, UserError)), opts
    return None, opts


def _measure_halo_once(src: Path, up: Upscaler, opts: UpscaleOptions) -> UpscaleOptions:
    """``halo="auto"`` with a deep model measures an effective halo on the image, tens of seconds on
    a CPU (:mod:`.halo`). A folder measures once, on the first image larger than a tile, and hands
    that choice to every later file (the returned options hold it); a file resumed from an
    interrupted run keeps the halo it started with."""
    if opts.halo not in ("auto", None) or not halo_mod.measures(up, opts.tile or 0):
        return opts
    with imageio.open_image(src) as source:
        tile = align_up(tile_size(opts.tile, source.height, source.width), up.align)
        choice = halo_mod.choose_halo(up, "auto", height=source.height, width=source.width,
                                      channels=source.channels, tile=tile, read=halo_mod.source_reader(source))
    if choice.how != "measured":  # the image fits in one tile: there was nothing to measure
        return opts
    log.warning("%s: %s; the other files of the folder use it too (--halo N sets one)", src, choice.describe())
    return dataclasses.replace(opts, halo=halo_mod.HaloChoice(choice.halo, f"measured on {src.name}", choice.radius))


def _for_file(dst: Path, opts: UpscaleOptions) -> UpscaleOptions:
    """The options for one output: no bar of its own (one bar for the folder), a pyramid for a TIFF
    only, resuming only where an interrupted run left a work folder (anywhere else it would just log
    that there is nothing to resume); ``fmt`` is the folder's."""
    return dataclasses.replace(opts, progress=False, fmt=None,
                               pyramid=opts.pyramid and imageio.output_format(dst) == "tiff",
                               resume=opts.resume and work_path(dst).exists())


def _leaves_folder(dst: Path, dst_dir: Path) -> str | None:
    """Why ``dst`` would be written outside ``dst_dir`` (a symlinked folder inside it pointing out),
    or None. The existing part of the path is resolved; folders still to be made are inside."""
    top = dst_dir.resolve()
    parent = dst.parent.resolve()
    if parent != top and top not in parent.parents:
        return f"its folder leads out of the output folder to {parent} (a symlink)"
    return None


def _make_parents(dst: Path) -> list[Path]:
    """Create the missing folders above ``dst``; returns those it created, innermost first."""
    missing = []
    parent = dst.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    dst.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or already gone): leave it


def _reason(exc: Exception, src: Path) -> str:
    """One line saying why, without repeating the file name the report line already starts with."""
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return first.removeprefix(f"{src}: ")


def _input_pixels(path: Path) -> int:
    """The input's pixel count from its header, without decoding it again (for the throughput)."""
    if path.suffix.lower() in PILLOW_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            return im.width * im.height
    with imageio.open_image(path) as source:  # TIFF and zarr are read lazily
        return source.height * source.width


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"
