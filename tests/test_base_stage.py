"""`raybias base`: the rebuild recipe runs (tiny corpus, few steps) and writes a loadable backbone."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import small_config

TINY_BASE = {"arch": "tiny", "corpus_size": 160, "steps": 6, "vae_steps": 4, "batch_size": 16,
             "oracle_epochs": 1, "check_per_pair": 1, "check_guidance": [1.0, 2.0], "check_steps": 2,
             "check_colors": ["red", "green"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    from raybias.rundir import RunDir
    from raybias.stages.base import run_base

    tmp = tmp_path_factory.mktemp("base")
    cfg = small_config(tmp, base=dict(TINY_BASE))
    run = RunDir(cfg.run_dir)
    summary = run_base(cfg, run, verbose=False)
    return cfg, run, summary


def test_rebuild_writes_a_loadable_backbone_and_its_report(built):
    from diffusers import StableDiffusionPipeline

    from raybias.diffusion.backbone import resolve_base_model
    from raybias.diffusion.oracle import load_oracle, predict
    from raybias.diffusion.pretrain import read_meta
    from raybias.diffusion.sampling import sample

    cfg, run, summary = built
    assert run.is_done("base")
    folder = run.local_path("base/model")
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # stock diffusers
    images = sample(pipe, ["a red seven", "a green two"], [0, 1], steps=2)
    assert images[0].shape == (16, 16, 3)
    meta = read_meta(folder)
    assert meta["corpus_size"] == 160 and meta["settings"]["steps"] == 6
    assert meta["scaling_factor"] > 0 and pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    quality = json.loads(run.read_text("base/quality.json"))["quality"]
    assert set(quality["by_guidance"]) == {"1", "2"}
    assert quality["best"]["n"] == 20 and 0 <= quality["best"]["both"] <= 1
    assert summary["best_guidance"] in (1.0, 2.0)
    for png in ("samples.png", "guidance.png", "corpus.png", "loss.png"):
        assert run.read_bytes(f"base/{png}")[:4] == b"\x89PNG"
    # the oracle trained on the same corpus is saved and usable
    oracle = load_oracle(run.local_path("base/oracle"))
    d, c = predict(np.stack(images), oracle)
    assert d.shape == (2, 10) and c.shape == (2, len(oracle.palette))
    assert np.allclose(d.sum(1), 1, atol=1e-5)
    # later stages of this run use the rebuilt copy
    assert resolve_base_model(cfg, run) == folder


def test_resume_skips_and_fresh_with_changed_config_redoes(built):
    from raybias.rundir import ResumeRefused
    from raybias.stages.base import run_base

    cfg, run, _ = built
    before = run.stage_record("base")["finished_at"]
    run_base(cfg, run, mode="resume", verbose=False)
    assert run.stage_record("base")["finished_at"] == before
    changed = cfg.copy()
    changed.base.steps = 7
    with pytest.raises(ResumeRefused, match="base.steps"):
        run_base(changed, run, mode="resume", verbose=False)


def test_external_model_is_checked(tmp_path, ray_session):
    from raybias.config import ConfigError
    from raybias.diffusion.backbone import build_pipeline, save_pipeline
    from raybias.rundir import RunDir
    from raybias.stages.base import run_base

    folder = str(tmp_path / "sd")
    save_pipeline(build_pipeline("tiny"), folder)
    cfg = small_config(tmp_path, base={"model": folder})
    run = RunDir(cfg.run_dir)
    summary = run_base(cfg, run, verbose=False)
    info = run.read_json("base/model_info.json")
    assert info["components"]["unet"] == "UNet2DConditionModel" and info["image_size"] == 16
    assert summary["parameters"]["unet"] == info["parameters"]["unet"] > 0
    bad = small_config(tmp_path / "b", base={"model": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="base.model"):
        run_base(bad, RunDir(bad.run_dir), verbose=False)
    assert not RunDir(bad.run_dir).is_done("base")


def test_cli_base_reports_a_bad_model_clearly(tmp_path, capsys, ray_session):
    from raybias.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("ray:\n  num_cpus: 2\n  object_store_mb: 400\n")
    code = main(["base", str(config), f"base.model={tmp_path / 'nowhere'}", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "raybias: error:" in err and "base.model" in err and "folder not found" in err
    code = main(["base", str(config), "base.check_colors=[mauve]", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "base.check_colors" in capsys.readouterr().err


def test_config_validation_of_base_section(tmp_path):
    from raybias.config import ConfigError

    for bad, key in (({"arch": "huge"}, "base.arch"), ({"cond_drop": 1.5}, "base.cond_drop"),
                     ({"check_guidance": []}, "base.check_guidance"), ({"vae_steps": 0}, "base.vae_steps")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            small_config(tmp_path, base=bad)
