"""Where one SRGAN training step's time goes, per backend: the pretrain step of
benchmarks/test_train_step.py (the real :class:`fastsr.train.Trainer` step) under torch.profiler.

For each backend: the step's wall time (synchronised) and the host's time issuing it (until the step
returns, before the synchronisation), both medians of timed steps without the profiler; then, from
profiled steps, the GPU's busy time (the sum of its kernels' times), the CUDA launches and operator
calls (all levels) per step, and the operators that take the most host time. A
step whose host time is close to its wall time while the GPU is busy for a fraction of it is
host-bound: faster kernels will not shorten it, fewer or cheaper launches will (issue 25's GPU goal).
On a CPU the host time is the step.

    .venv/bin/python benchmarks/profile_train_step.py --device cpu --amp off --out /tmp/profile.md
    python benchmarks/profile_train_step.py --device cuda --amp bf16 --out $OUT/train-profile.md

The GPU check runs it as its train-profile step and appends one JSON line per backend to
$FASTSR_RESULTS_JSONL (its case table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastsr
from fastsr.train import TrainConfig, Trainer

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@dataclass
class Profile:
    """One backend's step: wall and host time, medians of the timed steps; the rest, means per
    profiled step."""

    backend: str
    wall_ms: float
    host_ms: float
    gpu_busy_ms: float
    launches: float
    op_calls: float
    top_ops: list[tuple[str, float, float, float]] = field(default_factory=list)  # name, calls, host us, GPU us


def _trainer(device: str, amp: str, batch: int, crop: int) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(data="", out="", stage="pretrain", batch_size=batch, crop=crop, device=device,
                      warmup_steps=0, amp=amp)
    return Trainer(cfg, torch.device(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_backend(backend: str, device: str, amp: str, batch: int, crop: int, steps: int, top: int) -> Profile:
    """Warm up, time ``steps`` synchronised steps, then profile ``steps`` more."""
    trainer = _trainer(device, amp, batch, crop)
    gen = torch.Generator().manual_seed(1)
    hr = torch.rand(batch, 3, crop, crop, generator=gen)
    lr = torch.nn.functional.avg_pool2d(hr, 4)

    def step():
        with fastsr.use_backend(backend):
            trainer.step(lr, hr)

    for _ in range(3):  # first-use validation, cuDNN's algorithm search, allocator warm-up
        step()
    _sync(device)
    walls, hosts = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - start)
        _sync(device)
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
            _sync(device)
    return _summarise(backend, prof.key_averages(), steps, statistics.median(walls), statistics.median(hosts), top)


def _summarise(backend: str, averages, steps: int, wall_s: float, host_s: float, top: int) -> Profile:
    by_key = {a.key: a for a in averages}
    kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(a.self_device_time_total for a in kernels)
    launches = sum(by_key[k].count for k in LAUNCH_CALLS if k in by_key)
    ops = [a for a in averages if a.device_type == torch.autograd.DeviceType.CPU and "::" in a.key]
    ranked = sorted(ops, key=lambda a: -a.self_cpu_time_total)[:top]
    return Profile(backend=backend, wall_ms=1e3 * wall_s, host_ms=1e3 * host_s,
                   gpu_busy_ms=gpu_us / steps / 1e3, launches=launches / steps,
                   op_calls=sum(a.count for a in ops) / steps,
                   top_ops=[(_short(a.key), a.count / steps, a.self_cpu_time_total / steps, a.device_time_total / steps)
                            for a in ranked])


def _short(name: str) -> str:
    """An operator's name without the namespaces autograd's node names carry."""
    for noise in ("torch::autograd::", "(anonymous namespace)::", "autograd::engine::"):
        name = name.replace(noise, "")
    return name


def _machine(device: str) -> str:
    """The GPU's name, or the CPU's model, threads and the ISA caps in effect (the AVX2 approximation)."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "FASTSR_CPU_CAPABILITY")
            if k in os.environ]
    return (f"{names[0] if names else platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
            + (f" ({', '.join(caps)})" if caps else ""))


def markdown(profiles: list[Profile], device: str, amp: str, batch: int, crop: int) -> str:
    """A summary row per backend, then each backend's top operators by host time."""
    where = _machine(device)
    lines = [f"# Training step profile: pretrain, batch {batch} of {crop}x{crop} HR crops, amp {amp}, {where}", "",
             f"torch {torch.__version__}; per step: wall (synchronised) and host (until the step returns) are "
             "medians without the profiler; GPU busy (the sum of kernel times), launches and operator calls (all "
             "levels) are means of profiled steps.", "",
             "| backend | wall ms | host ms | GPU busy ms | CUDA launches | operator calls |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {p.backend} | {p.wall_ms:.2f} | {p.host_ms:.2f} | {p.gpu_busy_ms:.2f} | {p.launches:.0f} | "
              f"{p.op_calls:.0f} |" for p in profiles]
    for p in profiles:
        lines += ["", f"## {p.backend}: operators by host time (self), per step", "",
                  "| operator | calls | host us | GPU us (incl. children) |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {calls:.0f} | {host:.0f} | {gpu:.0f} |" for name, calls, host, gpu in p.top_ops]
    return "\n".join(lines) + "\n"


def _append_cases(path: str, profiles: list[Profile], amp: str) -> None:
    """One line per backend in the GPU check's case format (its benchmark table shows them)."""
    with open(path, "a") as f:
        for p in profiles:
            label = "eager" if p.backend == "torch" else p.backend
            extra = {k: round(v, 3) for k, v in asdict(p).items() if k not in ("backend", "top_ops", "wall_ms")}
            f.write(json.dumps({"step": os.environ.get("FASTSR_STEP", "train-profile"), "outcome": "passed",
                                "case": f"train_profile[{label}]", "group": f"train-profile-{amp}",
                                "mean_s": p.wall_ms / 1e3, "extra_info": extra}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16"], default="bf16")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "cpp"], metavar="B,B")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 4 on a CPU (as the benchmark)")
    parser.add_argument("--crop", type=int, default=None, help="HR crop; default: 96 on CUDA, 48 on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="steps timed, then as many profiled (default 10)")
    parser.add_argument("--top", type=int, default=25, help="operators listed per backend (default 25)")
    parser.add_argument("--out", required=True, help="the markdown report")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    batch, crop = args.batch or (16 if cuda else 4), args.crop or (96 if cuda else 48)
    profiles = []
    for backend in args.backends:
        ok, why = fastsr.ops.dispatch.availability(backend, args.device)
        if not ok:
            print(f"profile: backend {backend} unavailable on {args.device}: {why}")
            continue
        profiles.append(profile_backend(backend, args.device, args.amp, batch, crop, args.steps, args.top))
        print(f"profile: {backend}: wall {profiles[-1].wall_ms:.2f} ms, host {profiles[-1].host_ms:.2f} ms", flush=True)
    report = markdown(profiles, args.device, args.amp, batch, crop)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)
    if os.environ.get("FASTSR_RESULTS_JSONL"):
        _append_cases(os.environ["FASTSR_RESULTS_JSONL"], profiles, args.amp)
    return 0 if len(profiles) == len(args.backends) else 1


if __name__ == "__main__":
    raise SystemExit(main())
