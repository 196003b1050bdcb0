"""fastsr loses nothing, ever: an interrupted run's tiles are never discarded silently, a full disk
stops a run resumably in one line, bad training options and damaged checkpoints are one-line
errors, metadata (EXIF, DPI, GeoTIFF, OME) reaches the output scaled, and multi-frame inputs
are refused instead of upscaling their first frame only."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from cases import photo
from PIL import Image

import fastsr
from fastsr.cli import main as cli_main
from fastsr.errors import UserError

BACKEND = "torch"
# One thread: on a shared 2-core machine, 2-thread OpenMP ops wait for descheduled peers.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSR_BACKEND": "torch"}

pytestmark = pytest.mark.usefixtures("one_thread")


def work_of(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.fastsr-partial")


def manifest_lines(dst: Path) -> list[str]:
    """The finished batch numbers of ``dst``'s manifests (each line: number, then chunk checksums)."""
    return sorted(line.split()[0] for f in work_of(dst).glob("done.rank*.txt") for line in f.read_text().splitlines())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastsr: error: ") and "\n" not in err, err
    return err


def crash_after(monkeypatch, calls: int) -> None:
    """Make the model call number ``calls + 1`` fail like a crash (the run keeps its finished tiles)."""
    from fastsr.pipeline import engine

    real, seen = engine.Upscaler.run_uint, []

    def crashing(self, batch):
        seen.append(1)
        if len(seen) > calls:
            raise RuntimeError("simulated crash")
        return real(self, batch)

    monkeypatch.setattr(engine.Upscaler, "run_uint", crashing)


def upscale_args(src: Path, dst: Path, model_file: Path, *extra: str) -> list[str]:
    return ["upscale", str(src), str(dst), "--model", str(model_file), "--tile", "16", "--backend", BACKEND,
            "--quiet", *extra]


# ----------------------------------------------------------------------------- 1. rerun without --resume


def test_a_rerun_without_resume_refuses_to_discard_finished_tiles(tmp_path, tiny_model_file, model, monkeypatch,
                                                                  capsys):
    image = photo(48, 64)  # 3 x 4 tiles of 16
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, photometric="rgb")
    crash_after(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    monkeypatch.undo()
    before = manifest_lines(dst)
    assert len(before) == 5
    assert cli_main(upscale_args(src, dst, tiny_model_file)) == 2
    err = one_line_error(capsys)
    assert "5 finished batches (5 tiles)" in err and "--resume" in err and "--restart" in err
    assert manifest_lines(dst) == before  # nothing discarded
    assert cli_main(upscale_args(src, dst, tiny_model_file, "--resume", "--restart")) == 2
    assert "exclude each other" in one_line_error(capsys)
    assert manifest_lines(dst) == before
    assert cli_main(upscale_args(src, dst, tiny_model_file, "--restart")) == 0
    assert not work_of(dst).exists()
    assert np.array_equal(tifffile.imread(dst), fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_a_rerun_counts_tiles_of_larger_batches(tmp_path, model, monkeypatch):
    image = photo(48, 64)  # 12 tiles in batches of 5: 5, 5, 2
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    tifffile.imwrite(src.with_suffix(".tif"), image, photometric="rgb")
    src = src.with_suffix(".tif")
    crash_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fastsr.upscale_file(src, dst, model, tile=16, batch_size=5, progress=False, backend=BACKEND)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"2 finished batches \(10 tiles\)"):
        fastsr.upscale_file(src, dst, model, tile=16, batch_size=5, progress=False, backend=BACKEND)
    fastsr.upscale_file(src, dst, model, tile=16, batch_size=5, progress=False, backend=BACKEND, resume=True)
    assert not work_of(dst).exists()


def test_a_work_folder_without_finished_batches_is_replaced_silently(tmp_path, model, monkeypatch):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, photo(32, 32), photometric="rgb")
    crash_after(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    monkeypatch.undo()
    assert work_of(dst).exists() and manifest_lines(dst) == []
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)  # nothing to lose
    assert dst.exists() and not work_of(dst).exists()


# ----------------------------------------------------------------------------- 2. disk full

NOISE = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # compresses to ~95% of raw


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``size`` bytes (root only): ``small_disk(size)`` mounts it and returns its folder."""
    mounted = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsr", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def assert_resumable(dst: Path, reference: np.ndarray, batches: int) -> list[int]:
    """The work folder of a stopped run: listed batches are whole and equal the reference; nothing
    under the final name, no half-written output file. Returns the listed batches."""
    import zarr

    listed = [int(line) for line in manifest_lines(dst)]
    assert len(listed) == len(set(listed)) < batches
    store = zarr.open_array(str(work_of(dst) / "tiles.zarr"), mode="r")
    side = store.chunks[0]
    cols = -(-store.shape[1] // side)
    for g in listed:  # batch size 1: batch g is tile g
        y, x = divmod(g, cols)
        box = np.s_[y * side:(y + 1) * side, x * side:(x + 1) * side]
        assert np.array_equal(store[box], reference[box]), f"batch {g} is not whole"
    assert not dst.exists()
    assert not list(work_of(dst).glob("output*"))
    return listed


def test_a_noisy_image_that_will_not_fit_stops_early_in_one_line_and_resumes(tmp_path, small_disk):
    """The up-front check (60% compression) passes; the compressed sizes of the first batches show
    that noise needs far more, and the run stops while its finished tiles are intact."""
    src, ref = tmp_path / "noise.tif", tmp_path / "ref.tif"
    tifffile.imwrite(src, NOISE, photometric="rgb")
    fastsr.upscale_file(src, ref, tile=48, progress=False, backend=BACKEND)
    reference = tifffile.imread(ref)
    disk = small_disk(1 << 20)
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * (300 << 10))
    dst = disk / "out.tif"
    r = cli("upscale", str(src), str(dst), "--tile", "48", "--backend", BACKEND, "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fastsr: error: {dst}: not enough disk space: the rest of the run needs about ")
    assert f"free in {disk}" in lines[0] and "rerun with --resume" in lines[0]
    assert_resumable(dst, reference, 4)
    ballast.unlink()  # space freed, and more: the whole run needs about 1 MiB with its margin
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    r = cli("upscale", str(src), str(dst), "--tile", "48", "--backend", BACKEND, "--quiet", "--resume")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(tifffile.imread(dst), reference)
    assert sorted(p.name for p in disk.iterdir()) == ["out.tif"]


def fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` to the last byte, as another program would."""
    with open(folder / "ballast", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
                f.flush()


def test_a_disk_filled_by_someone_else_mid_run_stops_in_one_line_and_resumes(tmp_path, small_disk, monkeypatch,
                                                                               capsys):
    from fastsr.pipeline import engine

    src, ref = tmp_path / "noise.tif", tmp_path / "ref.tif"
    tifffile.imwrite(src, NOISE, photometric="rgb")
    fastsr.upscale_file(src, ref, tile=48, progress=False, backend=BACKEND)
    disk = small_disk(4 << 20)
    dst = disk / "out.tif"
    real, calls = engine.Upscaler.run_uint, []

    def filling(self, batch):
        calls.append(1)
        if len(calls) == 3:
            fill(disk)
        return real(self, batch)

    monkeypatch.setattr(engine.Upscaler, "run_uint", filling)
    assert cli_main(upscale_args(src, dst, "default", "--tile", "48")) == 2
    err = one_line_error(capsys)
    assert f"fastsr: error: {dst}: " in err and ("no space left on device" in err or "not enough disk space" in err)
    assert "rerun with --resume" in err
    assert_resumable(dst, tifffile.imread(ref), 4)
    monkeypatch.undo()
    (disk / "ballast").unlink()
    assert cli_main(upscale_args(src, dst, "default", "--tile", "48", "--resume")) == 0
    assert np.array_equal(tifffile.imread(dst), tifffile.imread(ref))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_chunk_write_failing_for_want_of_space_keeps_the_finished_batches(tmp_path, model, monkeypatch, capsys,
                                                                              code):
    from fastsr.pipeline import stream

    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    image = photo(48, 64)
    tifffile.imwrite(src, image, photometric="rgb")
    real, calls = stream.paste, []

    def paste(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "paste", paste)
    with pytest.raises(fastsr.imageio.DiskFullError, match=os.strerror(code).lower()) as info:
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    assert "\n" not in str(info.value) and "3 of 12 batches are finished and kept" in str(info.value)
    assert manifest_lines(dst) == ["0", "1", "2"]
    monkeypatch.undo()
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    assert np.array_equal(tifffile.imread(dst), fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_too_little_free_space_measured_after_a_batch_stops_the_run(tmp_path, model, monkeypatch):
    from fastsr.pipeline.assemble import SpaceWatch

    src, dst = tmp_path / "in.tif", tmp_path / "out.png"
    image = photo(48, 64)
    tifffile.imwrite(src, image, photometric="rgb")
    monkeypatch.setattr(SpaceWatch, "free", lambda self: 4096)
    with pytest.raises(fastsr.imageio.DiskFullError, match=r"not enough disk space: .* 4\.0 KiB free"):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    assert manifest_lines(dst) == ["0"]  # judged after the first batch (8% of the output)
    monkeypatch.undo()
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    assert np.array_equal(np.asarray(Image.open(dst)), fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_a_writer_failing_while_the_model_waits_for_the_reader_stops_the_run(tmp_path, model, monkeypatch):
    """The reader slower than the model: the calling thread waits on an empty queue when the writer
    fails, and the reader stops without filling it. The run must end in its error, not wait for ever
    (CI once hung here, at the test above, on a host where the reader was the slow thread)."""
    import threading
    import time

    from fastsr.pipeline.assemble import SpaceWatch
    from fastsr.tiling import TilePlan

    src, dst = tmp_path / "in.tif", tmp_path / "out.png"
    tifffile.imwrite(src, photo(48, 64), photometric="rgb")
    monkeypatch.setattr(SpaceWatch, "free", lambda self: 4096)  # the writer fails after the first batch
    real, reads = TilePlan.read, []

    def slow_read(self, *args, **kwargs):
        reads.append(1)
        if len(reads) > 1:
            time.sleep(0.3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TilePlan, "read", slow_read)
    raised = []

    def run():
        try:
            fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
        except fastsr.imageio.DiskFullError as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the run hung after its writer failed"
    assert len(raised) == 1 and "4.0 KiB free" in str(raised[0])
    assert manifest_lines(dst) == ["0"]


@pytest.mark.parametrize("suffix,writer", [(".png", "write_pillow"), (".tif", "write_tiff")])
def test_the_output_file_failing_for_want_of_space_keeps_every_batch(tmp_path, model, monkeypatch, suffix, writer):
    """The last step (the PNG at the end, the TIFF written alongside) runs out of space: all tiles
    stay, and a resume only writes the file."""
    src, dst = tmp_path / "in.tif", tmp_path / f"out{suffix}"
    image = photo(32, 48)
    tifffile.imwrite(src, image, photometric="rgb")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(fastsr.imageio, writer, full)
    with pytest.raises(fastsr.imageio.DiskFullError, match="no space left on device: .* 6 of 6 batches are finished"):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    assert len(manifest_lines(dst)) == 6 and not dst.exists()
    monkeypatch.undo()
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    got = tifffile.imread(dst) if suffix == ".tif" else np.asarray(Image.open(dst))
    assert np.array_equal(got, fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_a_line_cut_short_in_the_manifest_is_dropped_not_joined(tmp_path, model, monkeypatch):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, photo(48, 64), photometric="rgb")
    crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    manifest = next(work_of(dst).glob("done.rank*.txt"))
    with open(manifest, "ab") as f:
        f.write(b"1")  # "1" of "11\n", cut short by a full disk or a power cut
    monkeypatch.undo()
    crash_after(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    assert [line.split()[0] for line in manifest.read_text().splitlines()] == ["0", "1", "2", "3", "4"]


# ----------------------------------------------------------------------------- 3. training: one-line errors


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from fastsr.data import export_skimage_photos

    root = tmp_path_factory.mktemp("photos")
    export_skimage_photos(root, ("chelsea", "coins"))
    return root


def train_args(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(photos), "--out", str(out), "--steps", "2", "--batch-size", "2", "--crop", "32",
            "--num-blocks", "1", "--channels", "8", "--save-every", "1", "--log-every", "1", "--backend", BACKEND,
            *extra]


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--lr", "0"], "--lr must be greater than 0, got 0"),
    (["--lr=-1e-4"], "--lr must be greater than 0, got -0.0001"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--min-lr", "-1"], "--min-lr must be at least 0, got -1"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.0002"),
    (["--crop", "0"], "--crop must be at least 1, got 0"),
    (["--crop", "30"], "--crop 30 must be a multiple of --scale 4"),
    (["--channels", "0"], "--channels must be at least 1, got 0"),
    (["--num-blocks", "-1"], "--num-blocks must be at least 0, got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0, got -1"),
    (["--ema-decay", "1"], "--ema-decay must be less than 1, got 1"),
    (["--ema-decay", "-0.5"], "--ema-decay must be at least 0, got -0.5"),
    (["--save-every", "0"], "--save-every must be at least 1, got 0"),
    (["--log-every", "-1"], "--log-every must be at least 1, got -1"),
    (["--stop-at", "0"], "--stop-at must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--d-channels", "0"], "--d-channels must be at least 1, got 0"),
    (["--d-lr", "0"], "--d-lr must be greater than 0, got 0"),
    (["--adv-weight", "-1"], "--adv-weight must be at least 0, got -1"),
    (["--pixel-weight", "nan"], "--pixel-weight must be a finite number, got nan"),
])
def test_nonsensical_training_numbers_are_one_line_errors(photos, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli_main(train_args(photos, out, *extra)) == 2
    assert one_line_error(capsys).startswith(f"fastsr: error: {message}")
    assert not out.exists()  # refused before anything is written


@pytest.fixture(scope="module")
def finished_run(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(train_args(photos, out)) == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "another kind of file"])
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(photos, finished_run, tmp_path, capsys, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[:len(data) // 2], "random bytes": np.random.default_rng(0).bytes(4096),
                      "empty": b""}.get(damage, b""))
    if damage == "another kind of file":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    capsys.readouterr()
    assert cli_main(train_args(photos, out, "--steps", "4", "--resume")) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"fastsr: error: cannot resume: {ckpt} ")
    assert ("is empty (0 bytes)" if damage == "empty" else "is not a readable training checkpoint") in err
    assert f"--init {out / 'model.safetensors'}" in err


def test_resume_with_other_model_options_is_a_one_line_error(photos, finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    argv = train_args(photos, out, "--steps", "4", "--resume")
    argv[argv.index("--channels") + 1] = "16"
    assert cli_main(argv) == 2
    err = one_line_error(capsys)
    assert "does not fit this run's options" in err and "--scale 4 --num-blocks 1 --channels 8" in err


def test_a_damaged_checkpoint_error_has_no_traceback(photos, finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    r = cli(*train_args(photos, out, "--steps", "4", "--resume"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- 4. metadata


def small(h: int = 12, w: int = 16) -> np.ndarray:
    return photo(h, w)


def upscale_to(src: Path, dst: Path) -> None:
    """With the embedded default model (x4), as users run it."""
    fastsr.upscale_file(src, dst, progress=False, backend=BACKEND)


def camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Camera Maker", "Model 7", 6  # orientation 6: turn 90 degrees
    exif[0x011A] = exif[0x011B] = 300.0
    exif[0x0128] = 2  # inch
    ifd = exif.get_ifd(0x8769)
    ifd[0xA002], ifd[0xA003], ifd[0x829A] = 16, 12, 0.01  # PixelX/YDimension as stored, exposure time
    return exif


@pytest.mark.parametrize("dst_suffix", [".jpg", ".png", ".webp"])
def test_exif_is_carried_with_the_output_dimensions_and_orientation_1(tmp_path, dst_suffix):
    src, dst = tmp_path / "in.jpg", tmp_path / f"out{dst_suffix}"
    Image.fromarray(small()).save(src, exif=camera_exif(), dpi=(300, 300), quality=95)  # 16 x 12 stored
    upscale_to(src, dst)
    out = Image.open(dst)
    assert out.size == (48, 64)  # shown upright (12 x 16), x4
    exif = out.getexif()
    assert exif[0x0112] == 1 and exif[0x010F] == "Camera Maker" and exif[0x0110] == "Model 7"
    ifd = exif.get_ifd(0x8769)
    assert (ifd[0xA002], ifd[0xA003]) == (48, 64)
    assert float(ifd[0x829A]) == pytest.approx(0.01)
    assert float(exif[0x011A]) == float(exif[0x011B]) == 1200.0


def test_exif_text_reaches_a_tiff_output(tmp_path):
    src, dst = tmp_path / "in.jpg", tmp_path / "out.tif"
    Image.fromarray(small()).save(src, exif=camera_exif(), quality=95)
    upscale_to(src, dst)
    with tifffile.TiffFile(dst) as tif:
        tags = tif.pages.first.tags
        assert tags["Make"].value == "Camera Maker" and tags["Model"].value == "Model 7"


@pytest.mark.parametrize("src_suffix,dst_suffix", [(".png", ".png"), (".jpg", ".jpg"), (".png", ".tif"),
                                                   (".tif", ".tif"), (".tif", ".png")])
def test_dpi_is_scaled_so_the_physical_size_stays(tmp_path, src_suffix, dst_suffix):
    src, dst = tmp_path / f"in{src_suffix}", tmp_path / f"out{dst_suffix}"
    if src_suffix == ".tif":
        tifffile.imwrite(src, small(), photometric="rgb", resolution=(300, 300), resolutionunit="INCH")
    else:
        Image.fromarray(small()).save(src, dpi=(300, 300))
    upscale_to(src, dst)
    if dst_suffix == ".tif":
        with tifffile.TiffFile(dst) as tif:
            tags = tif.pages.first.tags
            x, y = tags["XResolution"].value, tags["YResolution"].value
            assert x[0] / x[1] == pytest.approx(1200, rel=1e-4) and y[0] / y[1] == pytest.approx(1200, rel=1e-4)
            assert tags["ResolutionUnit"].value == 2  # inch
    else:
        assert Image.open(dst).info["dpi"] == pytest.approx((1200, 1200), rel=1e-4)


def test_a_centimetre_resolution_stays_in_centimetres(tmp_path):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, small(), photometric="rgb", resolution=(100, 50), resolutionunit="CENTIMETER")
    upscale_to(src, dst)
    with tifffile.TiffFile(dst) as tif:
        tags = tif.pages.first.tags
        assert tags["XResolution"].value == (400, 1) and tags["YResolution"].value == (200, 1)
        assert tags["ResolutionUnit"].value == 3


GEO_KEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 2048, 0, 1, 4326, 3073, 34737, 7, 0)  # PixelIsArea, WGS 84


def geotiff(path: Path, *, tiepoint=(0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), keys=GEO_KEYS, transform=None):
    tags = [(34735, 3, len(keys), keys, True), (34736, 12, 2, (6378137.0, 298.257223563), True),
            (34737, 2, 0, "WGS 84|", True), (42113, 2, 0, "255", True)]
    if transform is None:
        tags += [(33550, 12, 3, (0.5, 0.25, 0.0), True), (33922, 12, len(tiepoint), tiepoint, True)]
    else:
        tags.append((34264, 12, 16, transform, True))
    tifffile.imwrite(path, small(), photometric="rgb", extratags=tags, metadata=None)


def tags_of(path: Path) -> dict:
    with tifffile.TiffFile(path) as tif:
        return {tag.code: tag.value for tag in tif.pages.first.tags.values()}


def test_geotiff_tags_are_carried_with_the_pixel_size_divided(tmp_path):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    geotiff(src)
    upscale_to(src, dst)
    tags = tags_of(dst)
    assert tags[33550] == (0.125, 0.0625, 0.0)
    assert tags[33922] == (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0)  # the corner stays where it was
    assert tags[34735] == GEO_KEYS and tags[34736] == (6378137.0, 298.257223563)
    assert tags[34737] == "WGS 84|" and tags[42113] == "255"


def test_a_tie_point_inside_the_raster_moves_with_the_pixels(tmp_path):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    geotiff(src, tiepoint=(0, 0, 0, 500000, 4000000, 0, 10, 5, 0, 500005, 3999998.75, 0))
    upscale_to(src, dst)
    assert tags_of(dst)[33922] == (0, 0, 0, 500000, 4000000, 0, 40, 20, 0, 500005, 3999998.75, 0)


def test_a_pixel_is_point_raster_keeps_its_pixel_centres_in_place(tmp_path):
    """PixelIsPoint: raster coordinates are pixel centres; input pixel 0's centre is at output 1.5."""
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    keys = list(GEO_KEYS)
    keys[11] = 2  # GTRasterTypeGeoKey = PixelIsPoint
    geotiff(src, keys=tuple(keys))
    upscale_to(src, dst)
    assert tags_of(dst)[33922] == (1.5, 1.5, 0.0, 500000.0, 4000000.0, 0.0)


def test_a_model_transformation_is_scaled(tmp_path):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    m = (0.5, 0.1, 0.0, 500000.0, -0.1, -0.25, 0.0, 4000000.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geotiff(src, transform=m)
    upscale_to(src, dst)
    out = np.array(tags_of(dst)[34264]).reshape(4, 4)
    assert np.allclose(out @ [8, 12, 0, 1], np.array(m).reshape(4, 4) @ [2, 3, 0, 1])  # same place on the ground
    assert np.allclose(out[:2, :2], np.array(m).reshape(4, 4)[:2, :2] / 4)


def test_ome_tiff_physical_size_is_divided_and_sizes_updated(tmp_path):
    import xml.etree.ElementTree as ET

    src, dst = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    tifffile.imwrite(src, small(), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeYUnit": "µm", "Name": "cells"})
    upscale_to(src, dst)
    with tifffile.TiffFile(dst) as tif:
        assert tif.is_ome
        out = ET.fromstring(tif.ome_metadata)
        assert tif.series[0].shape == (48, 64, 3)
    with tifffile.TiffFile(src) as tif:
        before = ET.fromstring(tif.ome_metadata)
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = out.find("ome:Image/ome:Pixels", ns)
    assert (pixels.get("SizeX"), pixels.get("SizeY")) == ("64", "48")
    assert float(pixels.get("PhysicalSizeX")) == 0.125 and float(pixels.get("PhysicalSizeY")) == 0.0625
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    assert out.find("ome:Image", ns).get("Name") == "cells"
    assert out.get("UUID") != before.get("UUID")


def test_metadata_survives_resume_and_the_pyramid(tmp_path, monkeypatch):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    geotiff(src)
    crash_after(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        fastsr.upscale_file(src, dst, tile=16, pyramid=True, progress=False, backend=BACKEND)
    monkeypatch.undo()
    fastsr.upscale_file(src, dst, tile=16, pyramid=True, progress=False, backend=BACKEND, resume=True)
    assert tags_of(dst)[33550] == (0.125, 0.0625, 0.0)


# ----------------------------------------------------------------------------- 5. multi-frame inputs


def frames(n: int = 3) -> list:
    return [Image.fromarray(np.full((12, 16, 3), 40 * i, np.uint8)) for i in range(n)]


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp"])
def test_an_animation_is_refused_not_cut_to_its_first_frame(tmp_path, capsys, tiny_model_file, suffix):
    src, dst = tmp_path / f"anim{suffix}", tmp_path / "out.png"
    first, *rest = frames()
    first.save(src, save_all=True, append_images=rest)
    assert cli_main(["upscale", str(src), str(dst), "--model", str(tiny_model_file), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"{src}: holds 3 frames" in err and "extract the frames first" in err
    assert not dst.exists()


@pytest.mark.parametrize("layout", ["pillow pages", "tifffile pages", "ome series", "z stack"])
def test_a_multi_page_tiff_is_refused(tmp_path, capsys, tiny_model_file, layout):
    src, dst = tmp_path / "pages.tif", tmp_path / "out.tif"
    if layout == "pillow pages":
        first, *rest = frames()
        first.save(src, save_all=True, append_images=rest)
    elif layout == "tifffile pages":
        with tifffile.TiffWriter(src) as tif:
            for f in frames():
                tif.write(np.asarray(f), photometric="rgb", metadata=None)
    elif layout == "ome series":
        with tifffile.TiffWriter(src, ome=True) as tif:
            for f in frames():
                tif.write(np.asarray(f), photometric="rgb")
    else:
        tifffile.imwrite(src, np.zeros((3, 12, 16), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    assert cli_main(["upscale", str(src), str(dst), "--model", str(tiny_model_file), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"{src}: holds 3 pages or frames" in err and "extract the pages first" in err
    assert not dst.exists()


def test_single_images_with_extra_pages_are_not_refused(tmp_path, model):
    """A pyramid (SubIFDs or reduced pages), a thumbnail page, channel planes and a one-frame GIF
    are one image each."""
    pyramid, thumb, planes, gif = (tmp_path / n for n in ("pyramid.tif", "thumb.tif", "planes.tif", "one.gif"))
    Image.fromarray(small(32, 32)).save(tmp_path / "src.png")
    fastsr.upscale_file(tmp_path / "src.png", pyramid, model, tile=16, pyramid=True, progress=False, backend=BACKEND)
    with tifffile.TiffFile(pyramid) as tif:
        assert len(tif.series[0].levels) == 2  # the base and one SubIFD level
    with tifffile.TiffWriter(thumb) as tif:
        tif.write(small(), photometric="rgb", metadata=None)
        tif.write(small(6, 8), photometric="rgb", metadata=None, subfiletype=1)
    tifffile.imwrite(planes, np.ascontiguousarray(small().transpose(2, 0, 1)), imagej=True, metadata={"axes": "CYX"})
    frames(1)[0].save(gif)
    for src in (pyramid, thumb, planes, gif):
        fastsr.upscale_file(src, tmp_path / f"out-{src.stem}.tif", model, tile=16, progress=False, backend=BACKEND)


def ome_zarr(path: Path, image: np.ndarray, version: str = "0.5", extra_axes: str = "") -> None:
    """An OME-Zarr image of the (H, W, C) ``image``: axes ``extra_axes`` (single planes) + c, y, x,
    0.5 on zarr v3 or 0.4 on zarr v2, two levels, a scale and a translation."""
    import zarr

    planes = image.transpose(2, 0, 1).reshape((1,) * len(extra_axes) + (image.shape[2], *image.shape[:2]))
    kinds = {"t": "time", "z": "space", "c": "channel"}
    axes = [{"name": a, "type": kinds[a]} for a in extra_axes + "c"] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    ones = [1.0] * (len(extra_axes) + 1)
    datasets = [{"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": [*ones, 0.5 * 2 ** level, 0.25 * 2 ** level]},
        {"type": "translation", "translation": [*([0.0] * len(ones)), 10.0, 20.0]}]} for level in (0, 1)]
    image_meta = {"name": "cells", "axes": axes, "datasets": datasets}
    omero = {"channels": [{"label": c, "color": "FFFFFF"} for c in "RGB"]}
    if version == "0.5":
        group = zarr.create_group(str(path), zarr_format=3,
                                  attributes={"ome": {"version": "0.5", "multiscales": [image_meta], "omero": omero}})
    else:
        group = zarr.create_group(str(path), zarr_format=2,
                                  attributes={"multiscales": [{"version": "0.4", **image_meta}], "omero": omero})
    group.create_array("0", data=planes, chunks=planes.shape)
    group.create_array("1", data=planes[..., ::2, ::2], chunks=planes.shape)


@pytest.mark.parametrize("version,extra_axes", [("0.5", ""), ("0.4", "tz")])
def test_ome_zarr_scale_is_divided_for_the_output(tmp_path, model, version, extra_axes):
    import zarr

    image = small()
    src, dst = tmp_path / "in.zarr", tmp_path / "out.zarr"
    ome_zarr(src, image, version, extra_axes)
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    group = zarr.open_group(str(dst), mode="r")
    meta = group.attrs["ome"]
    assert meta["version"] == "0.5" and meta["omero"]["channels"][0]["label"] == "R"
    (out_image,) = meta["multiscales"]
    assert [a["name"] for a in out_image["axes"]] == ["c", "y", "x"] and out_image["name"] == "cells"
    (dataset,) = out_image["datasets"]
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 0.125, 0.0625]},
                                                    {"type": "translation", "translation": [0.0, 10.0, 20.0]}]
    planes = np.asarray(group[dataset["path"]])
    assert planes.shape == (3, 48, 64)
    assert np.array_equal(planes.transpose(1, 2, 0), fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_an_ome_zarr_stack_is_refused(tmp_path, model):
    import zarr

    src = tmp_path / "stack.zarr"
    ome_zarr(src, small())
    group = zarr.open_group(str(src), mode="r+")
    attrs = dict(group.attrs)
    image = attrs["ome"]["multiscales"][0]
    image["axes"].insert(0, {"name": "z", "type": "space"})
    for d in image["datasets"]:
        d["coordinateTransformations"] = [{"type": "scale", "scale": [1.0] * 4}]
    group.attrs.put(attrs)
    del group["0"]
    group.create_array("0", data=np.zeros((5, 3, 12, 16), np.uint8))
    with pytest.raises(fastsr.imageio.MultiFrameError, match=r"holds 5 planes"):
        fastsr.upscale_file(src, tmp_path / "out.zarr", model, tile=16, progress=False, backend=BACKEND)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_last_one_survives(photos, tmp_path, small_disk,
                                                                                      capsys):
    disk = small_disk(400 << 10)  # one checkpoint (~220 KB) and the exported model fit, not a second beside it
    out = disk / "run"
    argv = train_args(photos, out, "--steps", "4")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's line
    assert err.startswith("fastsr: error: ") and "no space left on device" in err
    assert f"the last checkpoint in {out} is intact" in err
    assert "rerun with --resume" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    assert cli_main([*argv, "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("out,message", [("afile", "exists and is not a folder"),
                                         ("afile/run", "cannot create the run folder")])
def test_an_impossible_run_folder_is_one_line(photos, tmp_path, capsys, out, message):
    (tmp_path / "afile").write_text("not a folder")
    assert cli_main(train_args(photos, tmp_path / out)) == 2
    assert message in one_line_error(capsys)


def test_a_missing_gpu_is_one_line(photos, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli_main(train_args(photos, tmp_path / "run", "--device", "cuda")) == 2
    assert "no CUDA GPU is available" in one_line_error(capsys)


@pytest.mark.parametrize("dst_suffix", [".tif", ".jpg"])
def test_tiff_camera_text_is_carried(tmp_path, dst_suffix):
    src, dst = tmp_path / "in.tif", tmp_path / f"out{dst_suffix}"
    tifffile.imwrite(src, small(), photometric="rgb", metadata=None,
                     extratags=[(271, 2, 0, "Scanner Co", True), (33432, 2, 0, "(c) someone", True)])
    upscale_to(src, dst)
    if dst_suffix == ".tif":
        tags = tags_of(dst)
        assert tags[271] == "Scanner Co" and tags[33432] == "(c) someone"
    else:
        exif = Image.open(dst).getexif()
        assert exif[271] == "Scanner Co" and exif[33432] == "(c) someone"


def test_a_camera_jpeg_with_a_preview_image_is_upscaled_not_refused(tmp_path, model):
    """MPO: a camera JPEG carrying a second (preview or depth) image; the first one is the photo."""
    src = tmp_path / "camera.jpg"
    photo_image, preview = Image.fromarray(small()), Image.fromarray(small()[::2, ::2])
    photo_image.save(src, format="MPO", save_all=True, append_images=[preview], quality=95)
    assert Image.open(src).format == "MPO" and Image.open(src).n_frames == 2
    fastsr.upscale_file(src, tmp_path / "out.png", model, progress=False, backend=BACKEND)
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def test_resume_recomputes_a_chunk_whose_checksum_changed(tmp_path, model, monkeypatch):
    """A chunk that still decodes but is not what was written (stale, overwritten, bit rot) fails
    its CRC-32 from the manifest: that batch is computed again, the output is still exact."""
    image = photo(48, 64)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, photometric="rgb")
    crash_after(monkeypatch, 4)
    with pytest.raises(RuntimeError):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    monkeypatch.undo()
    chunks = sorted((work_of(dst) / "tiles.zarr" / "c").rglob("0"))
    first, second = [c for c in chunks if c.is_file()][:2]
    first.write_bytes(second.read_bytes())  # a valid chunk, the wrong one
    line = next(work_of(dst).glob("done.rank*.txt")).read_text().splitlines()[0]
    assert len(line.split()) == 2 and all(len(c) == 8 for c in line.split()[1].split(","))
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    assert np.array_equal(tifffile.imread(dst), fastsr.upscale(image, model, tile=16, backend=BACKEND))


def test_no_space_to_create_the_work_folder_is_one_line(tmp_path, model, monkeypatch, capsys):
    import errno

    from fastsr.cli import main
    from fastsr.pipeline import files

    src = tmp_path / "in.png"
    Image.fromarray(photo(16, 16)).save(src)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "WorkDir", full)
    assert main(["upscale", str(src), str(tmp_path / "out.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left to start the run" in err, err
    assert not (tmp_path / "out.png").exists()


def test_in_memory_pil_image_keeps_its_profile_and_physical_size(model):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im = Image.fromarray(photo(12, 10))
    im.info.update({"icc_profile": icc, "dpi": (300, 300)})
    out = fastsr.upscale(im, model)
    assert out.info["icc_profile"] == icc and out.info["dpi"] == (1200, 1200)


def test_16bit_color_png_output_keeps_profile_dpi_and_exif(tmp_path, model):
    """Pillow cannot write 16-bit color PNG (imagecodecs does): fastsr adds the metadata chunks."""
    import imagecodecs
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "fastsr camera"  # Make
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    fastsr.imageio.write_pillow(src, photo(12, 10).astype(np.uint16) * 257,
                                metadata=fastsr.imageio.Metadata(icc_profile=icc, exif=exif.tobytes(),
                                                                 resolution=(300.0, 300.0)))
    fastsr.upscale_file(src, dst, model, progress=False)
    with Image.open(dst) as im:
        assert im.info["icc_profile"] == icc
        assert tuple(round(d) for d in im.info["dpi"]) == (1200, 1200)
        assert im.getexif()[0x010F] == "fastsr camera"
    assert imagecodecs.png_decode(dst.read_bytes()).dtype == np.uint16


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_matches_pillow_exif_transpose(orientation):
    from PIL import ImageOps

    from fastsr.imageio import upright

    array = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(upright(array, orientation), expected)
