"""Models, optimizers and one SRGAN training step: :class:`Trainer` (no files, no data)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import losses
from ..models import Discriminator, SRResNet, load_model
from ..models.checkpoint import ModelFileError
from ..nn import convert_sync_batchnorm
from .amp import AUTOCAST_DTYPES, resolve_amp
from .config import TrainConfig, TrainingError, validate
from .graph import GraphedStep
from .memory import keep_freed_memory
from .optim import Adam

CHECKPOINT_VERSION = 2


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
        self._index: tuple[nn.Module, list[tuple[str, nn.Module, str, bool]]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        averages, params, kept, buffers = [], [], [], []
        for key, module, name, is_param in self._entries(model):
            if is_param:
                averages.append(self.state[key])
                params.append(module._parameters[name])
            else:
                kept.append(self.state[key])
                buffers.append(module._buffers[name])
        # One multi-tensor call each instead of two ops per tensor (126 parameters in SRResNet: the
        # per-op overhead was ~3% of a CPU training step).
        if averages:
            torch._foreach_lerp_(averages, params, 1.0 - decay)
        if kept:
            torch._foreach_copy_(kept, buffers)

    def _entries(self, model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
        """(state key, owning module, attribute name, is a parameter) for every entry of the state,
        found once per model: building ``state_dict()`` and ``named_parameters()`` on every step cost
        ~0.5 ms of a 36 ms CPU step. The tensors themselves are looked up in their module at each
        update, so one replaced since (``model.to``, a new ``nn.Parameter``) is still the one read."""
        if self._index is None or self._index[0] is not model:
            entries = [(prefix + ("." if prefix else "") + name, module, name, is_param)
                       for prefix, module in model.named_modules()
                       for is_param, tensors in ((True, module._parameters), (False, module._buffers))
                       for name, t in tensors.items()
                       if t is not None and (is_param or name not in module._non_persistent_buffers_set)]
            if sorted(key for key, *_ in entries) != sorted(self.state):
                raise ValueError("the model's tensors do not match the average's state (a different architecture?)")
            self._index = (model, entries)
        return self._index[1]

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


def load_generator_weights(path: str | os.PathLike, generator: SRResNet) -> None:
    """Load ``--init`` weights into ``generator`` with :func:`fastsr.load_model`'s loader: a fastsr
    model file, or a training checkpoint (its EMA weights, which are what the run exported)."""
    path = Path(path)
    if not path.is_file():  # checked here: load_model would take a bare name for an embedded model
        raise TrainingError(f"--init {path}: file not found")
    # Loading builds a model, which draws from the seeded RNG the discriminator is initialised from next.
    with torch.random.fork_rng(devices=[]):
        try:
            model = load_model(path)
        except ModelFileError as exc:
            raise TrainingError(f"--init: {exc}") from None
    if model.config.get("arch") != "srresnet":
        raise TrainingError(f"--init {path}: not an SRResNet generator ({model.config.get('arch')!r})")
    try:
        generator.load_state_dict(model.state_dict())
    except RuntimeError:
        c, found = generator.config, model.config
        raise TrainingError(
            f"--init {path} does not fit a generator with --scale {c['scale']} --num-blocks {c['num_blocks']} "
            f"--channels {c['channels']}; pass the options it was trained with: --scale {found['scale']} "
            f"--num-blocks {found['num_blocks']} --channels {found['channels']}") from None


class Trainer:
    """Models, optimizers and one training step; no files, no data (see :func:`fastsr.train.train`).

    ``step(lr, hr)`` takes this rank's (B, 3, h, w) LR and (B, 3, h*scale, w*scale) HR float32
    batches in [0, 1] and returns the step's losses as a 1-D fp32 tensor (names:
    :attr:`loss_names`), averaged over the DDP ranks.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
        validate(cfg)
        if cfg.cuda_graph and world_size > 1:
            raise TrainingError("--cuda-graph runs in one process; under torchrun leave it off")
        self.cfg, self.device, self.world_size = cfg, device, world_size
        if device.type == "cpu":
            keep_freed_memory()  # large gradients in reused memory, not page-faulted in each step
        self.amp = resolve_amp(cfg.amp, device)  # "auto" -> bf16 or off; a slow choice warns
        self.gan = cfg.stage == "gan"
        self.loss_names = ["loss", "content", "adversarial", "d_real", "d_fake"] if self.gan else ["loss"]
        self.generator, self.discriminator = self._build_model()
        self.content = self._build_content_loss() if self.gan else None
        self.g_opt, self.g_sched = self._build_optim(self.generator, cfg.lr)
        self.d_opt = self.d_sched = None
        if self.gan:
            self.d_opt, self.d_sched = self._build_optim(self.discriminator, cfg.lr if cfg.d_lr is None else cfg.d_lr)
        # fp16 needs loss scaling (its range underflows small gradients); bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.ema = EMA(self.generator, cfg.ema_decay)
        self.g_train, self.d_train, self.d_plain = self._wrap_models()
        self._device_step = self._new_device_step()

    # -- setup --------------------------------------------------------------------------------
    def _build_model(self) -> tuple[SRResNet, Discriminator | None]:
        """The generator (with the ``--init`` weights) and, in the gan stage, the discriminator;
        on the device, channels_last, in training mode, with synchronised BatchNorm under DDP."""
        cfg = self.cfg
        generator = SRResNet(cfg.scale, cfg.num_blocks, cfg.channels)
        if cfg.init:
            load_generator_weights(cfg.init, generator)
        discriminator = Discriminator(channels=cfg.d_channels) if self.gan else None
        for m in (generator, discriminator):
            if m is None:
                continue
            if self.world_size > 1 and cfg.sync_bn:
                convert_sync_batchnorm(m)
            m.to(self.device).to(memory_format=torch.channels_last).train()
        return generator, discriminator

    def _build_content_loss(self) -> losses.ContentLoss:
        """The gan stage's content loss: on VGG19 features (``--vgg-weights``) or pixel MSE."""
        cfg = self.cfg
        if cfg.content_loss == "mse":
            return losses.ContentLoss(None)
        try:
            features = losses.VGGFeatures.from_file(cfg.vgg_weights, cfg.content_layer)
        except losses.VGGWeightsError as exc:
            raise TrainingError(str(exc)) from None
        features = features.to(self.device).to(memory_format=torch.channels_last)
        if self.amp in AUTOCAST_DTYPES:
            # The frozen convolutions' weights in the autocast dtype once: autocast caches its casts of
            # trainable weights only, so it cast these ~20M weights again on every call, twice a step
            # (the same values: rounding once or each time is one rounding). The input normalisation
            # stays fp32.
            features.features.to(AUTOCAST_DTYPES[self.amp])
        return losses.ContentLoss(torch.compile(features) if cfg.compile else features)

    def _build_optim(self, model: nn.Module, lr: float) -> tuple[Adam, torch.optim.lr_scheduler.LambdaLR]:
        """Adam at peak rate ``lr`` and its schedule (:func:`lr_factor`), stepped once per step."""
        # The backend's own kernel where it has one (optim.Adam), else PyTorch's fused kernel (CPU and
        # CUDA): one pass per tensor instead of ~10 ops, each with its scalar-to-tensor copies (Adam was
        # 8% of a CPU pretrain step on the single-tensor path).
        fused = self.device.type in ("cpu", "cuda")
        opt = Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), fused=fused)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, self.cfg))

    def _wrap_models(self) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        """The modules the step calls: (G, D, D as the generator step calls it), in DDP wrappers
        under several ranks (not the third: see :meth:`step`), compiled with ``--compile``."""
        g_train, d_train, d_plain = self.generator, self.discriminator, self.discriminator
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            g_train = nn.parallel.DistributedDataParallel(g_train, device_ids=ids)
            if self.gan:
                d_train = nn.parallel.DistributedDataParallel(d_train, device_ids=ids)
        if self.cfg.compile:
            g_train = torch.compile(g_train)
            if self.gan:
                d_train, d_plain = torch.compile(d_train), torch.compile(d_plain)
        return g_train, d_train, d_plain

    # -- one step -----------------------------------------------------------------------------
    def _new_device_step(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The step's device work: :meth:`_optimizer_steps`, replayed as one CUDA graph with
        --cuda-graph (fastsr.training.graph)."""
        if self.cfg.cuda_graph:
            return GraphedStep(self._optimizer_steps, [self.g_opt])
        return self._optimizer_steps

    def _autocast(self) -> torch.autocast:
        dtype = AUTOCAST_DTYPES.get(self.amp)
        # Autocast's cache of weight casts cannot live in a captured graph (fastsr.training.graph).
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None,
                              cache_enabled=not self.cfg.cuda_graph)

    def step(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """One optimizer step of G (and of D in the gan stage) on this rank's slice of the batch."""
        lr = lr.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        hr = hr.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        values = self._device_step(lr, hr)
        self.g_sched.step()
        if self.d_sched is not None:
            self.d_sched.step()
        self.ema.update(self.generator, self.g_sched.last_epoch)  # last_epoch = steps taken, resumed too
        if self.world_size > 1:
            # Every rank must take the same stop/go decision on a non-finite loss.
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def _optimizer_steps(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """The step's device work: G's (and D's) forward, losses, backward and update; the losses
        stacked (1-D fp32). No host reads or writes a CUDA graph could not replay."""
        with self._autocast():
            sr = self.g_train(lr)
        if self.gan:
            self.discriminator.requires_grad_(False)  # the generator step wants G's gradients only
        g_loss, values = self._generator_loss(sr, hr)
        self.g_opt.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.g_opt)
        if self.gan:
            self.discriminator.requires_grad_(True)
            values += self._discriminator_step(hr, sr.detach())
        self.scaler.update()
        return torch.stack([v.float() for v in values])

    def _generator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """G's loss (to backpropagate) and its logged terms (detached): loss (, content, adversarial)."""
        cfg = self.cfg
        if not self.gan:
            loss = losses.pixel_loss(sr, hr, cfg.loss)
            return loss, [loss.detach()]
        # D runs outside its DDP wrapper: D's reducer must see exactly one backward per step, D's own.
        with self._autocast():
            fake_logits = self.d_plain(sr)
            content = self.content(sr, hr)
        adversarial = losses.adversarial_loss(fake_logits, real=True)
        loss = cfg.content_weight * content + cfg.adv_weight * adversarial
        if cfg.gan_pixel_weight:
            loss = loss + cfg.gan_pixel_weight * losses.pixel_loss(sr, hr, cfg.loss)
        return loss, [loss.detach(), content.detach(), adversarial.detach()]

    def _discriminator_step(self, hr: torch.Tensor, fake: torch.Tensor) -> list[torch.Tensor]:
        """Real and fake batches go through D separately (each with its own BatchNorm statistics,
        as in the paper's implementation); one gradient all-reduce for both (no_sync on the first).
        Returns the two detached losses: d_real, d_fake."""
        self.d_opt.zero_grad(set_to_none=True)
        no_sync = self.d_train.no_sync if self.world_size > 1 else contextlib.nullcontext
        with no_sync():
            with self._autocast():
                real_logits = self.d_train(hr)
            d_real = losses.adversarial_loss(real_logits, real=True)
            self.scaler.scale(d_real).backward()
        with self._autocast():
            fake_logits = self.d_train(fake)
        d_fake = losses.adversarial_loss(fake_logits, real=False)
        self.scaler.scale(d_fake).backward()
        self.scaler.step(self.d_opt)
        return [d_real.detach(), d_fake.detach()]

    def current_lr(self) -> float:
        """The generator's learning rate for the next step."""
        return self.g_sched.get_last_lr()[0]

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything to resume exactly, but the step and RNG states (see :mod:`fastsr.training.checkpoint`)."""
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
        # A captured step would go on reading the optimizer's replaced state tensors: capture anew.
        self._device_step = self._new_device_step()

    def parameter_checksum(self) -> torch.Tensor:
        """(2,) float64: sum and sum of squares of every trainable weight (G, D and G's EMA), to compare
        ranks. Buffers are left out: without --sync-bn the BatchNorm running statistics are per rank."""
        tensors = [p for m in (self.generator, self.discriminator) if m is not None for p in m.parameters()]
        tensors += [self.ema.state[name] for name, _ in self.generator.named_parameters()]
        flat = torch.cat([t.detach().double().flatten() for t in tensors if t.is_floating_point()])
        return torch.stack([flat.sum(), flat.square().sum()])
