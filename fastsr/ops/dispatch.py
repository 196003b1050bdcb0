"""Backend registry: which implementation of the fused ops serves a call.

Three backends implement the same op set (see docs/architecture.md, "The backend contract"):

* ``torch``  - plain PyTorch composition (:mod:`fastsr.ops.reference`), the oracle; always there.
* ``triton`` - Triton kernels (:mod:`fastsr.kernels`); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` runs the Triton interpreter.
* ``cpp``    - the C++/CUDA extension (:mod:`fastsr.csrc.backend`), built on first use.

``"auto"`` picks per call from the tensor's device: CUDA -> triton, cpp, torch; CPU -> cpp, torch.
A backend the user names explicitly is never silently replaced: if it cannot serve the call,
:class:`BackendUnavailableError` says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from ..errors import BackendUnavailableError
from ..layout import is_channels_last

BACKENDS = ("torch", "triton", "cpp")
_MODULES = {"torch": "fastsr.ops.reference", "triton": "fastsr.kernels", "cpp": "fastsr.csrc.backend"}
_AUTO_ORDER = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastsr_backend", default=None)
_global_choice: str | None = None
_warned_fallback: set[str] = set()


def _check_name(name: str) -> str:
    name = name.lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return name


def backend_module(name: str) -> ModuleType | None:
    """The module of backend ``name`` ("torch", "triton" or "cpp"), imported now; None when it is
    not installed. Importing does not check availability (see :func:`availability`)."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def availability(name: str, device_type: str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run ops on ``device_type`` tensors, and if not, why.

    Checking may import triton or build the C++ extension (cached after the first time).
    """
    name = _check_name(name)
    if name == "auto":
        return True, "auto picks a backend per call"
    key = (name, device_type)
    if key not in _availability_cache:
        _availability_cache[key] = _check_availability(name, device_type)
    return _availability_cache[key]


# Availability is decided once per process: a backend does not appear or vanish mid-run, and
# re-checking on every op call would cost time (and could start a build in the middle of a job).
_availability_cache: dict[tuple[str, str], tuple[bool, str]] = {}


def _check_availability(name: str, device_type: str) -> tuple[bool, str]:
    backend = backend_module(name)
    if backend is None or not hasattr(backend, "availability"):
        return False, f"backend {name!r} is not installed (module {_MODULES[name]} missing)"
    try:
        return backend.availability(device_type)
    except Exception as exc:  # a broken check must not take a user's job down with it
        return False, f"checking backend {name!r} failed: {type(exc).__name__}: {exc}"


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run on ``device_type`` ("cpu" or "cuda"; default: cuda if present)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if availability(name, device_type)[0]]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend ("auto", "torch", "triton" or "cpp"); None clears it,
    so ``FASTSR_BACKEND`` (else "auto") applies again."""
    global _global_choice
    _global_choice = None if name is None else _check_name(name)


@contextlib.contextmanager
def global_backend(name: str | None) -> Iterator[None]:
    """Context manager: :func:`set_backend` ``(name)`` for the block (None: no process-wide default),
    then the default it replaced, whatever the block set meanwhile. Unlike :func:`use_backend` it
    holds for every thread; tests and benchmarks use it to leave no default behind."""
    previous = _global_choice
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name`` (thread/task local)."""
    token = _selected.set(_check_name(name))
    try:
        yield
    finally:
        _selected.reset(token)


def get_backend() -> str:
    """The backend in effect: ``use_backend`` > ``set_backend`` > ``FASTSR_BACKEND`` > "auto"."""
    return _selected.get() or _global_choice or _check_name(os.environ.get("FASTSR_BACKEND", "auto"))


def resolve(name: str | None, tensor: torch.Tensor, op: str) -> ModuleType:
    """The backend module that serves ``op`` on ``tensor`` (``name=None``: the backend in effect).

    A fast backend is validated against the reference the first time it serves that
    op on the tensor's device, dtype and memory format (:mod:`.validate`): ``auto`` moves on to the
    next backend with one warning when it fails, a named backend raises BackendUnavailableError.
    """
    device_type = "cuda" if tensor.is_cuda else "cpu"
    return _LOADED[_resolve_name(name, device_type, op, tensor.dtype, is_channels_last(tensor))]


def optional_kernel(op: str, tensor: torch.Tensor) -> Callable | None:
    """The backend in effect's own kernel for ``op`` (one of contract.OPTIONAL_OPS, e.g. Adam's step)
    on tensors like ``tensor``, validated on first use like the op set's kernels. None where it has
    none for the tensor's device and dtype (its ``OPTIONAL`` dict), where it is the torch backend
    (whose kernel is PyTorch's own, which the caller then uses), or where its kernel failed the
    first-use check (said once on stderr)."""
    device_type = "cuda" if tensor.is_cuda else "cpu"
    name = get_backend()
    if name == "auto":
        name = next((c for c in _AUTO_ORDER.get(device_type, ()) if availability(c, device_type)[0]), "torch")
    if name == "torch" or not availability(name, device_type)[0]:
        return None
    if name not in _LOADED:
        _LOADED[name] = backend_module(name)
    if (device_type, tensor.dtype) not in getattr(_LOADED[name], "OPTIONAL", {}).get(op, ()):
        return None
    kernel = getattr(_LOADED[name], op)
    wrong = _invalid(name, device_type, op, tensor.dtype, False)  # its probe holds both memory formats
    if wrong:
        if (name, op, device_type, tensor.dtype) not in _warned_invalid:
            _warned_invalid.add((name, op, device_type, tensor.dtype))
            print(f"fastsr: warning: backend {name!r} failed its first-use check of {op} ({device_type}, "
                  f"{str(tensor.dtype).removeprefix('torch.')}), using PyTorch's: {wrong}", file=sys.stderr, flush=True)
        return None
    return kernel


# Backend modules already picked by _resolve_name; a plain dict lookup torch.compile can trace.
_LOADED: dict[str, ModuleType] = {}
_warned_invalid: set[tuple] = set()


def forget_checks() -> None:
    """Forget which backends were found available and which fallbacks were warned about, as a new
    process would (tests; a backend installed mid-session). The backend choice and the first-use
    validation verdicts (:func:`.validate.forget`) stay."""
    _availability_cache.clear()
    _warned_fallback.clear()
    _warned_invalid.clear()


# torch.compile cannot trace ContextVar.get or importlib, so the choice is made in Python and its
# result (a backend name) is a constant of the compiled graph: the backend in effect at compile time
# (validation probes run then, outside the graph).
def _resolve_name(name: str | None, device_type: str, op: str, dtype: torch.dtype, channels_last: bool) -> str:
    name = _check_name(name) if name is not None else get_backend()
    if name != "auto":
        ok, why = availability(name, device_type)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is unavailable for {device_type} tensors: {why}")
        wrong = _invalid(name, device_type, op, dtype, channels_last)
        if wrong:
            raise BackendUnavailableError(f"backend {name!r} failed its first-use check of {op} "
                                          f"({_describe(device_type, dtype, channels_last)}): {wrong}")
        return name
    for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
        ok, why = availability(candidate, device_type)
        if not ok:
            _warn_unbuilt(candidate, why)
            continue
        wrong = _invalid(candidate, device_type, op, dtype, channels_last)
        if not wrong:
            return candidate
        if (candidate, op, device_type, dtype, channels_last) not in _warned_invalid:
            _warned_invalid.add((candidate, op, device_type, dtype, channels_last))
            print(f"fastsr: warning: backend {candidate!r} failed its first-use check of {op} "
                  f"({_describe(device_type, dtype, channels_last)}), using the next one: {wrong}",
                  file=sys.stderr, flush=True)
    _LOADED["torch"] = backend_module("torch")
    return "torch"


def _invalid(name: str, device_type: str, op: str, dtype: torch.dtype, channels_last: bool) -> str | None:
    """Load backend ``name``; why it is wrong for ``op`` here (first-use validation), or None."""
    if name not in _LOADED:  # every op call comes here: import once
        _LOADED[name] = backend_module(name)
    return _validate().check(op, name, _LOADED[name], device_type, dtype, channels_last)


def _validate() -> ModuleType:
    """fastsr.ops.validate, imported at the first op call (it imports the reference and the probes,
    too much for `import fastsr`) and kept: an import statement per op call cost ~0.5 us."""
    global _validate_module
    if _validate_module is None:
        from . import validate

        _validate_module = validate
    return _validate_module


_validate_module: ModuleType | None = None


def _describe(device_type: str, dtype, channels_last: bool) -> str:
    return f"{device_type}, {str(dtype).removeprefix('torch.')}, {'channels_last' if channels_last else 'NCHW'}"


def _warn_unbuilt(candidate: str, why: str) -> None:
    if candidate == "cpp" and backend_module("cpp") is not None and candidate not in _warned_fallback:
        # The extension exists but did not build: say so once, in one line, then keep going.
        _warned_fallback.add(candidate)
        print(f"fastsr: warning: C++ backend unavailable, using the next one: {why}", file=sys.stderr, flush=True)


# This is what torch.compiler.assume_constant_result(_resolve_name) does; calling that would import
# torch._dynamo (and with it triton) at `import fastsr`, which must stay light.
_resolve_name._dynamo_marked_constant = True  # type: ignore[attr-defined]
