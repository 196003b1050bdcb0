"""SRGAN training: losses, data, exact resume, AMP, NaN stop, DDP (2 CPU ranks, gloo), eval CLI.

Everything runs a tiny generator (1 block, 8 channels) and discriminator (8 channels) on 32 px
crops, and a narrow VGG19 (torchvision key layout, 4-8 channels) built from random weights.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerance import assert_within_rule

import fastsr
from fastsr import losses
from fastsr.data import RandomCrops, StepBatches, export_skimage_photos
from fastsr.train import EMA, SyncBatchNorm2d, TrainConfig, Trainer, TrainingError, train
from fastsr.training.amp import AUTOCAST_DTYPES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    export_skimage_photos(root / "a", ("chelsea", "coins"))
    export_skimage_photos(root / "a" / "nested", ("camera",))
    return root / "a"


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A VGG19-shaped network in torchvision's key layout, narrow so tests stay fast."""
    gen = torch.Generator().manual_seed(0)
    state, c_in = {}, 3
    for name, (conv_index, _) in losses.vgg19_layer_indices().items():
        c_out = 4 if name.startswith("conv1") else 8
        # Kaiming scale keeps the activations O(1) through 16 layers (fp16 must not overflow).
        state[f"features.{conv_index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{conv_index}.bias"] = torch.randn(c_out, generator=gen) * 0.1
        c_in = c_out
    state["classifier.0.weight"] = torch.randn(16, 8 * 49, generator=gen)  # present in real files; ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(state, path)
    return path


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), steps=20, batch_size=4, crop=32, scale=4, num_blocks=1, channels=8,
                d_channels=8, lr=1e-3, warmup_steps=3, save_every=5, log_every=1, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_states_equal(a, b, where="") -> None:
    """Bitwise equality of nested checkpoint structures (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


# -- losses -----------------------------------------------------------------------------------


def test_vgg_features_match_hand_built_stack(vgg_file):
    state = torch.load(vgg_file, weights_only=True)
    x = torch.rand(2, 3, 37, 41)
    features = losses.VGGFeatures.from_file(vgg_file, "conv2_2")

    def stack(x):  # conv1_1 relu conv1_2 relu pool conv2_1 relu conv2_2 relu: torchvision indices 0..8
        def t(v):
            return torch.as_tensor(v, dtype=x.dtype)

        y = (x - t(losses.IMAGENET_MEAN).view(1, 3, 1, 1)) / t(losses.IMAGENET_STD).view(1, 3, 1, 1)
        for i in (0, 2, "pool", 5, 7):
            if i == "pool":
                y = F.max_pool2d(y, 2)
            else:
                y = F.relu(F.conv2d(y, t(state[f"features.{i}.weight"]), t(state[f"features.{i}.bias"]), padding=1))
        return y

    assert_within_rule("VGG features", features(x), stack(x.double()), stack(x), torch.float32)
    with fastsr.use_backend("cpp"):  # fused conv + ReLU (Winograd from 64 pixels on)
        assert_within_rule("VGG features on cpp", features(x), stack(x.double()), stack(x), torch.float32)
    pre = losses.VGGFeatures.from_file(vgg_file, "conv2_2_prerelu")
    assert (pre(x) < 0).any() and len(pre.features) == len(features.features)
    assert pre.features[-1].activation is None and features.features[-1].activation == "relu"  # conv + ReLU fused
    deep = losses.VGGFeatures.from_file(vgg_file)  # conv5_4 after ReLU = torchvision features[:36]
    assert len(deep.features) == 16 + 4 and deep(x).shape == (2, 8, 37 // 16, 41 // 16)  # 16 convs, 4 pools
    assert not any(p.requires_grad for p in deep.parameters())


def test_vgg_weights_errors(tmp_path, vgg_file):
    with pytest.raises(losses.VGGWeightsError, match="not found"):
        losses.VGGFeatures.from_file(tmp_path / "missing.pth")
    with pytest.raises(losses.VGGWeightsError, match="unknown VGG19 layer"):
        losses.VGGFeatures.from_file(vgg_file, "conv6_1")
    state = torch.load(vgg_file, weights_only=True)
    del state["features.28.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(losses.VGGWeightsError, match="features.28.weight"):
        losses.VGGFeatures.from_file(tmp_path / "partial.pth")
    losses.VGGFeatures.from_file(tmp_path / "partial.pth", "conv4_4")  # layers before 28 are enough
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(losses.VGGWeightsError, match="not a readable"):
        losses.VGGFeatures.from_file(tmp_path / "junk.pth")


def test_content_loss_scaling(vgg_file):
    features = losses.VGGFeatures.from_file(vgg_file, "conv3_4")
    sr, hr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    features64 = copy.deepcopy(features).double()

    def expected(f, sr, hr):
        return F.mse_loss(f(sr) / 12.75, f(hr) / 12.75)

    assert_within_rule("VGG content loss", losses.ContentLoss(features)(sr, hr),
                       expected(features64, sr.double(), hr.double()), expected(features, sr, hr), torch.float32)
    assert_within_rule("pixel content loss", losses.ContentLoss(None)(sr, hr), F.mse_loss(sr.double(), hr.double()),
                       F.mse_loss(sr, hr), torch.float32)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_amp_stores_the_frozen_vgg_in_the_autocast_dtype(photos, tmp_path, vgg_file, amp, backend):
    """Under --amp the trainer keeps VGG19's frozen weights in the autocast dtype (autocast would cast
    them again on every call), its input normalisation in fp32, and gives the content loss of the
    fp32-weight module under autocast exactly: one rounding of each weight either way."""
    fastsr.save_model(fastsr.SRResNet(4, 1, 8), tmp_path / "g.safetensors")
    cfg = tiny(photos, tmp_path / "run", stage="gan", init=str(tmp_path / "g.safetensors"),
               vgg_weights=str(vgg_file), amp=amp)
    content = Trainer(cfg, torch.device("cpu")).content
    dtype = AUTOCAST_DTYPES[amp]
    assert {p.dtype for p in content.features.features.parameters()} == {dtype}
    assert content.features.mean.dtype == content.features.std.dtype == torch.float32
    reference = losses.ContentLoss(losses.VGGFeatures.from_file(vgg_file).to(memory_format=torch.channels_last))
    sr, hr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with fastsr.use_backend(backend), torch.autocast("cpu", dtype=dtype):
        assert torch.equal(content(sr.to(dtype), hr), reference(sr.to(dtype), hr))


def test_adversarial_loss_is_bce_with_logits():
    logits = torch.tensor([-3.0, 0.0, 2.5])
    for real, bce in ((True, lambda z: -torch.log(torch.sigmoid(z)).mean()),
                      (False, lambda z: -torch.log(1 - torch.sigmoid(z)).mean())):
        assert_within_rule(f"adversarial_loss real={real}", losses.adversarial_loss(logits, real), bce(logits.double()),
                           bce(logits), torch.float32)


def assert_ema(ema: EMA, formula, start: torch.Tensor) -> None:
    """The averaged weight by the tolerance rule: ``formula`` of the start weight in float64 the reference."""
    assert_within_rule("EMA weight", ema.state["weight"], formula(start.double()), formula(start), torch.float32)


def test_ema_formula():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert_ema(ema, lambda w: 0.9 * w + 0.1 * (w + 1.0), start)


def test_ema_decay_warms_up_with_the_step():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.999)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # decay (1 + 0) / (10 + 0) = 0.1: mostly the new weights
    assert_ema(ema, lambda w: 0.1 * w + 0.9 * (w + 1.0), start)
    late = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    late.update(model, step=100_000)  # (1 + s) / (10 + s) > 0.999: the configured decay
    assert_ema(late, lambda w: 0.999 * (w + 1.0) + 0.001 * (w + 2.0), start)


def test_ema_copies_buffers():
    model = torch.nn.BatchNorm2d(3)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.running_mean.add_(2.0)
        model.num_batches_tracked.add_(5)
    ema.update(model)
    assert torch.equal(ema.state["running_mean"], model.running_mean)
    assert int(ema.state["num_batches_tracked"]) == 5


def test_ema_follows_tensors_replaced_after_its_first_update():
    """The average finds the model's tensors once, but reads them in their module at every update:
    a parameter or buffer replaced since (``model.to``, a new ``nn.Parameter``) is the one averaged
    or copied, in a nested model, by state key."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = EMA(model, 0.5)
    ema.update(model)
    start = model[0].weight.detach().clone()
    model[0].weight = torch.nn.Parameter(start + 2.0)
    model[1].running_var = torch.full((4,), 7.0)
    ema.update(model)
    assert torch.allclose(ema.state["0.weight"], start + 1.0)
    assert torch.equal(ema.state["1.running_var"], torch.full((4,), 7.0))
    with pytest.raises(ValueError, match="do not match"):
        ema.update(torch.nn.Linear(2, 1))


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="mallopt is glibc's (Linux)")
def test_training_keeps_freed_memory_for_the_next_step():
    """A CPU Trainer sets glibc's thresholds so that a large tensor freed in one step is reused in
    the next instead of page-faulted in again (in a subprocess: the setting is process-wide)."""
    code = (
        "import resource, torch\n"
        "from fastsr.training.memory import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    t = torch.empty(20_000_000).fill_(1.0)\n"  # 80 MB, 19,500 pages
        "    del t\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(min(faults() for _ in range(4)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 500, out.stdout


# -- data -------------------------------------------------------------------------------------


def test_crops_are_a_function_of_seed_step_index(photos):
    crops = RandomCrops(photos, 32, 4, seed=3)
    assert len(crops.images) == 3  # nested folder found
    lr, hr = crops.batch(7, 0, 4)
    assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 32, 32)
    lr2, hr2 = crops.batch(7, 2, 2)  # a DDP rank's slice is the same crops
    assert torch.equal(hr[2:], hr2) and torch.equal(lr[2:], lr2)
    assert torch.equal(RandomCrops(photos, 32, 4, seed=3).batch(7, 0, 4)[1], hr)
    assert not torch.equal(crops.batch(8, 0, 4)[1], hr)
    assert not torch.equal(RandomCrops(photos, 32, 4, seed=4).batch(7, 0, 4)[1], hr)


def test_dataloader_workers_give_the_same_batches(photos):
    crops = RandomCrops(photos, 32, 4)

    def batches(workers):
        loader = torch.utils.data.DataLoader(StepBatches(crops, 0, 2), batch_size=None, sampler=range(5, 9),
                                             num_workers=workers)
        return [hr for _, hr in loader]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampling, expected_small", [("image", 0.5), ("area", 1 / 101)])
def test_crop_sampling_by_image_or_by_area(tmp_path, sampling, expected_small):
    # A black 32x32 image and a white 320x320 one (100x the pixels): "image" picks each half the
    # time, "area" the small one once per 101 crops.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full((320, 320, 3), 255, np.uint8)).save(tmp_path / "large.png")
    crops = RandomCrops(tmp_path, 32, 4, sampling=sampling)
    hr = crops.batch(0, 0, 2000)[1]
    small = float((hr.amax(dim=(1, 2, 3)) == 0).float().mean())
    assert abs(small - expected_small) < 4 * (expected_small * (1 - expected_small) / 2000) ** 0.5 + 1e-3
    with pytest.raises(ValueError, match="sampling"):
        RandomCrops(tmp_path, 32, 4, sampling="pixels")


def test_shrink_takes_crops_from_the_image_at_smaller_scales(tmp_path):
    # A ramp (value = column) gains 1 per pixel at full size, 1/f per pixel shrunk by f.
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3))
    Image.fromarray(np.ascontiguousarray(ramp)).save(tmp_path / "ramp.png")

    def slopes(shrink):
        hr = RandomCrops(tmp_path, 32, 4, shrink=shrink, seed=1).batch(0, 0, 64)[1] * 255.0
        along_w, along_h = hr.diff(dim=-1).mean(dim=(1, 2, 3)).abs(), hr.diff(dim=-2).mean(dim=(1, 2, 3)).abs()
        return torch.maximum(along_w, along_h)  # rot90 turns some ramps vertical

    assert torch.equal(slopes(1.0), torch.ones(64))
    shrunk = slopes(0.5)
    assert shrunk.min() >= 0.95 and shrunk.max() <= 2.05  # factors in [0.5, 1]
    assert (shrunk > 1.5).sum() >= 10 and (shrunk < 1.25).sum() >= 10  # spread over the range
    assert torch.equal(RandomCrops(tmp_path, 32, 4, shrink=0.5, seed=1).batch(0, 0, 64)[1],
                       RandomCrops(tmp_path, 32, 4, shrink=0.5, seed=1).batch(0, 0, 64)[1])
    with pytest.raises(ValueError, match="shrink"):
        RandomCrops(tmp_path, 32, 4, shrink=1.5)


def test_bad_images_skipped_and_counted(tmp_path, photos, caplog):
    for p in photos.glob("*.png"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "tiny.png")
    crops = RandomCrops(tmp_path, 32, 4)
    assert len(crops.images) == 2 and len(crops.skipped) == 2
    assert "skipped 2 of 4" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        RandomCrops(empty, 32, 4)


# -- training ---------------------------------------------------------------------------------


def test_gan_stage_needs_init_and_vgg_weights(photos, tmp_path):
    with pytest.raises(TrainingError, match="--init"):
        train(tiny(photos, tmp_path / "a", stage="gan"))
    pre = tiny(photos, tmp_path / "pre", steps=2)
    train(pre)
    with pytest.raises(TrainingError, match="--vgg-weights PATH.*--content-loss mse"):
        train(tiny(photos, tmp_path / "b", stage="gan", init=str(tmp_path / "pre" / "checkpoint.pt")))
    with pytest.raises(TrainingError, match="does not fit a generator"):
        train(tiny(photos, tmp_path / "c", stage="gan", content_loss="mse", channels=16,
                   init=str(tmp_path / "pre" / "model.safetensors")))
    with pytest.raises(TrainingError, match="exists: pass --resume"):
        train(pre)


def _resume_matches_straight(cfg: TrainConfig, tmp_path: Path) -> dict:
    straight = replace(cfg, out=str(tmp_path / "straight"))
    train(straight)
    split = replace(cfg, out=str(tmp_path / "split"), stop_at=10)
    train(split)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 10
    train(replace(split, stop_at=None, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for key in a:
        if key not in ("rng", "torch_rng", "config"):
            assert_states_equal(a[key], b[key], key)
    assert read_log(tmp_path / "straight")[-1]["loss"] == read_log(tmp_path / "split")[-1]["loss"]
    assert (tmp_path / "split" / "model.safetensors").is_file()
    return a


def test_pretrain_resume_is_bit_identical(photos, tmp_path):
    state = _resume_matches_straight(tiny(photos, None, loss="l1", permute_channels=True), tmp_path)
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "rng", "data", "step"} <= state.keys()
    assert {"python", "numpy", "torch"} <= state["rng"].keys()


def test_gan_resume_is_bit_identical_with_fp16_and_workers(photos, tmp_path, vgg_file):
    pre = tiny(photos, tmp_path / "pre", steps=3)
    train(pre)
    cfg = tiny(photos, None, stage="gan", init=str(tmp_path / "pre" / "checkpoint.pt"), vgg_weights=str(vgg_file),
               amp="fp16", workers=1, gan_pixel_weight=0.5)
    state = _resume_matches_straight(cfg, tmp_path)
    assert {"discriminator", "d_optimizer", "d_scheduler"} <= state.keys()
    assert state["scaler"]["scale"] > 0  # fp16 loss scaling was active and is checkpointed
    rows = read_log(tmp_path / "straight")
    assert list(rows[0])[:6] == ["step", "loss", "content", "adversarial", "d_real", "d_fake"]
    assert (tmp_path / "straight" / "discriminator.safetensors").is_file()
    assert fastsr.load_model(tmp_path / "straight" / "model.safetensors").config["num_blocks"] == 1


def test_a_training_checkpoint_loads_as_a_model(photos, tmp_path):
    """runs/X/checkpoint.pt (what `fastsr train` writes) is a model file for load_model, convert,
    upscale and eval: its EMA generator, the weights model.safetensors holds."""
    train(tiny(photos, tmp_path, steps=2))
    from_ckpt = fastsr.load_model(tmp_path / "checkpoint.pt")
    exported = fastsr.load_model(tmp_path / "model.safetensors")
    assert from_ckpt.config == exported.config
    for key, value in exported.state_dict().items():
        assert torch.equal(from_ckpt.state_dict()[key].to(value.dtype), value), key


def test_bf16_pretrain_runs(photos, tmp_path):
    train(tiny(photos, tmp_path, steps=3, amp="bf16"))
    assert all(np.isfinite(float(r["loss"])) for r in read_log(tmp_path))


def test_training_runs_on_the_backend_in_effect(photos, tmp_path, monkeypatch):
    """Without cfg.backend the steps run on FASTSR_BACKEND's choice; cfg.backend overrides it."""
    from fastsr.ops.dispatch import get_backend

    seen = []
    real_step = Trainer.step

    def recording_step(self, lr, hr):
        seen.append(get_backend())
        return real_step(self, lr, hr)

    monkeypatch.setattr(Trainer, "step", recording_step)
    monkeypatch.setenv("FASTSR_BACKEND", "torch")
    with fastsr.backend.global_backend(None):  # no set_backend left by other tests
        train(tiny(photos, tmp_path / "env", steps=2))
        train(tiny(photos, tmp_path / "named", steps=2, backend="auto"))
    assert seen == ["torch", "torch", "auto", "auto"]


def test_cpp_and_torch_backends_give_the_same_loss_curve(photos, tmp_path):
    """Ten pretrain steps of a 16-channel model (the fused training BatchNorm, the Winograd input
    gradient at 16x16 LR crops, the few-output tail's weight gradient) on cpp and on torch: the
    same losses within fp32 noise (summation order only; measured: equal to the six digits the log keeps)."""
    curves = {}
    for backend in ("torch", "cpp"):
        cfg = tiny(photos, tmp_path / backend, steps=10, crop=64, channels=16, num_blocks=2, backend=backend)
        train(cfg)
        curves[backend] = np.array([float(r["loss"]) for r in read_log(tmp_path / backend)])
    assert len(curves["cpp"]) == 10
    np.testing.assert_allclose(curves["cpp"], curves["torch"], rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"stage": "gan", "init": "g.safetensors", "content_loss": "mse"}, "covers the pretrain stage"),
    ({"amp": "fp16"}, "--amp fp16"), ({"compile": True}, "choose one")])
def test_cuda_graph_refuses_what_it_cannot_capture(photos, tmp_path, change, message):
    """The conditions --cuda-graph needs besides a GPU (checked here with device "cuda" on any
    machine: the device check itself runs first in validate)."""
    from fastsr.training.config import check_cuda_graph

    cfg = replace(tiny(photos, tmp_path, cuda_graph=True, device="cuda"), **change)
    with pytest.raises(TrainingError, match=message):
        check_cuda_graph(cfg)
    check_cuda_graph(replace(cfg, stage="pretrain", amp="bf16", compile=False))  # what it covers passes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cuda_graph_steps_train_like_eager_steps(photos, tmp_path, backend):
    """Ten pretrain steps replayed from a CUDA graph (3 eager warm-up steps, the capture, 6 replays):
    the same loss curve as ten eager steps within fp32 noise, as the cpp and torch backends are held
    to (test_cpp_and_torch_backends_give_the_same_loss_curve), and a checkpoint that resumes without
    the graph. Both runs in IEEE fp32 with deterministic cuDNN (the suite's autouse fixture)."""
    if backend == "cpp" and not fastsr.ops.dispatch.availability("cpp", "cuda")[0]:
        pytest.skip("the C++ extension has no CUDA build here")
    curves = {}
    for graph in (False, True):
        out = tmp_path / f"graph-{graph}"
        cfg = tiny(photos, out, steps=10, crop=64, channels=16, num_blocks=2, backend=backend, device="cuda",
                   cuda_graph=graph)
        train(cfg)
        curves[graph] = np.array([float(r["loss"]) for r in read_log(out)])
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)
    train(replace(cfg, cuda_graph=False, steps=12, resume=True))  # the graph run's checkpoint, resumed eagerly
    assert len(read_log(out)) == 12
    with pytest.raises(TrainingError, match="one process"):
        Trainer(replace(cfg, resume=False), torch.device("cuda"), world_size=2)


def test_version1_checkpoint_resumes(photos, tmp_path):
    """A checkpoint written by the first train.py (keys step, model, optimizer, scheduler, ema, data,
    torch_rng; data = a sequential generator state) resumes with the default options."""
    cfg = tiny(photos, tmp_path, steps=4, stop_at=2)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = {k: ckpt[k] for k in ("step", "model", "optimizer", "scheduler", "ema", "torch_rng")}
    old["data"] = {"generator": torch.Generator().manual_seed(0).get_state()}
    torch.save(old, tmp_path / "checkpoint.pt")
    train(replace(cfg, stop_at=None, resume=True))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


def test_nan_loss_stops_gan_and_keeps_last_checkpoint(photos, tmp_path, monkeypatch):
    train(tiny(photos, tmp_path / "pre", steps=2))
    bce = losses.adversarial_loss
    calls = {"n": 0}

    def poisoned(logits, real):
        calls["n"] += 1  # three calls per step (G, D real, D fake); poison step 7's generator loss
        loss = bce(logits, real)
        return loss * float("nan") if calls["n"] == 3 * 6 + 1 else loss

    monkeypatch.setattr(losses, "adversarial_loss", poisoned)
    out = tmp_path / "gan"
    cfg = tiny(photos, out, stage="gan", content_loss="mse", init=str(tmp_path / "pre" / "model.safetensors"))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7 .*adversarial=nan.*checkpoint.*intact"):
        train(cfg)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.setattr(losses, "adversarial_loss", bce)
    train(replace(cfg, resume=True, steps=8))  # the run goes on from the good checkpoint
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8


# -- DDP --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank: int, port: int, x: torch.Tensor, grad: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bn = SyncBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    xs = x[rank * 2 : rank * 2 + 2].clone().requires_grad_(True)
    y = bn(xs)
    y.backward(grad[rank * 2 : rank * 2 + 2])
    torch.save({"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "mean": bn.running_mean,
                "var": bn.running_var}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    x, grad = torch.randn(4, 3, 5, 7) * 3 + 1, torch.randn(4, 3, 5, 7)
    torch.multiprocessing.spawn(_sync_bn_worker, args=(_free_port(), x, grad, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # The reference: BatchNorm2d on the global batch in float64; the same in fp32 the baseline.
    results = {}
    for dtype in (torch.float64, torch.float32):
        bn = torch.nn.BatchNorm2d(3).to(dtype)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
        xr = x.to(dtype).requires_grad_(True)
        y = bn(xr)
        y.backward(grad.to(dtype))
        results[dtype] = {"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "mean": bn.running_mean,
                          "var": bn.running_var}
    ref64, same = results[torch.float64], results[torch.float32]
    ours = {"y": torch.cat([r["y"] for r in ranks]), "dx": torch.cat([r["dx"] for r in ranks]),
            "dw": ranks[0]["dw"] + ranks[1]["dw"]}  # DDP then averages dw
    for key, value in ours.items():
        assert_within_rule(key, value, ref64[key], same[key], torch.float32)
    for r in ranks:
        for key in ("mean", "var"):
            assert_within_rule(f"running {key}", r[key], ref64[key], same[key], torch.float32)


def test_the_trainer_is_freed_before_the_process_group_ends(photos, tmp_path, monkeypatch):
    """train() frees its trainer inside the process group's block: under torchrun DDP's reducer holds
    the group and its last works; freed only at interpreter exit, a gloo thread aborted the rank."""
    import contextlib
    import weakref

    import fastsr.train as train_module

    trainers, alive_at_exit = [], []
    real_init, real_group = Trainer.__init__, train_module.process_group

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainers.append(weakref.ref(self))

    @contextlib.contextmanager
    def watched_group(device):
        with real_group(device) as info:
            yield info
            alive_at_exit.extend(ref() is not None for ref in trainers)

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    monkeypatch.setattr(train_module, "process_group", watched_group)
    train(tiny(photos, tmp_path, steps=2))
    assert alive_at_exit == [False]


def test_ddp_two_cpu_ranks_match_single_process(photos, tmp_path, vgg_file):
    """torchrun, 2 ranks x 2 crops vs 1 process x 4 crops, GAN stage: same losses and weights within
    float-reduction noise; the ranks' weights are compared (bit-exact) at every checkpoint."""
    pre = tiny(photos, tmp_path / "pre", steps=2)
    train(pre)
    common = ["--stage", "gan", "--init", str(tmp_path / "pre" / "checkpoint.pt"), "--vgg-weights", str(vgg_file),
              "--data", str(photos), "--steps", "4", "--batch-size", "4", "--crop", "32", "--num-blocks", "1",
              "--channels", "8", "--d-channels", "8", "--save-every", "2", "--log-every", "1", "--warmup-steps", "0",
              "--lr", "2e-4", "--backend", "torch"]  # torch: no extension build in each subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "fastsr", "train", *common,
                          "--out", str(tmp_path / "ddp")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("exported the EMA generator") == 1  # rank 1 neither writes nor prints
    single = subprocess.run([sys.executable, "-m", "fastsr", "train", *common, "--out", str(tmp_path / "single")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    # Same weights and data at every step; only the summation order differs (measured: <= 3e-6
    # relative). Per-rank BatchNorm (--no-sync-bn) is off by 2-3% at step 1 already.
    for a, b in zip(read_log(tmp_path / "ddp"), read_log(tmp_path / "single"), strict=True):
        for key in ("loss", "content", "adversarial", "d_real", "d_fake"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    init = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)["ema"]
    names = [k for k, _ in fastsr.SRResNet(4, 1, 8).named_parameters()]
    diff = sum((a["model"][k] - b["model"][k]).double().square().sum() for k in names).sqrt()
    update = sum((b["model"][k] - init[k]).double().square().sum() for k in names).sqrt()
    # Measured: 0.003% of the training update with synchronised BN; per-rank BN: ~100% (lr 1e-3).
    assert diff <= 0.01 * update, (float(diff), float(update))


# -- eval CLI ---------------------------------------------------------------------------------


def test_eval_command_table_and_json(photos, tmp_path, capsys):
    model = fastsr.SRResNet(4, 1, 8)
    fastsr.save_model(model, tmp_path / "m.safetensors")
    from fastsr.cli import main

    assert main(["eval", "--model", str(tmp_path / "m.safetensors"), "--data", str(photos),
                 "--json", str(tmp_path / "s.json")]) == 0
    table = capsys.readouterr().out
    assert "| chelsea |" in table and "| **mean** |" in table
    report = json.loads((tmp_path / "s.json").read_text())
    assert [i["name"] for i in report["images"]] == ["chelsea", "coins", "camera"]
    from fastsr.evaluate import score_folder

    expected = score_folder(model.eval(), str(photos), 4)
    assert report["images"][0]["model_psnr"] == pytest.approx(expected[0].model_psnr)
    assert report["mean"]["bicubic_psnr"] == pytest.approx(sum(s.bicubic_psnr for s in expected) / 3)
    assert main(["eval", "--model", str(tmp_path / "m.safetensors"), "--data", str(photos), "--scale", "2"]) == 2
    assert "does not match" in capsys.readouterr().err
    # a --json into a missing folder is refused before any image is scored, in one line
    assert main(["eval", "--model", str(tmp_path / "m.safetensors"), "--data", str(photos),
                 "--json", str(tmp_path / "nodir" / "s.json")]) == 2
    out = capsys.readouterr()
    assert "does not exist" in out.err and "\n" not in out.err.strip() and "| chelsea |" not in out.out
