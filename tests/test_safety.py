"""Issue 22: fastsr deletes or replaces only what it wrote itself (docs/safety.md), bounds the work
a declared size asks for, stops on a model that makes NaN, and turns the probe's tracebacks into
one line. Each test here failed on the code before the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastsr
from fastsr.atomic import one_writer
from fastsr.cli import main as cli_main
from fastsr.errors import UserError

ENV = {**os.environ, "FASTSR_BACKEND": "torch"}


def one_line(capsys) -> str:
    """The CLI's error: exactly one line on stderr, no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastsr: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def png(path: Path, size=(24, 20), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def upscale(*argv) -> int:
    return cli_main(["upscale", *map(str, argv), "--quiet", "--backend", "torch"])


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` and the bytes of its files: to assert nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- 1: folders at a destination


def test_an_existing_folder_at_a_zarr_destination_is_never_removed(tmp_path, tiny_model_file, capsys):
    src = png(tmp_path / "in.png")
    dst = tmp_path / "out.zarr"
    dst.mkdir()
    (dst / "precious.txt").write_text("precious\n")
    for extra in ([], ["--overwrite"]):
        assert upscale(src, dst, "--model", tiny_model_file, *extra) == 2
        assert "fastsr did not write" in one_line(capsys)
        assert (dst / "precious.txt").read_text() == "precious\n"


def test_a_zarr_group_holding_another_array_is_not_wiped(tmp_path, tiny_model_file, capsys):
    import zarr

    src = png(tmp_path / "in.png")
    dst = tmp_path / "grp.zarr"
    group = zarr.create_group(str(dst), zarr_format=3)
    group.create_array("labels", shape=(4, 4), dtype="uint8")[...] = 7
    before = snapshot(dst)
    assert upscale(src, dst, "--model", tiny_model_file, "--overwrite") == 2
    one_line(capsys)
    assert snapshot(dst) == before


def test_fastsr_replaces_its_own_zarr_only_with_overwrite(tmp_path, tiny_model_file, capsys):
    import zarr

    src, dst = png(tmp_path / "in.png"), tmp_path / "out.zarr"
    assert upscale(src, dst, "--model", tiny_model_file) == 0
    first = zarr.open_array(str(dst), mode="r")[...]
    assert upscale(src, dst, "--model", tiny_model_file) == 2
    assert "pass --overwrite" in one_line(capsys)
    png(src, seed=1)
    assert upscale(src, dst, "--model", tiny_model_file, "--overwrite") == 0
    assert not np.array_equal(zarr.open_array(str(dst), mode="r")[...], first)


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path, tiny_model_file, capsys):
    src, dst = png(tmp_path / "in.png"), tmp_path / "out.png"
    dst.write_bytes(b"not fastsr's")
    assert upscale(src, dst, "--model", tiny_model_file) == 2
    assert "exists; pass --overwrite" in one_line(capsys)
    assert dst.read_bytes() == b"not fastsr's"
    assert upscale(src, dst, "--model", tiny_model_file, "--overwrite") == 0
    assert Image.open(dst).size == (96, 80)


# ----------------------------------------------------------------------------- 2: sources and destinations nested


def test_a_source_inside_the_destination_zarr_is_refused_and_kept(tmp_path, tiny_model_file, capsys):
    from fastsr.imageio import create_zarr

    grp = tmp_path / "grp.zarr"
    create_zarr(grp / "0", (20, 24, 3), (16, 16, 3), np.uint8)[...] = 9
    create_zarr(grp / "labels", (20, 24, 1), (16, 16, 1), np.uint8)[...] = 1
    anc = tmp_path / "anc.zarr"
    anc.mkdir()
    png(anc / "src.png")
    before = snapshot(tmp_path)
    for src, dst in ((grp / "0", grp), (anc / "src.png", anc)):
        for extra in ([], ["--overwrite"]):
            assert upscale(src, dst, "--model", tiny_model_file, *extra) == 2
            assert "contains the input" in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_a_destination_inside_a_zarr_source_is_refused(tmp_path, tiny_model_file, capsys):
    from fastsr.imageio import create_zarr

    src = tmp_path / "in.zarr"
    create_zarr(src, (20, 24, 3), (16, 16, 3), np.uint8)[...] = 9
    before = snapshot(tmp_path)
    assert upscale(src, src / "out.png", "--model", tiny_model_file) == 2
    assert "lies inside the input" in one_line(capsys)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 3, 6: convert and export


def test_convert_and_export_never_write_over_their_input(tmp_path, tiny_model_file, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(tiny_model_file.read_bytes())
    ckpt = tmp_path / "ck.pt"
    torch.save(fastsr.load_model(tiny_model_file).state_dict(), ckpt)
    before = snapshot(tmp_path)
    for argv in (["convert", ckpt, ckpt], ["convert", model, model], ["export", model, model],
                 ["convert", model, model, "--overwrite"]):
        assert cli_main([*map(str, argv)]) == 2, argv
        one_line(capsys)
    assert snapshot(tmp_path) == before


def test_the_output_format_follows_the_suffix_or_is_refused(tmp_path, tiny_model_file, capsys):
    assert cli_main(["convert", str(tiny_model_file), str(tmp_path / "x.onnx")]) == 2
    assert ".safetensors" in one_line(capsys)
    assert cli_main(["export", str(tiny_model_file), str(tmp_path / "x.safetensors")]) == 2
    assert "ONNX" in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_convert_and_export_into_a_missing_folder_are_one_line(tmp_path, tiny_model_file, capsys):
    assert cli_main(["convert", str(tiny_model_file), str(tmp_path / "no" / "x.safetensors")]) == 2
    assert "does not exist" in one_line(capsys)
    assert cli_main(["export", str(tiny_model_file), str(tmp_path / "no" / "x.onnx")]) == 2
    assert "does not exist" in one_line(capsys)


def test_convert_replaces_an_existing_model_file_only_with_overwrite(tmp_path, tiny_model_file, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep")
    assert cli_main(["convert", str(tiny_model_file), str(dst)]) == 2
    assert "--overwrite" in one_line(capsys) and dst.read_bytes() == b"keep"
    assert cli_main(["convert", str(tiny_model_file), str(dst), "--overwrite"]) == 0
    assert fastsr.load_model(dst).config == fastsr.load_model(tiny_model_file).config


# ----------------------------------------------------------------------------- 4, 11: declared sizes and --tile


def test_the_output_estimate_does_not_overflow():
    from fastsr.imageio import estimate_output_bytes

    shape = (4 * 10**9, 4 * 10**9, 3)
    raw = 48 * 10**18
    assert estimate_output_bytes(shape, np.uint8, "tiff", "zstd") == raw * 60 // 100 * 2
    assert estimate_output_bytes(shape, np.uint8, "zarr", "zstd") == raw * 60 // 100


def test_a_zarr_declaring_an_absurd_shape_is_one_line_and_leaves_nothing(tmp_path, tiny_model_file, capsys):
    import zarr

    src = tmp_path / "lie.zarr"
    zarr.create_array(str(src), shape=(10**9, 10**9, 3), chunks=(512, 512, 3), dtype="uint8")  # 200 bytes on disk
    before = snapshot(tmp_path)
    started = time.monotonic()
    assert upscale(src, tmp_path / "out.tif", "--model", tiny_model_file) == 2
    assert "is its header damaged" in one_line(capsys)
    assert time.monotonic() - started < 30
    assert snapshot(tmp_path) == before  # no lock, no work folder


def test_a_large_declared_shape_is_refused_by_the_space_check_before_planning(tmp_path, tiny_model_file, capsys):
    import zarr

    src = tmp_path / "big.zarr"
    zarr.create_array(str(src), shape=(4 * 10**6, 4 * 10**6, 3), chunks=(512, 512, 3), dtype="uint8")
    assert upscale(src, tmp_path / "out.tif", "--model", tiny_model_file) == 2
    assert "not enough disk space" in one_line(capsys)


def test_the_tile_is_clamped_to_the_image():
    from fastsr.pipeline.memory import tile_size

    assert tile_size(4096, 64, 80) == 512
    assert tile_size(99999999999, 2000, 1000) == 2000
    assert tile_size(700, 650, 10) == 656
    assert tile_size(32, 64, 80) == 32


def test_a_huge_tile_works_like_the_default(tmp_path, tiny_model_file, capsys):
    src = png(tmp_path / "in.png")
    assert upscale(src, tmp_path / "a.tif", "--model", tiny_model_file, "--tile", "99999999999") == 0
    assert upscale(src, tmp_path / "b.tif", "--model", tiny_model_file) == 0
    import tifffile

    assert np.array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))


# ----------------------------------------------------------------------------- 5: NaN


def test_a_model_making_nan_stops_in_one_line_naming_it(tmp_path, capsys):
    model = fastsr.SRResNet(4, 1, 8)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    fastsr.save_model(model, path)
    src, dst = png(tmp_path / "in.png"), tmp_path / "out.png"
    for backend in ("torch", "auto"):
        assert cli_main(["upscale", str(src), str(dst), "--model", str(path), "--quiet", "--backend", backend]) == 2
        err = one_line(capsys)
        assert "NaN" in err and str(path) in err
        assert not dst.exists()
    with pytest.raises(UserError, match="NaN"):
        fastsr.upscale(np.zeros((8, 8, 3), np.uint8), model)


# ----------------------------------------------------------------------------- 7: training resume and lock


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--crop", "32",
            "--num-blocks", "1", "--channels", "8", "--save-every", "1", "--log-every", "1", "--backend", "torch",
            *extra]


@pytest.fixture(scope="module")
def hr_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hr")
    for i in range(2):
        png(root / f"p{i}.png", (64, 64), seed=i)
    return root


def test_resume_with_other_hyperparameters_is_refused_naming_them(hr_photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(hr_photos, out)) == 0
    config = (out / "config.json").read_text()
    capsys.readouterr()
    argv = train_args(hr_photos, out, "--resume", "--lr", "0.01")
    argv[argv.index("--batch-size") + 1] = "4"
    assert cli_main(argv) == 2
    err = one_line(capsys)
    assert "--batch-size 2 (now 4)" in err and "--lr 0.0002 (now 0.01)" in err
    assert (out / "config.json").read_text() == config
    # --steps may change (the schedule reads it live): the run goes on
    assert cli_main(train_args(hr_photos, out, "--resume", "--steps", "3")) == 0


def test_a_training_run_takes_the_one_writer_lock(hr_photos, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with one_writer(out.resolve()):
        assert cli_main(train_args(hr_photos, out)) == 2
        assert "another fastsr run" in one_line(capsys)
    assert not list(out.iterdir())


def test_train_out_must_not_hold_or_lie_in_its_inputs(hr_photos, tmp_path, capsys):
    assert cli_main(train_args(hr_photos, hr_photos / "run")) == 2
    assert "overlap" in one_line(capsys)
    assert not (hr_photos / "run").exists()


def test_cuda_graph_on_a_cpu_is_refused_in_one_line(hr_photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(hr_photos, out, "--cuda-graph")) == 2
    assert "--cuda-graph needs --device cuda" in one_line(capsys)
    assert not out.exists() or not list(out.iterdir())


def test_a_new_run_does_not_replace_another_runs_files_without_overwrite(hr_photos, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone's model")
    assert cli_main(train_args(hr_photos, out)) == 2
    assert "--overwrite" in one_line(capsys)
    assert (out / "model.safetensors").read_bytes() == b"someone's model"


# ----------------------------------------------------------------------------- 8, 10: folders


def test_an_input_folder_inside_the_output_folder_is_refused(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "out"
    png((out / "in").mkdir(parents=True) or out / "in" / "a.png")
    before = snapshot(tmp_path)
    assert upscale(out / "in", out, "--model", tiny_model_file) == 2
    assert "inside the output folder" in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_a_rerun_with_another_model_does_not_keep_the_first_models_outputs(tmp_path, tiny_model_file, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    png(src / "a.png")
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    fastsr.save_model(fastsr.SRResNet(4, 1, 8), other)
    assert upscale(src, out, "--model", tiny_model_file) == 0
    first = (out / "a.png").read_bytes()
    assert upscale(src, out, "--model", tiny_model_file) == 0  # same model: skipped
    assert (out / "a.png").read_bytes() == first
    capsys.readouterr()
    assert upscale(src, out, "--model", other) == 2
    assert "made with another model" in one_line(capsys)
    assert (out / "a.png").read_bytes() == first
    assert upscale(src, out, "--model", other, "--overwrite") == 0
    assert (out / "a.png").read_bytes() != first


def test_a_symlink_inside_the_output_folder_is_not_followed_out_of_it(tmp_path, tiny_model_file, capsys):
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    png(src / "sub" / "a.png")
    png(src / "b.png")
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    assert upscale(src, out, "--model", tiny_model_file) == 2  # the file's own failure: exit 2
    assert not list(elsewhere.iterdir())
    assert (out / "b.png").is_file()


def test_two_folder_runs_on_one_output_folder_are_one_refusal(tmp_path, tiny_model_file, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    png(src / "a.png")
    out.mkdir()
    with one_writer(out.resolve()):
        assert upscale(src, out, "--model", tiny_model_file) == 2
        assert "another fastsr run" in one_line(capsys)
    assert not (out / "a.png").exists()


# ----------------------------------------------------------------------------- 9: devices in the ops


@pytest.mark.parametrize("where", ["weight", "bias", "slope", "residual"])
def test_conv2d_prelu_refuses_tensors_on_another_device(where):
    x = torch.rand(1, 3, 8, 8)
    args = {"weight": torch.rand(4, 3, 3, 3), "bias": torch.rand(4), "slope": torch.rand(1),
            "residual": torch.rand(1, 4, 8, 8)}
    args[where] = args[where].to("meta")
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match=f"{where} is on device meta but x is on cpu"):
            fastsr.functional.conv2d_prelu(x, **args, backend=backend)


def test_conv2d_silu_refuses_tensors_on_another_device():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="skip is on device meta"):
        fastsr.functional.conv2d_silu(x, torch.rand(4, 3, 3, 3), None, torch.rand(1, 4, 8, 8, device="meta"))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fastsr.functional.conv2d_prelu(x, None)


# ----------------------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize("damage", ["dataset path", "missing dataset", "empty datasets", "string multiscales"])
def test_malformed_ome_zarr_metadata_is_one_line(tmp_path, tiny_model_file, capsys, damage):
    from fastsr.imageio import create_zarr

    src = tmp_path / "img.zarr"
    create_zarr(tmp_path / "meta", (16, 16, 3), (16, 16, 3), np.uint8)
    create_zarr(src / "0", (16, 16, 3), (16, 16, 3), np.uint8)
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}, {"name": "c", "type": "channel"}]
    datasets = {"dataset path": [{"path": "../../meta"}], "missing dataset": [{"path": "nope"}],
                "empty datasets": []}.get(damage, [{"path": "0"}])
    multiscales = "abc" if damage == "string multiscales" else [{"axes": axes, "datasets": datasets}]
    (src / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                               "attributes": {"ome": {"version": "0.5",
                                                                      "multiscales": multiscales}}}))
    assert upscale(src, tmp_path / "out.png", "--model", tiny_model_file) == 2
    one_line(capsys)
    assert not (tmp_path / "out.png").exists()


def test_eval_on_an_image_too_small_for_ssim_is_one_line(tmp_path, tiny_model_file, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    png(data / "small.png", (16, 16))
    assert cli_main(["eval", "--model", str(tiny_model_file), "--data", str(data)]) == 2
    assert "small.png" in one_line(capsys)


def test_eval_outputs_follow_the_rule(tmp_path, tiny_model_file, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    png(data / "a.png", (48, 48))
    base = ["eval", "--model", str(tiny_model_file), "--data", str(data)]
    assert cli_main([*base, "--json", str(data / "s.json")]) == 2  # inside the HR folder
    assert "inside the input" in one_line(capsys)
    (tmp_path / "s.json").write_text("{}")
    assert cli_main([*base, "--json", str(tmp_path / "s.json")]) == 2
    assert "--overwrite" in one_line(capsys)
    assert (tmp_path / "s.json").read_text() == "{}"
    assert cli_main([*base, "--json", str(tmp_path / "s.txt")]) == 2
    one_line(capsys)


def test_api_errors_are_clear(tiny_model_file):
    with pytest.raises(UserError, match="model must be"):
        fastsr.upscale(np.zeros((8, 8, 3), np.uint8), model=42)
    with pytest.raises(UserError, match="no convolution"):  # found by the fuzz suite: a matmul traceback
        fastsr.upscale(np.zeros((8, 8, 3), np.uint8), model=torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- smaller


def test_no_resume_hint_when_nothing_was_finished(tmp_path, tiny_model_file, monkeypatch, caplog):
    from fastsr.pipeline import engine

    def broken(self, batch):
        raise RuntimeError("the backend cannot run here")

    monkeypatch.setattr(engine.Upscaler, "run_uint", broken)
    with pytest.raises(RuntimeError, match="cannot run here"):
        fastsr.upscale_file(png(tmp_path / "in.png"), tmp_path / "out.png", tiny_model_file, progress=False)
    assert "--resume" not in caplog.text


def test_a_damaged_header_on_resume_keeps_the_finished_tiles(tmp_path, tiny_model_file):
    from fastsr.pipeline.resume import work_path

    src, dst = png(tmp_path / "in.png", (64, 48)), tmp_path / "out.tif"
    work = work_path(dst)
    work.mkdir()
    (work / "header.json").write_text("{ damaged")
    (work / "done.rank0.txt").write_text("0 -\n")
    with pytest.raises(UserError, match="missing or damaged"):
        fastsr.upscale_file(src, dst, tiny_model_file, tile=16, resume=True, progress=False)
    assert (work / "done.rank0.txt").read_text() == "0 -\n"


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_model_file):
    import tifffile
    from skimage import data

    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, np.ascontiguousarray(data.coffee()[:160, :192]), tile=(32, 32), photometric="rgb")
    work = tmp_path / f".{dst.name}.fastsr-partial"
    proc = subprocess.Popen([sys.executable, "-m", "fastsr", "upscale", str(src), str(dst), "--model",
                             str(tiny_model_file), "--tile", "16", "--quiet"], env=ENV, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(
            f.read_text() for f in work.glob("done.rank*.txt")):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert not (tmp_path / f".{dst.name}.fastsr-lock").exists()
    assert list(work.glob("done.rank*.txt")) and not dst.exists()


def test_a_file_where_a_zarr_output_goes_is_replaced_with_overwrite(tmp_path, tiny_model_file, capsys):
    """Found by the fuzz suite: the folder-replacing path removed a file with rmtree (a traceback)."""
    src, dst = png(tmp_path / "in.png"), tmp_path / "out.zarr"
    dst.write_bytes(b"a file")
    assert upscale(src, dst, "--model", tiny_model_file) == 2
    one_line(capsys)
    assert upscale(src, dst, "--model", tiny_model_file, "--overwrite") == 0
    assert (dst / "zarr.json").is_file()
