"""Train SRGAN in two stages on random crops of the HR images in --data.

Stage 1, pixel-loss pre-training from scratch (L1, cosine schedule, EMA; --amp auto is bf16
where the hardware has it, else fp32):
  fastsr train --data data/train --val data/val --out runs/pre --steps 16000 --batch-size 16 \\
      --crop 96 --lr 4e-4 --warmup-steps 300 --loss l1 --amp auto
(The default model's own recipe is `make default-model`: see the README.)
Stage 2, adversarial training from the stage-1 generator (VGG19 weights: a local file in
torchvision's format, e.g. vgg19-dcbb9e9d.pth; nothing is downloaded):
  fastsr train --stage gan --init runs/pre/checkpoint.pt --vgg-weights vgg19-dcbb9e9d.pth \\
      --data data/train --out runs/gan --steps 20000 --lr 1e-4
Several processes or GPUs (--batch-size is the global batch; only rank 0 writes):
  torchrun --nproc_per_node=4 -m fastsr train --device cuda ...
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from ..training.config import TrainConfig
from .options import add_options, options_from

HELP = "train SRGAN: pixel-loss pre-training or the GAN stage"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field, from its metadata (help, choices, flag, group)."""
    add_options(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from ..imageio import is_disk_full
    from ..train import train
    from . import terminate_as_interrupt

    cfg = options_from(args, TrainConfig, UserError)
    try:
        with terminate_as_interrupt():
            path = train(cfg)
    except (FileNotFoundError, ValueError) as exc:  # a file named in the options, a bad value found late
        raise UserError(str(exc)) from None
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # Checkpoints are written atomically: the last one survived the failed write.
        raise UserError(f"{exc.filename or cfg.out}: {exc.strerror.lower()}; the last checkpoint in {cfg.out} is "
                        f"intact: free some space and rerun with --resume") from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 wrote it
        print(f"exported the EMA generator to {path}")
    return 0
