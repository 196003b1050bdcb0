"""The trainer's optimizer: torch.optim.Adam whose update runs the backend's own kernel where it has one.

PyTorch's fused CPU Adam opens one parallel region per parameter and copies every gradient that is
not NCHW-contiguous (channels_last ones included) without reading the copy; the cpp backend's
``adam_step`` updates all of a group's parameters in one pass in their own layout (2.4 -> 0.5-1.0 ms
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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._checked_layouts: dict[torch.Tensor, tuple[int, ...]] = {}  # parameter -> stride its state fits

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
        """fp32 CPU, its gradient in its layout, and (checked once per layout, :meth:`_layout_fits`) the
        parameter dense and its moments in that layout too. Every step asks for every parameter, so
        the per-step part reads only what a step can change: the gradient, and the dtype and device
        that ``model.to`` changes in place."""
        grad, stride = p.grad, p.stride()
        if not (p.is_cpu and p.dtype == torch.float32 and grad.dtype == torch.float32) or grad.is_sparse:
            return False
        if grad.stride() != stride:
            return False
        return self._checked_layouts.get(p) == stride or self._layout_fits(p, stride)

    def _layout_fits(self, p: torch.Tensor, stride: tuple[int, ...]) -> bool:
        """``p`` contiguous or channels_last and its existing moments and step count as the kernel takes
        them; remembered for this stride until the state is loaded anew."""
        dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
        state = self.state.get(p)
        ok = dense and (not state or (torch.is_tensor(state["step"]) and state["step"].is_cpu
                                      and all(state[k].dtype == p.dtype and state[k].stride() == stride
                                              for k in ("exp_avg", "exp_avg_sq"))))
        if ok and state:
            self._checked_layouts[p] = stride
        return ok

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._checked_layouts.clear()  # the loaded moments keep the strides they were saved with

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, created as torch.optim.Adam creates it (fused: an fp32 step count)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._checked_layouts[p] = p.stride()
        return state
