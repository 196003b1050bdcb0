"""The trainer's Adam (fastsr.training.optim): the cpp backend's multi-tensor kernel against the
float64 reference by the tolerance rule, torch.optim.Adam's step wherever the kernel does not
apply, and state that moves between the two."""

from __future__ import annotations

import copy

import pytest
import torch
from backends import require_backend
from fastsr.csrc import backend as cpp
from tolerance import assert_within_rule

import fastsr
from fastsr.ops import reference
from fastsr.training.optim import Adam

pytestmark = pytest.mark.usefixtures("cpp_built")


@pytest.fixture
def cpp_built():
    require_backend("cpp")


def _params(seed: int = 0) -> list[torch.Tensor]:
    """A channels_last and a contiguous conv weight, a vector longer than two of the kernel's 16384-value
    chunks (a partial last chunk and a tail shorter than a vector register), an odd vector, one slope."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [((64, 16, 3, 3), True), ((3, 16, 9, 9), False), ((2 * 16384 + 21,), False), ((37,), False), ((1,), False)]
    out = []
    for shape, channels_last in shapes:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last else t)
    return out


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64)) for p in params]


def _state(params) -> tuple[list, list, list]:
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    return zeros[0], zeros[1], [torch.tensor(0.0, dtype=torch.float64) for _ in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_kernel_follows_the_reference_over_steps(weight_decay):
    """Three updates from a fresh state (the bias corrections at their largest) with new gradients each
    time: every parameter and both moments within the rule of the float64 reference, fp32 reference
    as the baseline, in each parameter's own layout."""
    runs = {}
    for name, dtype, fn in (("ref64", torch.float64, reference.adam_step), ("same", torch.float32, reference.adam_step),
                            ("ours", torch.float32, cpp.adam_step)):
        params = [p.to(dtype) for p in _params()]
        exp_avgs, exp_avg_sqs, steps = _state(params)
        for step in range(3):
            fn(params, [g.to(dtype) for g in _grads(params, step)], exp_avgs, exp_avg_sqs, steps, 3e-3, 0.9, 0.99,
               1e-8, weight_decay)
        runs[name] = (params, exp_avgs, exp_avg_sqs, steps)
    for part, label in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for i, (o, r, s) in enumerate(zip(runs["ours"][part], runs["ref64"][part], runs["same"][part], strict=True)):
            assert o.stride() == r.stride(), f"{label} {i} left its layout"
            assert_within_rule(f"{label} {i}", o, r, s, torch.float32)
    assert [s.item() for s in runs["ours"][3]] == [3.0] * 5


def test_the_kernel_refuses_a_gradient_in_another_layout():
    params = [_params()[0].float()]
    grads = [g.float().contiguous() for g in _grads(params, 0)]
    exp_avgs, exp_avg_sqs, steps = _state(params)
    with pytest.raises(RuntimeError, match="grads with their parameter's shape and strides"):
        cpp.adam_step(params, grads, [m.float() for m in exp_avgs], [v.float() for v in exp_avg_sqs], steps,
                      1e-3, 0.9, 0.99, 1e-8, 0.0)


def _model_and_grads():
    model = fastsr.SRResNet(4, num_blocks=2, channels=16).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)) for p in model.parameters()]
             for _ in range(4)]
    return model, grads


def _train(model, opt, grads, backend: str) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        with fastsr.use_backend(backend):
            opt.step()


@pytest.mark.parametrize("backend,kernel_used", [("cpp", True), ("auto", True), ("torch", False)])
def test_adam_takes_the_backends_kernel_and_torch_otherwise(monkeypatch, backend, kernel_used):
    calls = []
    real = cpp.adam_step
    monkeypatch.setattr(cpp, "adam_step", lambda *a: calls.append(len(a[0])) or real(*a))
    model, grads = _model_and_grads()
    theirs = copy.deepcopy(model)
    _train(model, Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True), grads, backend)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True), grads, "torch")
    # Each step one call with every parameter (the first-use probe's own call has 4 tensors).
    assert calls.count(len(list(model.parameters()))) == (4 if kernel_used else 0)
    for (name, ours), theirs_p in zip(model.named_parameters(), theirs.parameters(), strict=True):
        if kernel_used:
            # Two fp32 evaluations of one formula (the rule against float64 is the test above): a few ulps.
            torch.testing.assert_close(ours, theirs_p, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(ours, theirs_p), name  # PyTorch's own step


@pytest.mark.parametrize("case", ["amsgrad", "decoupled_weight_decay", "grad_in_another_layout", "float64"])
def test_adam_is_torchs_where_the_kernel_does_not_apply(monkeypatch, case):
    calls = []
    real = cpp.adam_step
    monkeypatch.setattr(cpp, "adam_step", lambda *a: calls.append(len(a[0])) or real(*a))
    model, grads = _model_and_grads()
    if case == "float64":
        model, grads = model.double(), [[g.double() for g in gs] for gs in grads]
    if case == "grad_in_another_layout":
        grads = [[g.contiguous() for g in gs] for gs in grads]
    kwargs = {"amsgrad": case == "amsgrad", "decoupled_weight_decay": case == "decoupled_weight_decay",
              "weight_decay": 0.01}
    theirs = copy.deepcopy(model)
    _train(model, Adam(model.parameters(), lr=1e-3, **kwargs), grads, "cpp")
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3, **kwargs), grads, "cpp")
    assert len(list(model.parameters())) not in calls
    for ours, theirs_p in zip(model.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(ours, theirs_p)


def test_the_state_moves_between_fastsr_and_torch_adam():
    """Two steps with fastsr's Adam on cpp, its state_dict loaded into torch.optim.Adam for two more,
    against four steps of torch.optim.Adam: the same parameters within float rounding of the steps."""
    model, grads = _model_and_grads()
    theirs = copy.deepcopy(model)
    ours_opt = Adam(model.parameters(), lr=1e-3, fused=True)
    _train(model, ours_opt, grads[:2], "cpp")
    handed = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    handed.load_state_dict(ours_opt.state_dict())
    _train(model, handed, grads[2:], "torch")
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3, fused=True), grads, "torch")
    for ours, theirs_p in zip(model.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs_p, rtol=0, atol=1e-6)
    back = Adam(theirs.parameters(), lr=1e-3)
    back.load_state_dict(handed.state_dict())
    assert all(s["step"].item() == 4 for s in back.state_dict()["state"].values())


def test_adam_is_torchs_for_moments_loaded_in_another_layout(monkeypatch):
    """Moments saved from an NCHW model and loaded for the channels_last one keep their strides: the
    step after the load is torch.optim.Adam's (the layouts checked before the load are forgotten)."""
    calls = []
    real = cpp.adam_step
    monkeypatch.setattr(cpp, "adam_step", lambda *a: calls.append(len(a[0])) or real(*a))
    model, grads = _model_and_grads()
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    nchw_opt = torch.optim.Adam(nchw.parameters(), lr=1e-3)
    _train(nchw, nchw_opt, [[g.contiguous() for g in gs] for gs in grads[:1]], "torch")
    theirs = copy.deepcopy(model)
    ours_opt, theirs_opt = Adam(model.parameters(), lr=1e-3), torch.optim.Adam(theirs.parameters(), lr=1e-3)
    _train(model, ours_opt, grads[:1], "cpp")  # the kernel's step: this layout is checked and remembered
    _train(theirs, theirs_opt, grads[:1], "cpp")
    ours_opt.load_state_dict(copy.deepcopy(nchw_opt.state_dict()))  # loading keeps the tensors: one copy each
    theirs_opt.load_state_dict(copy.deepcopy(nchw_opt.state_dict()))
    _train(model, ours_opt, grads[1:], "cpp")
    _train(theirs, theirs_opt, grads[1:], "cpp")
    n = len(list(model.parameters()))
    assert calls.count(n) == 1
    for ours, theirs_p in zip(model.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs_p, rtol=0, atol=1e-6)  # one kernel step, then the same torch steps
