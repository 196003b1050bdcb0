"""The correctness rule (docs/architecture.md, "The backend contract") and the checks built on it,
shared by the backend test files.

``|ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol`` elementwise (flash-attention's rule),
with ``atol`` per dtype scaled by the reference's magnitude.
"""

from __future__ import annotations

import copy

import torch

from fastsr.ops import functional as ops
from fastsr.ops import reference as ref
from fastsr.ops.dispatch import use_backend
from fastsr.ops.tolerance import judge


def assert_within_rule(name: str, ours: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor, dtype) -> None:
    """The tolerance rule, elementwise, with a message naming the worst element."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    verdict = judge(ours, ref64, same, dtype)
    assert verdict.ok, f"{name} ({dtype}): {verdict}"


def whole_image_reference(model, x: torch.Tensor, border: str = "mirror") -> torch.Tensor:
    """The rule's reference for tiled and whole-image runs: what ``fastsr.upscale(x, model,
    border=border)`` computes with one tile over the whole RGB image ``x`` (N, 3, H, W), in float64
    on the torch backend with the model as given (not optimized). That tile's window is the image
    with the border padding the pipeline plans for it (fastsr.pipeline.halo.plan_for)."""
    from fastsr.pipeline.engine import Upscaler
    from fastsr.pipeline.halo import plan_for

    up = Upscaler(model, device="cpu", backend="torch")
    _, c, h, w = x.shape
    plan = plan_for(up, height=h, width=w, channels=c, tile=max(h, w), halo=None, border=border,
                    read=lambda y0, y1, x0, x1: x[:1, :, y0:y1, x0:x1].float().cpu())
    assert len(plan) == 1
    tile = plan.tile_at(0)
    rows, cols = (torch.from_numpy(i) for i in plan.window_indices(tile))
    window = x.double().index_select(2, rows).index_select(3, cols)
    with torch.no_grad(), use_backend("torch"):
        out = copy.deepcopy(up.source).eval().double()(window)
    rows, cols = tile.output_crop(up.scale)
    return out[:, :, rows, cols]


def fmt(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def cast(ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


def grads(fn, ins, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [None if t is None else t.grad for t in leaves]


def case_id(c) -> str:
    """Test id of a conv case (n, c_in, c_out, h, w, k, shuffle, bias, slope, residual)."""
    return "n{}_ci{}_co{}_{}x{}_k{}_r{}_b{}_s{}_res{}".format(*c)


def assert_weight_grad_within_rule(g: torch.Tensor, x: torch.Tensor, kernel_size: int,
                                   channels_last: bool) -> torch.Tensor:
    """fastsr.conv2d_weight_grad of fp32 ``g`` (N, C_out, H, W) and ``x`` (N, C_in, H, W) against
    the float64 convolution_backward of the given float64 tensors, by the rule with fp32 oneDNN's
    error as the baseline, and in the asked layout (``channels_last`` or contiguous, whatever x's).
    Returns the op's result."""

    def weight_grad(g, x):
        weight = torch.empty(g.shape[1], x.shape[1], kernel_size, kernel_size, dtype=x.dtype)
        return torch.ops.aten.convolution_backward(g, x, weight, None, [1, 1], [kernel_size // 2] * 2, [1, 1], False,
                                                   [0, 0], 1, [False, True, False])[1]

    ours = torch.ops.fastsr.conv2d_weight_grad(g.float(), x.float(), kernel_size, channels_last)
    assert ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule("conv2d_weight_grad", ours, weight_grad(g, x), weight_grad(g.float(), x.float()), torch.float32)
    return ours


def assert_conv_forward_within_rule(backend: str, ins, shuffle: int, dtype, channels_last: bool) -> None:
    """``conv2d_prelu`` on ``backend`` (inputs ``ins`` in fp64, cast to ``dtype``) against the fp64
    reference by the rule; the output keeps the dtype and the memory format of the input."""
    ref64 = ref.conv2d_prelu(*ins, shuffle)
    same = ref.conv2d_prelu(*cast(ins, dtype), shuffle)
    ours = ops.conv2d_prelu(*cast(ins, dtype), shuffle=shuffle, backend=backend)
    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_rule("conv2d_prelu", ours, ref64, same, dtype)


def assert_conv_grads_within_rule(backend: str, ins, shuffle: int, dtype, channels_last: bool) -> None:
    """Every gradient of ``conv2d_prelu`` on ``backend`` (inputs ``ins`` in fp64, cast to ``dtype``)
    against the fp64 reference, by the rule; inputs that are None must get no gradient."""
    x, weight = ins[0], ins[1]
    n, _, h, w = x.shape
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, weight.shape[0] // shuffle**2, h * shuffle, w * shuffle, dtype=torch.float64, generator=gen)
    g = fmt(g.to(x.device), channels_last)
    ref64 = grads(lambda *a: ref.conv2d_prelu(*a, shuffle), ins, g)
    same = grads(lambda *a: ref.conv2d_prelu(*a, shuffle), cast(ins, dtype), g)
    ours = grads(lambda *a: ops.conv2d_prelu(*a, shuffle=shuffle, backend=backend), cast(ins, dtype), g)
    for name, o, r64, s in zip(("x", "weight", "bias", "slope", "residual"), ours, ref64, same, strict=True):
        if r64 is None:
            assert o is None
            continue
        assert o.dtype == dtype, f"grad of {name} has dtype {o.dtype}"
        assert_within_rule(f"d{name}", o, r64, s, dtype)
