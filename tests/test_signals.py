"""A real `raybias run` stopped by a real signal in the middle of a stage, then `--resume`.

SIGINT (Ctrl-C) and SIGTERM unwind with one line (exit 130 / 143); SIGKILL to the driver
alone (as `kill -9 PID` does) leaves it to the sentinel and the next writer's takeover. In
every case the resumed run finishes with every stage whole, exactly the planned images (no
id twice), no temporary left anywhere, and the work finished before the signal not redone.
(Generation killed mid-set: test_pipeline.py; prepare under SIGTERM: test_integrity.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import QUICKSTART, REPO, tiny_overrides

PER_GROUP = 12


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def _finished_files(run_dir: Path) -> dict:
    """What finished work leaves: published models, shards, classifier metrics (path -> mtime)."""
    files = [*run_dir.glob("generators/*/g*/training.json"), *run_dir.glob("synthetic/*/shards/*.parquet"),
             *run_dir.glob("classifiers/*/*/metrics.json")]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files}


@pytest.mark.parametrize("sig,stage", [
    (signal.SIGINT, "prepare"),
    (signal.SIGTERM, "finetune/lora"),
    (signal.SIGKILL, "train/lora/0"),
])
def test_a_signal_in_a_stage_then_resume_finishes_whole(tiny_base_folder, tmp_path, sig, stage):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "raybias", "run", QUICKSTART, "methods=[erm,lora]",
            *tiny_overrides(tiny_base_folder, per_group=PER_GROUP), "data.shard_rows=64",
            "ray.num_cpus=2", "ray.object_store_mb=300", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            rec = _stages(run_dir).get(stage)
            if rec is not None and not rec.get("done"):
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {stage} began: {err[-2000:]}")
        time.sleep(0.5)  # into the stage's work
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-2000:]
        assert lines[-1].startswith(("raybias: interrupted", "raybias: terminated")), lines[-3:]
        assert "Traceback" not in out + err
        assert not (run_dir / "lease.json").exists()
    stages = _stages(run_dir)
    assert not all(r.get("done") for r in stages.values()) or "report" not in stages
    before = _finished_files(run_dir)

    done = subprocess.run([*args, "--resume"], cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    from raybias.data.synthetic import read_synthetic
    from raybias.rundir import RunDir

    run = RunDir(str(run_dir))
    stages = run.manifest()["stages"]
    for key in ("prepare", "finetune/lora", "generate/lora", "filter/lora", "train/erm/0", "train/lora/0"):
        assert stages[key]["done"] and run.is_done(key), key
    syn = read_synthetic(run, "lora", filtered=False)
    assert syn["id"].is_unique and syn.groupby("group").size().to_dict() == {g: PER_GROUP for g in range(4)}
    leftovers = [str(p) for p in run_dir.rglob("*") if ".tmp-" in p.name and "logs" not in p.parts]
    assert not leftovers
    assert not (run_dir / "lease.json").exists()
    after = _finished_files(run_dir)
    redone = [f for f, mtime in before.items() if after.get(f) != mtime]
    assert not redone, f"finished before the signal, made again: {redone}"
