"""The GPU check, sized for a short window on a lent H100/H200 (`make gpu-check`): every step
time-boxed, so one that hangs still leaves the others' results.

Steps: build the CUDA extension (`fastsr info --build`), `fastsr selftest --device cuda`, the
gpu-marked tests and the conformance suite's CUDA targets, then the key benchmarks only
(benchmarks/test_gpu_key.py). Everything goes into RESULTS: one log per step, the benchmark JSON,
`gpu-check.json` (the steps: status, seconds, command) and `gpu-check.md` (the same as tables).

`--dry-run` runs the same steps on the CPU with tiny sizes (CI runs it, so the script cannot rot):
selftest on the CPU, the gpu-marked tests (all skipped there), the key benchmarks at toy sizes.

  python benchmarks/gpu_check.py --results $OUT          # on the GPU machine
  python benchmarks/gpu_check.py --results /tmp/r --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    ok_codes: tuple[int, ...] = (0,)
    env: dict[str, str] = field(default_factory=dict)  # added to the check's environment


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed", "timeout"
    returncode: int | None
    seconds: float
    command: str
    log: str


def steps(results: Path, dry_run: bool) -> list[Step]:
    """The check's steps, each with its own time box; ``main`` also holds them all to one budget."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    bench_json = str(results / f"gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    no_tests = (0, 5)  # pytest's 5: nothing collected (every gpu test deselected on a CPU)
    # Correctness steps run Triton with one config: autotuning every shape they meet would
    # compile the whole config space for each (minutes); the benchmark steps autotune.
    one_config = {"FASTSR_TRITON_AUTOTUNE": "0"}
    return [
        Step("build", [py, "-m", "fastsr", "info", "--build"], 180),
        Step("selftest", [py, "-m", "fastsr", "selftest", "--device", device,
                          "--json", str(results / "selftest.json")], 45, env=one_config),
        Step("gpu-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], 60, no_tests,
             env=one_config),
        Step("conformance-cuda", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conformance.py",
                                  "-k", "cuda"], 60, no_tests, env=one_config),
        Step("key-benchmarks", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_gpu_key.py",
                                "--benchmark-only", f"--benchmark-json={bench_json}"], 120),
        # RealESRGAN_x4plus, animevideov3 and SPAN, fp16: fastsr vs the plain module (the goal is
        # >= 1.5x eager). torch.compile is left out: three compilations would not fit the box. Last:
        # within the 330 s budget it runs only if the steps before left time for it.
        Step("zoo-benchmarks", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_zoo.py",
                                "--benchmark-only", "-k", "not torch_compile",
                                f"--benchmark-json={bench_json.replace('bench', 'zoo-bench')}"], 60),
    ]


def run_step(step: Step, results: Path, env: dict, left_s: float = float("inf")) -> Outcome:
    """Run one step in its own process group; past its time box (or the ``left_s`` seconds left of
    the whole check's budget) the whole group is killed."""
    log = results / f"{step.name}.log"
    start = time.perf_counter()
    if left_s <= 0:
        log.write_text("not run: the check's time budget was spent\n")
        return Outcome(step.name, "timeout", None, 0.0, " ".join(step.command), str(log))
    with open(log, "w") as out:
        proc = subprocess.Popen(step.command, cwd=ROOT, env={**env, **step.env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=min(step.timeout_s, left_s))
            status = "ok" if code in step.ok_codes else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, "timeout"
    return Outcome(step.name, status, code, round(time.perf_counter() - start, 1), " ".join(step.command), str(log))


def markdown(outcomes: list[Outcome], results: Path) -> str:
    """The steps as a table, then the benchmarks (one row per case) when they ran."""
    lines = ["| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds} |" for o in outcomes]
    for path in sorted(results.glob("gpu-bench-*.json")):
        data = json.loads(path.read_text())
        lines += ["", f"Benchmarks ({path.name}, {data['machine_info'].get('cpu', {}).get('brand_raw', '')}):", "",
                  "| case | mean ms | extra |", "|---|---:|---|"]
        for b in data["benchmarks"]:
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in b["extra_info"].items())
            lines.append(f"| {b['name']} | {1e3 * b['stats']['mean']:.3f} | {extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="folder for the logs, JSON and markdown")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds for all steps together (default 330: with the venv set-up, under 6 minutes)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FASTSR_GPU_CHECK_DRY": "1" if args.dry_run else "0"}
    outcomes, deadline = [], time.perf_counter() + args.budget
    for step in steps(results, args.dry_run):
        outcomes.append(run_step(step, results, env, deadline - time.perf_counter()))
        print(f"gpu-check: {step.name}: {outcomes[-1].status} ({outcomes[-1].seconds} s)", flush=True)
    (results / "gpu-check.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    (results / "gpu-check.md").write_text(markdown(outcomes, results))
    failed = [o.name for o in outcomes if o.status != "ok"]
    print(f"gpu-check: {len(outcomes) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
