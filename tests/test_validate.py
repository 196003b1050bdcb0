"""First-use validation (fastsr.ops.validate): a fast backend is checked against the reference the
first time it serves an (op, device, dtype, memory format); a wrong kernel is never used silently."""

from __future__ import annotations

import pytest
import torch
from backends import require_backend
from fastsr.csrc import backend as cpp
from tolerance import assert_within_rule

import fastsr
from fastsr.ops import contract, dispatch, validate
from fastsr.ops import functional as ops


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test starts with no cached verdicts and no warnings given; restored afterwards."""
    require_backend("cpp")
    monkeypatch.delenv("FASTSR_VALIDATE", raising=False)
    dispatch.forget_checks()
    validate.forget()
    yield
    validate.forget()
    dispatch.forget_checks()


def _wrong_conv(x, weight, bias, slope, residual, shuffle):
    """A kernel with a bug: right shape and dtype, values off by 1e-3 (a wrong stride would be worse)."""
    return fastsr.ops.reference.conv2d_prelu(x, weight, bias, slope, residual, shuffle) + 1e-3


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 6, 5, generator=g), torch.randn(8, 4, 3, 3, generator=g) / 6


def test_a_wrong_kernel_makes_auto_fall_back_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(cpp, "conv2d_prelu", _wrong_conv)
    x, w = _inputs()
    capsys.readouterr()
    for _ in range(3):
        out = ops.conv2d_prelu(x, w, backend="auto")
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, padding=1), rtol=0, atol=0)  # torch's
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "backend 'cpp' failed its first-use check of conv2d_prelu (cpu, float32, NCHW)" in lines[0]
    assert "outside the tolerance rule" in lines[0]


def test_a_wrong_kernel_named_by_the_user_raises_with_the_numbers(monkeypatch):
    monkeypatch.setattr(cpp, "conv2d_prelu", _wrong_conv)
    x, w = _inputs()
    with pytest.raises(fastsr.BackendUnavailableError,
                       match=r"'cpp' failed its first-use check of conv2d_prelu \(cpu, float32, NCHW\): "
                             r"\d+ of \d+ values outside the tolerance rule; worst error 0.001 vs bound"):
        ops.conv2d_prelu(x, w, backend="cpp")


def test_a_kernel_that_raises_is_not_used(monkeypatch):
    def broken(x, slope, r):
        raise RuntimeError("illegal memory access\nmore lines")

    monkeypatch.setattr(cpp, "pixel_shuffle_prelu", broken)
    x = torch.randn(1, 8, 3, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(fastsr.BackendUnavailableError, match=r"channels_last\): RuntimeError: illegal memory access$"):
        ops.pixel_shuffle_prelu(x, torch.tensor([0.2]), 2, backend="cpp")
    out = ops.pixel_shuffle_prelu(x, torch.tensor([0.2]), 2, backend="auto")  # torch's

    def expected(t):
        return torch.nn.functional.prelu(torch.nn.functional.pixel_shuffle(t, 2), torch.tensor([0.2], dtype=t.dtype))

    assert_within_rule("pixel_shuffle_prelu (auto)", out, expected(x.double()), expected(x), torch.float32)


def test_verdicts_are_per_dtype_and_memory_format_and_cached(monkeypatch):
    calls = []
    real = validate.run_probe
    monkeypatch.setattr(validate, "run_probe", lambda *a: calls.append(a[2:]) or real(*a))
    x, w = _inputs()
    for _ in range(2):
        ops.conv2d_prelu(x, w, backend="cpp")
        ops.conv2d_prelu(x.contiguous(memory_format=torch.channels_last), w, backend="cpp")
        ops.conv2d_prelu(x.bfloat16(), w.bfloat16(), backend="cpp")
    assert [(str(d), cl) for _, d, cl in calls] == [("torch.float32", False), ("torch.float32", True),
                                                    ("torch.bfloat16", False)]


def test_validation_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTSR_VALIDATE", "0")
    monkeypatch.setattr(cpp, "conv2d_prelu", _wrong_conv)
    x, w = _inputs()
    out = ops.conv2d_prelu(x, w, backend="cpp")  # served unchecked
    assert (out - torch.nn.functional.conv2d(x, w, padding=1)).abs().max() > 5e-4


def test_the_probes_cover_every_op_of_the_contract():
    for op in (*contract.OPS, *contract.OPTIONAL_OPS):
        assert validate.probes(op, torch.device("cpu"), False), op


@pytest.mark.parametrize("op", contract.OPS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_real_cpp_kernels_pass_their_probes(op, channels_last):
    for dtype in (torch.float32, torch.bfloat16):
        verdict = validate.run_probe(op, cpp, torch.device("cpu"), dtype, channels_last)
        assert verdict.ok, f"{op} {dtype}: {verdict}"


def test_the_real_cpp_adam_step_passes_its_probe():
    verdict = validate.run_probe("adam_step", cpp, torch.device("cpu"), torch.float32, False)
    assert verdict.ok, str(verdict)


def test_a_wrong_optional_kernel_is_not_used_and_said_once(monkeypatch, capsys):
    real = cpp.adam_step
    monkeypatch.setattr(cpp, "adam_step", lambda *a: real(*a[:-1], 0.0))  # forgets the weight decay
    p = torch.zeros(3)
    capsys.readouterr()
    with fastsr.use_backend("cpp"):
        assert dispatch.optional_kernel("adam_step", p) is None
        assert dispatch.optional_kernel("adam_step", p) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "failed its first-use check of adam_step (cpu, float32), using PyTorch's" in lines[0]
    monkeypatch.setattr(cpp, "adam_step", real)
    validate.forget()
    with fastsr.use_backend("cpp"):
        assert dispatch.optional_kernel("adam_step", p) is real
        assert dispatch.optional_kernel("adam_step", p.double()) is None  # not a dtype it serves
    with fastsr.use_backend("torch"):
        assert dispatch.optional_kernel("adam_step", p) is None  # the torch backend's Adam is PyTorch's


def test_selftest_checks_the_optional_kernels_where_they_serve():
    from fastsr.commands import selftest

    rows, _ = selftest.collect("cpu", ["cpp"])
    adam = [r for r in rows if r["op"] == "adam_step"]
    assert [(r["dtype"], r["format"], r["ok"]) for r in adam] == [("float32", "both", True)]
    assert {r["op"] for r in rows} == {*contract.OPS, "adam_step"}
