"""Running raybias on a Ray cluster through the Ray job API.

`raybias submit CONFIG --address URL` resolves the config (file + overrides + --run-dir)
on this machine, writes it into a temporary working directory together with a one-line
entry script, ships that folder and the raybias package as the job's runtime_env, starts
`python entry.py <stage> config.yaml [--resume]` as a job, follows its logs and exits
with the job's final status (0 SUCCEEDED, 1 FAILED or STOPPED). `raybias status / stop /
logs JOB` talk to the same API.

The address is the Ray dashboard's HTTP address (http://127.0.0.1:8265 through an SSH
tunnel or `kubectl port-forward`: the dashboard is never exposed beyond the cluster),
from --address or RAY_ADDRESS. A cluster with token authentication needs
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set here, as for `ray job submit`.

Words: Ray and the command line call what goes to the cluster a Ray job; in raybias's code
a "job" is one fine-tuning job (finetune.*_job* keys), so this module calls it a submission,
as the job API's `submission_id` does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

from omegaconf import OmegaConf

from raybias.config import ConfigError, to_yaml
from raybias.paths import relative_paths
from raybias.rundir import StageFailed
from raybias.stages import STAGES

CONFIG_NAME = "config.yaml"
ENTRY_NAME = "entry.py"
# The whole entry script: the job runs the same CLI a user runs by hand.
ENTRY_SCRIPT = (
    '"""Written by `raybias submit`: runs one raybias command inside a Ray job."""\n'
    "import sys\n\n"
    "from raybias.cli import main\n\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
# Never shipped with the package: caches and build leftovers.
EXCLUDES = ["__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".pytest_cache"]
# A package folder past this size is most likely carrying data by mistake.
PACKAGE_WARN_MB = 100
STATUS_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
TERMINAL = set(STATUS_EXIT)
ADDRESS_HELP = ("pass --address http://127.0.0.1:8265 (open it with `ray dashboard cluster/aws.yaml` or "
                "`kubectl port-forward svc/raybias-head-svc 8265:8265`) or set RAY_ADDRESS")


class SubmitError(StageFailed):
    """The Ray job API could not be reached, refused a request, or has no such job."""


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(f"no Ray job address: {ADDRESS_HELP}")
    return address.rstrip("/")


def job_api_missing(server: bool = False) -> List[str]:
    """Modules of ray[default] that the job client (or, with `server`, a head's job API) lacks here."""
    needed = ("aiohttp", "requests") + (("grpc", "aiohttp_cors", "prometheus_client") if server else ())
    return [m for m in needed if importlib.util.find_spec(m) is None]


def connect(address: Optional[str]):
    """A JobSubmissionClient for `address` (or RAY_ADDRESS); a SubmitError if it cannot be reached."""
    address = resolve_address(address)
    missing = job_api_missing()
    if missing:
        raise SubmitError(f"the Ray job client needs {', '.join(missing)}, which come with ray[default]: "
                       "pip install 'ray[default]'")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise SubmitError(f"the Ray cluster at {address} refused this client's token: set RAY_AUTH_MODE=token and "
                       f"RAY_AUTH_TOKEN to the cluster's token (see cluster/README.md). {exc}") from exc
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        raise SubmitError(f"cannot reach the Ray job API at {address} ({exc}); {ADDRESS_HELP}") from exc


def package_dir() -> Path:
    """The raybias package folder shipped to the cluster as a py_module."""
    import raybias

    return Path(raybias.__file__).resolve().parent


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts) / 2**20


def check_job_paths(cfg) -> None:
    """A job runs in a temporary folder on the cluster: a relative path would land there and
    vanish, and this machine's working directory means nothing on the cluster's nodes."""
    rel = relative_paths(cfg)
    if rel:
        key, value = rel[0]
        where = ("storage every node shares, or s3://bucket/path" if key == "run_dir"
                 else "the path as the cluster's nodes see it (e.g. /mnt/data/celeba)")
        raise ConfigError(
            f"config key '{key}' is {value!r}, a relative path: a Ray job runs in a temporary folder on the "
            f"cluster, where it would name another place; give an absolute path on {where}")


def submitted_config(cfg) -> Any:
    """The config the job runs: everything resolved, joining the cluster the job runs on."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # Inside a job RAY_ADDRESS names the cluster; a configured address would point elsewhere.
    out.ray.address = None
    return out


def entrypoint(entry: str, resume: bool) -> str:
    """The job's shell command: run `entry` (a raybias stage, `run` or `sweep`) on config.yaml."""
    argv = ["python", ENTRY_NAME, entry, CONFIG_NAME]
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def stage_working_dir(cfg, folder: Path) -> Path:
    """Write the job's working directory: the resolved config and the entry script."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(to_yaml(submitted_config(cfg)))
    (folder / ENTRY_NAME).write_text(ENTRY_SCRIPT)
    return folder


def runtime_env(folder: Path, ship_package: bool = True) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "working_dir": str(folder),
        "excludes": list(EXCLUDES),
        # Unbuffered: the log the submitter follows shows progress as it happens.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if ship_package:
        # The cluster runs this machine's raybias even where an older one is installed.
        env["py_modules"] = [str(package_dir())]
    return env


def new_submission_id(entry: str) -> str:
    return f"raybias-{entry}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit(cfg, config_path: str, overrides: Sequence[str], address: Optional[str] = None,
           entry: str = "run", resume: bool = False, wait: bool = True, *, ship_package: bool = True,
           job_id: Optional[str] = None, poll_s: float = 1.0, out: Optional[TextIO] = None) -> int:
    """Submit `raybias <entry>` on `cfg` as a Ray job; follow it when `wait`; return the exit code."""
    out = out or sys.stdout

    if entry not in STAGES:
        raise ConfigError(f"--entry {entry!r} is not a raybias stage: allowed {', '.join(STAGES)}")
    check_job_paths(cfg)
    client = connect(address)
    pkg = package_dir()
    if ship_package and _folder_mb(pkg) > PACKAGE_WARN_MB:
        print(f"warning: shipping {pkg} ({_folder_mb(pkg):.0f} MB) with the job; keep data out of the package",
              file=sys.stderr)
    job_id = job_id or new_submission_id(entry)
    with tempfile.TemporaryDirectory(prefix="raybias-job-") as tmp:
        folder = stage_working_dir(cfg, Path(tmp) / "job")
        try:
            client.submit_job(
                entrypoint=entrypoint(entry, resume),
                submission_id=job_id,
                runtime_env=runtime_env(folder, ship_package),
                metadata={"raybias_entry": entry, "raybias_config": str(config_path),
                          "raybias_overrides": " ".join(overrides), "run_dir": str(cfg.run_dir)},
            )
        except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
            raise SubmitError(f"the Ray job API at {client.get_address()} refused the job: {exc}") from exc
    where = client.get_address()
    print(f"submitted job {job_id} to {where} (run dir {cfg.run_dir})", file=out, flush=True)
    if not wait:
        print(f"follow it with: raybias logs {job_id} --address {where}", file=out, flush=True)
        return 0
    try:
        status = follow(client, job_id, out=out, poll_s=poll_s)
    except KeyboardInterrupt:
        print(f"\nraybias: stopped following job {job_id}; it keeps running on the cluster "
              f"(`raybias stop {job_id} --address {where}` stops it)", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if info.message and status != "SUCCEEDED" else ""),
          file=sys.stderr if status != "SUCCEEDED" else out, flush=True)
    return STATUS_EXIT.get(status, 1)


def _status(client, job_id: str) -> str:
    status = client.get_job_status(job_id)
    return getattr(status, "value", str(status))


def follow(client, job_id: str, out: Optional[TextIO] = None, poll_s: float = 1.0,
           timeout_s: Optional[float] = None, tail: bool = True) -> str:
    """Print the job's log as it grows until the job ends; return its final status.

    Streams over the job API's websocket (`tail`); polls the whole log when the stream
    breaks (a dropped tunnel), or with tail=False.
    """
    out = out or sys.stdout
    printed = 0
    if tail:
        try:
            printed = asyncio.run(_tail(client, job_id, out))
        except Exception as exc:  # a broken stream: polling picks up where it stopped
            print(f"(log stream interrupted: {exc}; polling instead)", file=sys.stderr)
    start = time.monotonic()
    while True:
        status = _status(client, job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SubmitError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


async def _tail(client, job_id: str, out: TextIO) -> int:
    printed = 0
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        printed += len(chunk)
    return printed


def _describe(info) -> List[str]:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t / 1000)) if t else "-"

    status = getattr(info.status, "value", str(info.status))
    lines = [f"{info.submission_id or info.job_id}: {status}"]
    if info.message:
        lines.append(f"  message:    {info.message}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    lines.append(f"  started:    {when(info.start_time)}   ended: {when(info.end_time)}")
    meta = info.metadata or {}
    if meta.get("run_dir"):
        lines.append(f"  run dir:    {meta['run_dir']}")
    return lines


def submission_command(command: str, job_id: str, address: Optional[str] = None, out: Optional[TextIO] = None) -> int:
    """`raybias status|stop|logs JOB`: print what the job API says; 0 when it answered."""
    out = out or sys.stdout
    client = connect(address)
    try:
        if command == "status":
            print("\n".join(_describe(client.get_job_info(job_id))), file=out)
        elif command == "stop":
            stopped = client.stop_job(job_id)
            print(f"stop requested for job {job_id}" if stopped
                  else f"job {job_id} was not running ({_status(client, job_id)})", file=out)
        elif command == "logs":
            out.write(client.get_job_logs(job_id))
        else:
            raise ConfigError(f"unknown job command {command!r}: allowed status, stop, logs")
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job {job_id!r} on the Ray cluster at {client.get_address()}") from exc
        raise SubmitError(f"the Ray job API at {client.get_address()} failed: {exc}") from exc
    out.flush()
    return 0
