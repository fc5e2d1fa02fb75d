"""`raybias submit / status / stop / logs` against a real Ray head started here.

The head is its own Ray (`ray start --head --block`: its own ports and temp dir, bound to
127.0.0.1), separate from the session's embedded Ray; it is stopped at the end even when a
test fails. The job API needs ray[default] (aiohttp, grpcio ...) on the head and here; where
that is missing the tests that need the head are skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- what `submit` ships (no cluster needed) ------------------------------------------------

def test_the_job_folder_holds_the_resolved_config_and_the_entry(tmp_path):
    from raybias.config import load_config
    from raybias.submit import CONFIG_NAME, ENTRY_NAME, entrypoint, runtime_env, stage_working_dir

    cfg = load_config(REPO / "configs/quickstart.yaml", ["data.severity=0.95", "ray.address=auto"])
    cfg.run_dir = str(tmp_path / "run")
    folder = stage_working_dir(cfg, tmp_path / "job")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, ENTRY_NAME]
    shipped = load_config(folder / CONFIG_NAME)  # the job loads it through the same checks
    assert shipped.data.severity == 0.95 and shipped.run_dir == cfg.run_dir
    assert list(shipped.methods) == list(cfg.methods)
    assert shipped.ray.address is None  # the job joins the cluster it runs on (RAY_ADDRESS)
    assert "from raybias.cli import main" in (folder / ENTRY_NAME).read_text()

    assert entrypoint("prepare", resume=False) == f"python {ENTRY_NAME} prepare {CONFIG_NAME}"
    assert entrypoint("run", resume=True) == f"python {ENTRY_NAME} run {CONFIG_NAME} --resume"
    env = runtime_env(folder)
    assert env["working_dir"] == str(folder)
    assert Path(env["py_modules"][0]) == REPO / "raybias"
    assert "__pycache__" in env["excludes"]
    assert "py_modules" not in runtime_env(folder, ship_package=False)


def test_submit_refuses_paths_that_would_vanish_with_the_job(capsys, monkeypatch):
    from raybias.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "configs/quickstart.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert "'run_dir'" in capsys.readouterr().err
    assert main(["submit", "configs/quickstart.yaml", "data.source=csv", "data.root=data/mine",
                 "--run-dir", "/abs/run", "--address", "http://127.0.0.1:9"]) == 2
    assert "'data.root'" in capsys.readouterr().err
    assert main(["status", "raybias-run-x"]) == 2
    assert "no Ray job address" in capsys.readouterr().err


def test_the_job_entry_scripts_run_the_cli(tmp_path):
    """jobs/*.py are what RayJob and `ray job submit` run: they forward to the CLI."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for script, stage in (("run.py", "run"), ("sweep.py", "sweep")):
        out = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True,
                             text=True, env=env, timeout=120)
        assert out.returncode == 0 and f"raybias {stage}" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "stage.py"), "prepare", "--help"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "raybias prepare" in out.stdout
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / "stage.py"), "nonsense", "x.yaml"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr


# --- a real head --------------------------------------------------------------------------------

def _free_ports(n: int):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _kill_leftovers(marker: str) -> None:
    """Processes of this head only: their command line names its own temp dir."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with the job API on 127.0.0.1; yields its http address."""
    from raybias.submit import job_api_missing

    missing = job_api_missing(server=True)
    if missing:
        pytest.skip(f"the Ray job API needs ray[default]; missing here: {', '.join(missing)}")
    import requests

    temp_dir = tempfile.mkdtemp(prefix="rbj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # `python` = this venv
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 as the node address (loopback only)
        "RAY_AUTH_MODE": "disabled",  # a loopback-only test head; the client sends no token
    })
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("the Ray head did not serve its job API:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_leftovers(temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _check_prepare(run_dir: Path, logs: str) -> None:
    from raybias.data.info import DatasetInfo
    from raybias.data.io import MARKER
    from raybias.layout import REAL
    from raybias.rundir import RunDir

    run = RunDir(str(run_dir))
    assert run.is_done("prepare")
    assert run.exists(REAL, MARKER)
    info = DatasetInfo.load(run)
    assert info.severity == 0.95
    assert "prepared colored_digits (severity 0.95)" in logs  # the job's own output, streamed back


def _check_run(run_dir: Path, logs: str) -> None:
    from raybias.rundir import RunDir

    run = RunDir(str(run_dir))
    assert run.is_done("prepare")
    metrics = run.read_json("classifiers/erm/0/metrics.json")
    assert 0.0 <= metrics["test"]["wga"] <= metrics["test"]["aga"] <= 1.0
    assert run.exists("report/report.md")
    assert "raybias run finished" in logs


ENTRIES = [("prepare", ["data.severity=0.95"], _check_prepare),
           ("run", ["data.severity=0.95", "methods=[erm]", "seeds=[0]", "train.epochs=1"], _check_run)]


@pytest.mark.parametrize("entry, overrides, check", ENTRIES, ids=[e[0] for e in ENTRIES])
def test_submit_runs_the_job_and_returns_its_status(ray_head, tmp_path, capsys, monkeypatch, entry, overrides, check):
    from raybias.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "run"
    rc = main(["submit", "configs/quickstart.yaml", *overrides, "--run-dir", str(run_dir),
               "--entry", entry, "--address", ray_head])
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = out.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in out
    check(run_dir, out)

    monkeypatch.setenv("RAY_ADDRESS", ray_head)  # the address from the environment this time
    assert main(["status", job_id]) == 0
    status = capsys.readouterr().out
    assert f"{job_id}: SUCCEEDED" in status and str(run_dir) in status
    assert main(["logs", job_id]) == 0
    assert capsys.readouterr().out.strip() in out


def test_a_failing_job_exits_1_with_its_error_in_the_log(ray_head, tmp_path, capsys):
    from raybias.cli import main

    rc = main(["submit", "configs/quickstart.yaml", "data.source=csv", f"data.root={tmp_path}/missing",
               "--run-dir", str(tmp_path / "run"), "--entry", "prepare", "--address", ray_head])
    captured = capsys.readouterr()
    assert rc == 1
    assert "raybias: error:" in captured.out and "missing" in captured.out  # the job's stderr, streamed
    assert "FAILED" in captured.err


def test_stop_ends_a_running_job(ray_head, tmp_path, capsys):
    from raybias.cli import main
    from raybias.submit import STATUS_EXIT, connect, follow
    from raybias.rundir import RunDir

    run_dir = tmp_path / "run"
    assert main(["submit", "configs/quickstart.yaml", "--run-dir", str(run_dir), "--entry", "prepare",
                 "--address", ray_head, "--no-wait"]) == 0
    job_id = capsys.readouterr().out.split("submitted job ", 1)[1].split()[0]
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert f"stop requested for job {job_id}" in capsys.readouterr().out
    status = follow(connect(ray_head), job_id, poll_s=0.5, timeout_s=120, tail=False)
    assert status == "STOPPED" and STATUS_EXIT[status] == 1
    assert not RunDir(str(run_dir)).is_done("prepare")  # nothing half-made is marked done

    assert main(["status", "raybias-no-such-job", "--address", ray_head]) == 2
    assert "no job 'raybias-no-such-job'" in capsys.readouterr().err
