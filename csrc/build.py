"""Building and caching the C++/CUDA extension in ``csrc/`` (imported as ``fastsr.csrc.build``).

This module only compiles and loads the shared library; registering the ops' Python side
(fake kernels, autograd) is :mod:`fastsr.csrc.backend`'s job.

* **ISA.** The CPU kernels use ``at::vec``, whose vector width is chosen at compile time by
  ``CPU_CAPABILITY``. :func:`cpu_isa` picks the widest variant that the CPU executes, the
  compiler accepts and torch itself dispatches to (``AVX512``, ``AVX2`` with FMA and F16C, or
  ``DEFAULT``, at::vec's portable code, e.g. on aarch64). ``FASTSR_CPU_CAPABILITY`` asks for one
  variant (the test matrix builds each); asking for one the CPU cannot run is refused.
* **Cache.** The library goes to ``~/.cache/fastsr/extensions/<name>`` where the name carries the
  ISA and a hash of what changes the binary: the sources' and headers' contents, flags, torch,
  Python, the compiler and its version (each combination gets its own folder). Not which ninja
  runs the build, nor where the sources lie: a checkout and an installed wheel with the same
  sources share one build. A built library is loaded directly, without running ninja.
* **Tools.** ninja is the ``ninja`` package's own binary, found through the Python running fastsr,
  so a venv's ``bin/fastsr`` builds without the venv being activated (PATH is not consulted for it
  unless the package is missing).
* **Failures are remembered.** A failed build writes ``failed.json`` (the first compiler error)
  and ``build.log`` (everything) into its folder; later processes read the record instead of
  compiling again. ``build(retry=True)`` (``fastsr info --build``) tries again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent
BUILD_MESSAGE = "fastsr: building the C++ extension (first use, cached afterwards)..."
RETRY_HINT = "retry with `fastsr info --build`"

# ISA variant -> (CPU flags it needs in /proc/cpuinfo, compiler flags). Widest first.
_AVX2_CPU = ("avx2", "fma", "f16c")
ISA_VARIANTS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "AVX512": (_AVX2_CPU + ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
    "AVX2": (_AVX2_CPU, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "DEFAULT": ((), []),
}

# A line of code per ISA that only compiles when the flags enable every instruction set torch's
# at::vec headers use for that variant (F16C was the one missing for AVX2).
_ISA_PROBE = {
    "AVX512": "#include <immintrin.h>\nint main(){__m512 a=_mm512_set1_ps(1.f);__m256i h=_mm512_cvtps_ph(a,0);"
              "__m256 b=_mm256_cvtph_ps(_mm_set1_epi16(0));(void)h;(void)b;"
              "return _mm512_reduce_add_epi32(_mm512_abs_epi32(_mm512_set1_epi32(-1)));}\n",
    "AVX2": "#include <immintrin.h>\nint main(){__m256 a=_mm256_fmadd_ps(_mm256_set1_ps(1.f),_mm256_set1_ps(2.f),"
            "_mm256_set1_ps(3.f));__m128i h=_mm256_cvtps_ph(a,0);return _mm_extract_epi16(h,0);}\n",
}


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message is one line saying why."""


def compiler() -> str:
    """The C++ compiler torch's extension build runs: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def cpu_features() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, which selects DEFAULT)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def compiler_accepts(isa: str) -> bool:
    """Whether the C++ compiler builds the ISA probe with the variant's flags."""
    return isa not in _ISA_PROBE or probe_compiles(compiler(), isa)


@functools.cache
def probe_compiles(compiler: str, isa: str) -> bool:
    """The verdict is kept in the cache folder, keyed by the compiler (path and version), the flags
    and the probe, so a process that loads an already built extension compiles nothing."""
    key = f"{shutil.which(compiler)}|{tool_version([compiler, '--version'])}|{ISA_VARIANTS[isa][1]}|{_ISA_PROBE[isa]}"
    record = _cache_root() / "isa-probes" / f"{isa.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if record.is_file():
        return record.read_text() == "ok"
    ok = compile_probe(compiler, isa)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}")
        tmp.write_text("ok" if ok else "no")
        os.replace(tmp, record)  # a reader never sees a half-written verdict
    except OSError:  # a read-only cache only costs the probe again next time
        pass
    return ok


def compile_probe(compiler: str, isa: str) -> bool:
    """Compile (and link) the ISA probe of ``isa`` with its flags: whether ``compiler`` accepts them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text(_ISA_PROBE[isa])
        try:
            proc = subprocess.run([compiler, *ISA_VARIANTS[isa][1], "-c", str(src), "-o", str(Path(tmp, "p.o"))],
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return proc.returncode == 0


def isa_missing(isa: str) -> str | None:
    """Why this machine cannot build and run variant ``isa``, or None when it can."""
    if isa not in ISA_VARIANTS:
        return f"unknown ISA variant {isa!r}; choose one of: {', '.join(ISA_VARIANTS)}"
    if isa != "DEFAULT" and platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{isa} is an x86 variant and this CPU is {platform.machine()}"
    lacking = [flag for flag in ISA_VARIANTS[isa][0] if flag not in cpu_features()]
    if lacking:
        return f"this CPU lacks {', '.join(lacking)}"
    if shutil.which(compiler()) is None:
        return missing_tools()
    if not compiler_accepts(isa):
        return f"the C++ compiler ({compiler()}) does not build {isa} code"
    return None


def runnable_isas() -> list[str]:
    """The ISA variants this machine can build and run, widest first (DEFAULT always)."""
    return [isa for isa in ISA_VARIANTS if isa_missing(isa) is None]


def cpu_isa() -> str:
    """The ISA variant to build: ``FASTSR_CPU_CAPABILITY`` if set (refused when the CPU can't run
    it), else the widest variant the machine runs that torch also dispatches to."""
    forced = os.environ.get("FASTSR_CPU_CAPABILITY", "").upper()
    if forced:
        why = isa_missing(forced)
        if why:
            raise BuildError(f"FASTSR_CPU_CAPABILITY={forced} cannot be built and run here: {why}")
        return forced
    torch_isa = torch.backends.cpu.get_cpu_capability().upper()  # honours ATEN_CPU_CAPABILITY
    allowed = {"AVX512": ("AVX512", "AVX2"), "AVX2": ("AVX2",)}.get(torch_isa, ())
    return next((isa for isa in allowed if isa_missing(isa) is None), "DEFAULT")


def tool_version(command: list[str]) -> str:
    """The first line ``command`` (e.g. ``[compiler, "--version"]``) prints; "unknown" if it cannot run."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def ninja_dir() -> str | None:
    """The folder holding the ninja to build with: the ``ninja`` package's (a dependency of fastsr,
    installed beside it whatever PATH says), else the first one on PATH; None when there is none."""
    try:
        import ninja

        if Path(ninja.BIN_DIR, "ninja").is_file():
            return ninja.BIN_DIR
    except ImportError:
        pass
    found = shutil.which("ninja")
    return str(Path(found).parent) if found else None


@contextlib.contextmanager
def _ninja_on_path():
    """torch's cpp_extension runs ``ninja`` by PATH lookup: put ours first while it builds."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja_dir() or "", old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def cuda_toolkit() -> str | None:
    """CUDA_HOME when torch is a CUDA build and a toolkit with nvcc is there, else None."""
    if not torch.version.cuda:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return CUDA_HOME
    return None


def _sources(with_cuda: bool) -> list[Path]:
    sources = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if with_cuda:
        sources += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return sources


def _cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fastsr"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsr" / "extensions"


@dataclass(frozen=True)
class BuildPlan:
    """Everything one build depends on; ``name`` is unique to it."""

    isa: str
    cflags: list[str]
    with_cuda: bool
    sources: list[Path]
    name: str
    build_dir: Path
    depends_on: dict = field(default_factory=dict)

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    @property
    def failure_record(self) -> Path:
        return self.build_dir / "failed.json"

    @property
    def log(self) -> Path:
        return self.build_dir / "build.log"


def plan() -> BuildPlan:
    """The build for this machine and environment, and the cache folder named after it."""
    isa = cpu_isa()
    cuda_home = cuda_toolkit()
    with_cuda = cuda_home is not None
    cflags = ["-O3", "-fopenmp", "-fno-math-errno", *ISA_VARIANTS[isa][1]]
    sources = _sources(with_cuda)
    depends_on = {
        "torch": torch.__version__, "torch_cuda": str(torch.version.cuda), "python": sys.version,
        "cflags": " ".join(cflags), "compiler": f"{compiler()} {tool_version([compiler(), '--version'])}",
        "nvcc": tool_version([str(Path(cuda_home, "bin", "nvcc")), "--version"]) if with_cuda else "none",
    }
    digest = hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode())
    # The compiled files and every header they may include (the CUDA ones only in CUDA builds).
    headers = [p for p in CSRC.rglob("*.h") if with_cuda or "cuda" not in p.relative_to(CSRC).parts]
    for path in sorted(set(sources) | set(headers)):
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    name = f"fastsr_ext_{isa.lower()}_{digest.hexdigest()[:16]}"
    return BuildPlan(isa, cflags, with_cuda, sources, name, _cache_root() / name, depends_on)


# file:line[:col]: [fatal] error: ...  and the linker's complaints.
_ERROR_LINE = re.compile(r"(:\d+(:\d+)?:\s*(fatal )?error:|undefined reference|^\S*ld: )")


def first_error(log: str) -> str:
    """The first compiler or linker error of a build log, as one short line."""
    for line in log.splitlines():
        if _ERROR_LINE.search(line):
            return re.sub(r"^\s*\S*/", "", line.strip())[:300]  # /long/path/file.h:12: ... -> file.h:12: ...
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return (lines[0] if lines else "unknown error")[:300]


def _record_failure(p: BuildPlan, log: str) -> str:
    p.build_dir.mkdir(parents=True, exist_ok=True)
    p.log.write_text(log)
    error = first_error(log)
    p.failure_record.write_text(json.dumps({"error": error, "log": str(p.log), "when": time.time(),
                                            "depends_on": p.depends_on}, indent=1))
    return error


def _failure_message(error: str, p: BuildPlan) -> str:
    return f"building the C++ extension ({p.isa}) failed: {error} (log: {p.log}; {RETRY_HINT})"


def build(retry: bool = False) -> tuple[BuildPlan, bool]:
    """Load the extension library into this process, compiling it first if it is not cached.

    Returns the plan and whether a cached library was loaded. Raises :class:`BuildError` with
    one line when it cannot: a remembered earlier failure (unless ``retry``), missing tools, or
    a new failure (then remembered).
    """
    p = plan()
    if p.library.exists():
        torch.ops.load_library(str(p.library))
        return p, True
    if p.failure_record.exists() and not retry:
        error = json.loads(p.failure_record.read_text()).get("error", "unknown error")
        raise BuildError(_failure_message(error, p).replace("failed:", "failed earlier:", 1))
    missing = missing_tools()
    if missing:
        raise BuildError(missing)
    p.build_dir.mkdir(parents=True, exist_ok=True)
    p.failure_record.unlink(missing_ok=True)
    print(BUILD_MESSAGE, file=sys.stderr, flush=True)
    from torch.utils.cpp_extension import load

    try:
        with _ninja_on_path():
            load(name=p.name, sources=[str(s) for s in p.sources], build_directory=str(p.build_dir),
                 extra_cflags=p.cflags, extra_ldflags=["-fopenmp"],
                 extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], with_cuda=p.with_cuda,
                 is_python_module=False, verbose=False)
    except Exception as exc:  # compiler, header or linker errors: remembered and reported in one line
        raise BuildError(_failure_message(_record_failure(p, f"{type(exc).__name__}: {exc}"), p)) from None
    return p, False


def missing_tools() -> str | None:
    """Why nothing can be compiled here (no C++ compiler, no ninja), or None."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler found ({compiler()!r} is not on PATH; install g++ or set CXX)"
    if ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    return None
