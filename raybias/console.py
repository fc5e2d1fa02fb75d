"""What a user sees: raybias's own lines and progress bars; everything else in logs/.

A run starts a local Ray (GCS, raylet, dashboard, workers), Ray Train, Ray Data and
diffusers, and each of them writes to the process's stdout and stderr: worker start-up
notices, C++ core-worker errors, per-worker pipeline-loading bars, deprecation warnings.
`capture` points file descriptors 1 and 2 of the raybias process, and so of every
process Ray starts from it, at a log file under the run directory's `logs/`, and keeps
a handle on the terminal for raybias's own output: the stage headers, one progress bar
per long stage, the results table, the report's path and, on failure, the one error
line. `raybias -v` does not capture: everything streams as it happens.

Code writes to the user through `say` and `bar`; outside `capture` (tests, library use)
they write to sys.stdout / sys.stderr as `print` and `tqdm` would.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

from raybias.layout import LOGS, log_file

_out: Optional[TextIO] = None  # the terminal's stdout while captured
_err: Optional[TextIO] = None  # the terminal's stderr while captured
_log_path: Optional[str] = None


def out() -> TextIO:
    return _out if _out is not None else sys.stdout


def err() -> TextIO:
    return _err if _err is not None else sys.stderr


def log_path() -> Optional[str]:
    """The file the current capture writes to (None when not captured)."""
    return _log_path


def say(*args, sep: str = " ", end: str = "\n", file: Optional[TextIO] = None, flush: bool = True) -> None:
    """`print` for raybias's own lines: to the terminal even while the rest is captured.
    `file=sys.stderr` (or `err()`) sends it to the terminal's stderr."""
    stream = err() if file is not None and file in (sys.stderr, sys.__stderr__, _err) else out()
    print(*args, sep=sep, end=end, file=stream, flush=flush)


def bar(**kwargs):
    """A tqdm progress bar on the terminal's stderr. In a terminal it redraws in place; where
    stderr is a file or a pipe (CI, `make run | tee`) it writes a line at most every 30 s."""
    from tqdm import tqdm

    stream = err()
    kwargs.setdefault("file", stream)
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        kwargs["mininterval"] = max(30.0, float(kwargs.get("mininterval") or 0.0))
        kwargs.setdefault("ncols", 100)
    kwargs.setdefault("dynamic_ncols", interactive)
    return tqdm(**kwargs)


class _ConsoleHandler(logging.Handler):
    """raybias's own warnings and errors (logger "raybias") also reach the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err().write(f"raybias: {record.levelname.lower()}: {record.getMessage()}\n")
            err().flush()
        except Exception:  # a closed terminal must not break the run
            pass


@contextmanager
def capture(run=None, command: str = "run", verbose: bool = False) -> Iterator[Optional[str]]:
    """Send fds 1 and 2 (this process, and the Ray processes it starts) to a log file under
    `run`'s `logs/` (a local temporary file uploaded there at the end for a remote run
    directory); raybias's own output keeps the terminal. Yields the log's path, or None
    with `verbose` (nothing captured)."""
    global _out, _err, _log_path
    if verbose or _out is not None:
        yield None
        return
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    local_dir = None
    if run is not None and run.is_local:
        try:
            local_dir = run.makedirs(LOGS)
            if not os.access(local_dir, os.W_OK):
                local_dir = None
        except OSError:
            local_dir = None
    if local_dir is None:
        local_dir = tempfile.mkdtemp(prefix="raybias-logs-")
    path = os.path.join(local_dir, name)
    try:
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        yield None
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # Where sys.stdout / sys.stderr were replaced (pytest's capsys, a caller's redirect), that
    # stream is the "terminal"; otherwise a copy of the original descriptor is.
    _out = sys.stdout if sys.stdout is not sys.__stdout__ else \
        os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    _err = sys.stderr if sys.stderr is not sys.__stderr__ else \
        os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    owned = [s for s in (_out, _err) if s is not sys.stdout and s is not sys.stderr]
    _log_path = path
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    handler = _ConsoleHandler(level=logging.WARNING)
    logging.getLogger("raybias").addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger("raybias").removeHandler(handler)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        for stream in owned:
            try:
                stream.close()
            except OSError:
                pass
        _out = _err = _log_path = None
        if run is not None and not run.is_local:
            try:  # the log of a run on an object store goes there too
                with open(path, "rb") as f:
                    run.write_bytes(log_file(name), f.read())
            except Exception:
                pass
