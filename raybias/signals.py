"""The command's own SIGTERM handler, kept across `ray.init`.

The CLI turns SIGTERM into an unwinding like Ctrl-C (one raybias line, exit 143, the local
Ray shut down). `ray.init` replaces that handler: Ray's Python one exits, and the core
worker's C++ failure handler prints a stack dump and, while trainers run in threads, aborts
the process (SIGABRT, no raybias line). `raybias.ray_utils.init_ray` therefore starts Ray with SIGTERM held
and puts the command's handler back once Ray is up (`held_during_ray_start`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Optional

_handler: Optional[Callable] = None


def keep(handler: Callable) -> None:
    """Remember `handler` as the command's SIGTERM handler (the CLI calls this)."""
    global _handler
    _handler = handler


def forget() -> None:
    global _handler
    _handler = None


@contextlib.contextmanager
def held_during_ray_start():
    """SIGTERM held (blocked) while Ray starts, then the command's handler put back and the
    signal let through. The threads Ray starts meanwhile inherit the blocked mask, so a later
    SIGTERM always reaches the main thread, where the handler unwinds the command; one that
    came during the start is delivered then, to that handler."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        if main:
            restore()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def restore() -> None:
    """Put the command's SIGTERM handler back (after something replaced it); main thread only."""
    if _handler is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGTERM, _handler)
    except (ValueError, OSError):
        pass
