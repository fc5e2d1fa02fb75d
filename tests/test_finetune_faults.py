"""Fine-tuning under faults: a run whose job died is resumed with --resume.

A job's worker is killed with SIGKILL from inside the training loop after a given step (the
`RAYBIAS_FINETUNE_FAULT` hook, once, guarded by a marker file). With no retries left the stage
fails; `--resume` must keep the finished jobs as they are and continue the dead one from the
last checkpoint Ray Train registered. (A worker restarted by Ray Train within one run is
tested in test_finetune.py's LoRA stage test.)
"""

from __future__ import annotations

import os

import pytest

from test_finetune import fresh_run, ft_config, tiny_base  # noqa: F401  (fixture)


def test_killed_run_resumes_without_retraining_finished_jobs(prepared_run, tmp_path, tiny_base, ray_session,
                                                              monkeypatch):
    from raybias.rundir import StageFailed
    from raybias.stages.finetune import FAULT_ENV, finetune_generator

    run, _ = fresh_run(prepared_run, tmp_path)
    # No retries: the killed job fails the run, as a killed driver or node would leave it.
    cfg = ft_config(tmp_path, tiny_base, methods=["dreambooth"], steps=10, checkpoint_every=5,
                    max_failures=0, n_samples=0, prior_preservation=False)
    monkeypatch.setenv(FAULT_ENV, "dreambooth/g3:7")
    with pytest.raises(StageFailed, match=r"(?s)--resume.*dreambooth/g3: \w+Error"):
        finetune_generator(cfg, run, "dreambooth", "fresh")
    stage = run.stage_record("finetune/dreambooth")
    assert not stage["done"] and stage["units"] == ["g0"]
    assert not run.exists("generators/dreambooth/manifest.json")
    assert not run.exists("generators/dreambooth/g3")
    weights = run.local_path("generators/dreambooth/g0/unet/diffusion_pytorch_model.safetensors")
    mtime = os.path.getmtime(weights)

    manifest = finetune_generator(cfg, run, "dreambooth", "resume")  # the marker stops a second kill
    assert os.path.getmtime(weights) == mtime  # g0 was not trained again
    assert run.read_json("generators/dreambooth/g0/training.json")["attempts"] == 1
    rec = run.read_json("generators/dreambooth/g3/training.json")
    assert rec["resumed_from"] == [5] and rec["attempts"] == 2  # continued from its Ray Train checkpoint
    assert rec["steps"] == 10 and len(rec["losses"]) == 10
    assert run.stage_record("finetune/dreambooth")["done"]
    models = {m["name"]: m for m in manifest["models"]}
    assert sorted(models) == ["g0", "g1", "g2", "g3"] and manifest["identifier"] == "sks"
    assert models["g3"]["prompt_template"] == "a sks green {member}" and models["g3"]["kind"] == "dreambooth"
    assert models["g2"]["borrowed_from"] == "g3" and models["g2"]["prompt_template"] == "a red {member}"
    assert run.exists("generators/dreambooth/g3/unet/diffusion_pytorch_model.safetensors")
    assert run.exists("generators/dreambooth/g3/model_index.json")
