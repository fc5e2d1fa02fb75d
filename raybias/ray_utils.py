"""Starting or joining Ray, and checking a cluster can run what a config asks for."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Optional, Sequence, TypeVar

import ray

from raybias import signals
from raybias.errors import ResourceError, first_line  # ResourceError re-exported: defined without Ray

log = logging.getLogger("raybias")


T = TypeVar("T")
R = TypeVar("R")


def init_ray(cfg=None, quiet: bool = False) -> None:
    """Join the cluster named by `ray.address` / RAY_ADDRESS, or start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    rc = cfg.ray if cfg is not None else None
    address = (rc.address if rc is not None else None) or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address and address != "local":
        target = reachable_address(address)
        try:
            with signals.kept_across_ray_start():
                ray.init(address=address, log_to_driver=not quiet)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            raise ResourceError(f"cannot connect to the Ray cluster at ray.address={address!r} ({target}): "
                                f"{first_line(exc)}") from exc
        ray_data_quiet()
        return
    num_cpus = rc.num_cpus if rc is not None and rc.num_cpus else None
    num_gpus = rc.num_gpus if rc is not None else None
    store_mb = rc.object_store_mb if rc is not None else 768
    reap_orphans()
    dashboard_port = free_port()
    # A local Ray binds to loopback only: nothing it serves is reachable from the network.
    with loopback_only(), signals.kept_across_ray_start():
        ray.init(
            # "local": always a Ray of our own; with no address ray.init joins a `ray start`
            # cluster it finds on the machine (/tmp/ray/ray_current_cluster) and then refuses num_cpus
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=int(store_mb) * 2**20,
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner
            # needs: without it a trainer ended from outside (a Tune trial finishing) leaks its
            # workers' CPUs and later trainers wait forever. It listens on 127.0.0.1 only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            # a free port (tests and a user's own Ray may hold 8265), known before the start so
            # that every worker can be told which State API is its own (pinned_env)
            dashboard_port=dashboard_port,
            runtime_env={"env_vars": pinned_env(dashboard_port)},
            _node_ip_address="127.0.0.1",
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    watch_local_ray()
    ray_data_quiet()


def reachable_address(address: str, timeout_s: float = 5.0) -> str:
    """host:port that `address` ("auto", "ray://host:port", "host:port") points at, checked to
    accept connections within `timeout_s`; a ResourceError saying so otherwise.

    Ray itself retries an unreachable address for minutes, and "auto" may read another
    user's stale address file from /tmp/ray; a user should hear at once that there is no
    cluster there.
    """
    import socket

    where = address
    if address == "auto":
        from ray._private import services

        try:
            where = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise ResourceError(f"ray.address=auto found no running Ray cluster on this machine ({exc}); start one "
                                "with `ray start --head`, or leave ray.address unset for a local Ray") from exc
    hostport = where.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ResourceError(f"ray.address={address!r} is not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        hint = " (found through this machine's Ray address file, which may be stale)" if address == "auto" else ""
        raise ResourceError(f"no Ray cluster answers at {hostport} for ray.address={address!r}{hint}: {exc}; "
                            "start one with `ray start --head`, or leave ray.address unset for a local Ray") from exc
    return hostport


# How often a Ray Train controller takes its workers' reports (Ray's default: 2 s). Every
# `ray.train.report` waits for that poll, so a short job pays up to 2 s per report: a packed
# tiny LoRA job 2.00 s instead of 0.26 s, a quickstart classifier (78 reports with
# train.stage2=auto) minutes (docs/performance.md). On a cluster, where a report follows
# minutes of GPU work, the user's Ray keeps its own setting.
TRAIN_POLL_S = "0.2"


def pinned_env(dashboard_port: int) -> dict:
    """Environment for every worker of a local Ray: its own State API address, and a Train
    controller that takes reports every TRAIN_POLL_S (unless the caller's environment says).

    Ray Train's placement-group cleaner (and anything else that asks Ray's State API without
    an address) otherwise looks for "the" Ray on the machine; with two local Rays (a sweep
    and a quickstart at once) it finds both, says "Found multiple active Ray instances" and
    picks the newest, which may be the other run's.
    """
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)}


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Ray's switch for "this machine is a single-node install": off, Ray keeps 127.0.0.1 as the
# node address; on (Linux default), it swaps 127.0.0.1 for the machine's outward address and
# its GCS, raylet and workers listen there, reachable from the network.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only():
    """While starting a local Ray: keep its node address, and so every listener, on 127.0.0.1."""
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"  # inherited by the GCS, raylet and workers started now
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when this process resolves 127.0.0.1
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = old_env


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def require_gpus(per_task: float, what: str) -> None:
    """Fail clearly instead of leaving `what` PENDING forever on a cluster without GPUs."""
    if per_task and per_task > 0:
        have = cluster_gpus()
        if have < per_task:
            raise ResourceError(
                f"{what} asks for {per_task:g} GPU(s) per task but the Ray cluster has {have:g}; "
                "set the num_gpus / use_gpu option to 0 to run on CPU, or add GPU nodes")


def cpus_available() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def run_trainers(items: Sequence[T], fit: Callable[[T], R], width: int, *, name: str,
                 on_done: Callable[[T, R], None], on_error: Callable[[T, Exception], None]) -> None:
    """Several Ray Train trainers at once: `fit(item)` for every item, `width` at a time.

    A TorchTrainer's `fit()` blocks its caller while its workers hold the cluster's CPUs or
    GPUs, so each runs in a thread of its own. `on_done(item, result)` / `on_error(item, exc)`
    as each ends, in the driver's threads one at a time; one failing does not stop the others.
    Ctrl-C or SIGTERM starts nothing more and returns at once: the running trainers end with
    the driver, and `--resume` continues them from their checkpoints.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(items), int(width))), thread_name_prefix=name)
    try:
        futures = {pool.submit(fit, item): item for item in items}
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:
                on_error(item, exc)
            else:
                on_done(item, result)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
    _stop_watching()


# --- a local Ray goes down with its driver, even a SIGKILLed one ------------------------------
#
# The processes ray.init starts (GCS, raylet, dashboard and its agents) are the driver's
# children but do not all notice its death: after a `kill -9` of a run, Ray's DashboardAgent
# and RuntimeEnvAgent were still alive a minute later. Two safeguards: a sentinel process that
# waits on a pipe from the driver (the kernel closes it however the driver dies) and then
# kills the processes recorded at start; and a record of them per driver under the user's
# private state folder, which the next local start reaps if its driver is gone.

_SENTINEL = """
import json, os, signal, sys, time
procs = json.loads(sys.argv[1])
sys.stdin.read()  # returns at EOF: the driver exited or was killed
time.sleep(1.0)   # a clean ray.shutdown() has the head of a second
import psutil
for pid, created in procs:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            p.kill()
    except (psutil.Error, OSError):
        pass
try:
    os.unlink(sys.argv[2])
except OSError:
    pass
"""
_sentinel = None


def _state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    folder = os.path.join(base, "raybias", "local-ray")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def _ray_children() -> list:
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            out.append([p.pid, p.create_time()])
        except psutil.Error:
            continue
    return out


def watch_local_ray() -> None:
    """Record this driver's local Ray processes and start the sentinel that stops them."""
    global _sentinel
    import json
    import subprocess
    import sys

    try:
        procs = _ray_children()
        record = os.path.join(_state_dir(), f"{os.getpid()}.json")
        import psutil

        with open(record, "w") as f:
            json.dump({"driver": [os.getpid(), psutil.Process().create_time()], "procs": procs}, f)
        _sentinel = subprocess.Popen([sys.executable, "-c", _SENTINEL, json.dumps(procs), record],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
    except Exception as exc:  # a safeguard; Ray works without it
        log.debug("local Ray watch not started: %s", exc)


def _stop_watching() -> None:
    global _sentinel
    if _sentinel is not None:
        try:
            _sentinel.stdin.close()  # the sentinel finds the processes gone and exits
        except OSError:
            pass
        _sentinel = None


def reap_orphans() -> int:
    """Kill the local-Ray processes of raybias drivers that died without stopping them (their
    sentinel killed too); returns how many were killed."""
    import json

    import psutil

    killed = []
    try:
        folder = _state_dir()
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                rec = json.load(f)
            pid, created = rec["driver"]
            alive = psutil.pid_exists(pid) and abs(psutil.Process(pid).create_time() - created) < 0.01
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            alive = False
            rec = {"procs": []}
        if alive:
            continue
        for pid, created in rec.get("procs", []):
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:
                    p.kill()
                    killed.append(p)
            except (psutil.Error, OSError):
                continue
        try:
            os.unlink(path)
        except OSError:
            pass
    # gone, not only signalled: the caller then removes what they left half-written (polled,
    # not waited for: a waitpid would reap a child of this process that someone else waits on)
    n_killed, deadline = len(killed), time.time() + 10
    while killed and time.time() < deadline:
        killed = [p for p in killed if _still_running(p)]
        if killed:
            time.sleep(0.02)
    return n_killed


def _still_running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ray_data_quiet(enable_progress: Optional[bool] = None) -> None:
    """Ray Data progress bars: on in a terminal, off in tests/CI."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if enable_progress is None:
        enable_progress = os.environ.get("CI") is None and os.isatty(2)
    ctx.enable_progress_bars = enable_progress
    logging.getLogger("ray.data").setLevel(logging.INFO if enable_progress else logging.WARNING)
    try:
        ctx.print_on_execution_start = enable_progress
    except AttributeError:
        pass


def quiet_train_worker() -> None:
    """No log line per `ray.train.report` in a Ray Train worker's output.

    Ray Train logs each report at INFO, with the whole metrics dict, from a logger named
    after its source file (not under "ray.train"), so the level is set on that logger too.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray Train layout: its INFO lines stay
        return
    reporter = getattr(train_context, "logger", None)
    if isinstance(reporter, logging.Logger):
        reporter.setLevel(logging.WARNING)
