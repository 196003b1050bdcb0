"""fastsr.upscale / upscale_file / `fastsr upscale`: kinds of input, file formats, streaming in
bounded memory, resume after kill -9, thread safety, and every bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from backends import require_backend
from cases import photo
from PIL import Image

import fastsr
from fastsr.cli import main as cli_main
from fastsr.errors import UserError

BACKEND = "torch"
# One thread: on a shared 2-core machine, 2-thread OpenMP ops wait for descheduled peers (16x slower here).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSR_BACKEND": "torch"}


pytestmark = pytest.mark.usefixtures("one_thread")


def no_leftovers(folder: Path, keep: set[str]) -> None:
    extra = {p.name for p in folder.iterdir()} - keep
    assert not extra, f"files left behind: {extra}"


# ----------------------------------------------------------------------------- in-memory API


def test_kinds_in_same_kind_out(model):
    rgb = photo()
    out = fastsr.upscale(rgb, model, backend=BACKEND)
    assert out.shape == (256, 320, 3) and out.dtype == np.uint8
    pil = fastsr.upscale(Image.fromarray(rgb), model, backend=BACKEND)
    assert pil.mode == "RGB" and pil.size == (320, 256)
    assert np.array_equal(np.asarray(pil), out)
    x = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255  # (C, H, W), float64 in -> float64 out
    t = fastsr.upscale(x, model, backend=BACKEND)
    assert t.shape == (3, 256, 320) and t.dtype == torch.float64
    assert np.abs(np.round(t.clamp(0, 1).permute(1, 2, 0).numpy() * 255) - out).max() <= 1


def test_cpp_backend_converts_to_uint8_in_one_pass_like_torch(model):
    """On the cpp backend the float -> uint8 step is the fused to_uint8 op: the result matches the
    torch backend's (round half to even, clamped), up to 1 level where float noise of the two
    backends' convolutions straddles a rounding boundary."""
    require_backend("cpp")
    from fastsr.pipeline import Upscaler

    up = Upscaler(model, device="cpu", backend="cpp")
    x = torch.from_numpy(photo()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        y = up.forward(x)
    expected = y.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(up.run_uint(photo()[None]), expected)
    diff = np.abs(fastsr.upscale(photo(), model, backend="cpp").astype(int)
                  - fastsr.upscale(photo(), model, backend=BACKEND).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_gray_16bit_and_alpha(model):
    rgb = photo(32, 40)
    gray16 = (rgb[..., 0].astype(np.uint16) * 257)
    out16 = fastsr.upscale(gray16, model, backend=BACKEND)
    assert out16.shape == (128, 160) and out16.dtype == np.uint16
    # Gray is run as RGB and averaged: equal to the mean of the RGB result of the replicated image.
    rep = fastsr.upscale(torch.from_numpy(gray16 / 65535.0).float()[None, None].expand(1, 3, -1, -1), model,
                         backend=BACKEND)
    assert np.abs(out16.astype(float) - np.round(rep.mean(1)[0].clamp(0, 1).numpy() * 65535)).max() <= 1
    pil16 = fastsr.upscale(Image.fromarray(gray16), model, backend=BACKEND)
    assert pil16.mode in ("I;16", "I") and pil16.size == (160, 128)

    alpha = np.linspace(0, 255, 32 * 40).reshape(32, 40).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    out = fastsr.upscale(Image.fromarray(rgba, "RGBA"), model, backend=BACKEND)
    assert out.mode == "RGBA"
    out = np.asarray(out)
    assert np.array_equal(out[..., :3], fastsr.upscale(rgb, model, backend=BACKEND))  # colour: the model
    # alpha: bicubic, of the image padded like the colour (border="mirror": 10 pixels, numpy "symmetric")
    padded = np.pad(alpha, 10, mode="symmetric")
    bicubic = F.interpolate(torch.from_numpy(padded)[None, None].float() / 255, scale_factor=4, mode="bicubic",
                            align_corners=False).clamp(0, 1)[0, 0, 40:-40, 40:-40].numpy() * 255
    assert np.abs(out[..., 3] - np.round(bicubic)).max() <= 1


def test_bad_in_memory_inputs(model):
    with pytest.raises(UserError, match="dtype float32"):
        fastsr.upscale(np.zeros((8, 8, 3), np.float32), model)
    with pytest.raises(UserError, match="zero size"):
        fastsr.upscale(np.zeros((0, 8, 3), np.uint8), model)
    with pytest.raises(UserError, match="5 channels"):
        fastsr.upscale(np.zeros((8, 8, 5), np.uint8), model)
    with pytest.raises(UserError, match="unsupported image mode 'CMYK'"):
        fastsr.upscale(Image.new("CMYK", (8, 8)), model)
    with pytest.raises(UserError, match="tensor input"):
        fastsr.upscale(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), model)
    with pytest.raises(UserError, match="dtype"):
        fastsr.upscale(photo(8, 8), model, dtype="fp64")


def test_thread_safe(model):
    images = [photo(24 + 8 * i, 40) for i in range(4)]
    expected = [fastsr.upscale(im, model, backend=BACKEND, tile=16) for im in images]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = fastsr.upscale(images[i], model, backend=BACKEND, tile=16)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert np.array_equal(results[i], expected[i])


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("dst_suffix", [".tif", ".zarr"])
def test_several_writer_threads_give_the_same_file(tmp_path, model, monkeypatch, dst_suffix):
    """On a GPU several threads compress finished tiles (each owns whole chunks); the output is
    the one-writer output, and the TIFF still gets its tiles in row-major order."""
    import importlib

    import zarr

    monkeypatch.setattr(importlib.import_module("fastsr.pipeline.files"), "writer_threads", lambda device: 3)
    image = photo(70, 90)
    src, dst = tmp_path / "in.tif", tmp_path / f"out{dst_suffix}"
    tifffile.imwrite(src, image, tile=(16, 16), photometric="rgb")
    fastsr.upscale_file(src, dst, model, tile=16, batch_size=2, progress=False, backend=BACKEND)
    got = tifffile.imread(dst) if dst_suffix == ".tif" else zarr.open_array(str(dst), mode="r")[...]
    # Bit-equality is guaranteed for the same tile plan and batch composition (tile and batch size).
    assert np.array_equal(got, fastsr.upscale(image, model, tile=16, batch_size=2, backend=BACKEND))
    no_leftovers(tmp_path, {src.name, dst.name})


@pytest.mark.parametrize("src_kind,dst_suffix", [("tiled-tiff", ".tif"), ("stripped-tiff", ".zarr"), ("npy", ".png"),
                                                  ("zarr", ".tif"), ("png", ".png")])
def test_file_formats_match_in_memory(tmp_path, model, src_kind, dst_suffix):
    image = photo(50, 70)
    if src_kind == "tiled-tiff":
        src = tmp_path / "in.tif"
        tifffile.imwrite(src, image, tile=(16, 16), compression="zlib", photometric="rgb")
    elif src_kind == "stripped-tiff":
        src = tmp_path / "in.tif"
        tifffile.imwrite(src, image, rowsperstrip=7, photometric="rgb")
    elif src_kind == "npy":
        src = tmp_path / "in.npy"
        np.save(src, image)
    elif src_kind == "zarr":
        from fastsr.imageio import create_zarr

        src = tmp_path / "in.zarr"
        create_zarr(src, image.shape, (16, 16, 3), np.uint8)[...] = image
    else:
        src = tmp_path / "in.png"
        Image.fromarray(image).save(src)
    dst = tmp_path / f"out{dst_suffix}"
    fastsr.upscale_file(src, dst, model, tile=20, progress=False, backend=BACKEND)
    expected = fastsr.upscale(image, model, tile=20, backend=BACKEND)
    if dst_suffix == ".tif":
        with tifffile.TiffFile(dst) as tif:
            assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].tilelength == 80
            got = tif.asarray()
    elif dst_suffix == ".zarr":
        import zarr

        arr = zarr.open_array(dst, mode="r")
        assert arr.chunks == (80, 80, 3)
        got = arr[...]
    else:
        got = np.asarray(Image.open(dst))
    assert np.array_equal(got, expected)
    no_leftovers(tmp_path, {src.name, dst.name})


def test_a_gray_zarr_comes_out_2d_as_tiff_and_png_do(tmp_path, model):
    """A 2-D (H, W) gray image keeps its shape in every output format; the .zarr one was (H, W, 1)."""
    import zarr

    from fastsr.imageio import create_zarr

    gray = photo(40, 36)[..., 1]
    src = tmp_path / "in.zarr"
    create_zarr(src, gray.shape, (16, 16), np.uint8)[...] = gray
    outs = {suffix: tmp_path / f"out{suffix}" for suffix in (".zarr", ".tif")}
    for dst in outs.values():
        fastsr.upscale_file(src, dst, model, tile=20, progress=False, backend=BACKEND)
    got = zarr.open_array(str(outs[".zarr"]), mode="r")[...]
    assert got.shape == (160, 144)
    assert np.array_equal(got, tifffile.imread(outs[".tif"]))
    no_leftovers(tmp_path, {src.name, *(d.name for d in outs.values())})


@pytest.mark.parametrize("dst_suffix", [".tif", ".png"])
def test_a_16bit_color_png_stays_16bit(tmp_path, model, dst_suffix):
    """Pillow reads 16-bit RGB PNGs as 8-bit; fastsr decodes them with imagecodecs and keeps 16 bits."""
    import imagecodecs

    image = photo(24, 20).astype(np.uint16) * 257 + np.arange(24 * 20 * 3, dtype=np.uint16).reshape(24, 20, 3) % 251
    src, dst = tmp_path / "in16.png", tmp_path / f"out{dst_suffix}"
    src.write_bytes(imagecodecs.png_encode(image))
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    got = tifffile.imread(dst) if dst_suffix == ".tif" else imagecodecs.png_decode(dst.read_bytes())
    assert got.dtype == np.uint16 and got.shape == (96, 80, 3)
    assert np.array_equal(got, fastsr.upscale(image, model, tile=16, backend=BACKEND))


@pytest.mark.parametrize("src_suffix,dst_suffix", [(".png", ".png"), (".jpg", ".tif"), (".tif", ".tif"),
                                                   (".tif", ".jpg")])
def test_the_icc_profile_is_carried_to_the_output(tmp_path, model, src_suffix, dst_suffix):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src, dst = tmp_path / f"in{src_suffix}", tmp_path / f"out{dst_suffix}"
    if src_suffix == ".tif":
        tifffile.imwrite(src, photo(20, 24), photometric="rgb", iccprofile=icc)
    else:
        Image.fromarray(photo(20, 24)).save(src, icc_profile=icc)
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    if dst_suffix == ".tif":
        with tifffile.TiffFile(dst) as tif:
            assert tif.pages.first.iccprofile == icc
    else:
        assert Image.open(dst).info.get("icc_profile") == icc


def test_half_precision_on_the_cpu_is_flagged(tmp_path, model, caplog):
    src = tmp_path / "in.png"
    Image.fromarray(photo(16, 16)).save(src)
    fastsr.upscale_file(src, tmp_path / "out.png", model, dtype="bf16", progress=False, backend=BACKEND)
    assert "bfloat16 on the CPU: several times slower than fp32" in caplog.text


def test_exif_orientation_is_applied(tmp_path, model):
    """A portrait photo stored landscape with EXIF orientation 6 comes out as it is shown: portrait."""
    from PIL import ImageOps

    stored = Image.fromarray(photo(40, 48))  # 48 wide, 40 tall as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    src, dst = tmp_path / "portrait.jpg", tmp_path / "out.png"
    stored.save(src, exif=exif.tobytes(), quality=95)
    fastsr.upscale_file(src, dst, model, progress=False, backend=BACKEND)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(src)))
    assert shown.shape == (48, 40, 3)
    got = np.asarray(Image.open(dst))
    assert got.shape == (192, 160, 3)
    assert np.array_equal(got, fastsr.upscale(shown, model, backend=BACKEND))


@pytest.mark.parametrize("compression", ["none", "deflate", "zstd", "jpeg"])
def test_tiff_compression_16bit_and_pyramid(tmp_path, model, compression):
    image = photo(40, 52)
    if compression != "jpeg":
        image = image.astype(np.uint16) * 257  # 16-bit stays 16-bit
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, photometric="rgb")
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, compression=compression, pyramid=True,
                        backend=BACKEND)
    expected = fastsr.upscale(image, model, tile=16, backend=BACKEND)
    with tifffile.TiffFile(dst) as tif:
        levels = tif.series[0].levels
        got = tif.asarray()
        assert [lv.shape[:2] for lv in levels] == [(160, 208), (80, 104), (40, 52)]  # down to one 64-pixel tile
        level1 = levels[1].asarray()
    assert got.dtype == image.dtype
    if compression == "jpeg":
        assert np.abs(got.astype(int) - expected).mean() < 4  # lossy
    else:
        assert np.array_equal(got, expected)
        e = expected.astype(np.int64)
        box = (e[0::2, 0::2] + e[1::2, 0::2] + e[0::2, 1::2] + e[1::2, 1::2] + 2) // 4
        assert np.array_equal(level1, box)


def test_cli_end_to_end_on_a_photo(tmp_path, tiny_model_file, model):
    from skimage import data

    src, dst = tmp_path / "astronaut.png", tmp_path / "astronaut_x4.png"
    image = data.astronaut()[:96, :128]
    Image.fromarray(image).save(src)
    r = subprocess.run([sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file),
                        "--tile", "48", "--backend", "torch"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    # The progress bar: output pixels done / total (384 x 512 = 197k) and the throughput.
    assert re.search(r"197k/197k \[.*px/s\]", r.stderr), r.stderr
    got = np.asarray(Image.open(dst))
    assert np.array_equal(got, fastsr.upscale(image, model, backend=BACKEND))
    no_leftovers(tmp_path, {src.name, dst.name})


def test_cli_help_reads_well():
    r = subprocess.run([sys.executable, "-m", "fastsr", "upscale", "--help"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 0
    for option in ("--tile", "--halo", "--batch-size", "--compression", "--pyramid", "--resume", "--model",
                   "--device", "--dtype", "--backend", "receptive field"):
        assert option in r.stdout


# ----------------------------------------------------------------------------- bad inputs


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (IHDR) with no data: cheap to make, huge to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _bad_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, [src, dst], expected message part)."""
    good = tmp / "good.png"
    Image.fromarray(photo(16, 16)).save(good)
    (tmp / "text.png").write_text("this is not an image\n")
    (tmp / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    np.save(tmp / "zero.npy", np.zeros((0, 16, 3), np.uint8))
    Image.new("CMYK", (16, 16)).save(tmp / "cmyk.jpg")
    tifffile.imwrite(tmp / "float.tif", np.zeros((16, 16, 3), np.float32), photometric="rgb")
    _png_header_only(tmp / "huge.png", 40000, 40000)
    # Sparse .npy files: huge logical size, no disk used.
    np.lib.format.open_memmap(tmp / "big.npy", mode="w+", dtype=np.uint8, shape=(20000, 20000, 3)).flush()
    np.lib.format.open_memmap(tmp / "giant.npy", mode="w+", dtype=np.uint8, shape=(300000, 300000, 3)).flush()
    (tmp / "outdir.png").mkdir()
    unwritable = "/proc/1" if os.geteuid() == 0 else str(tmp / "ro")
    if os.geteuid() != 0:
        os.mkdir(unwritable, 0o555)
    return [
        ("missing", [str(tmp / "missing.png"), str(tmp / "o.png")], "no such file"),
        ("text file named .png", [str(tmp / "text.png"), str(tmp / "o.png")], "not an image file"),
        ("empty file", [str(tmp / "empty.png"), str(tmp / "o.png")], "empty (0 bytes)"),
        ("truncated png", [str(tmp / "truncated.png"), str(tmp / "o.png")], "truncated"),
        ("zero-size image", [str(tmp / "zero.npy"), str(tmp / "o.tif")], "zero size"),
        ("unsupported mode", [str(tmp / "cmyk.jpg"), str(tmp / "o.png")], "mode 'CMYK'"),
        ("unsupported dtype", [str(tmp / "float.tif"), str(tmp / "o.tif")], "dtype float32"),
        ("input too large for Pillow", [str(tmp / "huge.png"), str(tmp / "o.tif")], "convert it to a tiled BigTIFF"),
        ("output too large for PNG", [str(tmp / "big.npy"), str(tmp / "o.png")], "too large for .png"),
        ("not enough disk space", [str(tmp / "giant.npy"), str(tmp / "o.tif")], "not enough disk space"),
        ("output is the input", [str(good), str(good)], "is the input file"),
        ("output directory missing", [str(good), str(tmp / "nodir" / "o.png")], "does not exist"),
        ("unwritable output directory", [str(good), unwritable + "/o.png"], "not writable"),
        ("unknown output format", [str(good), str(tmp / "o.xyz")], "unknown output format"),
        ("output is an existing directory", [str(good), str(tmp / "outdir.png")], "is a directory; name an output"),
        ("tile not matching TIFF", [str(good), str(tmp / "o.tif"), "--tile", "5"], "multiple of 16"),
        ("pyramid for a PNG", [str(good), str(tmp / "o.png"), "--pyramid"], "written into .tif outputs only"),
    ]


def test_bad_inputs_clear_one_line_errors(tmp_path, tiny_model_file, capsys):
    cases = _bad_cases(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    for name, args, message in cases:
        argv = ["upscale", *args[:2], "--model", str(tiny_model_file), "--quiet", *args[2:]]
        code = cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}"
        assert err.startswith("fastsr: error: ") and "\n" not in err, f"{name}: {err!r}"
        assert message in err, f"{name}: {err!r}"
        no_leftovers(tmp_path, before)


@pytest.mark.parametrize("scale,tile,suggested", [(4, 5, 8), (3, 40, 48), (2, 9, 16)])
def test_a_tile_the_tiff_cannot_take_gets_a_tile_it_can(tmp_path, capsys, scale, tile, suggested):
    """Output tiles of a TIFF are multiples of 16: the suggested --tile works, for x3 models too."""
    from fastsr.models.compact import SRVGGNetCompact

    model = SRVGGNetCompact(scale=4, num_convs=1, channels=4, output_scale=scale if scale < 4 else None)
    fastsr.save_model(model, tmp_path / "m.safetensors")
    Image.fromarray(np.zeros((20, 18, 3), np.uint8)).save(tmp_path / "in.png")
    argv = ["upscale", str(tmp_path / "in.png"), str(tmp_path / "o.tif"), "--model", str(tmp_path / "m.safetensors"),
            "--quiet", "--tile"]
    assert cli_main([*argv, str(tile)]) == 2
    assert f"use --tile {suggested} or another multiple of" in capsys.readouterr().err
    assert cli_main([*argv, str(suggested)]) == 0


def test_bad_input_exit_status_without_traceback(tmp_path, tiny_model_file):
    (tmp_path / "text.png").write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "fastsr", "upscale", str(tmp_path / "text.png"), str(tmp_path / "o.png"),
                        "--model", str(tiny_model_file)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"fastsr: error: {tmp_path / 'text.png'}: not an image file Pillow can "
                                             "read (is it really .png?)"]
    no_leftovers(tmp_path, {"text.png"})


# ----------------------------------------------------------------------------- resume


def test_resume_after_kill_9(tmp_path, tiny_model_file, model):
    from skimage import data

    image = np.ascontiguousarray(data.coffee()[:120, :160])
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, tile=(32, 32), photometric="rgb")
    args = [sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file),
            "--tile", "16", "--backend", "torch", "--quiet"]
    work = tmp_path / f".{dst.name}.fastsr-partial"
    proc = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        files = list(work.glob("done.rank*.txt"))
        done = len(files[0].read_text().splitlines()) if files else 0
        if done >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()  # nothing under the final name
    assert json.loads((work / "header.json").read_text())["tile"] == 16
    r = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = int(r.stderr.split("resuming: ")[1].split(" of ")[0])
    assert resumed >= done  # the batches finished before the kill were not computed again
    assert not work.exists()
    with tifffile.TiffFile(dst) as tif:
        got = tif.asarray()
    uninterrupted = tmp_path / "ref.tif"
    fastsr.upscale_file(src, uninterrupted, model, tile=16, progress=False, backend=BACKEND)
    assert np.array_equal(got, tifffile.imread(uninterrupted))
    no_leftovers(tmp_path, {src.name, dst.name, uninterrupted.name})
    # A resume with other settings is refused rather than mixing tiles of two runs (dst exists by
    # now: replacing it takes --overwrite, docs/safety.md).
    proc = subprocess.Popen([*args, "--overwrite"], env=ENV, stderr=subprocess.DEVNULL)
    while not list(work.glob("done.rank*.txt")) and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(UserError, match="other settings"):
        fastsr.upscale_file(src, dst, model, tile=32, resume=True, progress=False, backend=BACKEND, overwrite=True)


def test_resume_recomputes_missing_and_damaged_tiles(tmp_path, model, monkeypatch, caplog):
    """Resume does not trust the manifest: finished batches whose chunk was deleted or truncated
    are computed again (they were a black region and a zstd traceback)."""
    from fastsr.pipeline import engine

    image = photo(64, 64)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, photometric="rgb")
    real, calls = engine.Upscaler.run_uint, []

    def crash_after_ten(self, batch):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("simulated crash")
        return real(self, batch)

    monkeypatch.setattr(engine.Upscaler, "run_uint", crash_after_ten)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND)
    monkeypatch.setattr(engine.Upscaler, "run_uint", real)
    store = tmp_path / f".{dst.name}.fastsr-partial" / "tiles.zarr" / "c"
    chunks = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(chunks) >= 3
    chunks[0].unlink()
    chunks[1].write_bytes(chunks[1].read_bytes()[:7])
    fastsr.upscale_file(src, dst, model, tile=16, progress=False, backend=BACKEND, resume=True)
    assert "missing or damaged tiles" in caplog.text
    assert np.array_equal(tifffile.imread(dst), fastsr.upscale(image, model, tile=16, backend=BACKEND))
    no_leftovers(tmp_path, {src.name, dst.name})


def test_a_second_run_to_the_same_output_is_refused_while_the_first_runs(tmp_path, tiny_model_file, model):
    """One writer per output: the second run names the first's pid and touches nothing of it."""
    from skimage import data

    image = np.ascontiguousarray(data.coffee())  # 400x600: hundreds of batches, seconds of work
    src, dst = tmp_path / "in.tif", tmp_path / "same.tif"
    tifffile.imwrite(src, image, tile=(32, 32), photometric="rgb")
    args = [sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file),
            "--tile", "16", "--backend", "torch", "--quiet"]
    first = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)
    work = tmp_path / f".{dst.name}.fastsr-partial"
    deadline = time.time() + 120
    while not list(work.glob("done.rank*.txt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, f"finished before the second run started: {first.stderr.read()}"
    second = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"fastsr: error: {dst}: another fastsr run (pid {first.pid}) is writing this "
                                     "output; wait for it to finish or choose another output name")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert np.array_equal(tifffile.imread(dst), fastsr.upscale(image, model, tile=16, backend=BACKEND))
    no_leftovers(tmp_path, {src.name, dst.name})


# ----------------------------------------------------------------------------- memory


MEMORY_SCRIPT = r"""
import resource, sys, time
import numpy as np, torch
from torch import nn
import fastsr

class Tiny(nn.Sequential):  # cheap x4 model: the test is about the pipeline, not the model
    scale = 4
    def __init__(self):
        super().__init__(nn.Conv2d(3, 3, 3, padding=1), nn.Upsample(scale_factor=4, mode="nearest"))

torch.manual_seed(0)
model = Tiny().eval()
src, dst, tile = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
fastsr.upscale_file(src, dst, model, tile=tile, progress=False, backend="torch", compression="none")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, time.time() - t)
"""


def make_synthetic_tiff(path: Path, size: int, tile: int = 256) -> None:
    """A size x size RGB tiled BigTIFF written tile by tile (never whole in memory)."""
    yy, xx = np.mgrid[0:tile, 0:tile]

    def tiles():
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                r = ((yy + y) * 7 // 13 + (xx + x) // 5) % 256
                g = ((xx + x) * 3 // 7 + y // 64) % 256
                b = ((yy + y) // 3 + xx * 2) % 256
                yield np.stack([r, g, b], -1).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="zstd", bigtiff=True)


def _memory_run(tmp_path: Path, size: int, tile: int, timeout: int) -> None:
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    make_synthetic_tiff(src, size)
    script = tmp_path / "run.py"
    script.write_text(MEMORY_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(src), str(dst), str(tile)], capture_output=True, text=True,
                       env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stderr
    base, peak, seconds = map(float, r.stdout.split())
    out_bytes = (4 * size) ** 2 * 3
    # Holding the output (or even a quarter of it) would break this bound: a few rows of tiles only.
    assert peak - base < min(400e6, out_bytes / 4), f"peak RSS grew by {(peak - base) / 1e6:.0f} MB"
    print(f"{size}^2 -> {4 * size}^2: {seconds:.1f} s, peak RSS +{(peak - base) / 1e6:.0f} MB "
          f"(output {out_bytes / 1e6:.0f} MB)")
    # Spot checks of the output against the model run directly on small regions.
    from torch import nn

    conv = None
    with tifffile.TiffFile(dst) as tif:
        assert tif.series[0].shape == (4 * size, 4 * size, 3)
        out = tif.series[0].aszarr()
        import zarr

        out = zarr.open_array(out, mode="r")
        with tifffile.TiffFile(src) as tin:
            inp = zarr.open_array(tin.series[0].aszarr(), mode="r")
            torch.manual_seed(0)
            conv = nn.Conv2d(3, 3, 3, padding=1)
            for y, x in [(0, 0), (size // 2 + 3, size // 3 + 7), (size - 8, size - 8)]:
                patch = torch.from_numpy(np.asarray(inp[max(y - 1, 0):y + 9, max(x - 1, 0):x + 9])).permute(2, 0, 1)
                with torch.no_grad():
                    ref = conv(patch[None].float() / 255).clamp(0, 1).mul(255).round()[0].permute(1, 2, 0).numpy()
                ref = ref[(y > 0):(y > 0) + 8, (x > 0):(x > 0) + 8].repeat(4, 0).repeat(4, 1)
                got = np.asarray(out[4 * y:4 * y + 32, 4 * x:4 * x + 32])
                # Interior pixels of the patch are exact; rounding may differ by one level.
                assert np.abs(got[4:-4, 4:-4].astype(int) - ref[4:-4, 4:-4]).max() <= 1


def test_memory_bounded_4k_to_16k(tmp_path):
    _memory_run(tmp_path, 4096, 512, timeout=300)


@pytest.mark.slow
def test_memory_bounded_16k_to_64k(tmp_path):
    _memory_run(tmp_path, 16384, 512, timeout=3600)


# ----------------------------------------------------------------------------- scale-out


def test_torchrun_two_cpu_processes(tmp_path, tiny_model_file, model):
    """Two ranks (gloo) share the batches, write disjoint chunks of one store; rank 0 writes the TIFF."""
    image = photo(72, 96)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, tile=(32, 32), photometric="rgb")
    env = {**ENV, "FASTSR_DIST_BACKEND": "gloo"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file), "--tile", "16",
                        "--batch-size", "2", "--backend", "torch", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = fastsr.upscale(image, model, tile=16, batch_size=2, backend=BACKEND)  # the ranks' batches
    assert np.array_equal(tifffile.imread(dst), expected)
    no_leftovers(tmp_path, {src.name, dst.name})


def test_torchrun_two_nodes_write_one_zarr(tmp_path, tiny_model_file, model):
    """Multi-node: two torchrun launchers (node ranks 0 and 1, one process each, here on one host
    sharing the filesystem as nodes share a network one) split the tiles of one zarr output."""
    import socket

    import zarr

    image = photo(72, 96)
    src, dst = tmp_path / "in.tif", tmp_path / "out.zarr"
    tifffile.imwrite(src, image, tile=(32, 32), photometric="rgb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "FASTSR_DIST_BACKEND": "gloo"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file),
                               "--tile", "16", "--batch-size", "2", "--backend", "torch", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    expected = fastsr.upscale(image, model, tile=16, batch_size=2, backend=BACKEND)  # the ranks' batches
    assert np.array_equal(zarr.open_array(str(dst), mode="r")[...], expected)
    no_leftovers(tmp_path, {src.name, dst.name})
