"""The project as a person first meets it: real `raybias` processes, as a user starts them.

- a relative --run-dir from another working directory reaches Ray Train workers and Ray
  Tune trials as the same place (paths are made absolute at the command line);
- a run and a sweep at once, each with its own local Ray, finish with the tables they give
  one at a time, and neither talks to the other's Ray;
- the console holds raybias's own lines only (Ray's and diffusers' go to logs/), and a
  failure ends with one `raybias: error:` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from test_pipeline import QUICKSTART, tiny_overrides

# Lines of Ray's, diffusers' or Python's internals that must never reach the console.
NOISE = ("core_worker.cc", "PYTHON worker processes", "Loading pipeline components", "should be kept in float32",
         "(raylet)", "TrainController", "RayTrainWorker", "Token authentication", "Found multiple active Ray",
         "PlacementGroupCleaner", "Traceback", "pid=", "UserWarning", "DeprecationWarning", "gcs_server",
         "Output truncated")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raybias", *args], cwd=str(cwd), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    return out, err


def _run_args(run_dir: str, base: str):
    return ["run", QUICKSTART, "methods=[erm,lora]", *tiny_overrides(base), "ray.num_cpus=2",
            "ray.object_store_mb=300", "--run-dir", run_dir]


def _sweep_args(run_dir: str):
    return ["sweep", QUICKSTART, "sweep.name=one", "sweep.severities=[0.95]", "sweep.methods=[erm]",
            "sweep.seeds=[0]", "sweep.max_concurrent=1", "train.epochs=1", "ray.num_cpus=2",
            "ray.object_store_mb=300", "--run-dir", run_dir]


def _run_metrics(run_dir: Path) -> dict:
    out = {}
    for method in ("erm", "lora"):
        m = json.loads((run_dir / "classifiers" / method / "0" / "metrics.json").read_text())
        out[method] = m["test"]
    return out


def _sweep_results(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "sweeps" / "one" / "results.csv")
    return df[["severity", "method", "seed", "wga", "aga"]].sort_values(["method", "seed"]).reset_index(drop=True)


def _assert_quiet_console(out: str, err: str, run_dir: Path) -> None:
    for line in (out + err).splitlines():
        assert not any(marker in line for marker in NOISE), f"internal line on the console: {line!r}"
    logs = list((run_dir / "logs").glob("*.log"))
    assert logs, f"no log file under {run_dir / 'logs'}"
    # what the console did not show is in the log (captured, not thrown away)
    assert any("TrainController" in p.read_text(errors="replace") or "raylet" in p.read_text(errors="replace")
               for p in logs)


def test_relative_run_dirs_from_another_directory_and_two_runs_at_once(tiny_base_folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # one at a time, with relative run directories, from a directory that is not the repo
    out, err = _finish(_start(_run_args("rel/run", tiny_base_folder), elsewhere))
    run_dir = elsewhere / "rel" / "run"
    assert (run_dir / "generators" / "lora" / "manifest.json").is_file()  # fine-tuned on Ray Train
    alone = _run_metrics(run_dir)
    assert "raybias run finished" in out
    _assert_quiet_console(out, err, run_dir)
    out, err = _finish(_start(_sweep_args("rel/sweep"), elsewhere))
    sweep_alone = _sweep_results(elsewhere / "rel" / "sweep")
    assert len(sweep_alone) == 1 and sweep_alone["wga"].between(0, 1).all()  # the Tune trial found its data

    # both at once: two local Rays on one machine
    run_p = _start(_run_args("both/run", tiny_base_folder), elsewhere)
    sweep_p = _start(_sweep_args("both/sweep"), elsewhere)
    (run_out, run_err), _ = _finish(run_p), _finish(sweep_p)
    assert _run_metrics(elsewhere / "both" / "run") == alone
    pd.testing.assert_frame_equal(_sweep_results(elsewhere / "both" / "sweep"), sweep_alone)
    for folder in (elsewhere / "both" / "run", elsewhere / "both" / "sweep"):
        for log in folder.glob("logs/*.log"):
            text = log.read_text(errors="replace")
            assert "Found multiple active Ray instances" not in text, log
    _assert_quiet_console(run_out, run_err, elsewhere / "both" / "run")


def test_a_failing_stage_ends_with_one_raybias_error_line(tmp_path):
    # embed before prepare: the stage starts its Ray, then fails on a missing table
    proc = _start(["embed", QUICKSTART, "ray.num_cpus=2", "ray.object_store_mb=200", "--run-dir", "r"], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines and lines[-1].startswith("raybias: error: "), lines[-5:]
    assert "prepare" in lines[-1]
    assert sum(line.startswith("raybias: error:") for line in lines) == 1
    for line in lines:
        assert not any(marker in line for marker in NOISE), line
