"""Starting or joining Ray, and checking a cluster can run what a config asks for."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import ray

log = logging.getLogger("raybias")


class ResourceError(RuntimeError):
    """The cluster lacks what the config asks for (e.g. GPUs); better than waiting forever."""


def init_ray(cfg=None, quiet: bool = False) -> None:
    """Join the cluster named by `ray.address` / RAY_ADDRESS, or start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    rc = cfg.ray if cfg is not None else None
    address = (rc.address if rc is not None else None) or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address and address != "local":
        ray.init(address=address, log_to_driver=not quiet)
        ray_data_quiet()
        return
    num_cpus = rc.num_cpus if rc is not None and rc.num_cpus else None
    num_gpus = rc.num_gpus if rc is not None else None
    store_mb = rc.object_store_mb if rc is not None else 768
    # A local Ray binds to loopback only: nothing it serves is reachable from the network.
    with loopback_only():
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=int(store_mb) * 2**20,
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner
            # needs: without it a trainer ended from outside (a Tune trial finishing) leaks its
            # workers' CPUs and later trainers wait forever. It listens on 127.0.0.1 only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=0,  # any free port: tests and a user's own Ray may hold 8265
            _node_ip_address="127.0.0.1",
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    ray_data_quiet()


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


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


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
