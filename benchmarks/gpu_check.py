"""The GPU check (`make gpu-check`), sized for a lent H200's short window: 15 device minutes in all,
machine start included, so the check is planned for 6 minutes from a bare machine (the venv, the
build, every step) and leaves room for one rerun. docs/gpu-check.md has the plan (per step:
compiles, estimated seconds, time box) and the machine's facts it is built on.

Every step is time-boxed and writes its results as it goes, so a step killed by its box keeps every
case it finished. The steps, in order:

  build                the C++/CUDA extension (`fastsr info --build`), in the background while the
                       Triton steps run (MAX_JOBS=4: the tests use the other cores)
  env                  versions and the GPU's name
  conformance-triton   tests/test_conformance.py on CUDA, Triton (one config: FASTSR_TRITON_AUTOTUNE=0;
                       pytest -n 12, which also compiles the kernels on 12 cores)
  triton-tests         tests/test_triton*.py: bf16, the >2**31-element and grid-limit sizes, torch.compile
  conformance-cpp      (after the build) tests/test_conformance.py on CUDA, the C++ extension
  train-graph          (after the build) tests/test_train.py's CUDA-graph test: ten pretrain steps replayed
                       from a graph give the eager steps' loss curve, on torch and cpp
  selftest             `fastsr selftest --device cuda`, one JSON line per check
  train-step           benchmarks/test_train_step.py: the bf16 pretrain step (batch 16, 96x96) on
                       torch (eager), cpp and triton (issue 25's GPU goal: before the other benchmarks)
  train-profile        benchmarks/profile_train_step.py: that step on torch and cpp under torch.profiler
                       (wall, host and GPU-busy time, launches, the costliest operators)
  bench-warm           the benchmarks once each, one round, in parallel: compiles and autotunes on
                       12 cores, so the timed steps find a warm Triton cache
  key-benchmarks       benchmarks/test_gpu_key.py (first-use validation off: the selftest covers it)
  zoo-benchmarks       benchmarks/test_zoo.py: RealESRGAN_x4plus, animevideov3, SPAN (random weights
                       when the weights package is absent), fp16, fastsr vs the plain module, and
                       the 1080p -> 4K frame time of RealESRGAN_x4plus
  compile              torch.compile and max-autotune cases, last, in whatever time is left

What comes back (at most 8 files, whatever moment the check is stopped at): RESULTS/gpu-check.md (the
summary tables), gpu-check.json (the steps), cases.jsonl (one JSON line per case: tests, selftest
checks, benchmark means with extra_info), logs.tar.gz (every finished step's log and the benchmark
JSON) and the log of the step running at that moment.

`--dry-run` is the CI rehearsal on a CPU, under the GPU machine's conditions: the Python that runs
`make venv` is itself a venv holding torch, pip has no index (PIP_NO_INDEX=1: only carried wheels),
the working tree plus carried wheels must stay under 56 MiB, and the returned files are checked
against the limits (count, size, depth, names). The steps run at toy sizes with narrow selections.

  make gpu-check FASTSR_RESULTS=$OUT                                   # on the GPU machine
  .venv/bin/python benchmarks/gpu_check.py --results $OUT --only conformance-cpp,train-step,train-profile   # a rerun
  .venv/bin/python benchmarks/gpu_check.py --results /tmp/r --dry-run   # the rehearsal (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EAGER_STEP = "eager (fastsr[torch])"  # the train-step cases' baseline (benchmarks/test_train_step.py)
BUDGET_S = 330.0  # every step; with the venv (30 s box) 6 minutes
MIB = 2**20
# The GPU machine's transfer limits, and the margin the rehearsal keeps below the 64 MiB carry limit.
CARRY_LIMIT_MIB = 56
RETURN_FILES, RETURN_FILE_MIB, RETURN_DEPTH = 8, 16, 2
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
LOG_KEEP = 4 * MIB  # the tail of a log kept in the tarball


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    ok_codes: tuple[int, ...] = (0,)
    env: dict[str, str] = field(default_factory=dict)  # added to the check's environment
    background: bool = False  # started, then joined by the first step that names it in ``after``
    after: str | None = None


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed", "timeout"
    returncode: int | None
    seconds: float
    command: str
    log: str


@dataclass
class Running:
    step: Step
    proc: subprocess.Popen | None
    start: float
    log: Path


def _pytest(py: str, *args: str, workers: int = 0) -> list[str]:
    """pytest with the results plugin (one JSON line per case) and, when xdist is there, workers
    (tests of one xdist_group on one worker: the GPU-memory-heavy ones run one at a time)."""
    parallel = ["-n", str(workers), "--dist", "loadgroup"] if workers and importlib.util.find_spec("xdist") else []
    return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_plugin", *parallel, *args]


def steps(results: Path, dry_run: bool, py: str = sys.executable, work: Path | None = None) -> list[Step]:
    """The check's steps, each with its own time box; ``main`` also holds them all to one budget.
    The dry run keeps every step but narrows what it selects, so the rehearsal stays short."""
    work = work or results
    device = "cpu" if dry_run else "cuda"
    workers = 2 if dry_run else 12  # the rehearsal runs the same xdist paths, on this machine's 2 cores
    no_tests = (0, 5)  # pytest's 5: nothing collected (no CUDA targets on a CPU)
    # Correctness steps run Triton with one config: autotuning every shape they meet would compile
    # the whole config space for each (minutes); the benchmark steps autotune.
    one_config = {"FASTSR_TRITON_AUTOTUNE": "0"}
    no_validate = {"FASTSR_VALIDATE": "0", "FASTSR_ZOO_RANDOM_WEIGHTS": "1"}
    bench = ["--benchmark-only", "--benchmark-columns=mean,rounds"]
    triton_tests = ["-m", "gpu"] if dry_run else []  # the CPU runs them in `make test`
    warm = "conv_64 and eager" if dry_run else "not compile"
    key = "conv_64 and eager or tiled_pipeline" if dry_run else "not compile"
    zoo = "SPAN and plain or frame and cpp" if dry_run else "not compile"
    train = "backend and pretrain and off and torch" if dry_run else "backend and pretrain and bf16"
    train_amp = "off" if dry_run else "bf16"
    profile_size = ["--batch", "1", "--crop", "24", "--steps", "2"] if dry_run else []
    compile_ = ["benchmarks/test_gpu_key.py", "-k", "conv_64 and compile"] if dry_run else [
        "benchmarks/test_gpu_key.py", "benchmarks/test_zoo.py", "-k", "compile"]
    return [
        Step("build", [py, "-m", "fastsr", "info", "--build"], 150, env={"MAX_JOBS": "4"}, background=True),
        Step("env", [py, "-c", "import gpu_check; gpu_check.probe_env()"], 15),
        # Conformance on CUDA only: `make test` runs the CPU targets (on a CPU nothing is selected).
        Step("conformance-triton", _pytest(py, "tests/test_conformance.py", "-k", "triton-cuda",
                                           workers=workers), 80, no_tests, one_config),
        Step("triton-tests", _pytest(py, "tests/test_triton.py", "tests/test_triton_large.py", *triton_tests,
                                     workers=workers), 60, no_tests, one_config),
        Step("conformance-cpp", _pytest(py, "tests/test_conformance.py", "-k", "cpp-cuda", workers=workers // 2),
             35, no_tests, after="build"),
        # --cuda-graph's correctness: replayed steps train as eager ones do (tests/test_train.py).
        Step("train-graph", _pytest(py, "tests/test_train.py", "-m", "gpu", "-k", "cuda_graph"), 60, no_tests,
             after="build"),
        Step("selftest", [py, "-m", "fastsr", "selftest", "--device", device, "--jsonl", str(results / "cases.jsonl"),
                          *(["--backends", "cpp"] if dry_run else [])], 30, env=one_config),
        # The bf16 SRResNet training step (batch 16 of 96x96 crops on CUDA) per backend vs eager: issue 25's
        # GPU goal, so before the other benchmarks. The first H200 run needed more than 30 s for the first two
        # of its three cases (eager took 19 ms a step; the Triton case autotunes its backward kernels).
        Step("train-step", _pytest(py, "benchmarks/test_train_step.py", *bench, "-k", train,
                                   f"--benchmark-json={work / 'train-step-benchmarks.json'}"), 120,
             env=no_validate, after="build"),
        # Where that step's time goes, eager vs cpp: host time, GPU busy time, launches, the costliest
        # operators (benchmarks/profile_train_step.py; the report goes into logs.tar.gz, a line per
        # backend into the case table). A host-bound step needs fewer launches, not faster kernels.
        Step("train-profile", [py, "benchmarks/profile_train_step.py", "--device", device, "--amp", train_amp,
                               *profile_size, "--out", str(work / "train-profile.md")], 60,
             env=no_validate, after="build"),
        # Under xdist pytest-benchmark is disabled (each benchmarked call runs once, which is all a
        # warm-up needs) and refuses --benchmark-only, so this step selects by -k alone.
        Step("bench-warm", _pytest(py, "benchmarks/test_gpu_key.py", "benchmarks/test_zoo.py", "--benchmark-disable",
                                   "-k", warm, workers=workers), 45, env=no_validate),
        Step("key-benchmarks", _pytest(py, "benchmarks/test_gpu_key.py", *bench, "-k", key,
                                       f"--benchmark-json={work / 'key-benchmarks.json'}"), 50, env=no_validate),
        Step("zoo-benchmarks", _pytest(py, "benchmarks/test_zoo.py", *bench, "-k", zoo,
                                       f"--benchmark-json={work / 'zoo-benchmarks.json'}"), 40, env=no_validate),
        # torch.compile (max-autotune above all) compiles for minutes: last, in the time left.
        Step("compile", _pytest(py, *compile_, *bench, f"--benchmark-json={work / 'compile-benchmarks.json'}"),
             BUDGET_S, (0, 5), no_validate),
    ]


def select(plan: list[Step], only: list[str] | None) -> list[Step]:
    """The steps named in ``only`` (all when None), in plan order, with the steps they wait for."""
    if only is None:
        return plan
    unknown = set(only) - {s.name for s in plan}
    if unknown:
        raise SystemExit(f"gpu-check: no step named {', '.join(sorted(unknown))}; the steps: "
                         f"{', '.join(s.name for s in plan)}")
    wanted = set(only) | {s.after for s in plan if s.name in only and s.after}
    return [s for s in plan if s.name in wanted]


def probe_env() -> None:
    """The env step, in the venv the check runs: versions, where torch comes from, the GPU's name."""
    import fastsr.kernels  # noqa: F401  (the Triton backend imports)
    import torch
    import triton

    record = {"step": "env", "python": sys.version.split()[0], "prefix": sys.prefix, "torch": torch.__version__,
              "torch_file": torch.__file__, "triton": triton.__version__,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    print(record)
    with open(os.environ["FASTSR_RESULTS_JSONL"], "a") as f:
        f.write(json.dumps(record) + "\n")


def start_step(step: Step, results: Path, env: dict) -> Running:
    """Start ``step`` in its own process group, its output in RESULTS/<name>.log (returned if the
    check is stopped while it runs)."""
    log = results / f"{step.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(step.command, cwd=ROOT, env={**env, **step.env, "FASTSR_STEP": step.name},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Running(step, proc, time.perf_counter(), log)


def finish_step(running: Running, left_s: float = float("inf")) -> Outcome:
    """Wait for a started step until its time box (counted from its start) or the ``left_s`` seconds
    left of the whole check's budget run out; then its whole process group is killed."""
    step, proc = running.step, running.proc
    box = step.timeout_s - (time.perf_counter() - running.start)
    try:
        code = proc.wait(timeout=max(0.0, min(box, left_s)))
        status = "ok" if code in step.ok_codes else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code, status = None, "timeout"
    seconds = round(time.perf_counter() - running.start, 1)
    return Outcome(step.name, status, code, seconds, " ".join(step.command), str(running.log))


def run_step(step: Step, results: Path, env: dict, left_s: float = float("inf")) -> Outcome:
    """Run one step to its end or its time box (or the ``left_s`` seconds left of the whole budget)."""
    if left_s <= 0:
        log = results / f"{step.name}.log"
        log.write_text("not run: the check's time budget was spent\n")
        return Outcome(step.name, "timeout", None, 0.0, " ".join(step.command), str(log))
    return finish_step(start_step(step, results, env), left_s)


def read_cases(results: Path) -> list[dict]:
    """The JSON lines written so far (a line cut short by a kill is skipped)."""
    path = results / "cases.jsonl"
    cases = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            cases.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return cases


def _benchmark_rows(cases: list[dict]) -> list[str]:
    """One row per timed case, with its speed-up over the eager / plain case of its group."""
    timed = [c for c in cases if c.get("mean_s") and c.get("step") not in ("bench-warm",)]
    groups: dict[str, list[dict]] = {}
    for c in timed:
        groups.setdefault(c.get("group") or "", []).append(c)
    rows = []
    for group, members in groups.items():
        base = next((m for m in members if re.search(r"\[(eager|copy-eager)", m["case"]) or
                     "test_plain_module" in m["case"] or m.get("extra_info", {}).get("what") == EAGER_STEP), None)
        for m in members:
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in m.get("extra_info", {}).items() if k not in ("device", "dtype"))
            ratio = f"{base['mean_s'] / m['mean_s']:.2f}x" if base else "-"
            rows.append(f"| {group} | {m['case'].split('::')[-1]} | {1e3 * m['mean_s']:.3f} | {ratio} | {extra} |")
    return rows


def _outcome(case: dict) -> str | None:
    """passed / failed / skipped of a test case or a selftest check (None for other lines)."""
    if "ok" in case:
        return "passed" if case["ok"] else "failed"
    return case.get("outcome")


def _failure_line(case: dict) -> str:
    """A failed test (its node id) or selftest check (op, backend, dtype, format), and the last line of why."""
    what = case.get("case") or " ".join(str(case.get(k)) for k in ("op", "backend", "dtype", "format"))
    why = (case.get("error") or case.get("detail") or "").strip().splitlines()
    return f"- {case.get('step')}: {what}: {why[-1] if why else ''}"


def markdown(outcomes: list[Outcome], results: Path) -> str:
    """The steps, the cases per step, every failure, and the benchmarks with their speed-ups."""
    cases = read_cases(results)
    env = next((c for c in cases if c.get("step") == "env"), {})
    lines = [f"# gpu-check: {env.get('device', 'device unknown')}", "",
             f"python {env.get('python', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}", "",
             "| step | status | seconds | passed | failed | skipped |", "|---|---|---:|---:|---:|---:|"]
    for o in outcomes:
        mine = [_outcome(c) for c in cases if c.get("step") == o.name]
        counts = [mine.count(k) for k in ("passed", "failed", "skipped")]
        lines.append(f"| {o.name} | {o.status} | {o.seconds} | " + " | ".join(map(str, counts)) + " |")
    failures = [c for c in cases if c.get("outcome") == "failed" or c.get("ok") is False]
    if failures:
        lines += ["", "Failures:", "", *map(_failure_line, failures)]
    bench = _benchmark_rows(cases)
    if bench:
        lines += ["", "| group | case | mean ms | vs eager/plain | extra |", "|---|---|---:|---:|---|", *bench]
    return "\n".join(lines) + "\n"


def write_summary(outcomes: list[Outcome], results: Path, plan: list[Step]) -> None:
    """gpu-check.json and gpu-check.md, rewritten after every step (a stopped check keeps them)."""
    data = {"steps": [asdict(o) for o in outcomes],
            "plan": [{"name": s.name, "box_s": s.timeout_s} for s in plan]}
    (results / "gpu-check.json").write_text(json.dumps(data, indent=1))
    (results / "gpu-check.md").write_text(markdown(outcomes, results))


def pack_log(log: Path, work: Path, results: Path) -> None:
    """Move a finished step's log (its last LOG_KEEP bytes) into the work folder and repack
    RESULTS/logs.tar.gz from it (the logs and benchmark JSON), written under a temporary name first."""
    if log.exists():
        data = log.read_bytes()
        (work / log.name).write_bytes(data[-LOG_KEEP:])
        log.unlink()
    partial = results / "logs.tar.gz.part"
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=f"gpu-check/{path.name}")
    partial.replace(results / "logs.tar.gz")


def returned_file_problems(results: Path) -> list[str]:
    """What would not come back from $OUT: more than 8 files, one over 16 MiB, deeper than two
    folders, a link or special file, a name with other than letters, digits and ._-."""
    problems, files = [], []
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file")
        elif path.is_file():
            files.append(rel)
            if path.stat().st_size > RETURN_FILE_MIB * MIB:
                problems.append(f"{rel}: {path.stat().st_size / MIB:.1f} MiB, over {RETURN_FILE_MIB} MiB")
            if len(rel.parts) - 1 > RETURN_DEPTH:
                problems.append(f"{rel}: more than {RETURN_DEPTH} folders deep")
        if not all(PLAIN_NAME.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits and ._-")
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files, over {RETURN_FILES}: {[str(f) for f in files]}")
    return problems


def carried_mib(root: Path = ROOT) -> float:
    """MiB that travel to the GPU machine: the working tree as git sees it (tracked and untracked,
    not ignored) plus the carried wheels in .whl/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = [root / p.decode() for p in listed if p]
    wheels = list((root / ".whl").glob("*")) if (root / ".whl").is_dir() else []
    return sum(p.stat().st_size for p in paths + wheels if p.is_file()) / MIB


def rehearse_venv(work: Path) -> str:
    """The GPU machine's `make venv` on a CPU: this Python must itself be a venv holding torch (as
    /opt/torch/.venv is); the new venv is made from it with pip offline (PIP_NO_INDEX=1). Returns
    the new venv's python, after checking that it imports torch from this Python's venv."""
    import torch

    if sys.prefix == sys.base_prefix or not Path(torch.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        raise SystemExit(f"gpu-check --dry-run: {sys.executable} must be a venv holding torch "
                         f"(torch from {torch.__file__}), as the GPU machine's python3 is")
    venv = work / "venv"
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run(["make", "-s", "venv", f"VENV={venv}", f"PYTHON={sys.executable}", "USE_SYSTEM_TORCH=1",
                    "OFFLINE=1"],
                   cwd=ROOT, env=env, check=True, timeout=300)
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import torch, fastsr.kernels; print(torch.__file__)"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 or not Path(probe.stdout.strip()).is_relative_to(sys.prefix):
        raise SystemExit(f"gpu-check --dry-run: the new venv does not see this venv's torch: {probe.stderr[-2000:]}")
    return py


def run_all(plan: list[Step], results: Path, work: Path, env: dict, budget_s: float) -> list[Outcome]:
    """Run the plan in order within ``budget_s``; background steps run beside the others until a
    step needs them. The summary and the log tarball are rewritten after every step."""
    outcomes: list[Outcome] = []
    background: dict[str, Running] = {}
    deadline = time.perf_counter() + budget_s

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(f"gpu-check: {outcome.name}: {outcome.status} ({outcome.seconds} s)", flush=True)
        pack_log(Path(outcome.log), work, results)
        write_summary(outcomes, results, plan)

    for step in plan:
        if step.background:
            background[step.name] = start_step(step, results, env)
            continue
        if step.after in background:
            done(finish_step(background.pop(step.after), deadline - time.perf_counter()))
        box = deadline - time.perf_counter() if step.name == "compile" else step.timeout_s
        done(run_step(Step(**{**asdict(step), "timeout_s": box}), results, env, deadline - time.perf_counter()))
    for running in background.values():
        done(finish_step(running, deadline - time.perf_counter()))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="folder for what comes back ($OUT on the GPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="the CI rehearsal on a CPU (see above)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all steps together (default {BUDGET_S:.0f}: with the venv, 6 minutes)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, metavar="STEP,STEP",
                        help="run these steps alone (and the build when one of them waits for it): a rerun")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    problems = []
    py = sys.executable
    venv_dir = Path(tempfile.mkdtemp(prefix="gpu-check-venv-")) if args.dry_run else None
    if args.dry_run:
        carried = carried_mib()
        print(f"gpu-check: working tree + carried wheels: {carried:.1f} MiB (limit {CARRY_LIMIT_MIB})")
        if carried >= CARRY_LIMIT_MIB:
            problems.append(f"working tree + .whl is {carried:.1f} MiB, over {CARRY_LIMIT_MIB} MiB")
        py = rehearse_venv(venv_dir)
    # TRITON_INTERPRET: tests' conftest sets it without CUDA. PYTEST_XDIST_*: the rehearsal may run
    # in an xdist worker (`make test`), and pytest-benchmark in the steps would take it for its own.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST_")}
    env.update(FASTSR_GPU_CHECK_DRY="1" if args.dry_run else "0", FASTSR_RESULTS_JSONL=str(results / "cases.jsonl"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), env.get("PYTHONPATH")])))
    outcomes = run_all(select(steps(results, args.dry_run, py, work), args.only), results, work, env, args.budget)
    for folder in (work, venv_dir):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    problems += returned_file_problems(results)
    for problem in problems:
        print(f"gpu-check: {problem}")
    failed = [o.name for o in outcomes if o.status != "ok"]
    print(f"gpu-check: {len(outcomes) - len(failed)} steps passed, {len(failed)} failed" +
          (f": {failed}" if failed else ""))
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
