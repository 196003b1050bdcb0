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
import dataclasses
import os
import typing

from ..errors import UserError
from ..training.config import TrainConfig, flag_of

HELP = "train SRGAN: pixel-loss pre-training or the GAN stage"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field, from its metadata (help, choices, flag, group)."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for field in dataclasses.fields(TrainConfig):
        group = field.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(flag_of(field), dest=field.name, **_option_kwargs(field, hints[field.name]))


def _option_kwargs(field: dataclasses.Field, hint: object) -> dict:
    """``add_argument`` keywords for ``field``: a bool is a switch (``--no-X`` too when on by default),
    a field without a default is required, the others take a value of the field's type."""
    help_text, default = field.metadata["help"], field.default
    if isinstance(default, bool):
        if default:
            return {"action": argparse.BooleanOptionalAction, "default": True, "help": f"{help_text} (default: on)"}
        return {"action": "store_true", "help": help_text}
    if default is dataclasses.MISSING:
        return {"required": True, "help": help_text}
    value_type = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    kwargs = {"type": value_type, "default": default, "choices": field.metadata["choices"]}
    if kwargs["choices"] is None:  # argparse names the value after the flag ({a,b} with choices)
        kwargs["metavar"] = flag_of(field).lstrip("-").replace("-", "_").upper()
    if default is not None and "(default" not in help_text:
        help_text += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
    return {**kwargs, "help": help_text}


def run(args: argparse.Namespace) -> int:
    from ..errors import BackendUnavailableError
    from ..imageio import is_disk_full
    from ..train import TrainingError, train
    from . import terminate_as_interrupt

    cfg = TrainConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)})
    try:
        with terminate_as_interrupt():
            path = train(cfg)
    except (TrainingError, BackendUnavailableError, FileNotFoundError, ValueError) as exc:
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
