"""Command line: `raybias STAGE CONFIG [key=value ...] [--run-dir DIR] [--resume]`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from typing import List, Optional

from raybias.console import say
from raybias.errors import first_line
from raybias.paths import absolute, make_paths_absolute
from raybias.stages import STAGES

JOB_COMMANDS = ("submit", "status", "stop", "logs")

EPILOG = """\
examples:
  raybias prepare configs/quickstart.yaml
  raybias train configs/quickstart.yaml train.method=groupdro seeds=[0,1,2]
  raybias run configs/quickstart.yaml --run-dir runs/qs --resume
  raybias submit configs/celeba.yaml --address http://127.0.0.1:8265

Config overrides use dotted keys: data.severity=0.95 data.source=csv data.root=/data/mine.
A stage skips nothing unless --resume is given; `run` skips stages already finished
with the same config (and redoes ones whose config changed) like make.
"""


def _common(p: argparse.ArgumentParser, config_help: str = "YAML config (e.g. configs/quickstart.yaml)") -> None:
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.severity=0.95")
    p.add_argument("--run-dir", dest="run_dir", default=None,
                   help="run directory, local path or URI such as s3://bucket/run (default: the config's run_dir)")
    p.add_argument("--resume", action="store_true",
                   help="skip work finished earlier in this run directory; refuse if its config changed")
    p.add_argument("-v", "--verbose", action="store_true", help="more logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raybias",
        description="Fair image classifiers from group-balanced diffusion-generated data, on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from raybias import __version__

    parser.add_argument("--version", action="version", version=f"raybias {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        _common(p, "YAML config, or for `report` also a run or sweep directory" if name == "report"
                else "YAML config (e.g. configs/quickstart.yaml)")
    p = sub.add_parser("submit", help="submit `raybias run` (or --entry sweep) to a Ray cluster as a Ray job",
                       description="Submit a run or sweep to a Ray cluster through the job API, stream its "
                                   "logs and exit with the job's final status.")
    _common(p)
    p.add_argument("--address", default=None, help="Ray dashboard/job address, e.g. http://127.0.0.1:8265 "
                                                   "(default: RAY_ADDRESS)")
    p.add_argument("--entry", choices=tuple(STAGES), default="run",
                   help="what the job runs: run (default), sweep, or any one stage")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    for name, help_ in (("status", "print a submitted job's status"), ("stop", "stop a submitted job"),
                        ("logs", "print a submitted job's logs")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("job_id")
        p.add_argument("--address", default=None, help="Ray job address (default: RAY_ADDRESS)")
    return parser


def _known_errors() -> tuple:
    from raybias.config import ConfigError
    from raybias.data.images import ImageError
    from raybias.data.io import TableMissing
    from raybias.data.schema import SchemaError
    from raybias.data.sources import DataError
    from raybias.ray_utils import ResourceError
    from raybias.rundir import ResumeRefused, StageFailed

    # and the file-system errors a user causes (a folder they cannot write, a path that is a
    # file): Python's message names the path
    return (ConfigError, DataError, ImageError, SchemaError, ResumeRefused, StageFailed,
            TableMissing, ResourceError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # `raybias train cfg.yaml --run-dir X seeds=[0]`: overrides may also follow the options
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    if args.command is None:
        parser.print_help()
        return 2
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    known = _known_errors()
    previous_sigterm = _terminate_as_interrupt()
    try:
        if args.command in ("status", "stop", "logs"):
            from raybias.submit import submission_command

            return submission_command(args.command, args.job_id, args.address)
        if args.command == "report" and os.path.isdir(args.config):
            from raybias.stages.report import report_directory

            report_directory(absolute(args.config))
            return 0
        from raybias.config import load_config
        from raybias.rundir import RunDir

        cfg = load_config(args.config, args.overrides)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if args.command == "submit":
            from raybias.submit import submit

            # relative paths mean nothing on the cluster: submit refuses them, naming the key
            return submit(cfg, args.config, args.overrides, address=args.address, entry=args.entry,
                          resume=args.resume, wait=not args.no_wait)
        # Paths, once, here: nothing relative may reach a Ray worker (see raybias/paths.py).
        make_paths_absolute(cfg)
        stage = STAGES[args.command]
        if not stage.chain:  # a chain checks every stage it will run itself
            from raybias.stages.preflight import check_run

            check_run(cfg, [args.command])
        mode = "resume" if args.resume else ("auto" if stage.chain else "fresh")
        run = RunDir(cfg.run_dir)
        from raybias.console import capture
        from raybias.rundir import Lease

        # one writing command per run directory (a report only reads, and writes report/)
        lease = Lease(run, args.command) if args.command != "report" else None
        if lease is not None:
            lease.acquire()
            # A killed driver's local Ray (its sampler actors, its trainers) can outlive it by a
            # second or two and still be writing: stop it before its temporaries are removed.
            from raybias.ray_utils import reap_orphans

            reap_orphans()
            run.clean_temporaries()  # no live writer now: what is half-written is a dead one's
        ray_was_running = _ray_running()
        with capture(run, args.command, verbose) as log_file, _released(lease):
            try:
                start = time.time()
                # a command always prints its progress (-v is about the log: see console.capture)
                stage.command()(cfg, run, mode, True)
                if args.command != "run":
                    say(f"{args.command} finished in {time.time() - start:.1f}s ({run.uri})")
                return 0
            except BaseException as exc:
                if log_file and not isinstance(exc, (KeyboardInterrupt, SystemExit, _Terminated)) \
                        and _known_cause(exc, known) is None:
                    # the whole traceback goes to the log; the terminal gets one line
                    traceback.print_exc()
                    say(f"raybias: error: {type(exc).__name__}: {first_line(exc)} "
                        f"(an internal error; the traceback is in {log_file})", file=sys.stderr)
                    return 1
                raise
            finally:
                _shutdown_ray_if_started(ray_was_running)
    except KeyboardInterrupt:
        say("raybias: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except _Terminated:
        say("raybias: terminated (SIGTERM); rerun with --resume to continue", file=sys.stderr)
        return 143
    except SystemExit as exc:
        # ray.init replaces the SIGTERM handler with its own, which exits with the signal's
        # number: the same event, told the same way
        if exc.code == signal.SIGTERM:
            say("raybias: terminated (SIGTERM); rerun with --resume to continue", file=sys.stderr)
            return 143
        raise
    except Exception as exc:
        # A project error, possibly raised inside a Ray task/actor and wrapped on the way
        # back: print its message alone, not the nested Ray traceback.
        cause = _known_cause(exc, known)
        if cause is None:
            raise
        say(f"raybias: error: {one_line(cause)}", file=sys.stderr)
        return 2
    finally:
        _restore_sigterm(previous_sigterm)


@contextlib.contextmanager
def _released(lease):
    try:
        yield
    finally:
        if lease is not None:
            lease.release()


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run unwinds like Ctrl-C."""


def _terminate_as_interrupt():
    """SIGTERM unwinds the run like Ctrl-C (one raybias line, the local Ray shut down, no
    C++ stack dump); returns the handler it replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None
    from raybias import signals

    signals.keep(handler)  # init_ray puts it back after ray.init replaced it
    return previous


def _restore_sigterm(previous) -> None:
    from raybias import signals

    signals.forget()
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray_if_started(was_running: bool) -> None:
    """The Ray this command started (or joined) goes down with it, its agents included; a Ray
    that was running before the command (a test session's, a library caller's) is left alone."""
    if was_running:
        return
    try:
        from raybias.ray_utils import shutdown_ray

        shutdown_ray()
    except Exception:
        pass


def one_line(exc: BaseException) -> str:
    """An error's message as one line: a traceback that rode along inside it (Ray's wrappers
    put the remote one there) is cut off."""
    lines = []
    for line in str(exc).strip().splitlines():
        if line.lstrip().startswith("Traceback (most recent call last)"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(exc).__name__


def _known_cause(exc: BaseException, known: tuple) -> Optional[BaseException]:
    """The first error of a `known` class along `exc`'s chain, skipping Ray's wrappers
    (a RayTaskError keeps the original in `.cause`; Ray Data and `raise ... from` use
    `__cause__`). None if there is none: an unexpected error keeps its traceback."""
    seen, cur = set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, known) and not type(cur).__name__.startswith("RayTaskError"):
            return cur
        nxt = getattr(cur, "cause", None)
        cur = nxt if isinstance(nxt, BaseException) else cur.__cause__
    return None


if __name__ == "__main__":
    sys.exit(main())
