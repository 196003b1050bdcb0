"""Property-based fuzzing (Hypothesis) of the CLI and the public API (issue 22).

Random valid and invalid images (modes, bit depths, sizes including 1, truncations, lying
headers), paths (existing files and folders, fastsr's own zarr outputs, a source nested in the
destination or the other way round) and option values. Invariants:

* the CLI exits 0 with a correct output, or 2 with one line on stderr and no traceback;
* nothing outside the destination changed (with --overwrite, only the destination did);
* nothing partial is left under the final name, nor temporary files or locks beside it.

The default profile runs in well under two minutes; ``FASTSR_FUZZ_PROFILE=long`` (``make
test-slow``) runs many more examples.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fastsr
from fastsr.cli import main as cli_main
from fastsr.errors import UserError

PROFILES = {
    "default": settings(max_examples=25, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "long": settings(max_examples=600, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
}
FUZZ = PROFILES[os.environ.get("FASTSR_FUZZ_PROFILE", "default")]
# Each example writes files into its own temporary folder, so the test functions take no pytest
# fixtures that would be shared between examples.

SUFFIXES_IN = (".png", ".tif", ".npy", ".zarr", ".jpg", ".bmp")
SUFFIXES_OUT = (".png", ".tif", ".zarr", ".jpg", ".webp", ".npy", "")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzzmodel") / "tiny.safetensors"
    fastsr.save_model(fastsr.SRResNet(4, 1, 8), path)
    return path, fastsr.load_model(path)


@st.composite
def images(draw) -> np.ndarray:
    """(H, W, C) uint8/uint16 arrays, 1..4 channels, sides 1..40."""
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    seed = draw(st.integers(0, 2**16))
    top = 256 if dtype == np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, top, (h, w, c)).astype(dtype)


def write_image(path: Path, image: np.ndarray) -> None:
    """``image`` in the format of ``path``'s suffix (the formats that cannot hold it get a lossy or
    narrowed version: the input is still valid or invalid as the reader decides)."""
    from fastsr.imageio import create_zarr

    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, image)
    elif suffix == ".zarr":
        create_zarr(path, image.shape, (16, 16, image.shape[2]), image.dtype)[...] = image
    elif suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, image[..., 0] if image.shape[2] == 1 else image,
                         photometric="minisblack" if image.shape[2] < 3 else "rgb")
    else:
        eight = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
        if suffix == ".jpg" and eight.shape[2] in (2, 4):
            eight = eight[..., :-1]
        if eight.shape[2] == 2:
            eight = eight[..., :1]
        Image.fromarray(eight[..., 0] if eight.shape[2] == 1 else eight).save(path)


def damage(path: Path, how: str) -> None:
    """Truncate a file, or rewrite a zarr header to declare an absurd shape (a lying header)."""
    if how == "none" or not path.exists():
        return
    if path.is_dir():
        meta_path = path / "zarr.json"
        import json

        meta = json.loads(meta_path.read_text())
        meta["shape"] = [10**9, 10**9, meta["shape"][2]] if how == "lie" else [0, meta["shape"][1], meta["shape"][2]]
        meta_path.write_text(json.dumps(meta))
        return
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncate" else data[:8] + b"\x00" * 8 + data[16:])


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under ``root`` (but ``skip`` and what lies in it) and its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def run(argv: list[str]) -> tuple[int, str]:
    """``fastsr ARGV`` in this process: (exit status, stderr). argparse's own refusals exit 2 too."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


def assert_one_line(code: int, err: str, argv) -> None:
    """Exit 0, or exit 2 with exactly one error line (fastsr's, or argparse's for a bad option
    value) and no traceback. Log lines (warnings) may come before it."""
    assert code in (0, 2), (code, argv, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "\n" not in errors[0], (argv, err)


def assert_nothing_partial(folder: Path) -> None:
    """No temporary files, locks or half-written outputs left beside the destination."""
    left = [p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".fastsr-lock")]
    assert not left, left


@FUZZ
@given(image=images(), src_suffix=st.sampled_from(SUFFIXES_IN), dst_suffix=st.sampled_from(SUFFIXES_OUT),
       broken=st.sampled_from(["none", "none", "none", "truncate", "lie", "header"]),
       existing=st.sampled_from(["none", "none", "file", "folder", "fastsr zarr"]),
       nesting=st.sampled_from(["apart", "apart", "apart", "same", "src in dst", "dst in src"]),
       tile=st.sampled_from([None, "-3", "0", "1", "7", "16", "99999999999", "abc"]),
       overwrite=st.booleans())
def test_fuzz_upscale_cli(tiny, image, src_suffix, dst_suffix, broken, existing, nesting, tile, overwrite):
    model_path, model = tiny
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, dst = _paths(root, src_suffix, dst_suffix, nesting)
        write_image(src, image)
        damage(src, broken)
        _existing(dst, existing, image)
        argv = ["upscale", str(src), str(dst), "--model", str(model_path), "--quiet", "--backend", "torch"]
        argv += (["--tile", tile] if tile is not None else []) + (["--overwrite"] if overwrite else [])
        before_dst = snapshot(dst) if dst.is_dir() else (dst.read_bytes() if dst.is_file() else None)
        before = snapshot(root, skip=dst)
        code, err = run(argv)
        assert_one_line(code, err, argv)
        assert snapshot(root, skip=dst) == before or _only_work_folder_added(root, dst, before), argv
        assert_nothing_partial(root)
        if code == 0:
            _check_output(src, dst, model, tile)
        elif existing != "none":  # a refused run leaves the destination as it was
            assert (snapshot(dst) if dst.is_dir() else dst.read_bytes()) == before_dst, argv


def _paths(root: Path, src_suffix: str, dst_suffix: str, nesting: str) -> tuple[Path, Path]:
    if nesting == "same":
        return root / f"img{src_suffix}", root / f"img{src_suffix}"
    if nesting == "src in dst":
        dst = root / f"out{dst_suffix or '.zarr'}"
        dst.mkdir()
        return dst / f"img{src_suffix}", dst
    if nesting == "dst in src" and src_suffix == ".zarr":
        return root / "img.zarr", root / "img.zarr" / f"out{dst_suffix}"
    return root / f"img{src_suffix}", root / f"out{dst_suffix}"


def _existing(dst: Path, existing: str, image: np.ndarray) -> None:
    """Something already at the destination: a stranger's file or folder, or fastsr's own zarr."""
    if os.path.lexists(dst) or not dst.parent.is_dir():
        return
    if existing == "file":
        dst.write_bytes(b"someone's file")
    elif existing == "folder":
        dst.mkdir()
        (dst / "precious.txt").write_text("precious")
    elif existing == "fastsr zarr":
        from fastsr.imageio import create_zarr

        create_zarr(dst, (4, 4, 3), (4, 4, 3), np.uint8)[...] = 1


def _only_work_folder_added(root: Path, dst: Path, before: dict) -> bool:
    """A full disk keeps a work folder for --resume; nothing else may appear or change."""
    after = snapshot(root, skip=dst)
    work = f".{dst.name}.fastsr-partial"
    return {k: v for k, v in after.items() if work not in k} == before


def _check_output(src: Path, dst: Path, model, tile: str | None) -> None:
    """The output is the model's upscaling of the input (lossless formats exactly; JPEG/WebP in shape)."""
    from fastsr.imageio import open_image

    with open_image(src) as source:
        pixels = source.read(0, source.height, 0, source.width)
    expected = fastsr.upscale(pixels, model, tile=int(tile) if tile else 512, backend="torch")
    with open_image(dst) as out:
        got = out.read(0, out.height, 0, out.width)
    assert got.shape[:2] == expected.shape[:2]
    if dst.suffix in (".png", ".tif", ".zarr"):
        assert np.array_equal(got, expected)


CONVERT_NAMES = ("m.safetensors", "m.onnx", "x.safetensors", "x.onnx", "x.pt", "no/x.safetensors", "m.safetensors/x")


@FUZZ
@given(command=st.sampled_from(["convert", "export"]), dst=st.sampled_from(CONVERT_NAMES),
       existing=st.booleans(), overwrite=st.booleans())
def test_fuzz_convert_and_export(tiny, command, dst, existing, overwrite):
    model_path, _ = tiny
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "m.safetensors"
        src.write_bytes(model_path.read_bytes())
        out = root / dst
        if existing and not os.path.lexists(out) and out.parent.is_dir():
            out.write_bytes(b"someone's file")
        before = snapshot(root, skip=out)
        before_out = out.read_bytes() if out.is_file() else None
        argv = [command, str(src), str(out)] + (["--overwrite"] if overwrite else [])
        code, err = run(argv)
        assert_one_line(code, err, argv)
        assert snapshot(root, skip=out) == before, argv
        assert_nothing_partial(root)
        if code == 0:
            assert out.suffix == (".safetensors" if command == "convert" else ".onnx")
            assert out.stat().st_size > 0 and (before_out is None or overwrite)
        elif before_out is not None:
            assert out.read_bytes() == before_out


@FUZZ
@given(data=st.data())
def test_fuzz_upscale_api(tiny, data):
    """fastsr.upscale on arbitrary arrays and arguments: a correct result or a UserError."""
    _, model = tiny
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.int32, np.bool_]))
    shape = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=4).map(tuple))
    array = np.zeros(shape, dtype)
    which = data.draw(st.sampled_from(["model", "model", "42", "missing", "linear"]))
    chosen = {"model": model, "42": 42, "missing": "/nonexistent/model.safetensors",
              "linear": torch.nn.Linear(2, 2)}[which]
    tile = data.draw(st.sampled_from([None, 1, 5, 512, 0, -1]))
    try:
        out = fastsr.upscale(array, chosen, tile=tile, backend="torch")
    except UserError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert which == "model" and out.shape[:2] == (shape[0] * 4, shape[1] * 4) and out.dtype == array.dtype
