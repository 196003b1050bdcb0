"""Building and caching the C++ extension (fastsr.csrc.build): ISA choice, cache key, remembered
failures, the one-line warning. Nothing here compiles the real extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fastsr.csrc import backend as ext
from fastsr.csrc import build
from tolerance import assert_within_rule

import fastsr
from fastsr.ops import dispatch as backend

# What g++ 12 printed on an AVX2 machine when -mf16c was missing (shortened paths).
GCC_LOG = """Error building extension 'fastsr_ext_740877aa1405fa1b': [1/4] c++ -MMD -MF ops_cpu.o.d -O3 -mavx2 -c x.cpp
FAILED: ops_cpu.o
c++ -MMD -MF ops_cpu.o.d -DTORCH_EXTENSION_NAME=fastsr_ext -O3 -mavx2 -mfma -c /work/csrc/cpu/ops_cpu.cpp
In file included from /venv/torch/include/ATen/cpu/vec/vec256/vec256.h:16,
/usr/lib/gcc/x86_64-linux-gnu/12/include/f16cintrin.h:52:1: error: inlining failed in call to 'always_inline' \
'_cvtss_sh': target specific option mismatch
ninja: build stopped: subcommand failed.
"""


def test_first_error_is_the_compiler_error_not_the_command_line():
    assert build.first_error(GCC_LOG) == ("f16cintrin.h:52:1: error: inlining failed in call to 'always_inline' "
                                          "'_cvtss_sh': target specific option mismatch")


def test_avx2_variant_enables_f16c_and_fma():
    flags = build.ISA_VARIANTS["AVX2"][1]
    assert {"-mavx2", "-mfma", "-mf16c"} <= set(flags)
    assert "f16c" in build.ISA_VARIANTS["AVX2"][0]


def test_every_runnable_variant_compiles_its_probe():
    runnable = build.runnable_isas()
    assert runnable[-1] == "DEFAULT"
    features = build.cpu_features()
    if {"avx2", "fma", "f16c"} <= features:
        assert "AVX2" in runnable, build.isa_missing("AVX2")


def test_isa_probe_verdicts_are_kept_on_disk(tmp_path, monkeypatch):
    """A later process decides the ISA without compiling a probe again."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build.probe_compiles.cache_clear()
    first = build.probe_compiles(build.compiler(), "AVX2")
    assert list((tmp_path / "fastsr" / "isa-probes").glob("avx2-*"))
    build.probe_compiles.cache_clear()  # as in a new process
    monkeypatch.setattr(build, "compile_probe", lambda *a: pytest.fail("compiled the probe again"))
    assert build.probe_compiles(build.compiler(), "AVX2") == first
    build.probe_compiles.cache_clear()


def test_forced_isa_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(build, "cpu_features", lambda: {"sse2", "avx2", "fma"})  # no f16c, no avx512
    monkeypatch.setenv("FASTSR_CPU_CAPABILITY", "AVX512")
    with pytest.raises(build.BuildError, match="FASTSR_CPU_CAPABILITY=AVX512 .*lacks f16c, avx512f"):
        build.cpu_isa()
    monkeypatch.delenv("FASTSR_CPU_CAPABILITY")
    assert build.cpu_isa() == "DEFAULT"  # an AVX2 CPU without F16C: the portable build, not a broken one


def test_default_choice_follows_torch_and_the_cpu(monkeypatch):
    monkeypatch.delenv("FASTSR_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(build, "cpu_features", lambda: set(build.ISA_VARIANTS["AVX512"][0]))
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "compiler_accepts", lambda isa: True)
    for torch_isa, expected in [("AVX512", "AVX512"), ("AVX2", "AVX2"), ("DEFAULT", "DEFAULT")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda v=torch_isa: v)
        assert build.cpu_isa() == expected
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert build.cpu_isa() == "DEFAULT"


def test_cache_key_covers_the_compiler_not_ninja_or_path(monkeypatch):
    """What changes the binary changes the folder; which ninja runs the build, or PATH, does not."""
    monkeypatch.setenv("FASTSR_CPU_CAPABILITY", "DEFAULT")
    base = build.plan()
    assert base.name.startswith("fastsr_ext_default_")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(build, "ninja_dir", lambda: "/opt/other")
    assert build.plan().name == base.name
    monkeypatch.setattr(build, "tool_version", lambda command: "g++ (other) 99")
    assert build.plan().name != base.name


def test_ninja_is_found_through_python_not_path(monkeypatch):
    """A venv's bin/fastsr called without activating the venv still finds the ninja package's binary."""
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert build.ninja_dir() == ninja.BIN_DIR
    assert build.missing_tools() is None or "ninja" not in build.missing_tools()


def test_a_build_is_loaded_under_another_path_without_rebuilding(tmp_path):
    """Build (or load) with this process's PATH, then load from a process whose PATH has neither the
    venv's bin nor ninja: the same cached library, no compile."""
    build.build()
    code = "from fastsr.csrc import build; p, cached = build.build(); print(p.name, cached)"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [build.plan().name, "True"]


@pytest.fixture
def broken_plan(tmp_path, monkeypatch):
    """A plan whose only source does not compile, cached under tmp_path."""
    src = tmp_path / "broken.cpp"
    src.write_text("int main() { return not_declared; }\n")
    p = build.BuildPlan("DEFAULT", ["-O0"], False, [src], "fastsr_ext_test_broken", tmp_path / "cache", {"x": 1})
    monkeypatch.setattr(build, "plan", lambda: p)
    return p


def test_failed_build_is_remembered_and_retried_only_on_demand(broken_plan, monkeypatch):
    with pytest.raises(build.BuildError) as first:
        build.build()
    message = str(first.value)
    assert "\n" not in message and "not_declared" in message and "fastsr info --build" in message
    assert str(broken_plan.log) in message and "not_declared" in broken_plan.log.read_text()
    assert json.loads(broken_plan.failure_record.read_text())["error"] in message

    import torch.utils.cpp_extension as cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or 1 / 0)
    with pytest.raises(build.BuildError, match="failed earlier"):
        build.build()  # another process: reads the record, compiles nothing
    assert calls == []
    with pytest.raises(build.BuildError, match="ZeroDivisionError"):
        build.build(retry=True)  # `fastsr info --build`
    assert len(calls) == 1


def test_a_failed_build_warns_once_in_one_line(broken_plan, monkeypatch, capsys):
    capsys.readouterr()
    x, w = torch.rand(1, 3, 5, 5), torch.rand(4, 3, 3, 3)
    backend.forget_checks()
    try:
        with ext.unbuilt():
            for _ in range(2):
                out = fastsr.functional.conv2d_prelu(x, w, backend="auto")
    finally:
        backend.forget_checks()  # the real build is back: availability is found again
    conv = torch.nn.functional.conv2d
    assert_within_rule("conv2d_prelu (auto)", out, conv(x.double(), w.double(), padding=1), conv(x, w, padding=1),
                       torch.float32)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == build.BUILD_MESSAGE and len(lines) == 2, lines  # the build's own line, then one warning
    assert lines[1].startswith("fastsr: warning: C++ backend unavailable") and "not_declared" in lines[1]


def test_info_build_reports_the_isa():
    out = subprocess.run([sys.executable, "-m", "fastsr", "info", "--build"], capture_output=True, text=True,
                         check=True).stdout
    assert f"ISA: {build.cpu_isa()}" in out, out
