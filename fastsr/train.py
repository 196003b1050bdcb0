"""SRGAN training. Stage ``pretrain``: SRResNet on a pixel loss (L1 or MSE).

Each run lives in one folder: ``checkpoint.pt`` (everything needed to resume exactly, written
atomically), ``log.csv`` (one row per logged step) and ``model.safetensors`` (the EMA generator,
exported with :func:`fastsr.save_model` at every checkpoint and at the end).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import functional
from .data import RandomCrops
from .evaluate import score_folder
from .models import SRResNet, save_model

log = logging.getLogger("fastsr")


class TrainingError(RuntimeError):
    """Training cannot go on (bad configuration, a non-finite loss...)."""


@dataclass
class TrainConfig:
    data: str
    out: str
    stage: str = "pretrain"
    steps: int = 10000
    batch_size: int = 16
    crop: int = 96
    scale: int = 4
    num_blocks: int = 16
    channels: int = 64
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 200
    loss: str = "mse"
    ema_decay: float = 0.999
    permute_channels: bool = True
    amp: str = "off"
    save_every: int = 500
    log_every: int = 10
    val: str | None = None
    seed: int = 0
    resume: bool = False
    device: str = "cpu"


class EMA:
    """Exponential moving average of a model's weights: ``avg = decay * avg + (1 - decay) * param``.

    Buffers (BatchNorm running statistics) are already averages and are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for key, value in model.state_dict().items():
            if key in params:
                self.state[key].mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
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


def _autocast(cfg: TrainConfig):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=dtype is not None)


def _pixel_loss(sr: torch.Tensor, hr: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return (sr.float() - hr).abs().mean()
    return functional.mse(sr.float(), hr)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the path of the exported EMA model."""
    if cfg.stage != "pretrain":
        raise TrainingError(f"stage {cfg.stage!r} is not available; this version trains --stage pretrain")
    if cfg.loss not in ("mse", "l1"):
        raise TrainingError(f"loss must be 'mse' or 'l1', got {cfg.loss!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, model_path = out / "checkpoint.pt", out / "log.csv", out / "model.safetensors"
    if ckpt_path.exists() and not cfg.resume:
        raise TrainingError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = RandomCrops(cfg.data, cfg.crop, cfg.scale, permute_channels=cfg.permute_channels, seed=cfg.seed)
    model = SRResNet(cfg.scale, cfg.num_blocks, cfg.channels).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.ema_decay)
    step = 0
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.state = state["ema"]
        data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("resumed %s at step %d", ckpt_path, step)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save() -> None:
        _save_atomic({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "ema": ema.state, "data": data.state_dict(),
                      "torch_rng": torch.get_rng_state()}, ckpt_path)
        save_model(ema.model_copy(model), model_path)

    new_log = not log_path.exists()
    from tqdm import tqdm

    with open(log_path, "a", newline="") as log_file:
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(["step", "loss", "lr", "seconds", "val_bicubic_psnr", "val_model_psnr"])
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="pretrain", dynamic_ncols=True)
        started, running_loss, loss_count = time.time(), 0.0, 0
        model.train()
        while step < cfg.steps:
            lr_img, hr_img = data.sample(cfg.batch_size)
            lr_img = lr_img.to(device).contiguous(memory_format=torch.channels_last)
            with _autocast(cfg):
                sr = model(lr_img)
            loss = _pixel_loss(sr, hr_img.to(device), cfg.loss)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}; the last good checkpoint "
                                    f"({ckpt_path}) is intact. Try a lower --lr or --amp off.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.update(model)
            step += 1
            running_loss += loss.item()
            loss_count += 1
            bar.update(1)
            val_row = ["", ""]
            if step % cfg.save_every == 0 or step == cfg.steps:
                save()
                if cfg.val:
                    scores = score_folder(ema.model_copy(model), cfg.val, cfg.scale)
                    bic = sum(s.bicubic_psnr for s in scores) / len(scores)
                    mod = sum(s.model_psnr for s in scores) / len(scores)
                    val_row = [f"{bic:.4f}", f"{mod:.4f}"]
                    bar.write(f"step {step}: val PSNR bicubic {bic:.2f} dB, model (EMA) {mod:.2f} dB ({mod - bic:+.2f})")
            if step % cfg.log_every == 0 or val_row[0]:
                mean_loss = running_loss / loss_count
                writer.writerow([step, f"{mean_loss:.6f}", f"{scheduler.get_last_lr()[0]:.3e}",
                                 f"{time.time() - started:.1f}", *val_row])
                log_file.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                running_loss, loss_count = 0.0, 0
        bar.close()
    return model_path
