"""`make gpu-check` (benchmarks/gpu_check.py): its time boxes, and a dry run of the whole script on
the CPU at toy sizes, so that the one command a short GPU window runs cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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


def test_dry_run_of_the_whole_gpu_check(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    steps = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r.returncode == 0, r.stdout + "".join((tmp_path / f"{s['name']}.log").read_text()[-2000:]
                                                 for s in steps if s["status"] != "ok")
    assert [s["name"] for s in steps] == ["build", "selftest", "gpu-tests", "conformance-cuda", "key-benchmarks",
                                             "zoo-benchmarks"]
    assert json.loads((tmp_path / "selftest.json").read_text())["rows"]
    md = (tmp_path / "gpu-check.md").read_text()
    for case in ("test_conv_64_3x3_bf16[cpp]", "test_srresnet_x4[eager]", "test_metrics_vs_bandwidth[copy-eager]",
                 "test_tiled_pipeline_vs_model[pipeline]"):
        assert case in md, md
