"""Nothing lost, nothing taken for done: the run directory's lease, stage ownership, whole
outputs, the one-line error contract and what a kill leaves behind.

The mechanisms live in raybias/rundir.py (Lease, begin/finish_stage, table_problem,
outputs_problem, clean_temporaries), raybias/cli.py (the error contract) and
raybias/ray_utils.py (the local Ray's sentinel and reaper); these tests drive them with
real processes and real signals where a user would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from raybias.config import config_from_dict
from raybias.layout import LEASE
from raybias.rundir import Lease, RunDir, RunDirBusy, StageFailed

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _cfg(tmp_path, **data):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "data": data or {"severity": 0.95}})


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _raybias(args, cwd, timeout=300):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raybias", *args], cwd=str(cwd), env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.time() - t0


def _one_error_line(rc, out, err, *words):
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert rc == 2, (rc, out, err)
    assert lines[-1].startswith("raybias: error: "), lines[-5:]
    assert sum(line.startswith("raybias: error:") for line in lines) == 1
    assert "Traceback" not in out + err
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


# --- the lease ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_its_heartbeat(tmp_path):
    first = Lease(RunDir(tmp_path / "run"), "prepare").acquire()
    try:
        with pytest.raises(RunDirBusy) as err:
            Lease(RunDir(tmp_path / "run"), "run").acquire()
        msg = str(err.value)
        assert "raybias prepare" in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "heartbeat" in msg and "s ago" in msg
    finally:
        first.release()
    assert not (tmp_path / "run" / LEASE).exists()
    Lease(RunDir(tmp_path / "run"), "run").acquire().release()  # free again


def test_a_run_directory_inside_a_held_one_is_refused(tmp_path):
    """A sweep's sub-runs live inside the sweep's run directory, written by its trials."""
    outer = Lease(RunDir(tmp_path / "sweep"), "sweep").acquire()
    try:
        with pytest.raises(RunDirBusy, match=r"inside .*sweep, in use by `raybias sweep`"):
            Lease(RunDir(tmp_path / "sweep" / "sweeps" / "s" / "severity-0.9"), "train").acquire()
    finally:
        outer.release()
    Lease(RunDir(tmp_path / "sweep" / "sweeps" / "s" / "severity-0.9"), "train").acquire().release()


def test_a_dead_writers_lease_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_here = {"owner": "x", "host": socket.gethostname(), "pid": dead.pid, "command": "run",
                  "heartbeat": time.time()}  # fresh heartbeat, but its process is gone
    run.write_text(LEASE, json.dumps(stale_here))
    lease = Lease(run, "prepare").acquire()
    assert json.loads(run.read_text(LEASE))["owner"] == run.owner
    lease.release()
    # on another host only the heartbeat's age tells
    elsewhere = {"owner": "y", "host": "other-host", "pid": 1, "command": "run", "heartbeat": time.time()}
    run.write_text(LEASE, json.dumps(elsewhere))
    with pytest.raises(RunDirBusy):
        Lease(RunDir(tmp_path / "run"), "prepare").acquire()
    run.write_text(LEASE, json.dumps(dict(elsewhere, heartbeat=time.time() - 3600)))
    Lease(RunDir(tmp_path / "run"), "prepare").acquire().release()
    for garbage in ("", "{", "[]"):  # a half-written lease is a dead writer's
        run.write_text(LEASE, garbage)
        Lease(RunDir(tmp_path / "run"), "prepare").acquire().release()


def test_of_writers_starting_together_exactly_one_wins(tmp_path):
    code = ("import sys; from raybias.rundir import Lease, RunDir, RunDirBusy\n"
            "try:\n    l = Lease(RunDir(sys.argv[1]), 'run').acquire()\nexcept RunDirBusy:\n    sys.exit(3)\n"
            "import time; time.sleep(3); l.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")]) for _ in range(4)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes.count(0) >= 1 and codes.count(0) + codes.count(3) == 4
    assert codes.count(0) == 1, codes


# --- finish only what this process began ----------------------------------------------------

def test_finish_stage_marks_done_only_what_this_process_began(tmp_path):
    cfg_a, cfg_b = _cfg(tmp_path, severity=0.99), _cfg(tmp_path, severity=0.9)
    a, b = RunDir(cfg_a.run_dir), RunDir(cfg_b.run_dir)
    a.begin_stage("prepare", cfg_a, ("data",), "fresh")
    b.begin_stage("prepare", cfg_b, ("data",), "fresh")  # another process restarts the stage
    with pytest.raises(StageFailed, match="began it again"):
        a.finish_stage("prepare")
    with pytest.raises(StageFailed, match="began it again"):
        a.mark_units("prepare", ["u0"])
    assert not RunDir(cfg_a.run_dir).is_done("prepare")
    b.finish_stage("prepare")
    rec = RunDir(cfg_a.run_dir).stage_record("prepare")
    assert rec["done"] and rec["values"]["data.severity"] == 0.9


def test_two_prepares_on_one_run_directory(tmp_path):
    """The first holds the lease: the second, with another config, is refused at once, and
    the manifest ends saying what the first made."""
    first = subprocess.Popen([sys.executable, "-m", "raybias", "prepare", QUICKSTART, "--run-dir", "run",
                              "ray.num_cpus=1", "ray.object_store_mb=200"], cwd=str(tmp_path), env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lease = tmp_path / "run" / LEASE
    deadline = time.time() + 60
    while not lease.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lease.exists(), first.communicate()
    rc, out, err, seconds = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "data.severity=0.9"], tmp_path)
    _one_error_line(rc, out, err, "in use by `raybias prepare`", f"pid {first.pid}")
    assert first.wait(timeout=120) == 0, first.communicate()
    rec = RunDir(tmp_path / "run").stage_record("prepare")
    assert rec["done"] and rec["values"]["data.severity"] == 0.99
    assert not lease.exists()


def test_killed_writer_then_another_config_then_resume(tmp_path):
    """SIGKILL during prepare; the next writer takes the lease over, removes the dead one's
    temporaries and finishes with its own config; --resume with the first config refuses."""
    proc = subprocess.Popen([sys.executable, "-m", "raybias", "prepare", QUICKSTART, "--run-dir", "run",
                             "ray.num_cpus=1", "ray.object_store_mb=200", "data.shard_rows=64"],
                            cwd=str(tmp_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = tmp_path / "run" / "data"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if data.exists() and any(".tmp-" in p.name for p in data.iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (data / "real.tmp-deadbeef").mkdir(parents=True, exist_ok=True)  # certainly something left half-done
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "data.severity=0.9",
                                "ray.num_cpus=1", "ray.object_store_mb=200"], tmp_path)
    assert rc == 0, err
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp-" in p.name and "logs" not in p.parts]
    rec = RunDir(tmp_path / "run").stage_record("prepare")
    assert rec["done"] and rec["values"]["data.severity"] == 0.9
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "--resume"], tmp_path)
    _one_error_line(rc, out, err, "cannot --resume stage 'prepare'", "data.severity")


# --- done means whole -----------------------------------------------------------------------

def _prepared(tmp_path) -> Path:
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "data.shard_rows=300",
                                "ray.num_cpus=1", "ray.object_store_mb=200"], tmp_path)
    assert rc == 0, err
    return tmp_path / "run"


def test_damaged_outputs_are_never_taken_for_done(tmp_path):
    from raybias.data.io import TableMissing, read_table

    run_dir = _prepared(tmp_path)
    real = run_dir / "data" / "real"
    shards = sorted(real.glob("*.parquet"))
    assert len(shards) >= 3
    run = RunDir(run_dir)
    assert run.table_problem("data/real") is None
    # a shard deleted: the reader names it instead of reading four of five shards
    gone = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(TableMissing, match=shards[1].name):
        read_table(run, "data/real")
    shards[1].write_bytes(gone[: len(gone) // 2])  # truncated
    with pytest.raises(TableMissing, match=f"{shards[1].name} has {len(gone) // 2} bytes"):
        read_table(run, "data/real")
    # the stage that made it is redone on resume, not skipped as done
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "data.shard_rows=300",
                                "ray.num_cpus=1", "ray.object_store_mb=200", "--resume"], tmp_path)
    assert rc == 0, err
    assert RunDir(run_dir).table_problem("data/real") is None
    (real / "_SUCCESS").unlink()  # the marker gone: prepare is not done, embed refuses naming it
    rc, out, err, _ = _raybias(["embed", QUICKSTART, "--run-dir", "run", "--resume", "ray.num_cpus=2",
                                "ray.object_store_mb=200"], tmp_path)
    _one_error_line(rc, out, err, "data/real", "prepare")
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "data.shard_rows=300",
                                "ray.num_cpus=1", "ray.object_store_mb=200", "--resume"], tmp_path)
    assert rc == 0 and (real / "_SUCCESS").exists(), err


# --- one error contract ---------------------------------------------------------------------

@pytest.mark.parametrize("content,words", [
    ("garbage{", ["manifest.json", "not JSON"]),
    ("[]", ["manifest.json", "JSON list"]),
    ("{}", ["manifest.json", "'stages'"]),
    ('{"stages": {"prepare": 5}}', ["manifest.json", "stage 'prepare'"]),
])
def test_a_damaged_manifest_is_one_line(tmp_path, content, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(content)
    rc, out, err, seconds = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "--resume"], tmp_path)
    _one_error_line(rc, out, err, *words)
    assert seconds < 60


@pytest.mark.parametrize("args,words", [
    (["--run-dir", "foo://bucket/run"], ["foo://bucket/run"]),
    (["ray.address=ray://127.0.0.1:1"], ["ray.address", "127.0.0.1:1"]),
    (["ray.address=127.0.0.1:9"], ["ray.address", "127.0.0.1:9"]),
    (["data=5"], ["'data'", "section"]),
    (["methods=[erm,nope]"], ["methods", "nope"]),
])
def test_bad_locations_and_values_are_one_line_in_bounded_time(tmp_path, args, words):
    rc, out, err, seconds = _raybias(["prepare", QUICKSTART, "--run-dir", "run", *args], tmp_path)
    _one_error_line(rc, out, err, *words)
    assert seconds < 60


def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path):
    for text, words in (("- a\n- b\n", ["YAML list"]), ("data: 5\n", ["'data'", "section"]),
                        ("run_dir: [unclosed\n", ["not valid YAML"])):
        (tmp_path / "c.yaml").write_text(text)
        rc, out, err, _ = _raybias(["prepare", "c.yaml"], tmp_path)
        _one_error_line(rc, out, err, "c.yaml", *words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_directory_the_user_cannot_write_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", str(locked / "run")], tmp_path)
        _one_error_line(rc, out, err, str(locked))
    finally:
        locked.chmod(0o755)


def test_sigterm_unwinds_with_one_line_and_resume_finishes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "raybias", "prepare", QUICKSTART, "--run-dir", "run",
                             "ray.num_cpus=1", "ray.object_store_mb=200", "data.shard_rows=64"],
                            cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lease = tmp_path / "run" / LEASE
    deadline = time.time() + 60
    while not lease.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    if proc.returncode == 0:
        pytest.skip("prepare finished before the signal")
    assert proc.returncode == 143, (out, err)
    assert lines[-1].startswith("raybias: terminated"), lines[-3:]
    assert "core_worker" not in out + err and "Traceback" not in out + err
    assert not lease.exists()
    rc, out, err, _ = _raybias(["prepare", QUICKSTART, "--run-dir", "run", "ray.num_cpus=1",
                                "ray.object_store_mb=200", "data.shard_rows=64", "--resume"], tmp_path)
    assert rc == 0, err


# --- clean after a kill ---------------------------------------------------------------------

def _ray_processes(driver: psutil.Process) -> list:
    return [c for c in driver.children(recursive=True)
            if any(k in " ".join(c.cmdline()) for k in ("ray::", "raylet", "gcs_server", "dashboard"))]


def test_the_local_ray_goes_down_with_a_sigkilled_driver(tmp_path):
    env = dict(_env(), XDG_STATE_HOME=str(tmp_path / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "raybias", "run", QUICKSTART, "--run-dir", "run",
                             "methods=[erm]", "train.epochs=500", "ray.num_cpus=1", "ray.object_store_mb=200"],
                            cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)
    record = tmp_path / "state" / "raybias" / "local-ray" / f"{proc.pid}.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not record.exists():
        time.sleep(0.2)
    assert record.exists(), "the local Ray was not started and recorded"
    time.sleep(3)  # into the run
    everything = _ray_processes(driver)
    assert any("DashboardAgent" in " ".join(p.cmdline()) for p in everything)
    proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(everything, timeout=30)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, " ".join(p.cmdline())[:80]) for p in alive]
    deadline = time.time() + 10
    while record.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not record.exists()


def test_orphans_of_a_dead_driver_are_reaped_on_the_next_start(tmp_path, monkeypatch):
    """Whatever the sentinel missed (a driver killed with it), the next local start reaps."""
    from raybias import ray_utils

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = Path(ray_utils._state_dir())
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    op = psutil.Process(orphan.pid)
    (folder / f"{dead.pid}.json").write_text(json.dumps(
        {"driver": [dead.pid, time.time() - 10], "procs": [[orphan.pid, op.create_time()], [dead.pid, 1.0]]}))
    live = psutil.Process()  # a live driver's processes are never touched
    (folder / f"{os.getpid()}.json").write_text(json.dumps(
        {"driver": [os.getpid(), live.create_time()], "procs": [[orphan.pid, op.create_time()]]}))
    try:
        assert ray_utils.reap_orphans() == 1
        assert orphan.wait(timeout=10) != 0
        assert not (folder / f"{dead.pid}.json").exists() and (folder / f"{os.getpid()}.json").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_a_dead_drivers_writer_is_stopped_before_its_temporaries_are_removed(tmp_path):
    """A killed driver's actor can outlive it and still be writing: the next writing command
    stops it first (reap), then removes what it left, so no temporary appears afterwards."""
    state = tmp_path / "state"
    env = dict(_env(), XDG_STATE_HOME=str(state))
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    # the "actor": writes a fresh temporary in the run directory every 20 ms, for minutes
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, time, itertools\n"
        f"d = {str(run_dir / 'data')!r}\n"
        "for i in itertools.count():\n"
        "    open(os.path.join(d, f'shard-{i}.parquet.tmp-{os.getpid()}'), 'w').close()\n"
        "    time.sleep(0.02)\n")])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = state / "raybias" / "local-ray"
    folder.mkdir(parents=True, mode=0o700)
    (folder / f"{dead.pid}.json").write_text(json.dumps(
        {"driver": [dead.pid, time.time() - 10],
         "procs": [[writer.pid, psutil.Process(writer.pid).create_time()]]}))
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not any((run_dir / "data").iterdir()):
            time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "raybias", "prepare", QUICKSTART, "--run-dir", str(run_dir),
                               "ray.num_cpus=1", "ray.object_store_mb=200"], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert writer.poll() is not None, "the dead driver's writer still runs"
        time.sleep(0.5)
        left = [p.name for p in run_dir.rglob("*") if ".tmp-" in p.name and "logs" not in p.parts]
        assert not left, left[:5]
    finally:
        if writer.poll() is None:
            writer.kill()


# --- confinement ----------------------------------------------------------------------------

def test_every_run_relative_path_stays_inside_the_run_directory(tmp_path):
    """A generator manifest's `folder: ../../x` (or any other run-relative path that climbs
    out) names no file outside the run: RunDir refuses it, naming the path."""
    from raybias.generation.model_cache import ModelCache

    run = RunDir(tmp_path / "run")
    cache = ModelCache(run, 1.0, root=str(tmp_path / "cache"))
    assert run.path("generators", "lora", "g0") == f"{run.root}/generators/lora/g0"
    for bad in ("../../x", "generators/../../x", "a/./../../b"):
        with pytest.raises(StageFailed, match="outside the run directory"):
            run.path(bad)
        with pytest.raises(StageFailed, match="outside the run directory"):
            cache.acquire(bad)
    assert run.path("/generators/lora") == f"{run.root}/generators/lora"  # a leading slash stays inside
