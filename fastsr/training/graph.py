"""The training step replayed as one CUDA graph (``fastsr train --cuda-graph``).

On a GPU a small-batch SRResNet step is host-bound: an H200 computes it in a few milliseconds while
the host spends 20-36 ms issuing several hundred kernels through Python, the dispatcher and autograd
(docs/training-speed.md). Captured once, the step's kernels are replayed by one launch.

What the graph holds: the device work of a step (forward, loss, backward, the optimizer's update,
BatchNorm's running statistics), as ``body(lr, hr) -> losses`` computes it. What stays outside: the
learning-rate schedule, the EMA and the loss check, which read or set host values every step.

PyTorch's rules for capturing a whole network, and how they are kept here:
* warm-up steps on a side stream before the capture (cuDNN's algorithm search, fastsr's first-use
  validation, the optimizer's state and the allocator's pools must not be captured), and the capture
  on that same stream (libraries keep handles and workspaces per stream: a first use on a fresh
  capture stream would create them mid-capture);
* inputs copied into the same static tensors before every replay; losses read from a static output;
* gradients set to None before the capture, so the captured backward allocates them in the graph's
  pool and every replay rewrites them;
* the optimizer in capturable mode during the capture, its learning rate a device tensor that is
  filled from the schedule before every replay (a float would be frozen into the graph);
* autocast without its weight-cast cache (the body's autocast is entered inside the capture).
A batch of another shape (none in ``fastsr train``, whose crops are fixed) runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

WARMUP_STEPS = 3


class GraphedStep:
    """``body`` run eagerly for :data:`WARMUP_STEPS` steps, then captured and replayed.

    ``body(lr, hr)`` takes the (B, 3, h, w) LR and (B, 3, H, W) HR CUDA batches and returns the
    step's losses as a 1-D fp32 tensor; it must zero the gradients itself (``set_to_none=True``)
    and step ``optimizers``, whose parameter groups' learning rates stay Python floats (set by the
    schedule) outside the capture.
    """

    def __init__(self, body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizers: list[torch.optim.Optimizer]) -> None:
        self.body, self.optimizers = body, optimizers
        self.warmup_left = WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.losses: torch.Tensor | None = None
        self.lrs: list[torch.Tensor] = []  # one device tensor per parameter group, read by the replays
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.graph is not None and self._fits(lr, hr):
            return self._replay(lr, hr)
        if self.graph is None and self.warmup_left == 0:
            return self._capture(lr, hr)
        self.warmup_left = max(0, self.warmup_left - 1)
        return self._eager(lr, hr)

    def _fits(self, lr: torch.Tensor, hr: torch.Tensor) -> bool:
        a, b = self.inputs
        return (lr.shape, hr.shape, lr.dtype, hr.dtype) == (a.shape, b.shape, a.dtype, b.dtype)

    def _eager(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """One step outside the graph, on the side stream (PyTorch's warm-up pattern)."""
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self.body(lr, hr)
        torch.cuda.current_stream().wait_stream(side)
        losses.record_stream(torch.cuda.current_stream())  # allocated on the side stream, read on this one
        return losses

    def _capture(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Capture the step on static copies of this batch, then replay it: capturing runs nothing."""
        self.inputs = (lr.clone(), hr.clone())  # clone keeps the channels_last layout
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=lr.device)
                    for opt in self.optimizers for g in opt.param_groups]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with self._capturable(), torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
            self.losses = self.body(*self.inputs)
        self.graph = graph
        return self._replay(lr, hr)

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _replay(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        self.inputs[0].copy_(lr)
        self.inputs[1].copy_(hr)
        groups = (g for opt in self.optimizers for g in opt.param_groups)
        for tensor, group in zip(self.lrs, groups, strict=True):
            tensor.fill_(float(group["lr"]))  # the schedule's rate for this step
        self.graph.replay()
        return self.losses.clone()

    @contextlib.contextmanager
    def _capturable(self) -> Iterator[None]:
        """The optimizers in capturable mode reading ``self.lrs`` while the capture records them;
        afterwards their groups are as they were (floats, for the schedule and the checkpoints)."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        saved = [(g["lr"], g["capturable"]) for g in groups]
        for group, tensor in zip(groups, self.lrs, strict=True):
            group["lr"], group["capturable"] = tensor, True
        try:
            yield
        finally:
            for group, (rate, capturable) in zip(groups, saved, strict=True):
                group["lr"], group["capturable"] = rate, capturable
