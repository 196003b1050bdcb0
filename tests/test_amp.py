"""--amp auto picks bf16 only where the hardware has it; an emulated choice warns in one line."""

from __future__ import annotations

import logging

import pytest
import torch

from fastsr.training import amp


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "off"), ({"avx2", "avx512_bf16"}, "bf16"),
                                             ({"amx_bf16"}, "bf16")])
def test_auto_is_bf16_only_with_native_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(amp, "cpu_flags", lambda: flags)
    assert amp.resolve_amp("auto", torch.device("cpu")) == expected


def test_explicit_bf16_without_native_support_warns_once_and_is_honoured(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    with caplog.at_level(logging.WARNING, logger="fastsr"):
        assert amp.resolve_amp("bf16", torch.device("cpu")) == "bf16"
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "--amp off" in record.getMessage() and "slower" in record.getMessage()


def test_explicit_choice_with_native_support_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_flags", lambda: {"avx512_bf16"})
    with caplog.at_level(logging.WARNING, logger="fastsr"):
        assert amp.resolve_amp("bf16", torch.device("cpu")) == "bf16"
        assert amp.resolve_amp("off", torch.device("cpu")) == "off"
    assert not caplog.records
