"""The trainer's optimizer: torch.optim.Adam whose update runs the backend's own kernel where it has one.

PyTorch's fused CPU Adam opens one parallel region per parameter and copies every gradient that is
not NCHW-contiguous (channels_last ones included) without reading the copy; the cpp backend's
``adam_step`` updates all of a group's parameters in one pass in their own layout (2.15 -> 0.92 ms
an update for SRResNet on a 2-core Zen 5, docs/training-speed.md). The arithmetic and the state
(``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) are torch.optim.Adam's, so a checkpoint
resumes under either, and every case the kernel does not cover is torch.optim.Adam's own step.
"""

from __future__ import annotations

import torch

from ..ops.dispatch import optional_kernel


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, state and results within float rounding) whose step runs
    the backend in effect's multi-tensor kernel (the cpp backend's: fp32 CPU parameters, contiguous
    or channels_last, each gradient in its parameter's layout) and otherwise ``torch.optim.Adam.step``
    (fused where asked). The torch backend always takes PyTorch's step: it is the plain-PyTorch baseline."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None and self._own_step():
            return None
        return super().step(closure)

    def _own_step(self) -> bool:
        """Run the backend's kernel on every group; False (nothing done) where it does not apply."""
        # A GradScaler hands the fused step its scale and inf flag as these attributes (fp16 AMP).
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        work = []
        for group in self.param_groups:
            if any(group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable",
                                                 "decoupled_weight_decay")):
                return False
            if torch.is_tensor(group["lr"]):
                return False
            params = [p for p in group["params"] if p.grad is not None]
            if not all(self._fits(p) for p in params):
                return False
            work.append((group, params))
        first = next((ps[0] for _, ps in work if ps), None)
        kernel = None if first is None else optional_kernel("adam_step", first)
        if kernel is None:
            return False
        for group, params in work:
            states = [self._state_of(p) for p in params]
            beta1, beta2 = group["betas"]
            kernel(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group["lr"], beta1, beta2,
                   group["eps"], group["weight_decay"])
        return True

    def _fits(self, p: torch.Tensor) -> bool:
        """fp32 CPU, contiguous or channels_last, its gradient and (existing) moments in its own layout."""
        grad = p.grad
        dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
        if p.dtype != torch.float32 or p.device.type != "cpu" or not dense:
            return False
        if grad.is_sparse or grad.dtype != p.dtype or grad.stride() != p.stride():
            return False
        state = self.state.get(p)
        if not state:
            return True
        return (torch.is_tensor(state["step"]) and state["step"].device.type == "cpu"
                and all(state[k].dtype == p.dtype and state[k].stride() == p.stride()
                        for k in ("exp_avg", "exp_avg_sq")))

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, created as torch.optim.Adam creates it (fused: an fp32 step count)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
