"""Generation at scale: plan, actor pool, shards, resume after a real kill, determinism.

Everything runs for real: a tiny random-weight StableDiffusionPipeline saved to a folder
and loaded through `base.model`, LoRA weights in stock diffusers format (peft), DreamBooth
pipeline folders, the session's local Ray, Parquet shards on disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from raybias.data.images import decode, encode_png
from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing, read_table, write_table
from raybias.data.schema import SchemaError
from raybias.data.synthetic import finished_units, read_synthetic
from raybias.generation.plan import (PlanUnits, build_plan, group_targets, image_draw, split_by_weight,
                                     vanilla_models, read_generator_manifest)
from raybias.layout import REAL, shards_dir
from raybias.rundir import ResumeRefused, RunDir

TRAIN_COUNTS = {0: 12, 1: 3, 2: 5, 3: 10}  # a biased little training set: groups 1, 2 are the minority
FAST = {"steps": 2, "unit_size": 4, "batch_size": 4}


# --------------------------------------------------------------------------- helpers (also used by test_filter)

def make_small_run(prepared, root: Path, train_counts=TRAIN_COUNTS, per_split: int = 4) -> RunDir:
    """A prepared run with a few real images per group (subsampled from the session's prepared run)."""
    _, run0, info0 = prepared
    df = read_table(run0, REAL)
    parts = [df[df["split"] != "train"].groupby(["split", "group"]).head(per_split)]
    for g, n in train_counts.items():
        parts.append(df[(df["split"] == "train") & (df["group"] == g)].head(n))
    small = pd.concat(parts).reset_index(drop=True)
    run = RunDir(str(root / "run"))
    write_table(run, REAL, small)
    info = DatasetInfo(**{**info0.__dict__})
    info.counts = {s: {str(g): int(((small["split"] == s) & (small["group"] == g)).sum())
                       for g in range(info.n_groups)} for s in ("train", "val", "test")}
    info.empty_train_groups = [g for g in range(info.n_groups) if info.counts["train"][str(g)] == 0]
    info.save(run)
    return run


def expanded(plan):
    """Every unit of `plan` with its ids, seeds and prompts (derived from the unit table)."""
    units = PlanUnits(plan)
    return [units.expand(n) for n in range(len(units))]


def save_tiny_base(folder: Path) -> str:
    from raybias.diffusion.backbone import build_pipeline, save_pipeline

    if not (folder / "model_index.json").exists():
        save_pipeline(build_pipeline("tiny", seed=0), str(folder))
    return str(folder)


def save_lora(base: str, folder: Path, seed: int) -> str:
    """A LoRA adapter in stock diffusers format whose weights are far from zero (so it shows)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from raybias.diffusion.backbone import load_pipeline

    pipe = load_pipeline(base)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return str(folder)


def save_dreambooth(base: str, folder: Path, seed: int, tune_text: bool = False) -> str:
    """A DreamBooth model folder: the base pipeline with a changed UNet (and text encoder)."""
    from raybias.diffusion.backbone import load_pipeline, save_pipeline

    pipe = load_pipeline(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [pipe.unet] + ([pipe.text_encoder] if tune_text else []):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    save_pipeline(pipe, str(folder))
    return str(folder)


def write_manifest(run: RunDir, generator: str, base: str, models) -> None:
    run.write_json(f"generators/{generator}/manifest.json",
                   {"generator": generator, "base": base, "identifier": "sks", "models": models})


def entry(name, group, folder, kind, template, weight=1.0, cluster=None, negative=None, borrowed=None,
          members=None):
    return {"name": name, "group": group, "cluster": cluster, "weight": weight, "kind": kind, "folder": folder,
            "prompt_template": template, "members": members or (["zero", "one", "two", "three", "four"]
                                                                if group < 2 else
                                                                ["five", "six", "seven", "eight", "nine"]),
            "negative_prompt": negative, "n_images": 3, "borrowed_from": borrowed}


def gen_config(run: RunDir, base: str, methods=("vanilla",), **generate):
    from raybias.config import config_from_dict

    return config_from_dict({"run_dir": run.uri, "methods": list(methods), "base": {"model": base},
                             "ray": {"num_cpus": 2, "object_store_mb": 400},
                             # these tests were sized for max_group (the top-up mode), not the ffr default
                             "generate": {"balance": "max_group", **FAST, **generate}})


def png_of_stock_sample(pipe, prompt, seed, negative=None, steps=2, guidance=1.0) -> bytes:
    from raybias.diffusion.sampling import sample

    return encode_png(sample(pipe, [prompt], [seed], negative_prompts=[negative] if negative else None,
                             steps=steps, guidance=guidance, batch_size=1)[0])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base") / "pipe")


@pytest.fixture(scope="module")
def vanilla_run(prepared_run, tmp_path_factory, tiny_base):
    """A small run with the vanilla set made once (max_group): (cfg, run, summary)."""
    from raybias.stages.generate import run_generate

    run = make_small_run(prepared_run, tmp_path_factory.mktemp("vanilla"))
    cfg = gen_config(run, tiny_base)
    summary = run_generate(cfg, run, "fresh")["vanilla"]
    return cfg, run, summary


def _copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.path(), dest / "run")
    return RunDir(str(dest / "run"))


# --------------------------------------------------------------------------- plan (pure)

def _info(**kw) -> DatasetInfo:
    base = dict(source="colored_digits", n_classes=2, n_bias=2, class_names=["digit<5", "digit>=5"],
                bias_names=["red", "green"], class_words=[["zero", "one", "two", "three", "four"],
                                                          ["five", "six", "seven", "eight", "nine"]],
                bias_words=["red", "green"], prompt_template="a {bias} {member}", aligned=[0, 1],
                image_size=16, severity=0.95,
                counts={"train": {str(g): n for g, n in TRAIN_COUNTS.items()}})
    base.update(kw)
    return DatasetInfo(**base)


def test_group_targets_follow_each_balance_mode():
    real = {0: 12, 1: 3, 2: 5, 3: 10}
    assert group_targets("max_group", real, 99) == {0: 0, 1: 9, 2: 7, 3: 2}
    assert group_targets("per_group", real, 7) == {0: 7, 1: 7, 2: 7, 3: 7}
    # FFR: (0 + 9 + 7 + 2) / 4 = 4.5 -> 5 per group
    assert group_targets("ffr", real, 99) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert split_by_weight(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert split_by_weight(7, [1, 1, 1]) == [3, 2, 2]
    assert sum(split_by_weight(101, [0.13, 0.57, 0.3])) == 101


def test_plan_units_one_model_each_with_weighted_clusters_and_borrowed_negatives():
    from raybias.generation.plan import ModelSpec

    info = _info()
    members = info.class_words
    models = [
        ModelSpec("g0-c0", 0, "dreambooth", "a sks red {member}", members[0], weight=0.75, cluster=0, folder="x"),
        ModelSpec("g0-c1", 0, "dreambooth", "a sks red {member}", members[0], weight=0.25, cluster=1, folder="y"),
        ModelSpec("g1-c0", 1, "dreambooth", "a green {member}", members[0], weight=0.75, cluster=0, folder="x",
                  negative_prompt="red", borrowed_from="g0-c0"),
        ModelSpec("g1-c1", 1, "dreambooth", "a green {member}", members[0], weight=0.25, cluster=1, folder="y",
                  negative_prompt="red", borrowed_from="g0-c1"),
        ModelSpec("g2", 2, "dreambooth", "a sks red {member}", members[1], folder="z"),
        ModelSpec("g3", 3, "dreambooth", "a sks green {member}", members[1], folder="w"),
    ]
    kwargs = dict(balance="per_group", per_group=10, unit_size=3, seed=0, sampling={}, base_model="b")
    plan = build_plan("clustered_dreambooth", info, models, **kwargs)
    assert plan["group_counts"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    assert plan["cluster_counts"]["0"] == {"0": 8, "1": 2} and plan["cluster_counts"]["1"] == {"0": 8, "1": 2}
    ids = [i for u in expanded(plan) for i in u["ids"]]
    assert len(ids) == len(set(ids)) == 40 == plan["n_images"]
    by_name = {m.name: m for m in models}
    for u in expanded(plan):
        assert 1 <= len(u["ids"]) <= 3  # never more than unit_size, one model per unit
        m = by_name[u["model"]]
        assert (u["group"], u["cluster"]) == (m.group, m.cluster)
        assert u["negative_prompt"] == ("red" if u["group"] == 1 else None)
        for p in u["prompts"]:
            assert p.startswith(m.prompt_template.split("{member}")[0])
            assert p.split()[-1] in members[u["y"]]
        assert all(i.startswith(f"clustered_dreambooth-g{u['group']}-") for i in u["ids"])
    # pure function of the config: same plan again; another seed changes seeds, not counts
    assert build_plan("clustered_dreambooth", info, models, **kwargs) == plan
    other = build_plan("clustered_dreambooth", info, models, **{**kwargs, "seed": 1})
    assert other["group_counts"] == plan["group_counts"]
    assert [u["seeds"] for u in expanded(other)] != [u["seeds"] for u in expanded(plan)]
    assert image_draw(0, "lora", 1, 5) == image_draw(0, "lora", 1, 5) != image_draw(0, "lora", 1, 6)


def test_vanilla_models_prompt_each_group_with_its_bias_word():
    models = vanilla_models(_info())
    assert [m.prompt_template for m in models] == ["a red {member}", "a green {member}"] * 2
    assert all(m.kind == "base" and m.negative_prompt is None for m in models)


def test_manifest_errors_name_the_file_and_field(prepared_run, tmp_path):
    run = make_small_run(prepared_run, tmp_path)
    info = DatasetInfo.load(run)
    with pytest.raises(TableMissing, match="generators/lora/manifest.json"):
        read_generator_manifest(run, "lora", info)
    write_manifest(run, "lora", "b", [entry("g0", 0, "generators/lora/g0", "lora", "a red {member}")])
    with pytest.raises(TableMissing, match="folder .*generators/lora/g0 does not exist"):
        read_generator_manifest(run, "lora", info)
    write_manifest(run, "lora", "b", [entry("g0", 7, None, "base", "a red {member}")])
    with pytest.raises(SchemaError, match="group 7"):
        read_generator_manifest(run, "lora", info)
    write_manifest(run, "lora", "b", [{"name": "g0", "group": 0, "kind": "base"}])
    with pytest.raises(SchemaError, match="prompt_template"):
        read_generator_manifest(run, "lora", info)
    # a group that needs images but has no model is named
    write_manifest(run, "lora", "b", [entry("g0", 0, None, "base", "a red {member}")])
    from raybias.stages.generate import generate_set

    cfg = gen_config(run, "unused", methods=("lora",))
    with pytest.raises(SchemaError, match="no model for group 1"):
        generate_set(cfg, run, "lora", verbose=False)


# --------------------------------------------------------------------------- runs

def _check_set(run: RunDir, generator: str, expected_counts):
    df = read_synthetic(run, generator, filtered=False)
    counts = df.groupby("group").size().to_dict()
    assert {g: counts.get(g, 0) for g in expected_counts} == expected_counts
    assert df["id"].is_unique
    assert set(df["split"]) == {"train"} and set(df["source"]) == {generator} == set(df["generator"])
    assert (df["group"] == df["y"] * 2 + df["a"]).all()
    for col in ("seed", "prompt", "cluster", "negative_prompt"):
        assert col in df.columns
    plan = json.loads(Path(run.path(f"synthetic/{generator}/plan.json")).read_text())
    planned = [i for u in expanded(plan) for i in u["ids"]]
    assert sorted(df["id"]) == sorted(planned)
    img = Image.open(io.BytesIO(df["image"].iloc[0]))
    assert img.format == "PNG" and img.size == (16, 16)
    return df, plan


def test_vanilla_max_group_counts_manifest_and_grid(vanilla_run):
    cfg, run, summary = vanilla_run
    assert summary["group_counts"] == {0: 0, 1: 9, 2: 7, 3: 2}
    df, plan = _check_set(run, "vanilla", {0: 0, 1: 9, 2: 7, 3: 2})
    assert set(df.loc[df["group"] == 1, "prompt"].str.split().str[1]) == {"green"}
    rec = run.stage_record("generate/vanilla")
    assert rec["done"] and len(rec["units"]) == plan["n_units"] == 6
    assert plan["runtime"]["attention"] == "sdpa" and plan["runtime"]["device"] == "cpu"
    assert Image.open(run.path("synthetic/vanilla/samples.png")).format == "PNG"
    assert not [n for n in os.listdir(run.path(shards_dir("vanilla"))) if n.startswith(".tmp")]


@pytest.fixture(scope="module")
def ffr_run(prepared_run, tmp_path_factory, tiny_base):
    """The vanilla set under balance=ffr, with other unit/batch sizes and a pool of two actors."""
    from raybias.stages.generate import generate_set

    run = make_small_run(prepared_run, tmp_path_factory.mktemp("ffr"))
    cfg = gen_config(run, tiny_base, balance="ffr", unit_size=3, batch_size=2, concurrency=2)
    generate_set(cfg, run, "vanilla", "fresh", verbose=False)
    return cfg, run


def test_generate_counts_per_group(prepared_run, tmp_path, tiny_base):
    from raybias.stages.generate import generate_set

    run = make_small_run(prepared_run, tmp_path)
    generate_set(gen_config(run, tiny_base, balance="per_group", per_group=3), run, "vanilla", verbose=False)
    _check_set(run, "vanilla", {0: 3, 1: 3, 2: 3, 3: 3})


def test_generate_counts_ffr(ffr_run):
    _, run = ffr_run
    # FFR: (0 + 9 + 7 + 2) / 4 = 4.5 -> 5 per group
    _check_set(run, "vanilla", {0: 5, 1: 5, 2: 5, 3: 5})


def test_same_seeds_give_the_same_images_whatever_the_batching(vanilla_run, ffr_run):
    # Image i of group g has the same seed and prompt under every balance mode, so the ids the
    # two runs share (made with other unit sizes, batch sizes and actors) must match byte for byte.
    first = read_synthetic(vanilla_run[1], "vanilla", filtered=False).set_index("id")
    second = read_synthetic(ffr_run[1], "vanilla", filtered=False).set_index("id")
    shared = sorted(set(first.index) & set(second.index))
    assert len(shared) == 5 + 5 + 2  # groups 1, 2 and 3
    assert (first.loc[shared, "seed"] == second.loc[shared, "seed"]).all()
    assert (first.loc[shared, "prompt"] == second.loc[shared, "prompt"]).all()
    # Equal up to float rounding: the two runs batch these images with other neighbours, and on
    # some CPUs (this Intel Xeon with AMX) oneDNN's kernels round a batch's rows differently
    # with its size: one pixel level in ~0.1 % of pixels of one image here. Same batching gives
    # the same bytes (test_resume_after_killing_the_job_midway, the quickstart's repeat runs).
    for i in shared:
        a = decode(first.loc[i, "image"]).astype(int)
        b = decode(second.loc[i, "image"]).astype(int)
        assert np.abs(a - b).max() <= 2 and (a != b).mean() <= 0.01, i
    assert first.loc[shared, "image"].nunique() == len(shared)  # and they are not all alike
    # a different generate.seed gives other seeds
    info = DatasetInfo.load(vanilla_run[1])
    plan = build_plan("vanilla", info, vanilla_models(info), balance="max_group", per_group=1, unit_size=4,
                      seed=1, sampling={}, base_model="b")
    assert [s for u in expanded(plan) for s in u["seeds"]] != list(first["seed"])


def test_broken_shards_are_redone_on_resume_not_read(vanilla_run, tmp_path):
    from raybias.stages.generate import generate_set

    cfg, run0, _ = vanilla_run
    before = read_synthetic(run0, "vanilla", filtered=False).set_index("id")
    run = _copy_run(run0, tmp_path)
    cfg = gen_config(run, cfg.base.model)
    shards = Path(run.path(shards_dir("vanilla")))
    # a crash mid-write leaves a truncated temporary file; one final shard is truncated
    # (disk trouble) and one is gone: resume must redo those two and drop the temporary
    good = shards / "unit-00000.parquet"
    (shards / ".tmp-deadbeef-unit-00001.parquet").write_bytes(good.read_bytes()[:100])
    broken = shards / "unit-00002.parquet"
    broken.write_bytes(broken.read_bytes()[:300])
    (shards / "unit-00003.parquet").unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in shards.glob("unit-*.parquet") if p != broken}
    generate_set(cfg, run, "vanilla", "resume", verbose=False)
    after = read_synthetic(run, "vanilla", filtered=False).set_index("id")
    assert list(after.index) == list(before.index)
    assert all(after.loc[i, "image"] == before.loc[i, "image"] for i in after.index)
    assert not list(shards.glob(".tmp-*"))
    for name, mtime in untouched.items():  # whole shards were kept, not remade
        assert (shards / name).stat().st_mtime_ns == mtime
    plan = json.loads(Path(run.path("synthetic/vanilla/plan.json")).read_text())
    assert pq.read_table(broken).column("id").to_pylist() == PlanUnits(plan).ids(2)
    assert run.is_done("generate/vanilla")
    # --resume with another config is refused, naming the key that changed
    with pytest.raises(ResumeRefused, match="generate.steps"):
        generate_set(gen_config(run, cfg.base.model, steps=3), run, "vanilla", "resume", verbose=False)


def test_resume_after_killing_the_job_midway(prepared_run, tmp_path, tiny_base, ray_session):
    """A real `python -m raybias generate` process, SIGKILLed after a few shards, then --resume."""
    run = make_small_run(prepared_run, tmp_path)
    cfg = gen_config(run, tiny_base, unit_size=1, batch_size=1, steps=6)
    config_file = tmp_path / "gen.yaml"
    OmegaConf.save(cfg, config_file)
    from raybias.ray_utils import SINGLE_NODE_ENV

    # join the session's loopback-bound Ray (without SINGLE_NODE_ENV=0 a second driver rewrites
    # 127.0.0.1 to the machine's outward address and never finds the GCS)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1",
               **{SINGLE_NODE_ENV: "0"})
    shards = Path(run.path(shards_dir("vanilla")))
    log = open(tmp_path / "generate.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raybias", "generate", str(config_file), "--run-dir", run.uri],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(shards.glob("unit-*.parquet"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, ("generate ended before it could be killed: "
                                     + (tmp_path / "generate.log").read_text()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    _wait_for_no_sampler_actors(ray_session)
    done_at_kill = finished_units(run, "vanilla")
    plan = json.loads(Path(run.path("synthetic/vanilla/plan.json")).read_text())
    assert 3 <= len(done_at_kill) < plan["n_units"] == 18
    assert not run.is_done("generate/vanilla")
    # the shards are the units' record: no unit was written into the manifest one by one
    assert not (run.stage_record("generate/vanilla") or {}).get("units")
    kept = {u: (shards / f"unit-{u:05d}.parquet").stat().st_mtime_ns for u in done_at_kill}

    from raybias.stages.generate import generate_set

    generate_set(cfg, run, "vanilla", "resume", verbose=False)
    df = read_synthetic(run, "vanilla", filtered=False)
    planned = [i for u in expanded(plan) for i in u["ids"]]
    assert sorted(df["id"]) == sorted(planned) and df["id"].is_unique and len(df) == 18
    assert df.groupby("group").size().to_dict() == {1: 9, 2: 7, 3: 2}
    for u, mtime in kept.items():  # units finished before the kill were not made again
        assert (shards / f"unit-{u:05d}.parquet").stat().st_mtime_ns == mtime
    rec = run.stage_record("generate/vanilla")
    assert rec["done"] and sorted(rec["units"]) == [f"unit-{u:05d}" for u in range(18)]


def _wait_for_no_sampler_actors(ray, timeout: float = 60.0) -> None:
    """The killed driver's actors are reaped by Ray (their CPUs come back); wait for that, so
    they cannot write behind the resume's back."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.25)
    raise AssertionError("the killed job's actors still hold CPUs")


def test_lora_models_switch_per_unit_and_borrowed_groups_carry_the_negative_prompt(prepared_run, tmp_path,
                                                                                   tiny_base):
    from raybias.diffusion.backbone import load_pipeline
    from raybias.stages.generate import generate_set

    run = make_small_run(prepared_run, tmp_path)
    for name, seed in (("g0", 1), ("g3", 2)):
        save_lora(tiny_base, Path(run.path(f"generators/lora/{name}")), seed)
    write_manifest(run, "lora", tiny_base, [
        entry("g0", 0, "generators/lora/g0", "lora", "a red {member}"),
        entry("g1", 1, "generators/lora/g0", "lora", "a green {member}", negative="red", borrowed="g0"),
        entry("g2", 2, "generators/lora/g3", "lora", "a red {member}", negative="green", borrowed="g3"),
        entry("g3", 3, "generators/lora/g3", "lora", "a green {member}"),
    ])
    # guidance > 1 so that negative prompts act; a cache of one adapter forces reloads
    cfg = gen_config(run, tiny_base, methods=("lora",), balance="per_group", per_group=3, unit_size=2,
                     guidance=2.0, model_cache=1)
    generate_set(cfg, run, "lora", verbose=False)
    df, plan = _check_set(run, "lora", {0: 3, 1: 3, 2: 3, 3: 3})
    neg = {g: set(s.dropna()) for g, s in df.groupby("group")["negative_prompt"]}
    assert neg == {0: set(), 1: {"red"}, 2: {"green"}, 3: set()}
    assert set(df.loc[df["group"] == 1, "prompt"].str.split().str[1]) == {"green"}
    # each image is exactly what stock diffusers makes with that adapter, prompt, negative and seed
    base = load_pipeline(tiny_base)
    for folder, groups in (("g0", (0, 1)), ("g3", (2, 3))):
        pipe = load_pipeline(tiny_base)
        pipe.load_lora_weights(run.path(f"generators/lora/{folder}"))
        for g in groups:
            row = df[df["group"] == g].iloc[0]
            neg_prompt = row["negative_prompt"] if isinstance(row["negative_prompt"], str) else None
            assert row["image"] == png_of_stock_sample(pipe, row["prompt"], int(row["seed"]), neg_prompt,
                                                       guidance=2.0)
            # the adapter was applied
            assert row["image"] != png_of_stock_sample(base, row["prompt"], int(row["seed"]), neg_prompt,
                                                       guidance=2.0)
            if neg_prompt:  # and the negative prompt reached the sampler
                assert row["image"] != png_of_stock_sample(pipe, row["prompt"], int(row["seed"]), None,
                                                           guidance=2.0)


def test_units_of_one_model_are_dealt_to_one_actor(prepared_run, tmp_path, tiny_base, ray_session):
    """8 LoRA models of 2 units each on 2 actors that keep one adapter: dealt in blocks of a
    model's consecutive units, each model is loaded once, by one actor; dealt unit by unit
    (as before), a model's units go to whichever actor is free and it is loaded again there."""
    from raybias.generation.plan import models_for
    from raybias.generation.runner import run_units, sampling_settings

    run = make_small_run(prepared_run, tmp_path)
    rows = []
    for g in range(4):
        for c in range(2):
            folder = f"generators/lora/g{g}-c{c}"
            save_lora(tiny_base, Path(run.path(folder)), seed=10 * g + c)
            rows.append(entry(f"g{g}-c{c}", g, folder, "lora", "a red {member}", cluster=c))
    write_manifest(run, "lora", tiny_base, rows)
    cfg = gen_config(run, tiny_base, methods=("lora",), balance="per_group", per_group=4, unit_size=1, batch_size=1,
                     steps=1, concurrency=2, model_cache=1)
    info = DatasetInfo.load(run)
    g = cfg.generate
    _, models = models_for(run, "lora", info)
    plan = build_plan("lora", info, models, balance=g.balance, per_group=g.per_group, unit_size=g.unit_size,
                      seed=g.seed, sampling=sampling_settings(g), base_model=tiny_base)
    assert plan["n_units"] == 16 and len(plan["runs"]) == 8
    units = PlanUnits(plan)

    def deal(per_task):
        seen = []
        facts = run_units(run, plan, range(plan["n_units"]), base_model=tiny_base, base_revision=None,
                          concurrency=2, num_gpus=0, num_cpus=1, on_unit=seen.append, progress=False,
                          per_task=per_task)
        loads = {}  # actor pid -> models it loaded (its cumulative count at its last unit)
        actors_of = {}  # model -> actor pids that made its units
        for row in seen:
            loads[int(row["pid"])] = max(loads.get(int(row["pid"]), 0), int(row["model_loads"]))
            actors_of.setdefault(units.model_of(int(row["unit"])), set()).add(int(row["pid"]))
        return facts, loads, actors_of

    facts, loads, actors_of = deal(None)
    assert facts["units_per_task"] == 2 and facts["units"] == 16
    assert sum(loads.values()) == 8 and all(len(p) == 1 for p in actors_of.values()), (loads, actors_of)
    before, before_loads, before_actors = deal(1)
    print(f"model loads per actor: blocks of a model {sorted(loads.values())}, unit by unit "
          f"{sorted(before_loads.values())}; actors per model {max(map(len, before_actors.values()))} before")
    assert before["units_per_task"] == 1 and sum(before_loads.values()) >= sum(loads.values())
    df = read_synthetic(run, "lora", filtered=False)
    assert sorted(df["id"]) == sorted(i for u in expanded(plan) for i in u["ids"])


def test_clustered_dreambooth_swaps_unets_and_splits_by_cluster_weight(prepared_run, tmp_path, tiny_base):
    from diffusers import StableDiffusionPipeline

    from raybias.stages.generate import generate_set

    run = make_small_run(prepared_run, tmp_path)
    gen = "clustered_dreambooth"
    folders = {}
    for name, seed, text in (("g0-c0", 1, False), ("g0-c1", 2, True), ("g3-c0", 3, False)):
        folders[name] = f"generators/{gen}/{name}"
        save_dreambooth(tiny_base, Path(run.path(folders[name])), seed, tune_text=text)
    write_manifest(run, gen, tiny_base, [
        entry("g0-c0", 0, folders["g0-c0"], "dreambooth", "a sks red {member}", weight=2 / 3, cluster=0),
        entry("g0-c1", 0, folders["g0-c1"], "dreambooth", "a sks red {member}", weight=1 / 3, cluster=1),
        entry("g1-c0", 1, folders["g0-c0"], "dreambooth", "a green {member}", weight=2 / 3, cluster=0,
              negative="red", borrowed="g0-c0"),
        entry("g1-c1", 1, folders["g0-c1"], "dreambooth", "a green {member}", weight=1 / 3, cluster=1,
              negative="red", borrowed="g0-c1"),
        entry("g2-c0", 2, folders["g3-c0"], "dreambooth", "a red {member}", cluster=0, negative="green",
              borrowed="g3-c0"),
        entry("g3-c0", 3, folders["g3-c0"], "dreambooth", "a sks green {member}", cluster=0),
    ])
    cfg = gen_config(run, tiny_base, methods=(gen,), balance="per_group", per_group=6, unit_size=4,
                     model_cache=1)
    generate_set(cfg, run, gen, verbose=False)
    df, plan = _check_set(run, gen, {0: 6, 1: 6, 2: 6, 3: 6})
    by = df.groupby(["group", "cluster"]).size().to_dict()
    assert by == {(0, 0): 4, (0, 1): 2, (1, 0): 4, (1, 1): 2, (2, 0): 6, (3, 0): 6}
    for (g, c), folder in (((0, 0), "g0-c0"), ((0, 1), "g0-c1"), ((1, 1), "g0-c1"), ((3, 0), "g3-c0")):
        pipe = StableDiffusionPipeline.from_pretrained(run.path(folders[folder]), safety_checker=None)
        row = df[(df["group"] == g) & (df["cluster"] == c)].iloc[0]
        assert row["image"] == png_of_stock_sample(pipe, row["prompt"], int(row["seed"]))
    assert Image.open(run.path(f"synthetic/{gen}/samples.png")).format == "PNG"


def test_cli_generate_with_nothing_to_generate(prepared_run, tmp_path, capsys):
    from raybias.stages.generate import run_generate

    run = make_small_run(prepared_run, tmp_path)
    cfg = gen_config(run, "unused", methods=("erm",))
    assert run_generate(cfg, run) == {}
    assert "nothing to do" in capsys.readouterr().out
