"""The command's own SIGTERM handler, kept across `ray.init`.

The CLI turns SIGTERM into an unwinding like Ctrl-C (one raybias line, exit 143, the local
Ray shut down). `ray.init` replaces that handler: Ray's Python one exits, and the core
worker's C++ failure handler prints a stack dump and, while trainers run in threads, aborts
the process (SIGABRT, no raybias line). `raybias.ray_utils.init_ray` therefore puts the command's handler back
once Ray is up (`kept_across_ray_start`).
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
def kept_across_ray_start():
    """Put the command's SIGTERM handler back once Ray has started (ray.init replaced it).
    (Not held with a signal mask meanwhile: Ray's raylet and GCS, started by ray.init,
    would inherit the blocked mask and ignore the SIGTERM that shuts them down.)"""
    try:
        yield
    finally:
        restore()


def restore() -> None:
    """Put the command's SIGTERM handler back (after something replaced it); main thread only."""
    if _handler is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGTERM, _handler)
    except (ValueError, OSError):
        pass
