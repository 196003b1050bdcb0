"""The DESIGN.md correctness rule, shared by the backend test files.

``|ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol`` elementwise (flash-attention's rule),
with ``atol`` per dtype scaled by the reference's magnitude.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def assert_within_rule(name: str, ours: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor, dtype) -> None:
    """DESIGN.md tolerance rule, elementwise, with a message naming the worst element."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    ours64, same64 = ours.detach().double(), same.detach().double()
    atol = ATOL[dtype] * max(1.0, ref64.abs().max().item())
    err = (ours64 - ref64).abs()
    bound = 2 * (same64 - ref64).abs() + atol
    bad = err > bound
    if bad.any():
        i = (err - bound).argmax()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements outside the tolerance rule; "
            f"worst: ours err {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} (torch err "
            f"{(same64 - ref64).abs().flatten()[i]:.3g}, atol {atol:.3g})"
        )


def fmt(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def cast(ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


def grads(fn, ins, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [None if t is None else t.grad for t in leaves]
