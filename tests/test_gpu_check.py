"""`make gpu-check` (benchmarks/gpu_check.py): its time boxes, and a dry run of the whole script on
the CPU at toy sizes, so that the one command a short GPU window runs cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_step_past_its_time_box_is_killed_and_the_next_one_runs(tmp_path):
    gc = _module()
    # A hung step with a child process: the whole process group goes.
    sleeper = ("import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    hang = gc.Step("hang", [sys.executable, "-c", sleeper], 2)
    quick = gc.Step("quick", [sys.executable, "-c", "print('hello')"], 30)
    outcomes = [gc.run_step(s, tmp_path, {}) for s in (hang, quick)]
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert outcomes[0].seconds < 10
    assert "hello" in (tmp_path / "quick.log").read_text()
    md = gc.markdown(outcomes, tmp_path)
    assert "| hang | timeout |" in md and "| quick | ok |" in md
    spent = gc.run_step(quick, tmp_path, {}, left_s=0)  # the whole check's budget is used up
    assert spent.status == "timeout" and "budget" in (tmp_path / "quick.log").read_text()


def test_a_killed_step_keeps_the_cases_it_finished(tmp_path):
    """One JSON line per case as it ends (the pytest plugin): a step killed by its box keeps them."""
    gc = _module()
    (tmp_path / "test_two.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                          "def test_hangs():\n    time.sleep(60)\n")
    results = tmp_path / "out"
    results.mkdir()
    env = {**os.environ, "FASTSR_RESULTS_JSONL": str(results / "cases.jsonl"),
           "PYTHONPATH": str(ROOT / "benchmarks")}
    step = gc.Step("cases", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_plugin",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_two.py")], 15)
    outcome = gc.run_step(step, results, env)
    assert outcome.status == "timeout"
    cases = gc.read_cases(results)
    assert [(c["step"], c["case"].split("::")[-1], c["outcome"]) for c in cases] == [("cases", "test_quick", "passed")]


def test_returned_files_are_checked_against_the_limits(tmp_path):
    gc = _module()
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert gc.returned_file_problems(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")  # three folders down
    (tmp_path / "odd name.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(17 * 2**20)  # sparse: 17 MiB on paper
    (tmp_path / "link").symlink_to(tmp_path / "f0.txt")
    for i in range(3, 8):
        (tmp_path / f"f{i}.txt").write_text("x")
    problems = "\n".join(gc.returned_file_problems(tmp_path))
    for expected in ("more than 2 folders deep", "odd name.txt: a name", "over 16 MiB", "link: not a plain file",
                     "files, over 8"):
        assert expected in problems, problems


def test_dry_run_of_the_whole_gpu_check(tmp_path):
    """The rehearsal (also what CI runs): a venv made from this venv (which holds torch, as the GPU
    machine's python3 does) with pip offline, the carried size, every step at toy sizes, the returned
    files within the limits. About 60-90 s on 2 cores with the C++ extension cached."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["name"] for s in summary["steps"]] == [
        "env", "conformance-triton", "triton-tests", "build", "conformance-cpp", "train-graph", "selftest",
        "train-step", "train-profile", "bench-warm", "key-benchmarks", "zoo-benchmarks", "compile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.jsonl", "gpu-check.json", "gpu-check.md",
                                                          "logs.tar.gz"]
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    env = next(c for c in cases if c["step"] == "env")
    assert env["prefix"] != sys.prefix and env["torch_file"].startswith(sys.prefix)  # venv-in-venv sees torch
    assert any(c["step"] == "selftest" and c["ok"] for c in cases)
    md = (tmp_path / "gpu-check.md").read_text()
    for case in ("test_conv_64_3x3_bf16[eager]", "test_tiled_pipeline_vs_model[pipeline]", "test_plain_module[SPAN",
                 "test_train_step_backend[torch-pretrain-off]", "train_profile[eager]", "train_profile[cpp]"):
        assert case in md, md


def test_only_runs_the_named_steps_and_what_they_wait_for():
    """A rerun (--only): the named steps in plan order, plus the build when one waits for it."""
    gpu_check = _module()
    plan = gpu_check.steps(Path("results"), dry_run=False)
    assert [s.name for s in gpu_check.select(plan, ["train-step", "env"])] == ["build", "env", "train-step"]
    assert [s.name for s in gpu_check.select(plan, ["selftest"])] == ["selftest"]
    assert gpu_check.select(plan, None) == plan
    with pytest.raises(SystemExit, match="no step named bench"):
        gpu_check.select(plan, ["bench"])


def test_the_gpu_memory_heavy_tests_run_one_at_a_time():
    """The CUDA tests past 2**31 elements take 13-40 GB each: under the check's `-n 12` they must
    share one xdist group, and the parallel steps must schedule by group (--dist loadgroup)."""
    import test_triton
    import test_triton_large

    parallel = [s.command for s in _module().steps(Path("results"), dry_run=False) if "-n" in s.command]
    assert parallel and all(c[c.index("--dist") + 1] == "loadgroup" for c in parallel)
    heavy = [test_triton.test_over_2_31_elements, *(getattr(test_triton_large, name) for name in (
        "test_conv2d_prelu_nchw_channel_offsets_past_2_31", "test_pixel_shuffle_prelu_nchw_channel_offsets_past_2_31",
        "test_to_uint8_past_2_31_pixels_and_channel_offsets", "test_mse_psnr_past_65535_blocks_and_2_31_pixels"))]
    for test in heavy:
        groups = [m.args for m in getattr(test, "pytestmark", []) if m.name == "xdist_group"]
        assert groups == [("gpu-memory",)], test.__name__
