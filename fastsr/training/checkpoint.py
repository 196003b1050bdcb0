"""A run's checkpoint: ``checkpoint.pt`` (exact resume) and the exported model files.

``checkpoint.pt`` holds :meth:`Trainer.state_dict` plus ``step``, ``rng`` (python, numpy, torch
and CUDA generator states), ``data`` (the crop scheme), ``torch_rng`` (read by version-1
readers) and ``config``. It loads with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only. Version-1 checkpoints (no ``rng``, ``scaler``, ``stage``) resume too.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..distributed import DistInfo, all_gather
from ..models import save_model
from .config import TrainConfig, TrainingError, changed_hyperparameters
from .trainer import Trainer

log = logging.getLogger("fastsr")


class Checkpointer:
    """Saves and resumes the run in ``out``. Every rank takes part in :meth:`save` (the ranks'
    weights are compared under DDP); only the writer rank writes."""

    def __init__(self, out: Path, cfg: TrainConfig, dist_info: DistInfo) -> None:
        _check_out(out)
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
        try:
            save_model(trainer.ema.model_copy(trainer.generator), self.model_path)
            if trainer.gan:
                save_model(trainer.discriminator, self.discriminator_path)
        except Exception as exc:
            # safetensors reports a full disk in its message only; as an OSError it reaches the CLI's one line.
            code = next((c for c in (errno.ENOSPC, errno.EDQUOT) if f"os error {c})" in str(exc)), None)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(self.model_path)) from None

    def resume(self, trainer: Trainer) -> int:
        """Load the checkpoint into ``trainer`` and restore the RNG states; returns its step
        (0 when there is no checkpoint yet: a new run)."""
        if not self.path.exists():
            log.info("no checkpoint in %s yet: starting a new run", self.path.parent)
            return 0
        device = self.dist.device
        state = self._read()
        self._check_same_run(state)
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:  # missing entries, other shapes
            raise TrainingError(f"{self.path} does not fit this run's options ({_first_line(exc)}); resume with the "
                                f"options it was trained with{_options_of(state)}") from None
        if "rng" in state:
            _set_rng_state(state["rng"], device)
        else:  # version-1 checkpoint
            torch.set_rng_state(state["torch_rng"].cpu())
        if "generator" in state.get("data", {}):
            log.warning("%s is from an older fastsr that drew crops from one sequential generator; "
                        "from step %d on, crops come from per-step seeds", self.path, state["step"])
        log.info("resumed %s at step %d", self.path, state["step"])
        return state["step"]


    def _check_same_run(self, state: dict) -> None:
        """A resumed run keeps its hyper-parameters: with another --lr or --batch-size the schedule and
        the optimizer state would be the old run's while config.json said otherwise."""
        saved = state.get("config")
        changed = changed_hyperparameters(saved, self.cfg) if isinstance(saved, dict) else []
        if changed:
            raise TrainingError(f"{self.path} does not fit this run's options (other hyper-parameters: "
                                f"{', '.join(changed)}); resume with the options it was trained with"
                                f"{_options_of(saved)}, or start a new run in another --out")

    def _read(self) -> dict:
        """The checkpoint as a dict; a one-line :class:`TrainingError` for a file that is empty,
        truncated, damaged or not a training checkpoint (never a loader's traceback)."""
        size = self.path.stat().st_size
        try:
            state = torch.load(self.path, map_location=self.dist.device, weights_only=True) if size else None
        except Exception:  # whatever the loader trips on, the file is unusable
            state = None
        if not isinstance(state, dict) or not _CHECKPOINT_KEYS <= state.keys():
            what = "is empty (0 bytes)" if not size else f"is not a readable training checkpoint ({size} bytes: " \
                                                          "truncated, damaged or another kind of file)"
            backup = f" (--init {self.model_path} starts from the weights exported at the last save)" \
                if self.model_path.is_file() else ""
            raise TrainingError(f"cannot resume: {self.path} {what}; restore it from a backup, or start a new run "
                                f"in another --out{backup}")
        return state


# What every checkpoint, version 1 on, holds.
_CHECKPOINT_KEYS = frozenset({"step", "model", "optimizer", "scheduler", "ema"})


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 120 characters (torch's run over many lines)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= 120 else line[:117] + "..."


def _options_of(state: dict) -> str:
    """': --scale S --num-blocks B --channels C' from the checkpoint's config (``state["config"]``,
    or ``state`` itself when it is the config), if it has one."""
    config = state.get("config", state)
    if not isinstance(config, dict) or not {"scale", "num_blocks", "channels"} <= config.keys():
        return ""
    return f": --scale {config['scale']} --num-blocks {config['num_blocks']} --channels {config['channels']}"


def _check_ranks_in_sync(trainer: Trainer, step: int) -> None:
    """Raise if the ranks' weights differ (they must be bit-identical under DDP)."""
    gathered = all_gather(trainer.parameter_checksum(), trainer.world_size)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"DDP ranks diverged at step {step}: weight checksums "
                            f"{[tuple(round(float(v), 6) for v in g) for g in gathered]}")
    log.debug("step %d: %d ranks in sync", step, trainer.world_size)


def _check_out(out: Path) -> None:
    """Refuse a run folder that cannot be one (a file, or under a file) before any work."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: exists and is not a folder; choose a folder for the run")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not out.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        why = "is not a folder" if not parent.is_dir() else "is not writable"
        raise TrainingError(f"--out {out}: cannot create the run folder: {parent} {why}")


def _save_atomic(obj: dict, path: Path) -> None:
    # Serialized in memory first: torch.save reports a full disk as an unexplained "unexpected pos"
    # RuntimeError, a plain write as OSError ENOSPC (one line in the CLI).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:  # a crash mid-write leaves the previous checkpoint intact
        tmp.write_bytes(buffer.getbuffer())


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
