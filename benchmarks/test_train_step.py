"""One SRGAN training step (the real :class:`fastsr.train.Trainer` step) per backend vs eager and
torch.compile.

* ``gan``: generator step (VGG19 conv5_4 content + adversarial loss, backward, Adam) and
  discriminator step (real and fake, BCE-with-logits, backward, Adam); fp32.
* ``pretrain``: the generator step alone (pixel MSE), the part the fused ops speed up.

Each in fp32 and under bf16 autocast (``--amp bf16``: faster on GPUs and on CPUs with AMX).

Full size is the paper's: batch 16 of 96x96 HR crops (24x24 LR) at x4, SRResNet 16x64, D 64,
full-width VGG19 (random weights: the timing does not depend on their values). On a CPU this
is many seconds a step, so the CPU run uses batch 4 of 48x48 crops (``extra_info["reduced"]``),
plus one group at the paper's size for the fp32 pretrain step (about a second a step on 2 cores).
"Eager" is fastsr's ``torch`` backend: the fused ops as plain PyTorch ops, no fusion.
Compare timings only within one run on one machine.
"""

from __future__ import annotations

import pytest
import torch
from timing import mean_seconds

import fastsr
from fastsr import losses
from fastsr.train import TrainConfig, Trainer
from fastsr.training.graph import WARMUP_STEPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, CROP = (16, 96) if DEVICE == "cuda" else (4, 48)
REDUCED = "" if DEVICE == "cuda" else "CPU: batch 4 of 48x48 HR crops instead of 16 of 96x96"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """Full-size VGG19 in torchvision's layout, random weights (Kaiming scale)."""
    gen = torch.Generator().manual_seed(0)
    widths = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    state, c_in = {}, 3
    for name, (index, _) in losses.vgg19_layer_indices().items():
        c_out = widths[int(name[4])]
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(c_out)
        c_in = c_out
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(state, path)
    return str(path)


def _trainer(stage: str, vgg: str, compile_: bool, amp: str, batch: int = BATCH, crop: int = CROP,
             cuda_graph: bool = False) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(data="", out="", stage=stage, batch_size=batch, crop=crop, device=DEVICE,
                      content_loss="vgg", vgg_weights=vgg, compile=compile_, warmup_steps=0, amp=amp,
                      cuda_graph=cuda_graph)
    if stage == "gan":
        # The gan stage refuses to start from scratch; a fresh generator's weights do for timing.
        cfg.init = _fresh_generator_file(vgg)
    return Trainer(cfg, torch.device(DEVICE))


def _fresh_generator_file(vgg: str) -> str:
    from pathlib import Path

    path = Path(vgg).with_name("srresnet.safetensors")
    if not path.exists():
        fastsr.save_model(fastsr.SRResNet(4), path)
    return str(path)


def _run(benchmark, trainer: Trainer, backend: str, label: str, reduced: str = REDUCED, warmup: int = 1) -> None:
    batch, crop = trainer.cfg.batch_size, trainer.cfg.crop
    gen = torch.Generator().manual_seed(1)
    hr = torch.rand(batch, 3, crop, crop, generator=gen)
    lr = torch.nn.functional.avg_pool2d(hr, 4)

    def step():
        with fastsr.use_backend(backend):
            values = trainer.step(lr, hr)
        _sync()
        return values

    for _ in range(warmup):  # warm-up (compilation, the CUDA graph's capture) outside the timed rounds
        step()
    values = benchmark.pedantic(step, rounds=5 if DEVICE == "cpu" else 10, warmup_rounds=1)
    assert torch.isfinite(values).all()
    seconds = mean_seconds(benchmark)
    benchmark.extra_info.update({
        "what": label, "stage": trainer.cfg.stage, "device": DEVICE, "batch": batch, "hr_crop": crop,
        "amp": trainer.cfg.amp, "steps_per_s": 1 / seconds, "hr_mpix_per_s": batch * crop * crop / 1e6 / seconds,
        "reduced": reduced,
    })


STAGES = ["pretrain", "gan"]
AMP = ["off", "bf16"]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("stage", ["pretrain"])  # --cuda-graph covers the pretrain stage
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_train_step_backend_cuda_graph(benchmark, vgg_weights, backend, stage, amp):
    """The pretrain step replayed as one CUDA graph (``--cuda-graph``): a small-batch step on a GPU is
    host-bound, and a replay issues it with one launch (its id matches the GPU check's selection)."""
    ok, why = fastsr.ops.dispatch.availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend} unavailable on {DEVICE}: {why}")
    benchmark.group = f"train-step-{stage}-amp-{amp}"
    label = ("eager (fastsr[torch])" if backend == "torch" else f"fastsr[{backend}]") + " + CUDA graph"
    trainer = _trainer(stage, vgg_weights, False, amp, cuda_graph=True)
    _run(benchmark, trainer, backend, label, warmup=WARMUP_STEPS + 1)


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])  # Triton last: it autotunes on a GPU
def test_train_step_backend(benchmark, vgg_weights, stage, backend, amp):
    ok, why = fastsr.ops.dispatch.availability(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend} unavailable on {DEVICE}: {why}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, far too slow to benchmark")
    benchmark.group = f"train-step-{stage}-amp-{amp}"
    label = "eager (fastsr[torch])" if backend == "torch" else f"fastsr[{backend}]"
    _run(benchmark, _trainer(stage, vgg_weights, False, amp), backend, label)


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("stage", STAGES)
def test_train_step_torch_compile(benchmark, vgg_weights, stage, amp):
    benchmark.group = f"train-step-{stage}-amp-{amp}"
    _run(benchmark, _trainer(stage, vgg_weights, True, amp), "torch", "torch.compile(fastsr[torch])")


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU cases above already run at the paper's size")
@pytest.mark.parametrize("variant", ["torch", "cpp", "compile"])
def test_pretrain_step_at_paper_size_on_cpu(benchmark, vgg_weights, variant):
    """The fp32 pretrain step at the paper's size (batch 16 of 96x96 HR crops) on the CPU too: the
    reduced size above leaves per-op overheads a larger share than real training has."""
    ok, why = fastsr.ops.dispatch.availability("cpp", DEVICE)
    if variant == "cpp" and not ok:
        pytest.skip(f"backend cpp unavailable on {DEVICE}: {why}")
    benchmark.group = "train-step-pretrain-amp-off-paper-size"
    trainer = _trainer("pretrain", vgg_weights, variant == "compile", "off", batch=16, crop=96)
    label = {"torch": "eager (fastsr[torch])", "cpp": "fastsr[cpp]", "compile": "torch.compile(fastsr[torch])"}[variant]
    _run(benchmark, trainer, "cpp" if variant == "cpp" else "torch", label, reduced="")
