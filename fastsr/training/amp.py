"""Mixed precision where the hardware has it: ``--amp auto`` and the warning for a slow choice.

On a CPU, bf16/fp16 autocast pays only with native instructions (AVX-512-BF16 or AMX for bf16;
AVX-512-FP16 or AMX-FP16 for fp16). Without them every path emulates the conversions and the step
is several times slower than fp32: on a 2-core AMD EPYC Zen 2 (AVX2 only) a pretrain step (batch 4,
48x48 crops) took 1.2-2.1 s under bf16 autocast against 0.11-0.19 s in fp32, 7-15x. On a 2-core AMD
EPYC Zen 4 with AVX-512-BF16 bf16 is level with fp32 or faster on the cpp backend (since its fp32
weight gradients use Winograd): batch 16 of 96x96, 0.47 s against 0.53 s; 128x128, 0.99 s against
0.97 s with 2 threads and 1.72 s against 1.82 s with one. On a 2-core AMD EPYC Zen 5 (AVX-512-BF16)
bf16 saves 7% of the cpp step at batch 16 of 96x96 (0.36 s against 0.39 s) and 27% of the eager one
(0.47 s against 0.65 s).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger("fastsr")

# CPU flags (/proc/cpuinfo) that make each autocast dtype native.
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
# The torch dtype each --amp choice autocasts to ("off": no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SLOWDOWN = "7-15x slower than fp32 measured on an AVX2-only AMD EPYC Zen 2"


def cpu_flags() -> set[str]:
    try:
        match = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return set()
    return set(match.group(1).split()) if match else set()


def is_native(amp: str, device: torch.device) -> bool:
    """Whether ``amp`` ("bf16"/"fp16") runs on native instructions of ``device``."""
    if device.type == "cuda":
        return amp == "fp16" or torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & set(NATIVE_CPU_FLAGS[amp]))


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast mode to train in: ``auto`` is bf16 where it is native, else off (fp32); an
    explicit bf16/fp16 without native support is honoured with a one-line warning."""
    if amp == "auto":
        chosen = "bf16" if is_native("bf16", device) else "off"
        log.info("--amp auto: %s (%s)", chosen if chosen != "off" else "fp32",
                 "native bf16 here" if chosen == "bf16" else "this CPU has no bf16 instructions")
        return chosen
    if amp in NATIVE_CPU_FLAGS and not is_native(amp, device):
        log.warning("--amp %s: this %s has no native %s instructions, so each step is emulated (%s); "
                    "use --amp off or --amp auto", amp, device.type.upper(), amp, SLOWDOWN)
    return amp
