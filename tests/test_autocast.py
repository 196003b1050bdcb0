"""Autocast: every op that casts its inputs under ``torch.autocast`` (``_autocast`` in
fastsr/ops/functional.py: the convolutions) on every backend this machine serves, output and
gradients by the tolerance rule (tests/tolerance.py).

Inside an autocast region the custom ops of the cpp and triton backends have no autocast kernel of
their own, so the interface casts their floating inputs as autocast casts ``F.conv2d``'s: every
backend computes in the autocast dtype, and gradients reach the fp32 leaves in fp32. The same-dtype
baseline is the torch reference on the inputs cast to that dtype; the float64 reference is the
reference on those cast inputs in float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from backends import require_backend
from tolerance import assert_within_rule, fmt, grads

from fastsr.ops import contract
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref


def _conv2d_prelu_inputs(gen: torch.Generator) -> list[torch.Tensor]:
    """(x, weight, bias, slope, residual), fp32: conv + shuffle 2 + per-channel PReLU + residual."""
    return [torch.randn(2, 5, 9, 11, generator=gen), torch.randn(12, 5, 3, 3, generator=gen) / 5,
            torch.randn(12, generator=gen) * 0.1, torch.rand(3, generator=gen) - 0.5,
            torch.randn(2, 3, 18, 22, generator=gen)]


def _conv2d_silu_inputs(gen: torch.Generator) -> list[torch.Tensor]:
    """(x, weight, bias, skip), fp32: SPAN's attention (the skip path)."""
    return [torch.randn(2, 5, 9, 11, generator=gen), torch.randn(8, 5, 3, 3, generator=gen) / 5,
            torch.randn(8, generator=gen) * 0.1, torch.randn(2, 8, 9, 11, generator=gen)]


def _conv2d_silu_plain_inputs(gen: torch.Generator) -> list:
    """(x, weight, bias, None), fp32: SiLU."""
    return [*_conv2d_silu_inputs(gen)[:3], None]


# op -> [(case name, inputs, ours(backend) as a function of the inputs, the reference)]
CASES = {
    "conv2d_prelu": [("shuffle2", _conv2d_prelu_inputs,
                      lambda backend: lambda *a: ops.conv2d_prelu(*a, shuffle=2, backend=backend),
                      lambda *a: ref.conv2d_prelu(*a, 2))],
    "conv2d_silu": [("attention", _conv2d_silu_inputs,
                     lambda backend: lambda *a: ops.conv2d_silu(*a, backend=backend), ref.conv2d_silu),
                    ("silu", _conv2d_silu_plain_inputs,
                     lambda backend: lambda *a: ops.conv2d_silu(*a, backend=backend), ref.conv2d_silu)],
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params():
    for op, cases in CASES.items():
        for name, *_ in cases:
            for device in DEVICES:
                for backend in ("torch", "cpp", "triton"):
                    for dtype in (torch.bfloat16, torch.float16):
                        marks = ()
                        if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                            marks = pytest.mark.skip(reason="the Triton CPU interpreter has no bf16 tl.dot")
                        yield pytest.param(op, name, backend, device, dtype, marks=marks,
                                           id=f"{op}-{name}-{backend}-{device}-{str(dtype).removeprefix('torch.')}")


def test_every_op_with_autocast_handling_is_tested_here():
    """The ops whose interface calls ``_autocast`` are exactly the ops of CASES."""
    with_autocast = {op for op in contract.OPS if "_autocast(" in inspect.getsource(getattr(ops, op))}
    assert with_autocast == set(CASES)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("op,case,backend,device,dtype", list(_params()))
def test_op_follows_autocast_within_rule(op, case, backend, device, dtype, channels_last):
    require_backend(backend, device)
    _, make, ours_fn, ref_fn = next(c for c in CASES[op] if c[0] == case)
    ins = [None if t is None else (fmt(t, channels_last) if t.dim() == 4 else t).to(device)
           for t in make(torch.Generator().manual_seed(0))]
    # What the op really computes on: the fp32 inputs rounded to the autocast dtype.
    low = [None if t is None else t.to(dtype) for t in ins]
    low64 = [None if t is None else t.double() for t in low]

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    with torch.autocast(device, dtype=dtype):
        out = ours_fn(backend)(*leaves)
    assert out.dtype == dtype, f"{op} under autocast({dtype}) returned {out.dtype}"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule(f"{op} on {backend} under autocast", out, ref_fn(*low64), ref_fn(*low), dtype)

    g = fmt(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)), channels_last).to(device)
    out.backward(g.to(dtype))
    ours_grads = [None if t is None else t.grad for t in leaves]
    ref64 = grads(ref_fn, low64, g.to(dtype).double())
    same = grads(ref_fn, low, g.to(dtype))
    names = list(inspect.signature(getattr(contract.Backend, op)).parameters)[1:1 + len(leaves)]  # after self
    for name, o, r64, s in zip(names, ours_grads, ref64, same, strict=True):
        if r64 is None:
            assert o is None
            continue
        assert o.dtype == torch.float32, f"grad of the fp32 leaf {name} has dtype {o.dtype}"
        assert_within_rule(f"d{name} of {op} on {backend} under autocast", o, r64, s, dtype)
