"""fastsr.sheet (the comparison sheet) and the commands that write one: eval --sheet and demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastsr
from fastsr import sheet
from fastsr.cli import main as cli_main
from fastsr.sheet import SheetError, comparison_sheet, informative_crop, sheet_row

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The reference backend: no C++ build in these tests."""
    monkeypatch.setenv("FASTSR_BACKEND", "torch")


def photo(size: int = 24, x: int = 100) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:100 + size, x:x + size])


def test_the_crop_is_where_the_detail_is():
    flat = np.full((40, 50, 3), 0, np.uint8)
    flat[0:15, 0:20] = 255  # a bright area: the highest variance is on its edges, but no fine detail
    flat[25:37, 34:46] = np.random.default_rng(0).integers(0, 256, (12, 12, 3))  # fine texture, less variance
    x0, y0, x1, y1 = informative_crop(flat, 10)
    assert (x1 - x0, y1 - y0) == (10, 10)
    assert 34 <= (x0 + x1) / 2 <= 46 and 25 <= (y0 + y1) / 2 <= 37, (x0, y0)
    x0, y0, x1, y1 = informative_crop(flat, 100)
    assert (x1 - x0, y1 - y0) == (40, 40) and x1 <= 50  # clamped to the image
    assert informative_crop(np.zeros((8, 8, 3), np.uint8), 4) == (0, 0, 4, 4)


def test_layout_pixels_and_captions(tmp_path):
    gt = photo()
    bic = np.asarray(Image.fromarray(gt).resize((6, 6), Image.BICUBIC).resize((24, 24), Image.BICUBIC))
    model = torch.from_numpy(gt.copy()).permute(2, 0, 1)[None].float() / 255  # tensors are accepted too
    rows = [sheet_row("astronaut", gt, bic, model, 27.04, 28.75, crop=64),
            sheet_row("flat", np.zeros((24, 24, 3), np.uint8), bic, gt, 20.0, 19.5)]
    assert rows[0].box == (0, 0, 24, 24)  # the crop is clamped to the 24x24 image
    zoom = 8
    path = comparison_sheet(tmp_path / "sheet.png", rows, zoom=zoom, model_label="tiny", note="PSNR on Y")
    im = Image.open(path)
    cell, line = 24 * zoom, sheet.font().getbbox("Ag")[3] + 4
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (3 * cell + 4 * sheet.PAD, sheet.PAD + line + 2 * (cell + line + sheet.PAD) + line)
    pixels = np.asarray(im)
    y0 = sheet.PAD + line
    for i, column in enumerate((gt, bic, gt)):  # the crops, enlarged with nearest neighbour
        x0 = sheet.PAD + i * (cell + sheet.PAD)
        assert np.array_equal(pixels[y0:y0 + cell, x0:x0 + cell], column.repeat(zoom, 0).repeat(zoom, 1)), i
    under = pixels[y0 + cell:y0 + cell + line]  # the captions under the first row
    assert (under < 100).any() and (under == 255).any()
    captions = im.text["Description"].splitlines()
    assert captions == ["astronaut, crop at (0, 0) | PSNR 27.04 dB | PSNR 28.75 dB (+1.71)",
                        "flat, crop at (0, 0) | PSNR 20.00 dB | PSNR 19.50 dB (-0.50)", "PSNR on Y"]
    assert not list(tmp_path.glob(".*"))  # written under a temporary name, then renamed


def test_bad_paths_and_images_are_user_errors(tmp_path):
    row = sheet_row("a", photo(), photo(), photo(), 1.0, 2.0)
    with pytest.raises(SheetError, match="name a .png file"):
        comparison_sheet(tmp_path / "sheet.jpg", [row])
    with pytest.raises(SheetError, match="does not exist"):
        comparison_sheet(tmp_path / "missing" / "sheet.png", [row])
    with pytest.raises(SheetError, match="no images"):
        comparison_sheet(tmp_path / "sheet.png", [])
    with pytest.raises(SheetError, match="differ in size"):
        sheet_row("a", photo(24), photo(20), photo(24), 1.0, 2.0)
    with pytest.raises(SheetError, match="uint8"):
        sheet_row("a", photo().astype(np.float32), photo(), photo(), 1.0, 2.0)


def test_eval_sheet_shows_the_psnrs_it_reports(tmp_path, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    for i, x in enumerate((100, 200)):
        Image.fromarray(photo(24, x)).save(data / f"p{i}.png")
    out, report = tmp_path / "sheet.png", tmp_path / "scores.json"
    argv = ["eval", "--model", "default", "--data", str(data), "--sheet", str(out), "--json", str(report)]
    assert cli_main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    scores = json.loads(report.read_text())["images"]
    captions = Image.open(out).text["Description"].splitlines()
    assert len(captions) == 3 and "Y channel" in captions[-1]
    for score, caption in zip(scores, captions, strict=False):
        assert caption == (f"{score['name']}, crop at (0, 0) | PSNR {score['bicubic_psnr']:.2f} dB | "
                           f"PSNR {score['model_psnr']:.2f} dB ({score['gain_db']:+.2f})")
    assert Image.open(out).width >= 3 * 24 * sheet.ZOOM + 4 * sheet.PAD  # columns as wide as their captions


def test_eval_refuses_a_bad_sheet_path_before_the_work(tmp_path, capsys, monkeypatch):
    from fastsr import evaluate

    monkeypatch.setattr(evaluate, "score_folder", lambda *a, **k: pytest.fail("scored before checking --sheet"))
    (tmp_path / "hr").mkdir()
    Image.fromarray(photo()).save(tmp_path / "hr" / "p.png")
    code = cli_main(["eval", "--data", str(tmp_path / "hr"), "--sheet", str(tmp_path / "sheet.jpg")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"fastsr: error: --sheet {tmp_path / 'sheet.jpg'}: the sheet is a PNG; " \
                                              "name a .png file"


def test_demo_writes_a_sheet(tmp_path, monkeypatch, capsys):
    from fastsr import data

    def small_photos(out_dir, names):  # 32x32 crops instead of whole photos: the wiring, quickly
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(32)).save(out_dir / "astronaut.png")
        return [out_dir / "astronaut.png"]

    monkeypatch.setattr(data, "export_skimage_photos", small_photos)
    torch.manual_seed(0)
    fastsr.save_model(fastsr.SRResNet(scale=4, num_blocks=1, channels=8), tmp_path / "tiny.safetensors")
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--model", str(tmp_path / "tiny.safetensors")]) == 0
    out = capsys.readouterr().out
    sheet_path = tmp_path / "demo" / "comparison.png"
    assert f"side by side in {sheet_path}" in out
    caption = Image.open(sheet_path).text["Description"].splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("| astronaut"))
    bicubic, model = row.split("|")[2:4]
    assert caption.startswith(f"astronaut, crop at (0, 0) | PSNR {bicubic.strip()} dB | PSNR {model.strip()} dB")
    assert Path(sheet_path).stat().st_size < 400_000
