"""Classifier training on a real local Ray Train: outcomes, determinism, resume, DDP,
JTT's error set, two-stage training on a hand-written synthetic set, streaming, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from raybias import faults
from raybias.classify.data import real_sets, load_images
from raybias.classify.metrics import group_metrics
from raybias.classify.models import load_classifier, state_from_safetensors
from raybias.classify.runner import train_classifier, train_methods
from raybias.config import with_overrides
from raybias.rundir import ResumeRefused, RunDir, StageFailed
from tests.conftest import small_config

# short, fast runs; the defaults are tuned for the real results (docs/results.md)
FAST = ["train.epochs=4", "train.batch_size=64", "train.lr=0.003"]


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory, ray_session):
    """colored_digits at severity 0.99: train groups [634, 7, 7, 623] (a planted shortcut)."""
    from raybias.stages.prepare import run_prepare

    tmp = tmp_path_factory.mktemp("shortcut")
    cfg = small_config(tmp, data={"severity": 0.99, "image_size": 16})
    run = RunDir(cfg.run_dir)
    info = run_prepare(cfg, run, verbose=False)
    return cfg, run, info


def _predict(run, rel_model, split):
    model = load_classifier(run.read_bytes(rel_model))
    model.eval()
    ds = real_sets(run)[split]
    x = load_images(run, ds, 16).float() / 255.0
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return ds.meta, pred


def _history(rec):
    return [{k: v for k, v in h.items()} for h in rec["history"]]


def test_groupdro_beats_erm_on_planted_shortcut(shortcut_run):
    cfg, run, info = shortcut_run
    cfg = with_overrides(cfg, ["train.epochs=8", "train.lr=0.003", "train.groupdro_eta=0.1"])
    res = train_methods(cfg, run, ["erm", "groupdro"], [0], progress=False)
    erm, dro = res[("erm", 0)], res[("groupdro", 0)]
    assert erm["test"]["wga"] < 0.5  # the colour shortcut: minority groups fail
    assert dro["test"]["wga"] > erm["test"]["wga"] + 0.2
    assert dro["test"]["aga"] > erm["test"]["aga"]
    # outputs: metrics.json as specified, weights that reproduce the test metrics
    rec = json.loads(run.read_text("classifiers/groupdro/0/metrics.json"))
    for key in ("method", "seed", "train_method", "best_epoch", "val", "test", "history", "seconds",
                "n_train", "group_counts_train", "config"):
        assert key in rec, key
    assert rec["config"]["method"] == "groupdro" and rec["n_train"] == sum(rec["group_counts_train"].values())
    assert rec["group_counts_train"]["1"] < 20 and rec["group_counts_train"]["0"] > 500
    assert len(rec["history"]) == 8 and 1 <= rec["best_epoch"] <= 8
    best = rec["history"][rec["best_epoch"] - 1]
    assert best["val_wga"] == max(h["val_wga"] for h in rec["history"]) == rec["val"]["wga"]
    meta, pred = _predict(run, "classifiers/groupdro/0/model.safetensors", "test")
    again = group_metrics(pred, meta["y"], meta["group"], info.n_groups)
    assert again["wga"] == pytest.approx(rec["test"]["wga"]) and again["acc"] == pytest.approx(rec["test"]["acc"])
    assert run.exists("classifiers/groupdro/0/curves.png")
    assert run.is_done("train/groupdro/0") and run.is_done("train/erm/0")
    assert not run.exists("classifiers/groupdro/0/train-groupdro-0")  # checkpoints removed when done
    # a second call in auto/resume mode skips finished work
    again = train_methods(cfg, run, ["erm"], [0], mode="resume", progress=False)
    assert again[("erm", 0)]["seconds"] == erm["seconds"]


def test_same_seed_identical_and_resume_continues(shortcut_run, tmp_path, capsys, monkeypatch):
    _, run, _ = shortcut_run
    from raybias.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"run_dir: {run.uri}\nseeds: [3]\nray: {{num_cpus: 2, object_store_mb: 400}}\n"
                        "data: {severity: 0.99, image_size: 16}\n")
    overrides = ["train.method=reweight"] + FAST
    assert main(["train", str(cfg_file)] + overrides) == 0
    out = capsys.readouterr().out
    assert "reweight" in out and "WGA" in out and "digit<5/red" in out
    first = json.loads(run.read_text("classifiers/reweight/3/metrics.json"))

    from raybias.config import load_config

    cfg = load_config(cfg_file, overrides)
    second = train_classifier(cfg, run, "reweight", 3, "fresh")
    assert second["test"] == first["test"] and second["val"] == first["val"]
    assert [h["train_loss"] for h in second["history"]] == [h["train_loss"] for h in first["history"]]

    # killed after 2 of 4 epochs (no automatic restart): nothing marked done, checkpoints kept
    cfg0 = with_overrides(cfg, ["train.max_failures=0"])
    faults.arm(monkeypatch, "train.epoch", "reweight/3", 2)
    with pytest.raises(StageFailed, match="injected failure"):
        train_classifier(cfg0, run, "reweight", 3, "fresh")
    assert not run.is_done("train/reweight/3")
    assert not run.exists("classifiers/reweight/3/metrics.json")
    with pytest.raises(ResumeRefused, match="train.lr"):
        train_classifier(with_overrides(cfg0, ["train.lr=0.01"]), run, "reweight", 3, "resume")
    resumed = train_classifier(cfg0, run, "reweight", 3, "resume")
    assert resumed["restarts"] == 1
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    # continuing from the epoch-2 checkpoint repeats the uninterrupted run exactly
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in first["history"]]
    assert resumed["test"] == first["test"]


def test_jtt_error_set_is_exactly_the_misclassified_training_points(shortcut_run):
    cfg, run, info = shortcut_run
    cfg = with_overrides(cfg, ["train.method=jtt", "train.jtt_epochs=1", "train.epochs=2", "train.jtt_lambda=10"])
    rec = train_classifier(cfg, run, "jtt", 0, "fresh")
    err = json.loads(run.read_text("classifiers/jtt/0/jtt_error_set.json"))
    meta, pred = _predict(run, "classifiers/jtt/0/jtt_identifier.safetensors", "train")
    expected = sorted(meta["id"][pred != meta["y"].to_numpy()])
    assert sorted(err["ids"]) == expected
    assert 0 < len(expected) < len(meta) and err["n_train"] == len(meta)
    # the retraining epoch grows by (lambda - 1) per error-set example
    final = [h for h in rec["history"] if h["phase"] == "final"]
    assert [h["phase"] for h in rec["history"]] == ["identify", "final", "final"]
    assert final[0]["examples"] == pytest.approx(len(meta) + 9 * len(expected), abs=2)
    assert rec["best_phase"] == "final"


def _write_synthetic(run, generator: str, per_group: int = 40) -> None:
    """A group-balanced synthetic set in the generate stage's layout, drawn from the digits."""
    from sklearn.datasets import load_digits

    from raybias.palette import COLOR_RGB
    from raybias.data.images import encode_png
    from raybias.data.schema import to_arrow
    from raybias.data.sources.colored_digits import colorize

    digits = load_digits()
    rng = np.random.default_rng(0)
    rows = []
    for y in (0, 1):
        pool = np.flatnonzero((digits.target >= 5) == bool(y))
        for a, colour in enumerate(("red", "green")):
            for k, i in enumerate(rng.choice(pool, per_group, replace=False)):
                rows.append({"id": f"syn-{generator}-{y}{a}-{k:03d}",
                             "image": encode_png(colorize(digits.images[i], COLOR_RGB[colour], 16)),
                             "y": y, "a": a, "group": 2 * y + a, "split": "train", "source": generator,
                             "seed": int(k), "prompt": f"a {colour} digit"})
    table = to_arrow(pd.DataFrame(rows))
    run.makedirs(f"synthetic/{generator}/shards")
    with run.fs.open_output_stream(run.path(f"synthetic/{generator}/shards/unit-00000.parquet")) as f:
        pq.write_table(table, f)


def test_two_stage_head_streaming_keeps_encoder(shortcut_run):
    cfg, run, info = shortcut_run
    _write_synthetic(run, "vanilla")
    cfg = with_overrides(cfg, ["train.method=two_stage", "train.generator=vanilla", "train.stage2=head",
                               "train.stage2_method=groupdro", "train.stage1.epochs=2", "train.epochs=2",
                               "train.synthetic_ratio=0.2", "train.in_memory=false"])
    rec = train_classifier(cfg, run, "vanilla", 0, "fresh")
    assert rec["train_method"] == "two_stage" and rec["method"] == "vanilla"
    assert rec["n_stage1"] == 160 + 40  # 160 synthetic, and real making up 20 %
    phases = [h["phase"] for h in rec["history"]]
    assert phases == ["stage1", "stage1", "stage2", "stage2"]
    assert rec["history"][0]["examples"] == 200  # streaming: every stage-1 row once per epoch
    n_train = rec["n_train"]
    assert n_train - 1 <= rec["history"][2]["examples"] <= n_train  # group-balanced draw of N rows
    stage1 = state_from_safetensors(run.read_bytes("classifiers/vanilla/0/stage1_model.safetensors"))
    final = state_from_safetensors(run.read_bytes("classifiers/vanilla/0/model.safetensors"))
    enc = [k for k in final if k.startswith("encoder.")]
    assert enc and all(torch.equal(final[k], stage1[k]) for k in enc)  # weights and BN statistics
    assert not torch.equal(final["head.weight"], stage1["head.weight"])
    assert rec["test"]["wga"] is not None


def test_two_stage_auto_keeps_the_stage2_validation_chooses(shortcut_run, monkeypatch):
    """stage2=auto trains each candidate from the one stage-1 model, records every candidate's
    validation WGA and keeps the argmax; a candidate is exactly the fixed stage 2 it names, and a
    worker failure inside the candidates resumes from the epoch checkpoint."""
    cfg, run, info = shortcut_run
    _write_synthetic(run, "lora")
    common = ["train.method=two_stage", "train.generator=lora", "train.stage1.epochs=2", "train.epochs=2",
              "train.lr=0.003"]
    fixed = train_classifier(with_overrides(cfg, common + ["train.stage2=head", "train.stage2_method=groupdro"]),
                             run, "lora", 0, "fresh", name="lora-fixed")
    assert fixed["stage2"] == {"mode": "head", "order": ["head+groupdro"], "chosen": "head+groupdro"}
    auto_cfg = with_overrides(cfg, common + ["train.stage2=auto", "train.max_failures=1",
                                             "train.stage2_candidates=[full+erm,head+groupdro]", "train.stage2_rank=final"])
    # the worker fails after stage 1 (2 epochs) and the first candidate's first epoch
    faults.arm(monkeypatch, "train.epoch", "lora/0", 3)
    rec = train_classifier(auto_cfg, run, "lora", 0, "fresh")
    assert rec["restarts"] == 1
    assert [h["phase"] for h in rec["history"]] == ["stage1"] * 2 + ["stage2:full+erm"] * 2 + ["stage2:head+groupdro"] * 2
    s2 = rec["stage2"]
    assert s2["mode"] == "auto" and s2["order"] == ["full+erm", "head+groupdro"] and s2["rank"] == "final"
    cands = s2["candidates"]
    assert set(cands) == {"full+erm", "head+groupdro"}
    for c, r in cands.items():  # each candidate's record: its best epoch on validation, and its last
        hist = [h for h in rec["history"] if h["phase"] == f"stage2:{c}"]
        assert r["val_wga"] == max(h["val_wga"] for h in hist) == hist[r["best_epoch"] - 1]["val_wga"]
        assert (r["final_val_wga"], r["final_val_aga"]) == (hist[-1]["val_wga"], hist[-1]["val_aga"])
    key = {c: (r["final_val_wga"], r["final_val_aga"]) for c, r in cands.items()}
    best = max(key.values())
    assert s2["chosen"] == next(c for c in s2["order"] if key[c] == best)  # the argmax, ties to the first
    assert rec["best_phase"] == f"stage2:{s2['chosen']}"
    chosen = cands[s2["chosen"]]
    assert rec["best_epoch"] == chosen["best_epoch"] and rec["val"]["wga"] == chosen["val_wga"]
    assert rec["test"]["wga"] == chosen["test_wga"]  # the kept model is the chosen one's best epoch
    # the candidate head+groupdro trained exactly what the fixed stage 2 did
    hg = cands["head+groupdro"]
    assert hg["val_wga"] == fixed["val"]["wga"] and hg["test_wga"] == fixed["test"]["wga"]
    assert [h["train_loss"] for h in rec["history"] if h["phase"] == "stage2:head+groupdro"] == \
        [h["train_loss"] for h in fixed["history"] if h["phase"] == "stage2"]
    on_disk = json.loads(run.read_text("classifiers/lora/0/metrics.json"))
    assert on_disk["stage2"] == s2
    # the classifier's file carries the projection head it was pretrained with
    model = load_classifier(run.read_bytes("classifiers/lora/0/model.safetensors"))
    assert model.projection_spec is not None and model.projection_spec.kind == "mlp"


def test_ddp_two_workers_restart_after_failure(shortcut_run, monkeypatch):
    cfg, run, info = shortcut_run
    cfg = with_overrides(cfg, ["train.method=groupdro", "train.num_workers=2", "train.max_failures=1",
                               "train.epochs=3", "train.lr=0.003"])
    faults.arm(monkeypatch, "train.epoch", "groupdro/7", 1)
    rec = train_classifier(cfg, run, "groupdro", 7, "fresh")
    assert rec["restarts"] == 1  # Ray Train restarted the worker group from the epoch-1 checkpoint
    assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
    # two ranks share each epoch's N draws (equal halves; at most one short batch dropped each)
    assert all(rec["n_train"] - 3 <= h["examples"] <= rec["n_train"] for h in rec["history"])
    q = rec["history"][-1]["groupdro_q"]
    assert len(q) == 4 and sum(q) == pytest.approx(1, abs=1e-3)
    assert sum(rec["test"]["n"].values()) == len(real_sets(run)["test"])  # every test row counted once


def test_cli_missing_imagenet_weights_exits_2(shortcut_run, tmp_path, monkeypatch, capsys):
    _, run, _ = shortcut_run
    from raybias.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"run_dir: {run.uri}\nray: {{num_cpus: 2, object_store_mb: 400}}\n")
    before = run.stage_record("train/erm/0")
    code = main(["train", str(cfg_file), "train.model=resnet18", "train.pretrained=imagenet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "raybias: error: train.pretrained=imagenet" in err and "resnet18" in err
    assert run.stage_record("train/erm/0") == before  # refused before anything was recorded
