import pytest
import torch

import fastsr
from fastsr.models.checkpoint import EMBEDDED, ModelFileError, embedded_path


def test_save_load_round_trip(tmp_path):
    model = fastsr.SRResNet(scale=2, num_blocks=2, channels=16)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
    path = tmp_path / "m.safetensors"
    fastsr.save_model(model, path)
    loaded = fastsr.load_model(path)
    assert not loaded.training and loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_save_in_fp16_loads_as_fp32(tmp_path):
    model = fastsr.SRResNet(scale=2, num_blocks=1, channels=8)
    fastsr.save_model(model, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = fastsr.load_model(tmp_path / "m.safetensors")
    w = loaded.head.conv.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, model.head.conv.weight.half().float())


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"])
def test_bad_model_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        fastsr.load_model(path)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found"):
        fastsr.load_model(tmp_path / "nope.safetensors")


def test_embedded_default_model_loads():
    if not embedded_path("default").is_file():
        pytest.fail(f"the embedded default model {EMBEDDED['default']} is missing from the package")
    model = fastsr.load_model("default")
    assert isinstance(model, fastsr.SRResNet) and model.scale == 4 and not model.training
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


# The shipped weights measured +1.219 dB (fastsr eval, fp16 as shipped); the floor is that minus 0.05.
DEFAULT_MODEL_FLOOR_DB = 1.219 - 0.05


def test_embedded_default_model_beats_bicubic_on_held_out_photos(tmp_path):
    """The shipped default model's mean PSNR gain over bicubic (Y channel, border 4) on the photos
    held out of its training (fastsr.data.HELD_OUT_PHOTOS), as `fastsr eval` measures it, stays
    within 0.05 dB of what it measured when it was trained."""
    from fastsr.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS, export_skimage_photos
    from fastsr.evaluate import score_folder

    assert not set(HELD_OUT_PHOTOS) & set(TRAIN_PHOTOS)
    paths = export_skimage_photos(tmp_path, HELD_OUT_PHOTOS)
    scores = score_folder(fastsr.load_model("default"), paths, 4)
    gains = {s.name: s.gain_db for s in scores}
    assert sum(gains.values()) / len(gains) >= DEFAULT_MODEL_FLOOR_DB, gains


def test_saved_files_follow_the_umask(tmp_path):
    """save_model (and every atomic write) gives the file the mode a plain open() would, not 0600."""
    import os

    import fastsr

    old = os.umask(0o027)
    try:
        fastsr.save_model(fastsr.SRResNet(4, 1, 8), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("bad", [None, 42, 1.5])
def test_load_model_names_a_wrong_argument_in_one_line(bad):
    with pytest.raises(fastsr.UserError, match="model must be an embedded model's name or a model file's path"):
        fastsr.load_model(bad)


def test_a_pth_of_random_bytes_is_reported_as_a_bad_pytorch_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(fastsr.UserError, match="not a readable PyTorch checkpoint") as info:
        fastsr.load_model(path)
    assert "safetensors model file" not in str(info.value)
