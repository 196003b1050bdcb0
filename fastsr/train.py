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

This module is the recipe: :func:`train` sets a run up and runs its loop. The parts live in
:mod:`fastsr.training`: ``config`` (:class:`TrainConfig`, from which the CLI is generated),
``trainer`` (models, optimizers, one step), ``checkpoint`` (save and resume), ``loggers`` (CSV,
TensorBoard, progress bar); the process group is :mod:`fastsr.distributed`, ``SyncBatchNorm2d`` is in :mod:`fastsr.nn`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch

from .atomic import check_destination, one_writer
from .data import RandomCrops, StepBatches, find_images
from .distributed import DistInfo, process_group
from .evaluate import score_folder
from .nn import SyncBatchNorm2d, convert_sync_batchnorm
from .ops.dispatch import use_backend
from .training.checkpoint import Checkpointer
from .training.config import STAGES, TrainConfig, TrainingError, validate
from .training.loggers import CSVLogger, LoggerGroup, MetricLogger, ProgressLogger, TensorBoardLogger
from .training.trainer import CHECKPOINT_VERSION, EMA, Trainer, load_generator_weights, lr_factor

__all__ = [
    "CHECKPOINT_VERSION", "EMA", "STAGES", "SyncBatchNorm2d", "TrainConfig", "Trainer", "TrainingError",
    "convert_sync_batchnorm", "load_generator_weights", "lr_factor", "train",
]


def train(cfg: TrainConfig) -> Path:
    """Run (or resume, with ``cfg.resume``) the training run in ``cfg.out``; returns the path of the
    exported EMA generator (``model.safetensors``). Under torchrun every rank calls it."""
    validate(cfg)
    if cfg.val and not find_images(cfg.val):
        raise TrainingError(f"--val {cfg.val}: no images found")
    with process_group(cfg.device) as dist_info:
        recipe = _Recipe(cfg, dist_info)
        try:
            recipe.check_out()
            # One run per folder, as one upscale per output: two would interleave log.csv and checkpoints.
            lock = one_writer(recipe.out.resolve()) if dist_info.is_writer else contextlib.nullcontext()
            with lock:
                recipe.setup()
                recipe.run()
            return recipe.checkpointer.model_path
        finally:
            recipe.release()


# What a run writes into --out: a new run replaces them only with --overwrite (docs/safety.md).
RUN_FILES = ("checkpoint.pt", "config.json", "log.csv", "model.safetensors", "discriminator.safetensors")


def _overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same path or one lies inside the other (symlinks resolved)."""
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or ra in rb.parents or rb in ra.parents


class _Recipe:
    """One rank's part of a run: :meth:`setup` builds everything, :meth:`run` trains to the last step."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.out = Path(cfg.out)
        self.checkpointer = Checkpointer(self.out, cfg, dist_info)
        self.last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)

    def check_out(self) -> None:
        """The run folder before anything is written (docs/safety.md): it holds none of the inputs
        and lies in none; a new run finds no other run's files there (unless --overwrite); the
        folder exists afterwards (the lock file goes beside it)."""
        cfg = self.cfg
        if cfg.batch_size % self.dist.world_size:
            raise TrainingError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                                f"{self.dist.world_size} processes")
        for flag, path in (("--data", cfg.data), ("--val", cfg.val), ("--init", cfg.init),
                           ("--vgg-weights", cfg.vgg_weights)):
            if path and _overlaps(Path(path), self.out):
                raise TrainingError(f"--out {self.out} and {flag} {path} overlap (one is, or lies inside, the other); "
                                    "the run folder must be separate from its inputs")
        if self.checkpointer.path.exists() and not cfg.resume and not cfg.overwrite:
            raise TrainingError(f"{self.checkpointer.path} exists: pass --resume to continue that run, "
                                f"or choose another --out (--overwrite starts a new run over it)")
        if not cfg.resume:
            for name in RUN_FILES:
                if os.path.lexists(self.out / name):  # another run's file: replaced only with --overwrite
                    check_destination(self.out / name, overwrite=cfg.overwrite, what="--out file")
        if self.dist.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        """Drop the trainer and the data, and collect them now, while the process group is alive:
        DDP's reducer holds the group and its last communication works, whose tensors hold Python
        references (and the trainer is in a reference cycle, which only the collector frees). Left to
        interpreter exit, a gloo thread freed them after finalisation had begun and aborted the rank
        ("terminate called without an active exception") in about one torchrun run in 25."""
        self.trainer = self.loader = None
        gc.collect()

    def setup(self) -> None:
        """Build the trainer (models, optimizers), resume, build the data."""
        cfg = self.cfg
        if self.dist.is_writer and cfg.overwrite and not cfg.resume:
            (self.out / "log.csv").unlink(missing_ok=True)  # a new run's log starts empty, not after the old rows
        torch.manual_seed(cfg.seed)  # the models' initial weights
        self.trainer = Trainer(cfg, self.dist.device, self.dist.world_size)
        self.step = self.checkpointer.resume(self.trainer) if cfg.resume else 0
        if self.dist.is_writer:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.loader = self._build_data()

    def _build_data(self) -> torch.utils.data.DataLoader:
        """This rank's slice of each step's batch, for the steps still to go (see :class:`RandomCrops`)."""
        cfg = self.cfg
        crops = RandomCrops(cfg.data, cfg.crop, cfg.scale, permute_channels=cfg.permute_channels, seed=cfg.seed,
                            sampling=cfg.sampling, shrink=cfg.shrink)
        local = cfg.batch_size // self.dist.world_size
        return torch.utils.data.DataLoader(
            StepBatches(crops, self.dist.rank * local, local), batch_size=None, sampler=range(self.step, self.last),
            num_workers=cfg.workers, pin_memory=self.dist.device.type == "cuda",
        )

    def _build_loggers(self) -> MetricLogger:
        """log.csv, TensorBoard (when installed) and a progress bar on the writer rank; nothing elsewhere."""
        if not self.dist.is_writer:
            return LoggerGroup([])
        names = self.trainer.loss_names
        columns = {**dict.fromkeys(names, ".6f"), "lr": ".3e", "seconds": ".1f",
                   "val_bicubic_psnr": ".4f", "val_model_psnr": ".4f"}
        tags = {**{n: f"train/{n}" for n in names}, "lr": "train/lr",
                "val_bicubic_psnr": "val/bicubic_psnr", "val_model_psnr": "val/model_psnr"}
        loggers = [CSVLogger(self.out / "log.csv", columns), TensorBoardLogger.create(self.out / "tensorboard", tags),
                   ProgressLogger(self.last, self.step, self.cfg.stage, names)]
        return LoggerGroup([logger for logger in loggers if logger is not None])

    def run(self) -> None:
        """Train to the last step: a checkpoint (and validation, with --val) every --save-every steps,
        a log row every --log-every steps, both at the last step."""
        cfg, trainer = self.cfg, self.trainer
        backend = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
        with backend, contextlib.closing(self._build_loggers()) as logger:
            started, sums, count = time.time(), torch.zeros(len(trainer.loss_names)), 0
            for lr_img, hr_img in self.loader:
                values = self._checked_step(lr_img, hr_img)
                self.step += 1
                sums += values
                count += 1
                metrics = {}
                if self.step % cfg.save_every == 0 or self.step == self.last:
                    self.checkpointer.save(trainer, self.step)
                    if cfg.val and self.dist.is_writer:
                        metrics = self._validate()
                logger.on_step(self.step)
                if self.step % cfg.log_every == 0 or metrics or self.step == self.last:
                    means = dict(zip(trainer.loss_names, (sums / count).tolist(), strict=True))
                    logger.log(self.step, {**means, "lr": trainer.current_lr(), "seconds": time.time() - started,
                                           **metrics})
                    sums.zero_()
                    count = 0

    def _checked_step(self, lr_img: torch.Tensor, hr_img: torch.Tensor) -> torch.Tensor:
        """:meth:`Trainer.step` on this rank's (B, 3, h, w) LR and (B, 3, H, W) HR float32 batch; returns
        the losses (1-D, CPU). A non-finite loss stops the run, on every rank (the losses are averaged
        over the ranks), before anything is saved."""
        values = self.trainer.step(lr_img, hr_img).cpu()
        if not torch.isfinite(values).all():
            bad = ", ".join(f"{n}={float(v)}" for n, v in zip(self.trainer.loss_names, values, strict=True))
            raise TrainingError(f"non-finite loss at step {self.step + 1} ({bad}); stopped. The last good "
                                f"checkpoint ({self.checkpointer.path}) is intact. Try a lower --lr or --amp off/bf16.")
        return values

    def _validate(self) -> dict[str, float]:
        """Mean PSNR (dB) of bicubic and of the EMA generator on the --val images."""
        scores = score_folder(self.trainer.ema.model_copy(self.trainer.generator), self.cfg.val, self.cfg.scale)
        return {"val_bicubic_psnr": sum(s.bicubic_psnr for s in scores) / len(scores),
                "val_model_psnr": sum(s.model_psnr for s in scores) / len(scores)}
