"""Where training metrics go: one interface (:class:`MetricLogger`), three sinks (CSV file,
TensorBoard when installed, a progress bar) and :class:`LoggerGroup` to feed them all."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path


class MetricLogger:
    """Receives a run's metrics: :meth:`log` at each logged step, :meth:`on_step` after every step.

    Metrics are plain floats keyed by name (e.g. ``loss``, ``lr``, ``val_model_psnr``); a sink
    records the names it knows and ignores the others. The defaults do nothing.
    """

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` as the values at ``step``."""

    def on_step(self, step: int) -> None:
        """Step ``step`` is done (logged or not)."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


class LoggerGroup(MetricLogger):
    """Forwards every call to each of ``loggers`` in turn (none: a rank that writes nothing)."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def on_step(self, step: int) -> None:
        for logger in self.loggers:
            logger.on_step(step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class CSVLogger(MetricLogger):
    """One row per :meth:`log` appended to ``path``: ``step``, then ``columns`` (name -> format
    spec, e.g. ``".6f"``); a metric missing from a call is an empty cell. The header is written
    when the file is new, so a resumed run goes on in the same file."""

    def __init__(self, path: Path, columns: Mapping[str, str]) -> None:
        self.columns = dict(columns)
        new = not path.exists()
        self._file = open(path, "a", newline="")  # closed by close()
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", *self.columns])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._writer.writerow([step, *(format(metrics[k], spec) if k in metrics else ""
                                       for k, spec in self.columns.items())])
        self._file.flush()  # a crashed or killed run keeps its rows

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(MetricLogger):
    """Scalars in ``log_dir`` for the metrics in ``tags`` (name -> TensorBoard tag, e.g.
    ``"loss": "train/loss"``). Needs the optional ``tensorboard`` package: see :meth:`create`."""

    def __init__(self, log_dir: Path, tags: Mapping[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tags = dict(tags)
        self._writer = SummaryWriter(str(log_dir))

    @classmethod
    def create(cls, log_dir: Path, tags: Mapping[str, str]) -> TensorBoardLogger | None:
        """The logger, or ``None`` when tensorboard is not installed (it is optional)."""
        try:
            return cls(log_dir, tags)
        except ImportError:
            return None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if name in self.tags:
                self._writer.add_scalar(self.tags[name], value, step)

    def close(self) -> None:
        self._writer.close()


class ProgressLogger(MetricLogger):
    """A tqdm bar over the steps ``initial .. total``, showing the last logged ``names`` and the
    ``lr``, and printing a line for each validation (``val_bicubic_psnr``, ``val_model_psnr``)."""

    def __init__(self, total: int, initial: int, desc: str, names: list[str]) -> None:
        from tqdm import tqdm

        self.names = names
        self._bar = tqdm(total=total, initial=initial, unit="step", desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if "val_model_psnr" in metrics:
            bic, mod = metrics["val_bicubic_psnr"], metrics["val_model_psnr"]
            self._bar.write(f"step {step}: val PSNR bicubic {bic:.2f} dB, model (EMA) {mod:.2f} dB ({mod - bic:+.2f})")
        self._bar.set_postfix({n: f"{metrics[n]:.4f}" for n in self.names} | {"lr": f"{metrics['lr']:.1e}"})

    def on_step(self, step: int) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
