"""The ``cpp`` backend: builds, loads and registers the C++/CUDA extension in ``csrc/``.

Nothing happens at import time. The first :func:`availability` call (or the first op) compiles
the extension with ``torch.utils.cpp_extension.load`` + ninja into a cache directory keyed by a
hash of the sources, the torch version and the flags, so later processes just load the built
library, and a source change rebuilds. The CUDA part is compiled only when torch is a CUDA build
and a CUDA toolkit is found.

The ops are registered as ``torch.ops.fastsr.*`` (``TORCH_LIBRARY(fastsr, m)`` in C++); this
module adds their fake (meta) kernels and autograd formulas, so they run in eager mode, under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

# Build state, filled by _build() once per process.
_lock = threading.RLock()
_state: dict = {"attempted": False, "ok": False, "reason": "not built yet (builds on first use)", "with_cuda": False}
_loaded = False  # plain global read on every op call (cheap, and torch.compile guards on it)

BUILD_MESSAGE = "fastsr: building the C++ extension (first use, cached afterwards)..."


def _csrc_dir() -> Path:
    import fastsr.csrc

    return Path(fastsr.csrc.__file__).resolve().parent


def _cuda_toolkit() -> str | None:
    """CUDA_HOME when torch is a CUDA build and a toolkit with nvcc is there, else None."""
    if not torch.version.cuda:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return CUDA_HOME
    return None


def _cpu_flags() -> list[str]:
    """Vector ISA flags for at::vec, matching the capability torch itself dispatches to on this CPU.

    The extension is compiled on the machine that runs it, so it may use that machine's widest
    vectors: AVX-512 where torch reports it, else AVX2 + FMA (``FASTSR_CPU_CAPABILITY=AVX2``
    forces the latter). ``CPU_CAPABILITY`` selects the matching ``at::vec::Vectorized``.
    """
    capability = os.environ.get("FASTSR_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []  # other CPUs: at::vec's portable default


def _sources(with_cuda: bool) -> list[Path]:
    root = _csrc_dir()
    sources = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return sources


def _build_plan() -> dict:
    """Everything the build depends on, and the cache directory named by its hash."""
    cuda_home = _cuda_toolkit()
    with_cuda = cuda_home is not None
    cflags = ["-O3", "-fopenmp", "-fno-math-errno", *_cpu_flags()]
    root = _csrc_dir()
    digest = hashlib.sha256()
    for key in (torch.__version__, str(torch.version.cuda), " ".join(cflags), str(with_cuda), sys.version):
        digest.update(key.encode())
    # The compiled files and every header they may include (the CUDA ones only in CUDA builds).
    sources = _sources(with_cuda)
    headers = [p for p in root.rglob("*.h") if with_cuda or "cuda" not in p.relative_to(root).parts]
    for path in sorted(set(sources) | set(headers)):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    name = f"fastsr_ext_{digest.hexdigest()[:16]}"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fastsr"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsr" / "extensions"
    return {"name": name, "build_dir": base / name, "with_cuda": with_cuda, "cflags": cflags, "sources": sources}


def _missing_tools() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or set CXX)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _short(exc: BaseException) -> str:
    """The useful part of a build error: its first line and the first compiler error line."""
    text = str(exc).strip()
    lines = text.splitlines() or [type(exc).__name__]
    errors = [line.strip() for line in lines[1:] if "error:" in line.lower()][:1]
    return " | ".join(dict.fromkeys([lines[0].strip(), *errors]))[:400]


def _build() -> None:
    """Compile (or load from the cache) and register the extension; record why if it fails."""
    global _loaded
    with _lock:
        if _state["attempted"]:
            return
        _state["attempted"] = True
        missing = _missing_tools()
        plan = _build_plan()
        _state.update(build_dir=str(plan["build_dir"]), name=plan["name"])
        if missing:
            _state.update(ok=False, reason=missing)
            return
        from torch.utils.cpp_extension import load

        build_dir = plan["build_dir"]
        build_dir.mkdir(parents=True, exist_ok=True)
        cached = (build_dir / f"{plan['name']}.so").exists()
        if not cached:
            print(BUILD_MESSAGE, file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            load(name=plan["name"], sources=[str(s) for s in plan["sources"]], build_directory=str(build_dir),
                 extra_cflags=plan["cflags"], extra_ldflags=["-fopenmp"],
                 extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], with_cuda=plan["with_cuda"],
                 is_python_module=False, verbose=False)
        except Exception as exc:  # compiler errors, missing headers, linker errors: report, never crash
            _state.update(ok=False, reason=f"building the C++ extension failed: {_short(exc)} (build dir {build_dir})")
            return
        _register_python_side()
        _state.update(ok=True, reason="built" if not cached else "loaded from the build cache",
                      with_cuda=plan["with_cuda"], seconds=round(time.perf_counter() - start, 1), cached=cached)
        _loaded = True


def availability(device_type: str) -> tuple[bool, str]:
    """Whether the extension serves ``device_type`` ("cpu" or "cuda") tensors, and if not, why.

    The first call builds the extension (a minute or more; cached on disk afterwards).
    """
    _build()
    if not _state["ok"]:
        return False, _state["reason"]
    if device_type == "cpu":
        return True, f"C++ extension {_state['reason']} ({_state['build_dir']})"
    if device_type == "cuda":
        if not _state["with_cuda"]:
            why = "torch is a CPU-only build" if not torch.version.cuda else "no CUDA toolkit (nvcc) was found"
            return False, f"the extension was built without CUDA ({why})"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"C++/CUDA extension {_state['reason']} ({_state['build_dir']})"
    return False, f"no kernels for device type {device_type!r}"


def build_info(build: bool = False) -> dict:
    """The extension's build state for ``fastsr info``; ``build=True`` builds it now if needed.

    Keys: ``built`` (True / False / None = not attempted in this process), ``reason``,
    ``build_dir``, ``with_cuda``, ``cached`` (a built library is in the cache dir), ``seconds``.
    """
    if build:
        _build()
    if not _state["attempted"]:
        plan = _build_plan()
        cached = (plan["build_dir"] / f"{plan['name']}.so").exists()
        return {"built": None, "reason": _state["reason"], "build_dir": str(plan["build_dir"]),
                "with_cuda": plan["with_cuda"], "cached": cached, "seconds": None}
    return {"built": _state["ok"], "reason": _state["reason"], "build_dir": _state.get("build_dir"),
            "with_cuda": _state["with_cuda"], "cached": _state.get("cached", False), "seconds": _state.get("seconds")}


def _ensure() -> None:
    if not _loaded:
        _build()
        if not _state["ok"]:
            from .backend import BackendUnavailableError

            raise BackendUnavailableError(f"backend 'cpp' is unavailable: {_state['reason']}")


# ----------------------------------------------------------------------------------------------
# The backend module contract (positional arguments exactly as in fastsr/reference.py).


def conv2d_prelu(x, weight, bias, slope, residual, shuffle):
    """See :func:`fastsr.functional.conv2d_prelu`. Output (N, C_out/shuffle**2, H*shuffle, W*shuffle), x.dtype."""
    _ensure()
    if slope is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, slope, residual)
    ):
        # Under autograd: conv + bias, then shuffle + PReLU + residual as a second op, so the
        # pre-activation is saved for the PReLU backward instead of recomputed by another
        # convolution (the fused op's backward does that; it made training 7-17% slower than torch).
        pre = torch.ops.fastsr.conv2d_prelu(x, weight, bias, None, None, 1)
        return torch.ops.fastsr.shuffle_prelu(pre, slope, residual, int(shuffle))
    return torch.ops.fastsr.conv2d_prelu(x, weight, bias, slope, residual, int(shuffle))


def pixel_shuffle_prelu(x, slope, upscale_factor):
    """See :func:`fastsr.functional.pixel_shuffle_prelu`. (N, C*r*r, H, W) -> (N, C, H*r, W*r)."""
    _ensure()
    return torch.ops.fastsr.shuffle_prelu(x, slope, None, int(upscale_factor))


def mse(a, b, reduction):
    """Per-image (``"none"``, shape (N,)) or mean squared error, fp32 (fp64 for fp64 inputs)."""
    _ensure()
    per_image = torch.ops.fastsr.mse_per_image(a, b, 1.0, False, 0)
    return per_image if reduction == "none" else per_image.mean()


def psnr(sr, hr, data_range, y_channel, crop_border, reduction):
    """PSNR in dB per image (N,) or their mean; fp32 (fp64 for fp64 inputs)."""
    _ensure()
    per_image = 10.0 * torch.log10(1.0 / torch.ops.fastsr.mse_per_image(sr, hr, 1.0 / data_range, y_channel,
                                                                        crop_border))
    return per_image if reduction == "none" else per_image.mean()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C): clamp, * 255, round half to even; NaN -> 0.

    Computed in fp32 (fp64 for fp64 input), one pass, either memory format in.
    """
    _ensure()
    return torch.ops.fastsr.to_uint8(x)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, registered once the library has defined the ops.


def _out_format(x: torch.Tensor) -> torch.memory_format:
    # The same rule as output_format() in csrc/common.h.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _empty(x: torch.Tensor, shape, fmt=None, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=_out_format(x) if fmt is None else fmt)


def _register_python_side() -> None:
    lib = "fastsr::"

    @torch.library.register_fake(lib + "conv2d_prelu")
    def _(x, weight, bias, slope, residual, shuffle):
        n, _, h, w = x.shape
        return _empty(x, (n, weight.shape[0] // (shuffle * shuffle), h * shuffle, w * shuffle))

    @torch.library.register_fake(lib + "shuffle_prelu")
    def _(x, slope, residual, r):
        n, c, h, w = x.shape
        return _empty(x, (n, c // (r * r), h * r, w * r))

    @torch.library.register_fake(lib + "shuffle_prelu_backward")
    def _(grad_out, x, slope, r):
        grad_slope = torch.empty(slope.shape if slope is not None else (0,),
                                 dtype=slope.dtype if slope is not None else x.dtype, device=x.device)
        return _empty(x, x.shape), grad_slope

    @torch.library.register_fake(lib + "mse_per_image")
    def _(a, b, scale, y_channel, crop):
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        return torch.empty((a.shape[0],), dtype=dtype, device=a.device)

    @torch.library.register_fake(lib + "mse_per_image_backward")
    def _(grad, a, b, scale, y_channel, crop):
        return _empty(a, a.shape)

    @torch.library.register_fake(lib + "to_uint8")
    def _(x):
        n, c, h, w = x.shape
        return torch.empty((n, h, w, c), dtype=torch.uint8, device=x.device)

    # conv2d_prelu: the backward recomputes the convolution when there is an activation (its
    # pre-activation values decide the PReLU gradient), like activation checkpointing: the
    # forward op stays a single output and saves nothing but its inputs.
    def conv_setup(ctx, inputs, output):
        x, weight, bias, slope, residual, shuffle = inputs
        ctx.shuffle = shuffle
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, bias, slope)

    def conv_backward(ctx, grad):
        x, weight, bias, slope = ctx.saved_tensors
        r = ctx.shuffle
        need_x, need_w, need_b, need_slope, _, _ = ctx.needs_input_grad
        grad_slope = None
        if slope is not None:
            pre = torch.ops.fastsr.conv2d_prelu(x, weight, bias, None, None, 1)
            grad_pre, grad_slope = torch.ops.fastsr.shuffle_prelu_backward(grad, pre, slope, r)
        else:
            grad_pre = torch.nn.functional.pixel_unshuffle(grad, r) if r > 1 else grad
        pad = weight.shape[-1] // 2
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_pre, x, weight, None if bias is None else [bias.shape[0]], [1, 1], [pad, pad], [1, 1], False,
            [0, 0], 1, [need_x, need_w, need_b and bias is not None])
        return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None,
                grad_slope if need_slope else None, grad if ctx.has_residual else None, None)

    torch.library.register_autograd(lib + "conv2d_prelu", conv_backward, setup_context=conv_setup)

    def shuffle_setup(ctx, inputs, output):
        x, slope, residual, r = inputs
        ctx.r = r
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, slope)

    def shuffle_backward(ctx, grad):
        x, slope = ctx.saved_tensors
        grad_x, grad_slope = torch.ops.fastsr.shuffle_prelu_backward(grad, x, slope, ctx.r)
        return grad_x, grad_slope if slope is not None else None, grad if ctx.has_residual else None, None

    torch.library.register_autograd(lib + "shuffle_prelu", shuffle_backward, setup_context=shuffle_setup)

    def mse_setup(ctx, inputs, output):
        a, b, scale, y_channel, crop = inputs
        ctx.args = (scale, y_channel, crop)
        ctx.save_for_backward(a, b)

    def mse_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.fastsr.mse_per_image_backward(grad, a, b, *ctx.args)
        need_a, need_b = ctx.needs_input_grad[:2]
        return (grad_a if need_a else None, (-grad_a).to(b.dtype) if need_b else None, None, None, None)

    torch.library.register_autograd(lib + "mse_per_image", mse_backward, setup_context=mse_setup)
