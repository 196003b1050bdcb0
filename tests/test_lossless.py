"""fastsr loses nothing, ever: an interrupted run's tiles are never discarded silently, a full disk
stops a run resumably in one line, bad training options and damaged checkpoints are one-line
errors, metadata (EXIF, DPI, GeoTIFF, OME) reaches the output scaled, and multi-frame inputs
are refused instead of upscaling their first frame only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import fastsr
from fastsr.cli import main as cli_main
from fastsr.errors import UserError

BACKEND = "torch"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    fastsr.save_model(fastsr.SRResNet(scale=4, num_blocks=1, channels=8), path)
    return path


@pytest.fixture(scope="module")
def model(tiny_model_file):
    return fastsr.load_model(tiny_model_file)


def photo(h: int = 64, w: int = 80) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.chelsea()[60:60 + h, 100:100 + w])


def work_of(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.fastsr-partial")


def manifest_lines(dst: Path) -> list[str]:
    return sorted(line for f in work_of(dst).glob("done.rank*.txt") for line in f.read_text().splitlines())


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
