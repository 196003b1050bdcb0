import pytest
import torch
from tolerance import assert_within_rule

import fastsr
from fastsr.ops import dispatch as backend
from fastsr.ops import functional


def test_torch_backend_is_always_available():
    assert "torch" in fastsr.available_backends("cpu")
    assert backend.availability("torch", "cpu") == (True, "plain PyTorch, always available")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fastsr.set_backend("nope")


def test_use_backend_is_scoped_and_overrides_set_backend(monkeypatch):
    monkeypatch.delenv("FASTSR_BACKEND", raising=False)
    with backend.global_backend(None):  # no default of other tests; this one's set_backend undone after
        assert fastsr.get_backend() == "auto"
        fastsr.set_backend("torch")
        assert fastsr.get_backend() == "torch"
        with fastsr.use_backend("cpp"):
            assert fastsr.get_backend() == "cpp"
        assert fastsr.get_backend() == "torch"


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTSR_BACKEND", "torch")
    with backend.global_backend(None):
        assert fastsr.get_backend() == "torch"


def test_named_unavailable_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(backend, "availability", lambda name, device_type="cpu": (name == "torch", "no compiler found"))
    x, w = torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3)
    with pytest.raises(fastsr.BackendUnavailableError, match="'cpp' is unavailable for cpu tensors: no compiler"):
        functional.conv2d_prelu(x, w, backend="cpp")
    # auto never raises: it falls back to the reference
    out = functional.conv2d_prelu(x, w, backend="auto")
    conv = torch.nn.functional.conv2d
    assert_within_rule("conv2d_prelu (auto)", out, conv(x.double(), w.double(), padding=1), conv(x, w, padding=1),
                       torch.float32)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fastsr; print('triton' in sys.modules, 'fastsr.csrc.backend' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
