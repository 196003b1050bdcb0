"""One module per ``fastsr`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args)``.

The long-running commands (upscale, train) share :func:`terminate_as_interrupt`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) handled as Ctrl-C: the run stops through the same
    path (message, finished tiles or checkpoint kept, lock released) instead of dying silently with
    its lock file left. Only the main thread can set a handler; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
