"""What is specific to the ``triton`` backend (the op-by-op matrix against the reference is
tests/test_conformance.py, shared by every backend).

Availability and the interpreter's limits (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA; it cannot run bf16 tl.dot), the ``gpu``-marked bf16 and >2**31-element cases, the
conv ops' ``triton_op`` entry points (eager and under torch.compile), and compiling every kernel
for sm_90 without a GPU.

Tolerance rule (docs/architecture.md): |ours - ref64| <= 2 * |torch_same_dtype - ref64| + atol, elementwise,
where ref64 is the reference in float64 and torch_same_dtype the reference in the tested dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from cases import GPU_MEMORY_HEAVY, conv_inputs, image_pair
from tolerance import (
    assert_within_rule,
    cast,
    grads,
)

import fastsr
from fastsr.ops import functional as ops
from fastsr.ops import reference as ref

kernels = importlib.import_module("fastsr.kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (n, C_in, C_out, H, W, k, shuffle, bias, slope, residual): the SRResNet layers and odd extras.
CONV_CASES = [
    (1, 3, 64, 7, 13, 9, 1, True, "scalar", False),     # head: 9x9, C_in = 3
    (3, 64, 3, 7, 13, 9, 1, True, None, False),         # tail: 9x9 to 3 channels, no activation
    (3, 64, 64, 7, 13, 3, 1, False, "channel", True),   # body conv + residual
    (1, 64, 256, 7, 13, 3, 2, True, "scalar", False),   # upsample: conv + shuffle 2 + PReLU
    (3, 5, 17, 31, 17, 3, 1, True, "channel", True),    # odd channels, prime-ish sizes
    (1, 5, 68, 31, 17, 3, 2, False, "channel", True),   # shuffle 2 into 17 channels + residual
]


def test_availability_contract(monkeypatch):
    ok, why = kernels.availability("cpu")
    assert ok == (kernels.os.environ.get("TRITON_INTERPRET") == "1"), why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = kernels.availability("cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    ok, why = kernels.availability("cuda")
    assert ok == torch.cuda.is_available(), why


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter limitation only applies on CPU")
def test_bf16_under_interpreter_is_a_clear_error():
    x = torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)
    # The first-use check meets the interpreter's TypeError and refuses the backend with its text.
    with pytest.raises(fastsr.BackendUnavailableError, match=r"TypeError: the Triton interpreter .* cannot run bf16"):
        ops.conv2d_prelu(x, w, backend="triton")


# ---------------------------------------------------------------- GPU only (compiled kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES[:4], ids=lambda c: "ci{1}_co{2}_k{5}_r{6}".format(*c))
def test_conv2d_prelu_bf16_forward_and_gradients(case):
    dtype = torch.bfloat16
    ins = conv_inputs(DEVICE, *case, True)
    shuffle = case[6]
    assert_within_rule("conv2d_prelu bf16", ops.conv2d_prelu(*cast(ins, dtype), shuffle=shuffle, backend="triton"),
                       ref.conv2d_prelu(*ins, shuffle), ref.conv2d_prelu(*cast(ins, dtype), shuffle), dtype)
    n, _, c_out, h, w = case[:5]
    g = torch.randn(n, c_out // shuffle**2, h * shuffle, w * shuffle, dtype=torch.float64, device=DEVICE)
    ref64 = grads(lambda *a: ref.conv2d_prelu(*a, shuffle), ins, g)
    same = grads(lambda *a: ref.conv2d_prelu(*a, shuffle), cast(ins, dtype), g)
    ours = grads(lambda *a: ops.conv2d_prelu(*a, shuffle=shuffle, backend="triton"), cast(ins, dtype), g)
    for name, o, r64, s in zip(("x", "weight", "bias", "slope", "residual"), ours, ref64, same, strict=True):
        if r64 is not None:
            assert_within_rule(f"bf16 d{name}", o, r64, s, dtype)


@pytest.mark.gpu
def test_bf16_pixel_shuffle_and_metrics():
    dtype = torch.bfloat16
    a, b = image_pair(DEVICE, (3, 12, 33, 17), True)
    s = torch.rand(3, dtype=torch.float64, device=DEVICE)
    ours = ops.pixel_shuffle_prelu(a.to(dtype), s.to(dtype), 2, backend="triton")
    assert_within_rule("pixel_shuffle_prelu bf16", ours, ref.pixel_shuffle_prelu(a, s, 2),
                       ref.pixel_shuffle_prelu(a.to(dtype), s.to(dtype), 2), dtype)
    assert_within_rule("mse bf16", ops.mse(a.to(dtype), b.to(dtype), "none", backend="triton"),
                       ref.mse(a, b, "none"), ref.mse(a.to(dtype), b.to(dtype), "none"), torch.float32)


@pytest.mark.gpu
@GPU_MEMORY_HEAVY
def test_over_2_31_elements():
    """int64 offsets: a conv whose input and output each hold > 2**31 elements, checked against
    the reference on the last rows/columns (the farthest offsets), and mse over > 2**31 elements."""
    dtype = torch.bfloat16
    n, c, h, w = 1, 8, 16400, 16400  # 2.15e9 elements each, 4.3 GB in bf16
    assert n * c * h * w > 2**31
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=dtype, generator=gen)
    wt = torch.randn(c, c, 3, 3, device=DEVICE, dtype=dtype, generator=gen) * 0.2
    out = ops.conv2d_prelu(x, wt, None, torch.tensor([0.1], device=DEVICE, dtype=dtype), backend="triton")
    window = [x[..., -34:, -34:], wt, None, torch.tensor([0.1], device=DEVICE, dtype=dtype), None]
    ref64 = ref.conv2d_prelu(*cast(window, torch.float64), 1)[..., 1:, 1:]
    same = ref.conv2d_prelu(*window, 1)[..., 1:, 1:]
    assert_within_rule("conv2d_prelu corner", out[..., -33:, -33:], ref64, same, dtype)
    del out
    y = x.clone()
    y[0, -1, -1, -1] += 1.0  # one differing element at the very last offset
    diff = (y[0, -1, -1, -1].double() - x[0, -1, -1, -1].double()) ** 2
    got = ops.mse(x, y, "none", backend="triton")
    # Not the rule: the value, ~5e-10, lies far below its fp32 atol (2e-6); this relative check is stronger.
    torch.testing.assert_close(got.double(), diff.view(1) / x.numel(), rtol=1e-3, atol=0)


# ---------------------------------------------------------------- torch.library ops (torch.compile)


def test_library_op_matches_reference_and_gradchecks():
    """The triton_op, conv2d_prelu's one entry point (eager and under torch.compile): forward against
    the reference and its register_autograd formula by gradcheck, in float64."""
    from fastsr.kernels.conv_prelu import conv2d_prelu_op

    ins = conv_inputs(DEVICE, 2, 5, 8, 4, 5, 3, 2, True, "channel", True, True)
    leaves = [t.requires_grad_() for t in ins]

    def fn(*a):
        return conv2d_prelu_op(*a, 2, True)[0]

    # float64 against float64: stronger than the rule, whose atol here is 1e-12 x the largest |value|.
    torch.testing.assert_close(fn(*leaves), ref.conv2d_prelu(*leaves, 2), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("skip", [False, True])
def test_silu_library_op_matches_reference_and_gradchecks(skip):
    """conv2d_silu's triton_op, its one entry point, eagerly: forward against the reference and its
    register_autograd formula by gradcheck in float64."""
    from fastsr.kernels.conv_silu import conv2d_silu_op

    x, wt, b, _, s = conv_inputs(DEVICE, 2, 5, 8, 4, 5, 3, 1, True, None, skip, True)
    leaves = [t if t is None else t.requires_grad_() for t in (x, wt, b, s)]

    def fn(*a):
        return conv2d_silu_op(*a, True)[0]

    # float64 against float64: stronger than the rule, whose atol here is 1e-12 x the largest |value|.
    torch.testing.assert_close(fn(*leaves), ref.conv2d_silu(*leaves), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.gpu
def test_torch_compile_fullgraph_traces_conv2d_prelu():
    from fastsr.kernels.conv_prelu import conv2d_prelu_op

    dtype = torch.bfloat16
    ins64 = conv_inputs(DEVICE, 3, 64, 64, 31, 17, 3, 1, True, "channel", True, True)
    ins = cast(ins64, dtype)
    torch.library.opcheck(conv2d_prelu_op, (*ins, 1, False))

    def fn(*a):
        return kernels.conv2d_prelu(*a, 1)

    compiled = torch.compile(fn, fullgraph=True)
    # Compiled and eager, forward and every gradient, by the rule against the reference in float64.
    with torch.no_grad():
        ref64, same = ref.conv2d_prelu(*ins64, 1), ref.conv2d_prelu(*ins, 1)
        for name, f in (("compiled", compiled), ("eager", fn)):
            assert_within_rule(f"conv2d_prelu {name}", f(*ins), ref64, same, dtype)
    g = torch.randn(ref64.shape, dtype=torch.float64, device=DEVICE)
    ref_grads = grads(lambda *a: ref.conv2d_prelu(*a, 1), ins64, g)
    same_grads = grads(lambda *a: ref.conv2d_prelu(*a, 1), ins, g)
    for name, f in (("compiled", compiled), ("eager", fn)):
        for arg, o, r64, s in zip(("x", "weight", "bias", "slope", "residual"), grads(f, ins, g), ref_grads,
                                  same_grads, strict=True):
            assert_within_rule(f"{name} d{arg}", o, r64, s, dtype)


# ---------------------------------------------------------------- compiled path without a GPU

_COMPILE_CHECK = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastsr.kernels import conv as cv, conv_silu as cs, mse_psnr as mp, shuffle_prelu as sp

def build(fn, ptr_dtypes, consts, num_warps=4, num_stages=3):
    sig, cx = {}, {}
    for name in fn.arg_names:
        if name in consts:
            sig[name], cx[name] = "constexpr", consts[name]
        elif name in ptr_dtypes:
            sig[name] = "*" + ptr_dtypes[name]
        else:
            # pixel and element counts as int64: the type Triton gives them for tensors past 2**31. No kernel
            # takes a float argument: Triton types one fp32, so fp64 paths read their constants from tensors.
            sig[name] = "i64" if name in ("M", "PIXELS", "ELEMENTS") else "i32"
    triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})

bf, f32 = "bf16", "fp32"
blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
common = dict(ACC=tl.float32, DOT_PRECISION="tf32", **blocks)
for aligned, r in [(True, 1), (False, 2)]:
    build(cv._conv_fwd_kernel, dict.fromkeys(
        ["x_ptr", "w_ptr", "b_ptr", "slope_ptr", "res_ptr", "out_ptr", "z_ptr"], bf),
        dict(KS=3, R=r, TAP_ALIGNED=aligned, HAS_BIAS=True, HAS_SLOPE=True, HAS_RES=True, STORE_Z=True,
             ACT=cv.ACT_PRELU, **common))
    build(cv._conv_bwd_input_kernel, dict.fromkeys(["g_ptr", "z_ptr", "slope_ptr", "w_ptr", "dx_ptr"], bf),
        dict(KS=3, R=r, HAS_SLOPE=True, TAP_ALIGNED=aligned, **common))
    build(cv._conv_bwd_weight_kernel, {**dict.fromkeys(["g_ptr", "z_ptr", "slope_ptr", "x_ptr"], bf),
        **dict.fromkeys(["dw_ptr", "db_ptr", "dslope_ptr"], f32)},
        dict(KS=9, R=r, HAS_SLOPE=True, TAP_ALIGNED=aligned, **common))
# the one config of FASTSR_TRITON_AUTOTUNE=0 (the GPU check's correctness steps), in fp32 (IEEE dots)
small = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), cv._FWD_SHAPES[-1][:3]))
build(cv._conv_fwd_kernel, dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "slope_ptr", "res_ptr", "out_ptr", "z_ptr"],
      f32), dict(KS=3, R=2, TAP_ALIGNED=False, HAS_BIAS=True, HAS_SLOPE=True, HAS_RES=True, STORE_Z=True,
                 ACT=cv.ACT_PRELU, ACC=tl.float32, DOT_PRECISION="ieee", **small),
      num_warps=cv._FWD_SHAPES[-1][3], num_stages=cv._FWD_SHAPES[-1][4])
for act in (cv.ACT_SILU, cv.ACT_ATTENTION):  # conv2d_silu's epilogues
    build(cv._conv_fwd_kernel, dict.fromkeys(
        ["x_ptr", "w_ptr", "b_ptr", "slope_ptr", "res_ptr", "out_ptr", "z_ptr"], bf),
        dict(KS=3, R=1, TAP_ALIGNED=False, HAS_BIAS=True, HAS_SLOPE=False, HAS_RES=act == cv.ACT_ATTENTION,
             STORE_Z=True, ACT=act, **common))
for has_skip in (False, True):
    build(cs._sigmoid_gate_bwd_kernel, dict.fromkeys(["g_ptr", "y_ptr", "skip_ptr", "dy_ptr", "dskip_ptr"], bf),
          dict(HAS_SKIP=has_skip, ACC=tl.float32, BLOCK=cs._BLOCK))
ps = dict(R=2, ACC=tl.float32, BLOCK_P=sp._BLOCK_P, BLOCK_C=sp._BLOCK_C)
build(sp._pixel_shuffle_prelu_fwd_kernel, dict.fromkeys(["x_ptr", "slope_ptr", "out_ptr"], bf), ps)
build(sp._pixel_shuffle_prelu_bwd_kernel, {**dict.fromkeys(["g_ptr", "x_ptr", "slope_ptr", "dx_ptr"], bf),
      "ds_ptr": f32}, ps)
for y in (False, True):
    for data, acc, tl_acc in ((bf, f32, tl.float32), ("fp64", "fp64", tl.float64)):
        build(mp._sq_err_partial_kernel, {"a_ptr": data, "b_ptr": data, "part_ptr": acc, "const_ptr": acc},
              dict(Y_CHANNEL=y, ACC=tl_acc, BLOCK=mp._BLOCK), num_warps=8)
        build(mp._finish_kernel, {"part_ptr": acc, "out_ptr": acc, "const_ptr": acc},
              dict(MEAN=y, ACC=tl_acc, BLOCK=1024))
build(mp._mse_bwd_kernel, {"a_ptr": bf, "b_ptr": bf, "scale_ptr": f32, "da_ptr": bf, "db_ptr": bf},
      dict(HAS_DA=True, HAS_DB=True, ACC=tl.float32, BLOCK=mp._BLOCK), num_warps=8)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the compiled kernels run in the tests above")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter hides compiled-path errors (tl.dot shape/dtype rules, constexpr misuse):
    compile every kernel in bf16 for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed.
    Runs in a subprocess because TRITON_INTERPRET=1 is set in this one."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_autotune_off_leaves_one_config():
    """FASTSR_TRITON_AUTOTUNE=0 (set by the GPU check's correctness steps): one config per kernel.
    In a subprocess without the interpreter, which has its own single config."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from fastsr.kernels import conv as cv; "
            "print(len(cv._FWD_CONFIGS), len(cv._WGRAD_CONFIGS), len(cv._FWD_SHAPES))")
    counts = [subprocess.run([sys.executable, "-c", code], env={**env, "FASTSR_TRITON_AUTOTUNE": value},
                             capture_output=True, text=True, timeout=300).stdout.split() for value in ("0", "1")]
    assert counts[0][:2] == ["1", "1"] and counts[1][0] == counts[1][2] != "1", counts


def test_fp32_autotunes_only_the_configs_that_do_not_spill():
    """fp32/fp64 (IEEE dots) autotune over the configs measured not to spill on sm_90; bf16/fp16 over
    the rest; one config stays one config. In a subprocess without the interpreter (full config lists)."""
    from fastsr.kernels import conv as cv

    assert cv.is_ieee(torch.empty(1)) and cv.is_ieee(torch.empty(1, dtype=torch.float64))
    assert not cv.is_ieee(torch.empty(1, dtype=torch.bfloat16))
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from fastsr.kernels import conv as cv\n"
            "out = {f'{name} {ieee}': [list(cv._shape_of(c)) for c in getattr(cv, name)[ieee].configs]\n"
            "       for name in ('_fwd', '_bwd_input', '_bwd_weight') for ieee in (True, False)}\n"
            "print(json.dumps(out))")
    runs = {value: json.loads(subprocess.run([sys.executable, "-c", code], env={**env, "FASTSR_TRITON_AUTOTUNE": value},
                                             capture_output=True, text=True, timeout=300).stdout)
            for value in ("1", "0")}
    for key, kept in runs["1"].items():
        shapes = {tuple(s) for s in kept}
        ieee = cv.IEEE_WGRAD_SHAPES if "weight" in key else cv.IEEE_FWD_SHAPES
        if key.endswith("True"):
            assert shapes == ieee, key
        else:
            assert not shapes & cv.IEEE_ONLY and len(shapes) >= 5, key
    assert all(len(kept) == 1 for kept in runs["0"].values()), runs["0"]


def test_non_contiguous_views():
    """Strides are passed through, so sliced views work without a copy (and without reading out
    of bounds, which the interpreter would not catch as an error but as wrong values)."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(3, 7, 11, 19, generator=gen, dtype=torch.float64).to(DEVICE)
    x = big[:, 1:6, 2:9, 3:16]  # (3, 5, 7, 13), no dense layout
    wt = torch.randn(17, 5, 3, 3, generator=gen, dtype=torch.float64).to(DEVICE) / 6
    res_big = torch.randn(3, 13, 7, 17, generator=gen, dtype=torch.float64).to(DEVICE)
    res = res_big.transpose(1, 3)[:, :17]  # (3, 17, 7, 13), channel stride 1 in an odd layout
    s = torch.rand(17, generator=gen, dtype=torch.float64).to(DEVICE)
    ins = [x, wt, None, s, res]
    ref64 = ref.conv2d_prelu(*ins, 1)
    same = ref.conv2d_prelu(*cast(ins, torch.float32), 1)
    ours = ops.conv2d_prelu(*cast(ins, torch.float32), backend="triton")
    assert_within_rule("conv2d_prelu on views", ours, ref64, same, torch.float32)
    a, b = big[:, :3, 0:10:2, 1:], big[:, 3:6, 1:11:2, :-1]
    assert_within_rule("mse on views", ops.mse(a.float(), b.float(), "none", backend="triton"),
                       ref.mse(a, b, "none"), ref.mse(a.float(), b.float(), "none"), torch.float32)
