"""A run's checkpoint: ``checkpoint.pt`` (exact resume) and the exported model files.

``checkpoint.pt`` holds :meth:`Trainer.state_dict` plus ``step``, ``rng`` (python, numpy, torch
and CUDA generator states), ``data`` (the crop scheme), ``torch_rng`` (read by version-1
readers) and ``config``. It loads with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only. Version-1 checkpoints (no ``rng``, ``scaler``, ``stage``) resume too.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..distributed import DistInfo, all_gather
from ..models import save_model
from .config import TrainConfig, TrainingError
from .trainer import Trainer

log = logging.getLogger("fastsr")


class Checkpointer:
    """Saves and resumes the run in ``out``. Every rank takes part in :meth:`save` (the ranks'
    weights are compared under DDP); only the writer rank writes."""

    def __init__(self, out: Path, cfg: TrainConfig, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.path = out / "checkpoint.pt"
        self.model_path = out / "model.safetensors"  # the EMA generator
        self.discriminator_path = out / "discriminator.safetensors"

    def save(self, trainer: Trainer, step: int) -> None:
        """Write the checkpoint (atomically) and export the EMA generator (and the discriminator)."""
        if self.dist.world_size > 1:
            _check_ranks_in_sync(trainer, step)
        if not self.dist.is_writer:
            return
        device = self.dist.device
        _save_atomic({**trainer.state_dict(), "step": step, "rng": _rng_state(device),
                      "data": {"scheme": "per-step-seed", "seed": self.cfg.seed},
                      "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(self.cfg)}, self.path)
        save_model(trainer.ema.model_copy(trainer.generator), self.model_path)
        if trainer.gan:
            save_model(trainer.discriminator, self.discriminator_path)

    def resume(self, trainer: Trainer) -> int:
        """Load the checkpoint into ``trainer`` and restore the RNG states; returns its step
        (0 when there is no checkpoint yet: a new run)."""
        if not self.path.exists():
            log.info("no checkpoint in %s yet: starting a new run", self.path.parent)
            return 0
        device = self.dist.device
        state = torch.load(self.path, map_location=device, weights_only=True)
        trainer.load_state_dict(state)
        if "rng" in state:
            _set_rng_state(state["rng"], device)
        else:  # version-1 checkpoint
            torch.set_rng_state(state["torch_rng"].cpu())
        if "generator" in state.get("data", {}):
            log.warning("%s is from an older fastsr that drew crops from one sequential generator; "
                        "from step %d on, crops come from per-step seeds", self.path, state["step"])
        log.info("resumed %s at step %d", self.path, state["step"])
        return state["step"]


def _check_ranks_in_sync(trainer: Trainer, step: int) -> None:
    """Raise if the ranks' weights differ (they must be bit-identical under DDP)."""
    gathered = all_gather(trainer.parameter_checksum(), trainer.world_size)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"DDP ranks diverged at step {step}: weight checksums "
                            f"{[tuple(round(float(v), 6) for v in g) for g in gathered]}")
    log.debug("step %d: %d ranks in sync", step, trainer.world_size)


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:  # a crash mid-write leaves the previous checkpoint intact
        torch.save(obj, tmp)


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
