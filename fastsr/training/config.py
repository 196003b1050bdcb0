"""The training configuration: one dataclass whose fields are also the ``fastsr train`` options.

Each field's metadata describes its command-line option (see :func:`fastsr.options.option`), so a
new field appears in the CLI without being restated there; :mod:`fastsr.commands.options` builds
the parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..data import SAMPLINGS
from ..errors import UserError
from ..ops.dispatch import BACKENDS
from ..options import check_values, flag_of, option

STAGES = ("pretrain", "gan")
GAN_GROUP = "gan stage"


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (bad configuration, a non-finite loss...): a UserError (one line, exit
    2), still a RuntimeError for callers that caught it as one."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` and in every checkpoint."""

    data: str = option(help="folder of HR images (searched recursively)")
    out: str = option(help="run folder: checkpoint.pt, log.csv, model.safetensors")
    stage: str = option("pretrain", "training stage", choices=STAGES)
    steps: int = option(10000, "total optimizer steps", at_least=1)
    batch_size: int = option(16, "crops per step: the global batch, split over the DDP ranks", at_least=1)
    crop: int = option(96, "HR crop size in pixels", at_least=1)
    scale: int = option(4, "upscaling factor", choices=(2, 4, 8))
    num_blocks: int = option(16, "residual blocks", at_least=0)
    channels: int = option(64, "feature channels", at_least=1)
    lr: float = option(2e-4, "peak learning rate of Adam", above=0.0)
    min_lr: float = option(1e-6, "learning rate at the end of the cosine decay", at_least=0.0)
    warmup_steps: int = option(200, "linear warm-up steps", at_least=0)
    loss: str = option("mse", "pixel loss: the pretrain loss, and the gan stage's optional pixel term",
                       choices=("mse", "l1"))
    ema_decay: float = option(0.999, "EMA decay of the exported weights", at_least=0.0, below=1.0)
    permute_channels: bool = option(True, "random RGB permutation of the crops")
    sampling: str = option("image", "how a crop picks its image: each equally often (image), or in proportion "
                                    "to its pixel count (area: every pixel equally likely)", choices=SAMPLINGS)
    shrink: float = option(1.0, "take each crop from its image shrunk by a random factor in [SHRINK, 1] "
                                "(antialiased): the photos at more scales; 1 = off", above=0.0)
    amp: str = option("off", "mixed precision (auto: bf16 where the hardware has it, else fp32)",
                      choices=("off", "auto", "bf16", "fp16"))
    save_every: int = option(500, "checkpoint every N steps", at_least=1)
    log_every: int = option(10, "CSV/TensorBoard row every N steps", at_least=1)
    val: str | None = option(None, "folder of HR images to evaluate (PSNR vs bicubic) at every checkpoint")
    seed: int = option(0, "random seed", at_least=0)
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    device: str = option("cpu", "cpu or cuda")
    # Added with the gan stage; absent from older config.json files.
    init: str | None = option(None, "generator weights to start from: a pretrain checkpoint.pt or a model file",
                              group=GAN_GROUP)
    content_loss: str = option("vgg", "VGG19 feature loss (needs --vgg-weights) or pixel MSE",
                               choices=("vgg", "mse"), group=GAN_GROUP)
    vgg_weights: str | None = option(None, "torchvision-format VGG19 state dict (.pth or .safetensors)",
                                     group=GAN_GROUP)
    content_layer: str = option("conv5_4", "VGG19 layer, e.g. conv5_4 (after ReLU, the paper) or conv5_4_prerelu",
                                group=GAN_GROUP)
    content_weight: float = option(1.0, "weight of the content loss", group=GAN_GROUP, at_least=0.0)
    adv_weight: float = option(1e-3, "weight of the adversarial loss", group=GAN_GROUP, at_least=0.0)
    gan_pixel_weight: float = option(0.0, "weight of an extra --loss pixel term in the generator loss",
                                     flag="--pixel-weight", group=GAN_GROUP, at_least=0.0)
    d_lr: float | None = option(None, "discriminator learning rate (default: --lr)", group=GAN_GROUP, above=0.0)
    d_channels: int = option(64, "discriminator base channels", group=GAN_GROUP, at_least=1)
    workers: int = option(0, "DataLoader worker processes", at_least=0)
    sync_bn: bool = option(True, "under DDP, BatchNorm statistics over the global batch, as one process would "
                                 "have them (--no-sync-bn: per rank, cheaper)")
    backend: str | None = option(None, "fused-op backend (default: $FASTSR_BACKEND, else auto)",
                                 choices=("auto", *BACKENDS))
    stop_at: int | None = option(None, "save and stop at this step (the schedule still runs to --steps)",
                                 at_least=1)
    compile: bool = option(False, "torch.compile the models (slow start, faster steps)")
    cuda_graph: bool = option(False, "replay the pretrain step as one CUDA graph after 3 warm-up steps "
                                     "(--device cuda, one process, --amp off or bf16): the host issues one "
                                     "launch a step instead of hundreds")
    overwrite: bool = option(False, "start a new run in an --out that holds another run's files (checkpoint.pt, "
                                    "config.json, log.csv, model.safetensors), replacing them")


# Fields that say how a run is carried out, not what it trains: a resumed run may change them.
# Paths are among them (a run folder may move; --init only matters at step 0), and --steps (a run
# may be lengthened or cut short; the schedule reads it live, so config.json stays true). Every
# other field is a hyper-parameter: resuming with another value would mix two trainings (the
# optimizer keeps the old --lr) while config.json claimed the new value.
RUN_CONTROL_FIELDS = frozenset({"data", "out", "val", "resume", "device", "init", "vgg_weights", "workers",
                                "backend", "stop_at", "compile", "cuda_graph", "save_every", "log_every",
                                "overwrite", "steps"})


def changed_hyperparameters(saved: dict, cfg: TrainConfig) -> list[str]:
    """``--flag OLD (now NEW)`` for each hyper-parameter of ``cfg`` that differs from the run's
    ``saved`` config (a checkpoint's); fields the saved config lacks (older fastsr) are skipped."""
    changed = []
    for field in dataclasses.fields(cfg):
        if field.name in RUN_CONTROL_FIELDS or field.name not in saved:
            continue
        old, new = saved[field.name], getattr(cfg, field.name)
        if old != new:
            changed.append(f"{flag_of(field)} {old} (now {new})")
    return changed


def _check_device(device: str) -> None:
    """``--device`` names a device this machine has (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TrainingError(f"--device {device!r}: unknown device; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {device!r}: unsupported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: no CUDA GPU is available (torch.cuda.is_available() is False)")


def check_cuda_graph(cfg: TrainConfig) -> None:
    """--cuda-graph's conditions that the configuration alone decides (one process: Trainer)."""
    if torch.device(cfg.device).type != "cuda":
        raise TrainingError(f"--cuda-graph needs --device cuda (CUDA graphs are a GPU feature), not {cfg.device}")
    if cfg.stage != "pretrain":
        raise TrainingError("--cuda-graph covers the pretrain stage; run the gan stage without it")
    if cfg.amp == "fp16":
        raise TrainingError("--cuda-graph with --amp fp16: the loss scaler checks every step's gradients on the "
                            "host; use --amp bf16 (the same speed on GPUs with bf16) or off")
    if cfg.compile:
        raise TrainingError("--cuda-graph with --compile: choose one (torch.compile has its own CUDA graphs, "
                            "mode reduce-overhead)")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`TrainingError` for a value outside a field's choices or bounds, options that
    contradict each other, or a gan stage without its inputs."""
    check_values(TrainConfig, lambda name: getattr(cfg, name), TrainingError)
    if cfg.crop % cfg.scale:
        raise TrainingError(f"--crop {cfg.crop} must be a multiple of --scale {cfg.scale} (the LR crop is "
                            f"crop / scale pixels)")
    _check_device(cfg.device)
    if cfg.shrink > 1.0:
        raise TrainingError(f"--shrink {cfg.shrink:g} must be at most 1 (a factor the images are shrunk by)")
    if cfg.min_lr > cfg.lr:
        raise TrainingError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the schedule decays from --lr "
                            f"down to --min-lr")
    if cfg.cuda_graph:
        check_cuda_graph(cfg)
    if cfg.stage == "gan" and not cfg.init:
        raise TrainingError("the gan stage starts from a pre-trained generator: pass --init PATH "
                            "(a pretrain run's checkpoint.pt or model.safetensors)")
    if cfg.stage == "gan" and cfg.content_loss == "vgg" and not cfg.vgg_weights:
        raise TrainingError("the gan stage's VGG content loss needs VGG19 weights: pass --vgg-weights PATH "
                            "(torchvision's vgg19 state dict, e.g. vgg19-dcbb9e9d.pth; nothing is downloaded), "
                            "or choose --content-loss mse")
