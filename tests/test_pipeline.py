"""End to end: `raybias run` through every stage and method, resume after a kill, a sweep,
and the real-data configs on fixture data with tiny random-weight models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raybias.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ALL_METHODS = ["erm", "reweight", "groupdro", "jtt", "vanilla", "lora", "dreambooth", "clustered_dreambooth"]


def tiny_overrides(base_folder: str, per_group: int = 12) -> list:
    """Quickstart shapes at toy sizes: every stage runs, in seconds."""
    return [
        "seeds=[0]", "data.severity=0.95", f"base.model={base_folder}",
        "finetune.steps=4", "finetune.batch_size=4", "finetune.checkpoint_every=2",
        "finetune.num_class_images=4", "finetune.sample_steps=2", "finetune.n_samples=1",
        "cluster.k=2", "cluster.min_group_size=10",
        "generate.balance=per_group", f"generate.per_group={per_group}", "generate.unit_size=8",
        "generate.steps=2", "generate.batch_size=8",
        "filter.alpha=0.0",  # the oracle's prompt term is for the builtin backbone's generations
        "train.epochs=1", "train.stage1.epochs=1", "train.jtt_epochs=1",
        # the quickstart's stage2: auto, over two candidates rather than six (tests/test_classify_train.py
        # checks the choice itself)
        "train.stage2_candidates=[head+groupdro,full+groupdro]",
    ]


def test_run_every_stage_and_method_then_skip_on_rerun(ray_session, tiny_base_folder, tmp_path, capsys):
    from raybias.data.synthetic import read_synthetic
    from raybias.rundir import RunDir

    run_dir = str(tmp_path / "run")
    args = ["run", QUICKSTART, f"methods=[{','.join(ALL_METHODS)}]", *tiny_overrides(tiny_base_folder),
            "--run-dir", run_dir]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = RunDir(run_dir)
    manifest = run.manifest()["stages"]
    for key in ("prepare", "embed", "cluster", "finetune/lora", "finetune/dreambooth",
                "finetune/clustered_dreambooth", "generate/vanilla", "generate/lora", "filter/lora"):
        assert manifest[key]["done"], key
    for method in ALL_METHODS:
        metrics = run.read_json(f"classifiers/{method}/0/metrics.json")
        assert 0.0 <= metrics["test"]["wga"] <= metrics["test"]["aga"] <= 1.0
        assert method in out  # the results table printed at the end lists it
    # every generator made exactly the planned group-balanced set before filtering
    for gen in ("vanilla", "lora", "dreambooth", "clustered_dreambooth"):
        syn = read_synthetic(run, gen, filtered=False)
        assert syn.groupby("group").size().to_dict() == {g: 12 for g in range(4)}
        assert syn["id"].is_unique and (syn["source"] == gen).all()
    report = run.read_text("report/report.md")
    assert "| method |" in report and "wga_by_method.png" in report and "samples.png" in report
    assert run.exists("report/wga_by_method.png") and run.exists("report/samples.png")
    assert "raybias run finished" in out

    # a second `run` with the same config redoes nothing
    started = {k: v.get("started_at") for k, v in manifest.items() if k != "report"}
    assert main(args) == 0
    after = RunDir(run_dir).manifest()["stages"]
    assert {k: after[k].get("started_at") for k in started} == started


def test_run_resumes_after_being_killed_during_generation(tiny_base_folder, tmp_path):
    """A real `raybias run` process is killed mid-generation; --resume completes the set exactly."""
    from raybias.data.synthetic import finished_units, read_synthetic
    from raybias.layout import shards_dir, unit_name
    from raybias.rundir import RunDir

    run_dir = str(tmp_path / "run")
    per_group = 64
    overrides = ["methods=[vanilla]", *tiny_overrides(tiny_base_folder, per_group=per_group), "generate.steps=4",
                 "ray.num_cpus=2", "ray.object_store_mb=300"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "raybias", "run", QUICKSTART, *overrides, "--run-dir", run_dir],
                            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run = RunDir(run_dir)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(finished_units(run, "vanilla")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed; make it bigger"
    finally:
        if proc.poll() is None:  # the driver and the local Ray it started die together
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    before = {u: os.path.getmtime(run.path(shards_dir("vanilla"), unit_name(u))) for u in finished_units(run, "vanilla")}
    assert 2 <= len(before) < 4 * per_group // 8
    assert not RunDir(run_dir).is_done("generate/vanilla")

    assert main(["run", QUICKSTART, *overrides, "--run-dir", run_dir, "--resume"]) == 0
    run = RunDir(run_dir)
    syn = read_synthetic(run, "vanilla", filtered=False)
    assert len(syn) == 4 * per_group and syn["id"].is_unique
    assert syn.groupby("group").size().to_dict() == {g: per_group for g in range(4)}
    for u, mtime in before.items():  # finished units were not redone
        assert os.path.getmtime(run.path(shards_dir("vanilla"), unit_name(u))) == mtime
    assert run.exists("classifiers/vanilla/0/metrics.json")


def test_sweep_of_two_by_two_trials_writes_results_table(ray_session, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    args = ["sweep", QUICKSTART, "sweep.name=mini", "sweep.severities=[0.9,0.95]", "sweep.methods=[erm,groupdro]",
            "sweep.seeds=[0]", "sweep.max_concurrent=2", "train.epochs=1", "--run-dir", run_dir]
    assert main(args) == 0
    sweep = Path(run_dir) / "sweeps" / "mini"
    results = pd.read_csv(sweep / "results.csv")
    assert len(results) == 4
    assert sorted(zip(results["severity"].astype(float), results["method"])) == [
        (0.9, "erm"), (0.9, "groupdro"), (0.95, "erm"), (0.95, "groupdro")]
    assert results["wga"].between(0, 1).all()
    report = (sweep / "report.md").read_text()
    assert "wga_vs_severity" in report and (sweep / "wga_vs_severity_r0.png").exists()
    # restoring the finished experiment trains nothing new and gives the same table
    assert main(args) == 0
    assert pd.read_csv(sweep / "results.csv").equals(results)


@pytest.mark.parametrize("name", ["celeba", "waterbirds", "utkface"])
def test_real_data_configs_run_on_fixtures_with_tiny_models(name, ray_session, tiny_base_folder, tiny_clip_folder,
                                                            tmp_path):
    """The GPU-cluster configs stay valid: each runs end to end on fixture data in its real format."""
    from fixtures_data import MAKERS

    from raybias.rundir import RunDir

    fx = MAKERS[name](tmp_path / "data")
    run_dir = str(tmp_path / "run")
    args = ["run", str(REPO / "configs" / f"{name}.yaml"), *fx.overrides(0.95), "data.image_size=16",
            "methods=[groupdro,clustered_dreambooth]",
            *tiny_overrides(tiny_base_folder, per_group=8), "data.severity=0.95",
            f"embed.model={tiny_clip_folder}", "embed.num_gpus=0", "embed.concurrency=1", "embed.batch_size=16",
            "cluster.k=1", "finetune.num_gpus_per_job=0", "finetune.num_cpus_per_job=1",
            "finetune.mixed_precision=no", "finetune.prior_preservation=false",
            "generate.num_gpus=0", "generate.concurrency=1", "generate.dtype=fp32", "generate.channels_last=false",
            "generate.scheduler=ddim", "generate.guidance=1.0", "filter.alpha=0.5",
            "train.pretrained=null", "train.use_gpu=false", "train.batch_size=16", "train.in_memory=true",
            "--run-dir", run_dir]
    assert main(args) == 0
    run = RunDir(run_dir)
    for method in ("groupdro", "clustered_dreambooth"):
        assert run.exists(f"classifiers/{method}/0/metrics.json")
    assert run.read_json("classifiers/groupdro/0/metrics.json")["config"]["model"] == "resnet50"
