"""SRGAN training, the standard two stages (Ledig et al. 2017).

* ``pretrain``: SRResNet on a pixel loss (MSE or L1).
* ``gan``: the generator starts from a pre-trained one (``--init``); generator loss =
  ``content_weight * content + adv_weight * adversarial (+ gan_pixel_weight * pixel)``, with the
  content loss on VGG19 features (``conv5_4`` by default, maps scaled by 1/12.75, ImageNet
  normalisation) or plain MSE; the discriminator is trained with BCE-with-logits.

Each run lives in one folder: ``checkpoint.pt`` (everything needed to resume exactly: models,
optimizers, schedulers, AMP scaler, EMA, RNG states, step; written atomically), ``log.csv``
(one row per logged step), ``model.safetensors`` (the EMA generator, exported with
:func:`fastsr.save_model` at every checkpoint and at the end; ``discriminator.safetensors`` too
in the gan stage) and TensorBoard events when ``tensorboard`` is installed.

Data position = step: every crop is drawn from a generator seeded by (seed, step, index in the
global batch), so a resumed run, any number of DataLoader workers and any number of DDP ranks
all see the same crops.

Multi-process (DDP): ``torchrun --nproc_per_node=N -m fastsr train ...``. ``--batch-size`` is the
global batch, split evenly over the ranks; only rank 0 writes files. BatchNorm statistics are
synchronised over the ranks (``--sync-bn``, the default), so N ranks train the same model as
one process with the whole batch would; torch's own ``SyncBatchNorm`` is GPU-only, so fastsr
uses :class:`SyncBatchNorm2d` (all-reduce of the per-channel sums, differentiable) on every device.
``--no-sync-bn`` keeps per-rank statistics (cheaper; then N ranks x B/N crops is not the same
training as one process with B crops).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import losses
from .backend import use_backend
from .data import RandomCrops, StepBatches, find_images
from .evaluate import score_folder
from .models import Discriminator, SRResNet, load_model, save_model

log = logging.getLogger("fastsr")

CHECKPOINT_VERSION = 2
STAGES = ("pretrain", "gan")


class TrainingError(RuntimeError):
    """Training cannot go on (bad configuration, a non-finite loss...)."""


@dataclass
class TrainConfig:
    data: str
    out: str
    stage: str = "pretrain"
    steps: int = 10000
    batch_size: int = 16  # global batch: split over DDP ranks
    crop: int = 96
    scale: int = 4
    num_blocks: int = 16
    channels: int = 64
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 200
    loss: str = "mse"  # pixel loss: the pretrain loss, and the gan stage's optional pixel term
    ema_decay: float = 0.999
    permute_channels: bool = True
    amp: str = "off"
    save_every: int = 500
    log_every: int = 10
    val: str | None = None
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    # Added with the gan stage; absent from older config.json files.
    init: str | None = None  # generator weights: a checkpoint.pt or a fastsr model file
    content_loss: str = "vgg"  # vgg | mse
    vgg_weights: str | None = None
    content_layer: str = "conv5_4"
    content_weight: float = 1.0
    adv_weight: float = 1e-3
    gan_pixel_weight: float = 0.0
    d_lr: float | None = None  # default: lr
    d_channels: int = 64
    workers: int = 0
    sync_bn: bool = True
    backend: str | None = None  # None: the backend in effect (FASTSR_BACKEND, else auto)
    stop_at: int | None = None  # save and stop at this step (time-limited jobs); schedule still uses steps
    compile: bool = False  # torch.compile the generator, discriminator and VGG features


class EMA:
    """Exponential moving average of a model's weights: ``avg = decay * avg + (1 - decay) * param``.

    With ``step`` (optimizer steps taken) the decay warms up as ``min(decay, (1 + step) / (10 + step))``:
    a plain 0.999 average still carries a visible share of the random initial weights after
    thousands of steps (its validation PSNR was 4 dB below the raw weights' at step 2,500), so
    early checkpoints would be useless. Buffers (BatchNorm running statistics) are already
    averages and are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        for key, value in model.state_dict().items():
            if key in params:
                self.state[key].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                self.state[key].copy_(value)

    def model_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the averaged weights, in eval mode."""
        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(self.state)
        return ema_model.eval()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.min_lr / cfg.lr
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum) over the default process group: the gradient of a
    global sum with respect to each rank's contribution is the all-reduced incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all DDP ranks.

    Works on any device and process-group backend (gloo included): the per-channel sums are
    all-reduced with a differentiable all-reduce (:class:`_AllReduceSum`), so the
    backward pass gets the cross-rank terms right. Two passes (mean, then centred squares) for
    the variance, as numerically safe as the single-process BatchNorm. Without an initialised
    process group (or in eval mode) it is a plain BatchNorm2d; state dict keys are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        xf = x.float()
        dims = (0, 2, 3)
        count = all_reduce(xf.new_tensor([float(x.numel() // x.shape[1])]))
        mean = all_reduce(xf.sum(dims)) / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SyncBatchNorm2d` sharing its
    parameters and buffers (in place for children; returns the converted module)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync.to(next(iter(module.state_dict().values())).device).train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module


def _autocast(amp: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor: checkpoints load with weights_only=True (no pickled numpy).
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": int(n["pos"])}, "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples; a round trip through a checkpoint may turn them into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def load_generator_weights(path: str | os.PathLike, generator: SRResNet) -> None:
    """Load ``--init`` weights into ``generator``: a fastsr model file, or a training checkpoint
    (its EMA weights, which are what the run exported)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"--init {path}: file not found")
    if path.suffix == ".safetensors":
        model = load_model(path)
        if getattr(model, "config", {}).get("arch") != "srresnet":
            raise TrainingError(f"--init {path}: not an SRResNet generator ({model.config.get('arch')!r})")
        state = model.state_dict()
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file
            raise TrainingError(f"--init {path}: not a readable checkpoint ({exc})") from None
        if not isinstance(ckpt, dict) or not ("ema" in ckpt or "model" in ckpt):
            raise TrainingError(f"--init {path}: not a fastsr training checkpoint (no 'ema' or 'model' weights)")
        state = ckpt["ema"] if "ema" in ckpt else ckpt["model"]
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        c = generator.config
        raise TrainingError(
            f"--init {path} does not fit a generator with --scale {c['scale']} --num-blocks {c['num_blocks']} "
            f"--channels {c['channels']}; pass the options it was trained with ({str(exc).splitlines()[0]})"
        ) from None


class Trainer:
    """Models, optimizers and one training step; no files, no data (see :func:`train`).

    ``step(lr, hr)`` takes this rank's (B, 3, h, w) LR and (B, 3, h*scale, w*scale) HR float32
    batches in [0, 1] and returns the step's losses as a 1-D fp32 tensor (names:
    :attr:`loss_names`), averaged over the DDP ranks.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
        if cfg.stage not in STAGES:
            raise TrainingError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
        if cfg.loss not in ("mse", "l1"):
            raise TrainingError(f"loss must be 'mse' or 'l1', got {cfg.loss!r}")
        if cfg.amp not in ("off", "bf16", "fp16"):
            raise TrainingError(f"amp must be off, bf16 or fp16, got {cfg.amp!r}")
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.gan = cfg.stage == "gan"
        distributed = world_size > 1

        self.generator = SRResNet(cfg.scale, cfg.num_blocks, cfg.channels)
        if cfg.init:
            load_generator_weights(cfg.init, self.generator)
        elif self.gan:
            raise TrainingError("the gan stage starts from a pre-trained generator: pass --init PATH "
                                "(a pretrain run's checkpoint.pt or model.safetensors)")
        self.discriminator = Discriminator(channels=cfg.d_channels) if self.gan else None
        self.content = None
        if self.gan:
            if cfg.content_loss == "vgg":
                if not cfg.vgg_weights:
                    raise TrainingError(
                        "the gan stage's VGG content loss needs VGG19 weights: pass --vgg-weights PATH "
                        "(torchvision's vgg19 state dict, e.g. vgg19-dcbb9e9d.pth; nothing is downloaded), "
                        "or choose --content-loss mse")
                try:
                    features = losses.VGGFeatures.from_file(cfg.vgg_weights, cfg.content_layer)
                except losses.VGGWeightsError as exc:
                    raise TrainingError(str(exc)) from None
                features = features.to(device).to(memory_format=torch.channels_last)
            elif cfg.content_loss == "mse":
                features = None
            else:
                raise TrainingError(f"content loss must be 'vgg' or 'mse', got {cfg.content_loss!r}")
            self.content = losses.ContentLoss(features)

        models = [m for m in (self.generator, self.discriminator) if m is not None]
        for m in models:
            if distributed and cfg.sync_bn:
                convert_sync_batchnorm(m)
            m.to(device).to(memory_format=torch.channels_last).train()
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.g_sched = torch.optim.lr_scheduler.LambdaLR(self.g_opt, lambda s: lr_factor(s, cfg))
        self.d_opt = self.d_sched = None
        if self.gan:
            d_lr = cfg.lr if cfg.d_lr is None else cfg.d_lr
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=d_lr, betas=(0.9, 0.99))
            self.d_sched = torch.optim.lr_scheduler.LambdaLR(self.d_opt, lambda s: lr_factor(s, cfg))
        # fp16 needs loss scaling (its range underflows small gradients); bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ema = EMA(self.generator, cfg.ema_decay)

        self.g_train: nn.Module = self.generator
        self.d_train: nn.Module | None = self.discriminator
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.g_train = nn.parallel.DistributedDataParallel(self.generator, device_ids=ids)
            if self.gan:
                self.d_train = nn.parallel.DistributedDataParallel(self.discriminator, device_ids=ids)
        # The discriminator as the generator step calls it: outside DDP (see step()).
        self.d_plain: nn.Module | None = self.discriminator
        if cfg.compile:
            self.g_train = torch.compile(self.g_train)
            if self.gan:
                self.d_train, self.d_plain = torch.compile(self.d_train), torch.compile(self.discriminator)
                if self.content.features is not None:
                    self.content.features = torch.compile(self.content.features)
        self.loss_names = (["loss", "content", "adversarial", "d_real", "d_fake"] if self.gan else ["loss"])

    # -- one step ---------------------------------------------------------------------------
    def step(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        cfg, amp = self.cfg, lambda: _autocast(self.cfg.amp, self.device)
        lr = lr.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        hr = hr.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with amp():
            sr = self.g_train(lr)
        if not self.gan:
            g_loss = losses.pixel_loss(sr, hr, cfg.loss)
            values = [g_loss.detach()]
        else:
            # Generator step. D's weights are frozen and D runs outside its DDP wrapper: only
            # G's gradients are wanted here, and D's DDP reducer must see exactly one backward.
            self.discriminator.requires_grad_(False)
            with amp():
                fake_logits = self.d_plain(sr)
                content = self.content(sr, hr)
            adversarial = losses.adversarial_loss(fake_logits, real=True)
            g_loss = cfg.content_weight * content + cfg.adv_weight * adversarial
            if cfg.gan_pixel_weight:
                g_loss = g_loss + cfg.gan_pixel_weight * losses.pixel_loss(sr, hr, cfg.loss)
        self.g_opt.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.g_opt)
        if self.gan:
            self.discriminator.requires_grad_(True)
            d_real, d_fake = self._discriminator_step(hr, sr.detach(), amp)
            values = [g_loss.detach(), content.detach(), adversarial.detach(), d_real, d_fake]
        self.scaler.update()
        self.g_sched.step()
        if self.d_sched is not None:
            self.d_sched.step()
        self.ema.update(self.generator, self.g_sched.last_epoch)  # last_epoch = steps taken, resumed too
        values = torch.stack([v.float() for v in values])
        if self.world_size > 1:
            # Every rank must take the same stop/go decision on a non-finite loss.
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def _discriminator_step(self, hr: torch.Tensor, fake: torch.Tensor, amp) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and fake batches go through D separately (each with its own BatchNorm statistics,
        as in the paper's implementation); one gradient all-reduce for both (no_sync on the first)."""
        self.d_opt.zero_grad(set_to_none=True)
        no_sync = self.d_train.no_sync if self.world_size > 1 else contextlib.nullcontext
        with no_sync():
            with amp():
                real_logits = self.d_train(hr)
            d_real = losses.adversarial_loss(real_logits, real=True)
            self.scaler.scale(d_real).backward()
        with amp():
            fake_logits = self.d_train(fake)
        d_fake = losses.adversarial_loss(fake_logits, real=False)
        self.scaler.scale(d_fake).backward()
        self.scaler.step(self.d_opt)
        return d_real.detach(), d_fake.detach()

    def current_lr(self) -> float:
        return self.g_sched.get_last_lr()[0]

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "version": CHECKPOINT_VERSION, "stage": self.cfg.stage,
            "model": self.generator.state_dict(), "optimizer": self.g_opt.state_dict(),
            "scheduler": self.g_sched.state_dict(), "ema": self.ema.state,
            "scaler": self.scaler.state_dict(),
        }
        if self.gan:
            state.update(discriminator=self.discriminator.state_dict(), d_optimizer=self.d_opt.state_dict(),
                         d_scheduler=self.d_sched.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint; keys added after version 1 (discriminator, scaler...) may be absent."""
        stage = state.get("stage", "pretrain")
        if stage != self.cfg.stage:
            raise TrainingError(f"the checkpoint is from the {stage} stage, this run is --stage {self.cfg.stage}; "
                                f"start the gan stage in a new --out with --init pointing at that checkpoint")
        self.generator.load_state_dict(state["model"])
        self.g_opt.load_state_dict(state["optimizer"])
        self.g_sched.load_state_dict(state["scheduler"])
        self.ema.state = {k: v.to(self.device) for k, v in state["ema"].items()}
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.gan:
            missing = [k for k in ("discriminator", "d_optimizer", "d_scheduler") if k not in state]
            if missing:
                raise TrainingError(f"gan-stage checkpoint lacks {', '.join(missing)}")
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_opt.load_state_dict(state["d_optimizer"])
            self.d_sched.load_state_dict(state["d_scheduler"])

    def parameter_checksum(self) -> torch.Tensor:
        """(2,) float64: sum and sum of squares of every trainable weight (G, D and G's EMA), to compare
        ranks. Buffers are left out: without --sync-bn the BatchNorm running statistics are per rank."""
        tensors = [p for m in (self.generator, self.discriminator) if m is not None for p in m.parameters()]
        tensors += [self.ema.state[name] for name, _ in self.generator.named_parameters()]
        flat = torch.cat([t.detach().double().flatten() for t in tensors if t.is_floating_point()])
        return torch.stack([flat.sum(), flat.square().sum()])


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device)
    if world <= 1:
        return 0, 1, device, False
    created = False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def _check_ranks_in_sync(trainer: Trainer, step: int) -> None:
    """Raise if the ranks' weights differ (they must be bit-identical under DDP)."""
    mine = trainer.parameter_checksum()
    gathered = [torch.empty_like(mine) for _ in range(trainer.world_size)]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"DDP ranks diverged at step {step}: weight checksums "
                            f"{[tuple(round(float(v), 6) for v in g) for g in gathered]}")
    log.debug("step %d: %d ranks in sync", step, trainer.world_size)


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the path of the exported EMA generator."""
    if cfg.stage not in STAGES:
        raise TrainingError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.steps < 1 or cfg.save_every < 1 or cfg.log_every < 1:
        raise TrainingError("--steps, --save-every and --log-every must be >= 1")
    if cfg.workers < 0:
        raise TrainingError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.val and not find_images(cfg.val):
        raise TrainingError(f"--val {cfg.val}: no images found")
    rank, world, device, created_group = _setup_distributed(cfg)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    if cfg.batch_size % world:
        raise TrainingError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                            f"{world} processes")
    out = Path(cfg.out)
    ckpt_path, log_path, model_path = out / "checkpoint.pt", out / "log.csv", out / "model.safetensors"
    if ckpt_path.exists() and not cfg.resume:
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    writer_rank = rank == 0
    if writer_rank:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    crops = RandomCrops(cfg.data, cfg.crop, cfg.scale, permute_channels=cfg.permute_channels, seed=cfg.seed)
    trainer = Trainer(cfg, device, world)
    step = 0
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        trainer.load_state_dict(state)
        step = state["step"]
        if "rng" in state:
            _set_rng_state(state["rng"], device)
        else:  # version-1 checkpoint
            torch.set_rng_state(state["torch_rng"].cpu())
        if "generator" in state.get("data", {}):
            log.warning("%s is from an older fastsr that drew crops from one sequential generator; "
                        "from step %d on, crops come from per-step seeds", ckpt_path, step)
        log.info("resumed %s at step %d", ckpt_path, step)
    elif cfg.resume:
        log.info("no checkpoint in %s yet: starting a new run", out)
    last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    if writer_rank:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save() -> None:
        if world > 1:
            _check_ranks_in_sync(trainer, step)
        if not writer_rank:
            return
        _save_atomic({**trainer.state_dict(), "step": step, "rng": _rng_state(device),
                      "data": {"scheme": "per-step-seed", "seed": cfg.seed},
                      "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg)}, ckpt_path)
        save_model(trainer.ema.model_copy(trainer.generator), model_path)
        if trainer.gan:
            save_model(trainer.discriminator, out / "discriminator.safetensors")

    local = cfg.batch_size // world
    loader = torch.utils.data.DataLoader(
        StepBatches(crops, rank * local, local), batch_size=None, sampler=range(step, last),
        num_workers=cfg.workers, pin_memory=device.type == "cuda",
    )
    columns = ["step", *trainer.loss_names, "lr", "seconds", "val_bicubic_psnr", "val_model_psnr"]
    log_file = csv_writer = tb = bar = None
    if writer_rank:
        new_log = not log_path.exists()
        log_file = open(log_path, "a", newline="")
        csv_writer = csv.writer(log_file)
        if new_log:
            csv_writer.writerow(columns)
        tb = _tensorboard_writer(out)
        from tqdm import tqdm

        bar = tqdm(total=last, initial=step, unit="step", desc=cfg.stage, dynamic_ncols=True)
    try:
        with use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext():
            started, sums, count = time.time(), torch.zeros(len(trainer.loss_names)), 0
            for lr_img, hr_img in loader:
                values = trainer.step(lr_img, hr_img).cpu()
                if not torch.isfinite(values).all():
                    bad = ", ".join(f"{n}={float(v)}" for n, v in zip(trainer.loss_names, values, strict=True))
                    raise TrainingError(f"non-finite loss at step {step + 1} ({bad}); stopped. The last good "
                                        f"checkpoint ({ckpt_path}) is intact. Try a lower --lr or --amp off/bf16.")
                step += 1
                sums += values
                count += 1
                val_row = ["", ""]
                if step % cfg.save_every == 0 or step == last:
                    save()
                    if cfg.val and writer_rank:
                        val_row = _validate(trainer, cfg, step, bar, tb)
                if not writer_rank:
                    continue
                bar.update(1)
                if step % cfg.log_every == 0 or val_row[0] or step == last:
                    means = sums / count
                    csv_writer.writerow([step, *(f"{float(v):.6f}" for v in means), f"{trainer.current_lr():.3e}",
                                         f"{time.time() - started:.1f}", *val_row])
                    log_file.flush()
                    if tb is not None:
                        for name, v in zip(trainer.loss_names, means, strict=True):
                            tb.add_scalar(f"train/{name}", float(v), step)
                        tb.add_scalar("train/lr", trainer.current_lr(), step)
                    bar.set_postfix({n: f"{float(v):.4f}" for n, v in zip(trainer.loss_names, means, strict=True)}
                                    | {"lr": f"{trainer.current_lr():.1e}"})
                    sums.zero_()
                    count = 0
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
    if world > 1:
        dist.barrier()  # rank 0 has written the final files before anyone returns
    return model_path


def _validate(trainer: Trainer, cfg: TrainConfig, step: int, bar, tb) -> list[str]:
    """PSNR of the EMA generator vs bicubic on ``cfg.val``; returns the two CSV cells."""
    scores = score_folder(trainer.ema.model_copy(trainer.generator), cfg.val, cfg.scale)
    bic = sum(s.bicubic_psnr for s in scores) / len(scores)
    mod = sum(s.model_psnr for s in scores) / len(scores)
    bar.write(f"step {step}: val PSNR bicubic {bic:.2f} dB, model (EMA) {mod:.2f} dB ({mod - bic:+.2f})")
    if tb is not None:
        tb.add_scalar("val/bicubic_psnr", bic, step)
        tb.add_scalar("val/model_psnr", mod, step)
    return [f"{bic:.4f}", f"{mod:.4f}"]
