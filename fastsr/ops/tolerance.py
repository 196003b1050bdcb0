"""The correctness rule every backend is held to (docs/architecture.md, "The backend contract"):
``|ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol`` elementwise (flash-attention's rule),
``atol`` per dtype scaled by the reference's magnitude. Used by first-use validation, ``fastsr
selftest`` and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@dataclass(frozen=True)
class Verdict:
    """How ``ours`` compares with the rule: ``bad`` elements outside it of ``total``; the worst
    element's error, its bound, and ``ratio`` = the largest error / bound (<= 1 passes)."""

    bad: int
    total: int
    worst_err: float
    worst_bound: float
    ratio: float

    @property
    def ok(self) -> bool:
        return self.bad == 0

    def __str__(self) -> str:
        return (f"{self.bad} of {self.total} values outside the tolerance rule; worst error {self.worst_err:.3g} "
                f"vs bound {self.worst_bound:.3g}")


def judge(ours: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor, dtype: torch.dtype) -> Verdict:
    """``ours`` (any dtype) against the float64 reference ``ref64``, allowing twice the error of the
    reference computed in ``dtype`` (``same``) plus ``atol``. Shapes must match."""
    if ours.shape != ref64.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    ours64, same64, ref64 = ours.detach().double(), same.detach().double(), ref64.detach().double()
    atol = ATOL[dtype] * max(1.0, ref64.abs().max().item()) if ref64.numel() else ATOL[dtype]
    # Equal values (infinities included) are exact; a NaN where the reference has none is wrong.
    err = torch.where(ours64 == ref64, 0.0, (ours64 - ref64).abs()).nan_to_num(nan=float("inf"))
    bound = 2 * (same64 - ref64).abs() + atol
    if err.numel() == 0:
        return Verdict(0, 0, 0.0, atol, 0.0)
    i = int((err / bound).argmax())
    return Verdict(int((err > bound).sum()), err.numel(), float(err.flatten()[i]), float(bound.flatten()[i]),
                   float((err / bound).flatten()[i]))
