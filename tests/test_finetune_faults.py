"""Fine-tuning under faults: a run whose job died is resumed with --resume.

A job's worker is killed with SIGKILL from inside the training loop after a given step (the
`finetune.step` fault of raybias.faults, once, guarded by a marker file). With no retries left the stage
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
    from raybias import faults
    from raybias.stages.finetune import finetune_generator

    run, _ = fresh_run(prepared_run, tmp_path)
    # No retries: the killed job fails the run, as a killed driver or node would leave it.
    cfg = ft_config(tmp_path, tiny_base, methods=["dreambooth"], steps=10, checkpoint_every=5,
                    max_failures=0, n_samples=0, prior_preservation=False)
    faults.arm(monkeypatch, "finetune.step", "dreambooth/g3", 7)
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


def test_packed_jobs_match_lone_jobs_and_a_restarted_pack_skips_what_it_published(prepared_run, tmp_path,
                                                                                  tiny_base, ray_session,
                                                                                  monkeypatch):
    """finetune.jobs_per_trainer: several jobs in one trainer, in turn, from one loaded base.

    Packed, each job must train exactly as it would alone (a fresh copy of the base UNet per
    job: nothing leaks from the job before), and a worker killed in the pack's second job must
    skip the first (already published) and continue the second from its own checkpoint.
    """
    from raybias import faults
    from raybias.stages.finetune import finetune_generators

    run, _ = fresh_run(prepared_run, tmp_path)
    packed = ft_config(tmp_path, tiny_base, methods=["lora", "dreambooth"], steps=6, checkpoint_every=3,
                       max_failures=1, n_samples=0, prior_preservation=False, jobs_per_trainer=2)
    # 4 jobs (lora g0, g3; dreambooth g0, g3) in 2 packs; launch order interleaves the groups, so
    # pack 0 is [lora g0, dreambooth g0] and pack 1 [lora g3, dreambooth g3]
    faults.arm(monkeypatch, "finetune.step", "dreambooth/g3", 4)
    out = finetune_generators(packed, run, ["lora", "dreambooth"], "fresh")
    assert sorted(os.listdir(run.local_path("generators/lora/_train"))) == ["pack-0-of-2", "pack-1-of-2"]
    first = run.read_json("generators/lora/g3/training.json")
    killed = run.read_json("generators/dreambooth/g3/training.json")
    assert first["attempts"] == 1  # published before the kill: not trained again by the restart
    assert killed["attempts"] == 2 and killed["resumed_from"] == [3] and len(killed["losses"]) == 6
    assert os.path.exists(run.local_path("generators/dreambooth/_train/g3.fault-marker"))
    assert all(run.stage_record(f"finetune/{g}")["done"] for g in ("lora", "dreambooth"))
    assert {m["name"] for m in out["dreambooth"]["models"]} == {"g0", "g1", "g2", "g3"}

    monkeypatch.delenv(faults.ENV)
    alone_run, _ = fresh_run(prepared_run, tmp_path / "alone")
    alone = ft_config(tmp_path / "alone", tiny_base, methods=["lora", "dreambooth"], steps=6, checkpoint_every=3,
                      n_samples=0, prior_preservation=False)
    finetune_generators(alone, alone_run, ["lora", "dreambooth"], "fresh")
    for gen in ("lora", "dreambooth"):
        for name in ("g0", "g3"):
            a = run.read_json(f"generators/{gen}/{name}/training.json")["losses"]
            b = alone_run.read_json(f"generators/{gen}/{name}/training.json")["losses"]
            assert a == pytest.approx(b, rel=1e-5), f"{gen} {name}"
