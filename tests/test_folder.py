"""`fastsr upscale IN_DIR OUT_DIR` and fastsr.pipeline.upscale_folder: a tree of images, failures that
stop nothing, reruns that skip what is done, --format, and the exit status."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import fastsr
from fastsr.cli import main as cli_main
from fastsr.pipeline import upscale_folder
from fastsr.pipeline.folder import INPUT_SUFFIXES, find_inputs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSR_BACKEND": "torch"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The reference backend: no C++ build in these tests (they test the folder logic)."""
    monkeypatch.setenv("FASTSR_BACKEND", "torch")


def image(seed: int, channels: int = 3, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_tree(root: Path) -> dict[str, np.ndarray]:
    """Three good images in nested folders, a corrupt one alone in its folder, and files that are not
    images (a text file, a .npy array, a hidden sidecar with an image suffix). Returns the good ones."""
    good = {"x.png": image(0), "a/y.jpg": image(1), "a/b/z.tif": image(2, channels=1)}
    for rel, array in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".tif"):
            tifffile.imwrite(root / rel, array)
        else:
            Image.fromarray(array).save(root / rel)
    (root / "broken").mkdir()
    (root / "broken" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "a" / "notes.txt").write_text("not an image\n")
    np.save(root / "a" / "array.npy", image(3))
    (root / "a" / "._y.jpg").write_bytes(b"macOS resource fork")
    return good


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(*argv: str) -> int:
    return cli_main(["upscale", *map(str, argv)])


def test_a_tree_keeps_its_paths_and_formats_and_a_bad_file_stops_nothing(tmp_path, tiny_model_file, capsys, caplog):
    src, dst = tmp_path / "in", tmp_path / "out"
    good = make_tree(src)
    code = run_cli(src, dst, "--model", tiny_model_file)
    assert code == 2  # a file failed because of its input
    assert tree(dst) == {"x.png", "a", "a/y.jpg", "a/b", "a/b/z.tif"}  # no temporary files, no empty broken/
    model = fastsr.load_model(tiny_model_file)
    assert np.array_equal(np.asarray(Image.open(dst / "x.png")), fastsr.upscale(good["x.png"], model))
    assert np.array_equal(tifffile.imread(dst / "a/b/z.tif"), fastsr.upscale(good["a/b/z.tif"], model))
    assert Image.open(dst / "a/y.jpg").size == (96, 96)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"error: {src / 'broken/bad.png'}: not an image file Pillow can read (is it really .png?)"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"upscaled 3 files into {dst}, 1 failed: see above"


def test_a_rerun_skips_finished_outputs(tmp_path, tiny_model_file, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src)
    (src / "broken" / "bad.png").unlink()
    assert run_cli(src, dst, "--model", tiny_model_file, "--quiet") == 0
    assert capsys.readouterr().out == ""  # --quiet: no summary either
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.*")}
    (dst / "a" / "y.jpg").unlink()
    assert run_cli(src, dst, "--model", tiny_model_file) == 0
    assert capsys.readouterr().out.strip() == f"upscaled 1 file into {dst}, skipped 2 already done"
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "y.jpg")  # not rewritten
    assert (dst / "a" / "y.jpg").is_file()


def test_format_changes_every_output_and_an_output_inside_the_input_is_not_read(tmp_path, tiny_model_file, capsys):
    src = tmp_path / "in"
    make_tree(src)
    (src / "broken" / "bad.png").unlink()
    dst = src / "x4"  # inside the input folder
    for _ in range(2):
        assert run_cli(src, dst, "--model", tiny_model_file, "--format", "png", "--quiet") == 0
    assert tree(dst) == {"x.png", "a", "a/y.png", "a/b", "a/b/z.png"}
    assert Image.open(dst / "a/b/z.png").mode == "L"
    assert run_cli(src, dst, "--model", tiny_model_file, "--format", "png") == 0
    assert capsys.readouterr().out.strip() == f"upscaled 0 files into {dst}, skipped 3 already done"


def test_inputs_are_image_suffixes_and_zarr_arrays_not_hidden_or_other_files(tmp_path):
    for rel in ("b.PNG", "c.jpeg", "d.webp", "e.bmp", "f.tiff", "g.zarr/zarr.json", "g.zarr/c/0/0/0", "h.txt",
                "i.npy", ".j.png", ".hidden/k.png", "sub/l.tif", "out/m.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [str(p) for p in find_inputs(tmp_path, exclude=(tmp_path / "out").resolve())]
    assert found == ["b.PNG", "c.jpeg", "d.webp", "e.bmp", "f.tiff", "g.zarr", "sub/l.tif"]
    assert ".png" in INPUT_SUFFIXES and ".zarr" in INPUT_SUFFIXES and ".npy" not in INPUT_SUFFIXES


def test_the_model_is_loaded_once(tmp_path, tiny_model_file, monkeypatch):
    from fastsr.models import checkpoint

    calls = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    src = tmp_path / "in"
    for i in range(3):
        (src / str(i)).mkdir(parents=True)
        Image.fromarray(image(i)).save(src / str(i) / "p.png")
    summary = upscale_folder(src, tmp_path / "out", str(tiny_model_file), progress=False)
    assert len(summary.upscaled) == 3 and not summary.failed and not summary.skipped
    assert len(calls) == 1


def test_a_deep_model_measures_its_halo_once_per_folder(tmp_path, monkeypatch, caplog):
    """halo="auto" with a deep model (receptive field past the exact limit) measures an effective
    halo on the first image larger than a tile, and every later file uses that value."""
    from fastsr.models.rrdbnet import RRDBNet
    from fastsr.pipeline import halo as halo_mod

    model = RRDBNet(num_blocks=9, channels=8, growth=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * (0.5 / p[0].numel() ** 0.5))
    measured, real = [], halo_mod.measure_halo
    monkeypatch.setattr(halo_mod, "measure_halo", lambda up, h, w, rd: measured.append((h, w)) or real(up, h, w, rd))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image(0, size=12)).save(src / "a_small.png")  # fits one tile: nothing to measure
    for name in ("b.png", "c.png", "d.png"):
        Image.fromarray(image(len(name), size=40)).save(src / name)
    with caplog.at_level(logging.WARNING, logger="fastsr"):
        summary = upscale_folder(src, tmp_path / "out", model, tile=16, progress=False)
    assert len(summary.upscaled) == 4 and not summary.failed
    assert measured == [(40, 40)]
    notes = [r.getMessage() for r in caplog.records if "measured on the image" in r.getMessage()]
    assert len(notes) == 1 and "the other files of the folder use it too" in notes[0]


def test_a_crash_on_one_file_is_exit_1_and_the_others_are_done(tmp_path, tiny_model_file, monkeypatch, caplog):
    from fastsr.pipeline import folder

    real = folder.upscale_file

    def crash_on_y(src, dst, *args, **kwargs):
        if Path(src).stem == "y":
            raise RuntimeError("out of luck\nsecond line")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(folder, "upscale_file", crash_on_y)
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src)
    (src / "broken" / "bad.png").unlink()
    assert run_cli(src, dst, "--model", tiny_model_file, "--quiet") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"error: {src / 'a/y.jpg'}: RuntimeError: out of luck"]
    assert tree(dst) == {"x.png", "a", "a/b", "a/b/z.tif"}


def test_a_file_cut_short_is_resumed_and_never_silently_discarded(tmp_path, tiny_model_file, monkeypatch, caplog):
    from fastsr.pipeline.engine import Upscaler
    from fastsr.pipeline.resume import work_path

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(image(0, size=48)).save(src / "big.png")  # 4 batches of 24x24 tiles
    Image.fromarray(image(1)).save(src / "small.png")
    real, calls = Upscaler.run_uint, []

    def crash_in_the_second_batch(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real(self, batch)

    monkeypatch.setattr(Upscaler, "run_uint", crash_in_the_second_batch)
    args = [src, dst, "--model", tiny_model_file, "--tile", "24", "--quiet"]
    assert run_cli(*args) == 1  # a crash, not the file's fault; small.png is done all the same
    assert {p.name for p in dst.iterdir()} == {"small.png", work_path(dst / "big.png").name}
    caplog.clear()
    assert run_cli(*args) == 2  # without --resume the finished batch is not thrown away: refused, named
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "big.png" in errors[0] and "--resume" in errors[0], errors
    assert run_cli(*args, "--resume") == 0
    assert sorted(p.name for p in dst.iterdir()) == ["big.png", "small.png"]
    fresh = tmp_path / "fresh"
    assert run_cli(src, fresh, "--model", tiny_model_file, "--tile", "24", "--quiet") == 0
    assert np.array_equal(np.asarray(Image.open(dst / "big.png")), np.asarray(Image.open(fresh / "big.png")))


def _refusals(tmp: Path) -> list[tuple[list, str]]:
    src = tmp / "in"
    src.mkdir()
    for name in ("p.png", "p.jpg"):
        Image.fromarray(image(0)).save(src / name)
    (tmp / "file.png").write_bytes(b"")
    (tmp / "empty").mkdir()
    return [
        ([src, tmp / "o", "--format", "tif"], "would both be written to"),
        ([src, src], "the output folder is the input folder"),
        ([src, tmp / "file.png"], "exists and is not a folder"),
        ([src, tmp / "new.png"], "an image name"),
        ([tmp / "empty", tmp / "o"], "no images under"),
        ([src / "p.png", tmp / "o.png", "--format", "png"], "--format is for a folder SRC"),
        ([src, tmp / "o", "--batch-size", "0"], "--batch-size must be at least 1"),
    ]


def test_refusals_are_one_line_before_any_work(tmp_path, tiny_model_file, capsys):
    for argv, message in _refusals(tmp_path):
        before = tree(tmp_path)
        assert run_cli(*argv, "--model", tiny_model_file, "--quiet") == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastsr: error: ") and "\n" not in err and message in err, (argv, err)
        assert tree(tmp_path) == before, argv


def test_cli_progress_over_files_with_pixel_throughput(tmp_path, tiny_model_file):
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src)
    args = [sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(tiny_model_file)]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    # One bar over the 4 files; 3 x 96 x 96 output pixels = 27.6k.
    assert re.search(r"4/4 \[.*file/s, 27\.6kpx out, .*px/s\]", r.stderr), r.stderr
    bad = src / "broken" / "bad.png"
    assert f"fastsr: error: {bad}: not an image file Pillow can read (is it really .png?)\n" in r.stderr
    assert r.stdout.strip().splitlines() == [f"upscaled 3 files into {dst}, 1 failed: see above"]
    quiet = subprocess.run([*args, "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert quiet.stderr.splitlines() == [f"fastsr: error: {bad}: not an image file Pillow can read (is it really "
                                         ".png?)"]
