"""Fine-tuning: job planning, the one training loop, and whole stage runs on a real local Ray.

Models are tiny random-weight pipelines built from config (no download). The end-to-end tests
check what a user relies on: the stage's manifest contract, that stock diffusers loads the
outputs (`load_lora_weights`, `StableDiffusionPipeline.from_pretrained`) and reproduces the
fine-tuned model's own samples, and that a finished stage is not trained again.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config

SEVERITY = 0.95  # prepared_run: train groups about [634, 34, 33, 623] (FFR's ceiling)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random-weight Stable Diffusion pipeline saved to a folder (the base model)."""
    from raybias.diffusion.backbone import build_pipeline, save_pipeline

    folder = str(tmp_path_factory.mktemp("base") / "tiny")
    save_pipeline(build_pipeline("tiny", seed=0), folder)
    return folder


def fresh_run(prepared_run, tmp_path):
    """A new run directory holding a copy of the prepared data (so tests do not share outputs)."""
    from raybias.rundir import RunDir

    _, prep, info = prepared_run
    root = tmp_path / "run"
    shutil.copytree(prep.local_path("data"), root / "data")
    shutil.copy(prep.local_path("manifest.json"), root / "manifest.json")
    return RunDir(str(root)), info


def ft_config(tmp_path, base, methods=("lora",), **finetune):
    values = {"steps": 6, "batch_size": 4, "checkpoint_every": 3, "min_images": 40, "num_class_images": 4,
              "sample_steps": 3, "n_samples": 3, "num_cpus_per_job": 0.5, "max_failures": 1,
              "progress_every": 2}
    values.update(finetune)
    return small_config(tmp_path, data={"severity": SEVERITY, "image_size": 16}, base={"model": base},
                        methods=list(methods), finetune=values)


def write_clusters(run, info, split_group: int = 0):
    """embed/clusters.parquet + clusters.json by hand: `split_group` in two clusters (odd/even digit)."""
    from raybias.data.io import read_table

    real = read_table(run, "data/real", columns=["id", "group", "split", "digit"], split="train")
    real["cluster"] = np.where(real["group"] == split_group, real["digit"] % 2, 0)
    table = real[["id", "group", "cluster"]].reset_index(drop=True)
    run.makedirs("embed")
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), run.local_path("embed/clusters.parquet"))
    summary = {str(g): {"k": int(p["cluster"].nunique()), "sizes": p.groupby("cluster").size().tolist()}
               for g, p in table.groupby("group")}
    run.write_json("embed/clusters.json", summary)
    return table


# --------------------------------------------------------------------------- planning (no training)


def test_plan_trains_stocked_groups_and_borrows_for_the_rest(prepared_run, tmp_path):
    from raybias.finetune.runner import plan_generator

    run, info = fresh_run(prepared_run, tmp_path)
    cfg = ft_config(tmp_path, "builtin")
    counts = {g: info.train_count(g) for g in range(4)}
    assert counts[1] < 40 <= counts[0] and counts[2] < 40 <= counts[3]

    plan = plan_generator(cfg, run, info, "lora")
    assert [j.name for j in plan.jobs] == ["g0", "g3"]
    assert [len(j.ids) for j in plan.jobs] == [counts[0], counts[3]]
    by = {e["name"]: e for e in plan.entries}
    assert list(by) == ["g0", "g1", "g2", "g3"]
    assert by["g0"]["prompt_template"] == "a red {member}" and by["g0"]["borrowed_from"] is None
    assert by["g0"]["members"] == ["zero", "one", "two", "three", "four"]
    # group 1 (digit<5, green) has too few images: class 0's red model, green prompt, red negative
    assert by["g1"]["borrowed_from"] == "g0" and by["g1"]["folder"] == "generators/lora/g0"
    assert by["g1"]["prompt_template"] == "a green {member}" and by["g1"]["negative_prompt"] == "red"
    assert by["g1"]["group_images"] == counts[1]
    assert by["g2"]["borrowed_from"] == "g3" and by["g2"]["negative_prompt"] == "green"
    assert all(e["weight"] == 1.0 and e["cluster"] is None for e in plan.entries)
    assert [b["name"] for b in plan.jobs[0].borrower_previews] == ["g1 (borrowed)"]

    db = plan_generator(ft_config(tmp_path, "builtin", min_images=3), run, info, "dreambooth")
    assert [j.name for j in db.jobs] == ["g0", "g1", "g2", "g3"]
    assert db.jobs[1].prompt_template == "a sks green {member}"
    assert db.jobs[1].class_template == "a green {member}"
    assert all(e["kind"] == "dreambooth" and e["borrowed_from"] is None for e in db.entries)


def test_plan_clustered_one_job_per_cluster_weighted_by_size(prepared_run, tmp_path):
    from raybias.finetune.runner import plan_generator

    run, info = fresh_run(prepared_run, tmp_path)
    table = write_clusters(run, info, split_group=0)
    cfg = ft_config(tmp_path, "builtin", methods=["clustered_dreambooth"])
    plan = plan_generator(cfg, run, info, "clustered_dreambooth")
    assert [j.name for j in plan.jobs] == ["g0-c0", "g0-c1", "g3-c0"]
    sizes = table[table.group == 0].groupby("cluster").size()
    by = {e["name"]: e for e in plan.entries}
    assert by["g0-c0"]["weight"] == pytest.approx(sizes[0] / sizes.sum())
    assert by["g0-c0"]["weight"] + by["g0-c1"]["weight"] == pytest.approx(1.0)
    assert by["g3-c0"]["weight"] == 1.0 and by["g3-c0"]["n_images"] == info.train_count(3)
    # the borrowing group mirrors its source's clusters and their weights
    assert by["g1-c1"]["borrowed_from"] == "g0-c1" and by["g1-c1"]["weight"] == by["g0-c1"]["weight"]
    assert by["g1-c0"]["prompt_template"] == "a green {member}"
    assert plan.jobs[0].prompt_template == "a sks red {member}"
    assert set(plan.jobs[0].ids) == set(table[(table.group == 0) & (table.cluster == 0)]["id"])


def test_plan_refuses_what_cannot_be_trained(prepared_run, tmp_path):
    from raybias.config import ConfigError
    from raybias.data.io import TableMissing
    from raybias.rundir import StageFailed
    from raybias.finetune.runner import plan_generator

    run, info = fresh_run(prepared_run, tmp_path)
    with pytest.raises(TableMissing, match="clusters.parquet.*raybias cluster"):
        plan_generator(ft_config(tmp_path, "builtin"), run, info, "clustered_dreambooth")
    with pytest.raises(StageFailed, match="no group with at least finetune.min_images=5000"):
        plan_generator(ft_config(tmp_path, "builtin", min_images=5000), run, info, "lora")
    with pytest.raises(ConfigError, match="not fine-tuned"):
        plan_generator(ft_config(tmp_path, "builtin"), run, info, "vanilla")


def test_config_checks_finetune_fields(tmp_path):
    from raybias.config import ConfigError

    with pytest.raises(ConfigError, match="finetune.mixed_precision"):
        ft_config(tmp_path, "builtin", mixed_precision="fp8")
    with pytest.raises(ConfigError, match="finetune.identifier"):
        ft_config(tmp_path, "builtin", identifier="two words")
    with pytest.raises(ConfigError, match="finetune.num_cpus_per_job"):
        ft_config(tmp_path, "builtin", num_cpus_per_job=0)
    with pytest.raises(ConfigError, match="finetune.sample_steps"):
        ft_config(tmp_path, "builtin", sample_steps=0)


def test_members_and_prompts_are_deterministic(prepared_run):
    from raybias.finetune.spec import member_for, prompt_template

    _, _, info = prepared_run
    members = info.class_words[1]
    draws = [member_for(f"cd-{i:04d}-c0", members, seed=0) for i in range(200)]
    assert draws == [member_for(f"cd-{i:04d}-c0", members, seed=0) for i in range(200)]
    assert set(draws) == set(members)  # every member is named somewhere
    assert draws != [member_for(f"cd-{i:04d}-c0", members, seed=1) for i in range(200)]
    assert prompt_template(info, 3, identifier="sks") == "a sks green {member}"
    assert prompt_template(info, 3, bias_override="blue") == "a blue {member}"
    # a training prompt is exactly what the project's prompt helper makes for that member
    from raybias.diffusion.prompts import group_prompt

    class Pick:  # a "random" draw that picks the member we name
        def __init__(self, word):
            self.word = word

        def integers(self, n):
            return members.index(self.word)

    for word in members:
        assert (prompt_template(info, 3, identifier="sks").format(member=word)
                == group_prompt(info, 3, Pick(word), identifier="sks"))


# --------------------------------------------------------------------------- the loop (no Ray)


def _loop_inputs(tiny_base, tmp_path, kind, prior):
    from raybias.diffusion.backbone import load_pipeline
    from raybias.finetune.spec import FinetuneJob, finetune_spec
    from raybias.rundir import RunDir

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    job = FinetuneJob(name="g0", generator=kind, kind=kind, group=0, cluster=None,
                      prompt_template="a sks red {member}" if kind == "dreambooth" else "a red {member}",
                      members=["zero", "one"], ids=[f"i{k}" for k in range(5)],
                      class_template="a red {member}" if kind == "dreambooth" else None)
    cfg = small_config(tmp_path, base={"model": tiny_base}, finetune={
        "seed": 0, "batch_size": 2, "lr": 1e-3, "dreambooth_lr": 1e-3, "lora_rank": 2, "lora_alpha": 4.0,
        "prior_preservation": prior, "prior_loss_weight": 1.0, "weight_decay": 1e-2, "max_grad_norm": 1.0,
        "mixed_precision": "no"})
    ft = finetune_spec(cfg, RunDir(cfg.run_dir), kind)
    class_imgs = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3)] if prior else None
    return lambda: load_pipeline(tiny_base), job, ft, images, class_imgs


@pytest.mark.parametrize("kind,prior", [("lora", False), ("dreambooth", True)])
def test_loop_resumed_from_checkpoint_continues_exactly(tiny_base, tmp_path, kind, prior):
    """Train 5 steps straight, or 3 + save + reload into a fresh model + 2: same losses, same weights."""
    import torch

    from raybias.finetune.loop import FinetuneLoop

    load, job, ft, images, class_imgs = _loop_inputs(tiny_base, tmp_path, kind, prior)
    straight = FinetuneLoop(load(), job, ft, images=images, class_images=class_imgs)
    base_weights = {k: v.detach().clone() for k, v in straight.trainable_state().items()}
    losses = [straight.step(i) for i in range(5)]
    assert straight.prior == prior and all(np.isfinite(losses))

    first = FinetuneLoop(load(), job, ft, images=images, class_images=class_imgs)
    part = [first.step(i) for i in range(3)]
    first.save(str(tmp_path / "ckpt"), {"step": 3, "losses": part})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]
    second = FinetuneLoop(load(), job, ft, images=images, class_images=class_imgs)
    state = second.load(str(tmp_path / "ckpt"))
    resumed = state["losses"] + [second.step(i) for i in range(state["step"], 5)]
    np.testing.assert_allclose(resumed, losses, rtol=1e-5)
    end_a, end_b = straight.trainable_state(), second.trainable_state()
    assert set(end_a) == set(end_b) == set(base_weights)
    for name in end_a:
        torch.testing.assert_close(end_a[name], end_b[name])
    assert any(not torch.equal(end_a[n], base_weights[n]) for n in end_a)  # training changed them
    if kind == "lora":
        assert all(".lora_" in n for n in end_a)  # only the adapter trains


# --------------------------------------------------------------------------- whole stage on Ray


def _preview(run, folder, k):
    from raybias.data.images import decode

    return decode(run.read_bytes(f"{folder}/preview-{k}.png")).astype(int)


def _fine_tuned_row(run, entry, pipe, ft):
    from raybias.finetune.spec import preview_prompts
    from raybias.diffusion.sampling import sample

    prompts = preview_prompts(entry["prompt_template"], entry["members"], ft.n_samples)
    seeds = [ft.seed * 7919 + i for i in range(ft.n_samples)]
    return np.concatenate(sample(pipe, prompts, seeds, scheduler="ddim", steps=ft.sample_steps), axis=1).astype(int)


def test_lora_stage_survives_a_killed_worker_and_loads_in_stock_diffusers(prepared_run, tmp_path, tiny_base,
                                                                          ray_session, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from raybias import faults
    from raybias.stages.finetune import run_finetune

    run, info = fresh_run(prepared_run, tmp_path)
    # alpha != rank: the saved adapter metadata must carry the scaling to stock loaders
    cfg = ft_config(tmp_path, tiny_base, methods=["erm", "lora", "vanilla"], lr=2e-2, lora_alpha=8.0,
                    steps=6, checkpoint_every=3, max_failures=1)
    # g0's worker is killed (SIGKILL, once) after step 4: the checkpoint of step 3 is its last one
    faults.arm(monkeypatch, "finetune.step", "g0", 4)
    out = run_finetune(cfg, run, "fresh")
    assert list(out) == ["lora"]  # vanilla and erm need no fine-tuning
    manifest = run.read_json("generators/lora/manifest.json")
    assert manifest == out["lora"]
    assert manifest["generator"] == "lora" and manifest["base"] == tiny_base and manifest["identifier"] is None
    models = {m["name"]: m for m in manifest["models"]}
    assert list(models) == ["g0", "g1", "g2", "g3"]
    keys = {"name", "group", "cluster", "weight", "kind", "folder", "prompt_template", "members",
            "negative_prompt", "n_images", "borrowed_from", "steps", "final_loss"}
    for m in models.values():
        assert keys <= set(m) and m["kind"] == "lora" and m["steps"] == 6 and np.isfinite(m["final_loss"])
    assert models["g1"]["borrowed_from"] == "g0" and models["g1"]["final_loss"] == models["g0"]["final_loss"]
    assert os.path.exists(run.local_path("generators/lora/_train/g0.fault-marker"))  # the kill happened
    rec = run.read_json("generators/lora/g0/training.json")
    # Ray Train restarted the worker from step 3: every step done once, the history kept
    assert rec["attempts"] == 2 and rec["resumed_from"] == [3]
    assert rec["steps"] == 6 and len(rec["losses"]) == 6 and all(np.isfinite(rec["losses"]))
    assert rec["n_images"] == info.train_count(0)
    other = run.read_json("generators/lora/g3/training.json")
    assert other["attempts"] == 1 and other["resumed_from"] == []
    assert run.exists("generators/lora/g0/pytorch_lora_weights.safetensors")
    assert run.exists("generators/lora/samples.png")
    stage = run.stage_record("finetune/lora")
    assert stage["done"] and sorted(stage["units"]) == ["g0", "g3"]

    # stock diffusers: a fresh base + load_lora_weights reproduces the fine-tuned samples
    folder = run.local_path(models["g0"]["folder"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    before = _fine_tuned_row(run, models["g0"], pipe, cfg.finetune)
    pipe.load_lora_weights(folder)
    after = _fine_tuned_row(run, models["g0"], pipe, cfg.finetune)
    reference = _preview(run, models["g0"]["folder"], 1)  # row 1: sampled by the worker after training
    assert np.abs(after - reference).max() <= 1
    assert np.abs(before - reference).max() > 10  # the adapter changed what the model makes

    # resume of a finished stage trains nothing again
    mtime = os.path.getmtime(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    again = run_finetune(cfg, run, "resume")
    assert again["lora"] == manifest
    assert os.path.getmtime(os.path.join(folder, "pytorch_lora_weights.safetensors")) == mtime


def test_clustered_dreambooth_with_prior_loads_with_from_pretrained(prepared_run, tmp_path, tiny_base,
                                                                   ray_session):
    import torch
    from diffusers import StableDiffusionPipeline

    from raybias.stages.finetune import run_finetune

    run, info = fresh_run(prepared_run, tmp_path)
    write_clusters(run, info, split_group=0)
    cfg = ft_config(tmp_path, tiny_base, methods=["clustered_dreambooth"], steps=4, checkpoint_every=2,
                    dreambooth_lr=1e-2, n_samples=2)
    out = run_finetune(cfg, run, "fresh")["clustered_dreambooth"]
    assert out["identifier"] == "sks"
    models = {m["name"]: m for m in out["models"]}
    assert sorted(models) == ["g0-c0", "g0-c1", "g1-c0", "g1-c1", "g2-c0", "g3-c0"]
    assert models["g0-c0"]["weight"] + models["g0-c1"]["weight"] == pytest.approx(1.0)
    assert models["g0-c1"]["prompt_template"] == "a sks red {member}" and models["g0-c1"]["cluster"] == 1
    assert models["g1-c1"]["borrowed_from"] == "g0-c1" and models["g1-c1"]["negative_prompt"] == "red"
    assert models["g1-c1"]["prompt_template"] == "a green {member}"
    for name in ("g0-c0", "g0-c1", "g3-c0"):
        rec = run.read_json(f"generators/clustered_dreambooth/{name}/training.json")
        assert rec["steps"] == 4 and rec["n_images"] == models[name]["n_images"] and rec["n_class_images"] == 4
    # prior-preservation images: one cached set per group, shared by the group's clusters
    assert len(run.listdir("generators/clustered_dreambooth/_class")) == 2
    assert run.stage_record("finetune/clustered_dreambooth")["done"]
    assert run.exists("generators/clustered_dreambooth/samples.png")

    folder = run.local_path(models["g0-c1"]["folder"])
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert sum(changed) > len(changed) // 2  # the whole UNet trained
    for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters()):
        assert torch.equal(a, b)  # the text encoder is the base's (linked or copied)
    after = _fine_tuned_row(run, models["g0-c1"], pipe, cfg.finetune)
    assert np.abs(after - _preview(run, models["g0-c1"]["folder"], 1)).max() <= 1
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for _, _, fs in os.walk(folder) for f in fs)
