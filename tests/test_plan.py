"""The compact plan: a unit table from which every unit's ids, seeds and prompts are derived.

The oracle is the plan as raybias built it before (version 1: every unit's ids, seeds and
prompts listed), re-typed here from that code: the derived units must equal it bit for bit
on plans of every shape (balance modes, weighted clusters, borrowed models with negative
prompts, DDB's per-class plan, unit sizes that do and do not divide the counts).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pyarrow as pa
import pytest

from raybias.config import config_from_dict
from raybias.data.info import DatasetInfo
from raybias.generation.plan import (ModelSpec, PlanUnits, build_plan, fill_template, group_targets, image_draw,
                                     is_current, plan_signature, same_plan, split_by_weight, vanilla_models)
from raybias.generation.runner import unit_blocks, units_per_task
from raybias.generation.shards import SHARD_SCHEMA, shard_is_whole, sort_out_shards, write_shard
from raybias.layout import shards_dir
from raybias.rundir import RunDir


# --------------------------------------------------------------------------- the old expansion (oracle)

def old_units(generator: str, info: DatasetInfo, models: List[ModelSpec], *, balance: str, per_group: int,
              unit_size: int, seed: int) -> List[Dict[str, Any]]:
    """Version 1's `plan["units"]`: build_plan's loop as it was, every image listed."""
    real = {g: info.train_count(g) for g in range(info.n_groups)}
    targets = group_targets(balance, real, per_group)
    units: List[Dict[str, Any]] = []
    for g in range(info.n_groups):
        n = targets.get(g, 0)
        if n <= 0:
            continue
        group_models = sorted([m for m in models if m.group == g],
                              key=lambda m: (-1 if m.cluster is None else m.cluster, m.name))
        y, a = info.y_a(g)
        index = 0
        for m, count in zip(group_models, split_by_weight(n, [m.weight for m in group_models])):
            for start in range(0, count, unit_size):
                u = {"unit": len(units), "model": m.name, "group": g, "y": y, "a": a, "cluster": m.cluster,
                     "negative_prompt": m.negative_prompt, "ids": [], "seeds": [], "prompts": []}
                for i in range(index + start, index + min(count, start + unit_size)):
                    s, draw = image_draw(seed, generator, g, i)
                    u["ids"].append(f"{generator}-g{g}-{i:06d}")
                    u["seeds"].append(s)
                    u["prompts"].append(fill_template(m.prompt_template, member=m.members[draw % len(m.members)]))
                units.append(u)
            index += count
    return units


def old_ddb_units(manifest: Dict[str, Any], per_class: int, unit_size: int, seed: int) -> List[Dict[str, Any]]:
    """Version 1 of `build_ddb_plan`'s units."""
    units: List[Dict[str, Any]] = []
    for entry in manifest["models"]:
        c = int(entry["y"])
        members = list(entry["members"])
        for start in range(0, per_class, unit_size):
            u = {"unit": len(units), "model": entry["name"], "group": -1, "y": c, "a": -1, "cluster": None,
                 "negative_prompt": None, "ids": [], "seeds": [], "prompts": []}
            for i in range(start, min(per_class, start + unit_size)):
                s, draw = image_draw(seed, "ddb", c, i)
                u["ids"].append(f"ddb-y{c}-{i:06d}")
                u["seeds"].append(s)
                u["prompts"].append(fill_template(entry["prompt_template"], member=members[draw % len(members)]))
            units.append(u)
    return units


def _info(train=(12, 3, 5, 10)) -> DatasetInfo:
    return DatasetInfo(source="colored_digits", n_classes=2, n_bias=2, class_names=["digit<5", "digit>=5"],
                       bias_names=["red", "green"], class_words=[["zero", "one", "two", "three", "four"],
                                                                 ["five", "six", "seven", "eight", "nine"]],
                       bias_words=["red", "green"], prompt_template="a {bias} {member}", aligned=[0, 1],
                       image_size=16, severity=0.95,
                       counts={"train": {str(g): n for g, n in enumerate(train)}})


def clustered_models(info: DatasetInfo) -> List[ModelSpec]:
    """Weighted clusters, borrowed models (another group's weights, a negative prompt), one
    model per group for the rest; names chosen so that name order and cluster order differ."""
    w = info.class_words
    return [
        ModelSpec("z-g0-c0", 0, "dreambooth", "a sks red {member}", w[0], weight=0.61, cluster=0, folder="x"),
        ModelSpec("a-g0-c1", 0, "dreambooth", "a sks red {member}", w[0], weight=0.27, cluster=1, folder="y"),
        ModelSpec("m-g0-c2", 0, "dreambooth", "a sks red {member} photo", w[0][:2], weight=0.12, cluster=2,
                  folder="q"),
        ModelSpec("g1-c0", 1, "dreambooth", "a green {member}", w[0], weight=2.0, cluster=0, folder="x",
                  negative_prompt="red", borrowed_from="z-g0-c0"),
        ModelSpec("g1-c1", 1, "dreambooth", "a green {member}", w[0], weight=1.0, cluster=1, folder="y",
                  negative_prompt="red", borrowed_from="a-g0-c1"),
        ModelSpec("g2", 2, "lora", "a red {member} {unknown}", w[1], folder="z", negative_prompt="green"),
        ModelSpec("g3", 3, "lora", "a sks green {member}", w[1], folder="w"),
    ]


PLANS = [
    ("vanilla", "max_group", 0, 4, 0),
    ("vanilla", "per_group", 13, 1, 7),
    ("vanilla", "ffr", 0, 3, 2),
    ("clustered_dreambooth", "per_group", 40, 3, 0),
    ("clustered_dreambooth", "per_group", 1000, 64, 5),
    ("clustered_dreambooth", "ffr", 0, 512, 1),
    ("lora", "max_group", 0, 2, 3),
]


@pytest.mark.parametrize("generator,balance,per_group,unit_size,seed", PLANS)
def test_derived_units_equal_the_old_expansion(generator, balance, per_group, unit_size, seed):
    info = _info((120, 3, 50, 10)) if per_group == 1000 else _info()
    models = vanilla_models(info) if generator == "vanilla" else clustered_models(info)
    kwargs = dict(balance=balance, per_group=per_group, unit_size=unit_size, seed=seed)
    plan = build_plan(generator, info, models, sampling={"steps": 2}, base_model="b", **kwargs)
    want = old_units(generator, info, models, **kwargs)
    units = PlanUnits(json.loads(json.dumps(plan)))  # what a resumed run or an actor reads back
    assert plan["n_units"] == len(units) == len(want) > 0
    assert plan["n_images"] == sum(len(u["ids"]) for u in want)
    assert [units.expand(n) for n in range(len(units))] == want
    assert [units.ids(n) for n in range(len(units))] == [u["ids"] for u in want]
    assert [u["count"] for u in units] == [len(u["ids"]) for u in want]
    # the stored plan has one unit-table row per model that makes images, nothing per image
    assert len(plan["runs"]) == sum(1 for c in plan["model_counts"].values() if c > 0)
    assert "units" not in plan and is_current(plan)


def test_ddb_per_class_plan_derives_the_old_units():
    from raybias.stages.ddb import build_ddb_plan

    info = _info()
    manifest = {"models": [{"name": f"y{c}", "y": c, "prompt_template": "a {member}", "folder": "generators/ddb/cond",
                            "members": list(info.class_words[c])} for c in range(2)]}
    for per_class, unit_size, seed in ((17, 5, 0), (32, 32, 3), (1, 4, 9)):
        cfg = config_from_dict({"generate": {"unit_size": unit_size}, "ddb": {"per_class": per_class, "seed": seed}})
        plan = build_ddb_plan(cfg, info, manifest, "b")
        units = PlanUnits(plan)
        want = old_ddb_units(manifest, per_class, unit_size, seed)
        assert [units.expand(n) for n in range(len(units))] == want
        assert plan["n_images"] == 2 * per_class and len(plan["runs"]) == 2


def test_a_ten_million_image_plan_is_small_and_its_last_unit_is_derived_alone():
    info = _info((10_000_000, 0, 0, 10_000_000))
    models = clustered_models(info)
    plan = build_plan("clustered_dreambooth", info, models, balance="max_group", per_group=0, unit_size=512,
                      seed=0, sampling={}, base_model="b")
    assert plan["n_images"] == 20_000_000 and plan["n_units"] == 39_064
    assert len(json.dumps(plan)) < 10_000
    units = PlanUnits(plan)
    last = units.expand(plan["n_units"] - 1)
    # group 2's only model; ids past 999,999 keep the old format's growing width
    assert last["ids"][-1] == "clustered_dreambooth-g2-9999999" and last["group"] == 2
    assert last["seeds"][-1] == image_draw(0, "clustered_dreambooth", 2, 9_999_999)[0]
    with pytest.raises(IndexError, match="not in the plan"):
        units.unit(plan["n_units"])


def test_signature_and_same_plan_follow_what_the_shards_depend_on():
    info = _info()
    models = clustered_models(info)
    kwargs = dict(balance="per_group", per_group=20, unit_size=3, seed=0, sampling={"steps": 2}, base_model="b")
    plan = build_plan("clustered_dreambooth", info, models, **kwargs)
    again = json.loads(json.dumps(dict(plan, runtime={"device": "cpu"}, config_hash="other")))
    assert plan_signature(again) == plan_signature(plan) and same_plan(again, plan)
    for change in ({"seed": 1}, {"unit_size": 4}, {"per_group": 21}, {"sampling": {"steps": 3}}):
        other = build_plan("clustered_dreambooth", info, models, **{**kwargs, **change})
        assert plan_signature(other) != plan_signature(plan) and not same_plan(other, plan), change
    renamed = [ModelSpec(**{**m.to_dict(), "prompt_template": "a photo of {member}"}) if m.name == "g3" else m
               for m in models]
    assert not same_plan(build_plan("clustered_dreambooth", info, renamed, **kwargs), plan)
    assert not same_plan(None, plan)


def test_how_the_sampler_runs_is_not_part_of_the_plan():
    """generate.num_cpus and generate.model_cache (execution keys) keep the shards written."""
    info = _info()
    models = clustered_models(info)
    kwargs = dict(balance="per_group", per_group=20, unit_size=3, seed=0, base_model="b")
    plan = build_plan("clustered_dreambooth", info, models, sampling={"steps": 2, "num_threads": 1, "model_cache": 2},
                      **kwargs)
    for change in ({"num_threads": 2}, {"model_cache": 8}, {"num_threads": 4, "model_cache": 1}):
        other = build_plan("clustered_dreambooth", info, models,
                           sampling={"steps": 2, "num_threads": 1, "model_cache": 2, **change}, **kwargs)
        assert plan_signature(other) == plan_signature(plan) and same_plan(plan, other), change
    for change in ({"steps": 3}, {"image_quality": 80}):
        other = build_plan("clustered_dreambooth", info, models,
                           sampling={"steps": 2, "num_threads": 1, "model_cache": 2, **change}, **kwargs)
        assert not same_plan(plan, other), change


def test_a_version_1_plan_on_disk_keeps_its_shards_when_it_is_the_same_plan():
    info = _info()
    models = clustered_models(info)
    kwargs = dict(balance="ffr", per_group=0, unit_size=2, seed=4)
    new = build_plan("clustered_dreambooth", info, models, sampling={"steps": 2}, base_model="b", **kwargs)
    legacy = {k: new[k] for k in ("generator", "base", "config_hash", "balance", "seed", "unit_size", "real_counts",
                                  "group_counts", "cluster_counts", "model_counts", "models", "sampling",
                                  "n_images")}
    legacy.update(version=1, units=old_units("clustered_dreambooth", info, models, **kwargs))
    legacy = json.loads(json.dumps(legacy))
    assert not is_current(legacy) and same_plan(legacy, new)
    legacy["units"][3]["seeds"][0] += 1
    assert not same_plan(legacy, new)
    legacy["units"][3]["seeds"][0] -= 1
    legacy["units"].pop()
    assert not same_plan(legacy, new)


# --------------------------------------------------------------------------- dealing units to actors

def test_blocks_hold_consecutive_units_of_one_model_and_enough_for_every_actor():
    info = _info()
    plan = build_plan("clustered_dreambooth", info, clustered_models(info), balance="per_group", per_group=40,
                      unit_size=3, seed=0, sampling={}, base_model="b")
    units = PlanUnits(plan)
    todo = [n for n in range(len(units)) if n % 7 != 3]  # a resume: some units are done
    for per_task in (1, 2, 5, 100):
        blocks = unit_blocks(units, todo, per_task)
        assert [n for b in blocks for n in b] == todo
        for b in blocks:
            assert 1 <= len(b) <= per_task and len({units.model_of(n) for n in b}) == 1
        # a block ends only where its model ends or it is full
        for b, nxt in zip(blocks, blocks[1:]):
            assert len(b) == per_task or units.model_of(b[-1]) != units.model_of(nxt[0])
    assert units_per_task(20_000, 8, 512) == 8  # at most TASK_IMAGES images a task
    assert units_per_task(100, 2, 4) == 12  # at least 4 tasks an actor
    assert units_per_task(3, 4, 1) == 1


# --------------------------------------------------------------------------- resume's scan of the shards

class CountingRun(RunDir):
    """A real RunDir that counts its directory listings."""

    listings = 0

    def listdir(self, *parts):
        CountingRun.listings += 1
        return super().listdir(*parts)


def _shard(gen: str, unit: Dict[str, Any]) -> pa.Table:
    n = len(unit["ids"])
    return pa.table({"id": unit["ids"], "image": [b"x"] * n, "y": [unit["y"]] * n, "a": [unit["a"]] * n,
                     "group": [unit["group"]] * n, "split": ["train"] * n, "source": [gen] * n,
                     "seed": unit["seeds"], "prompt": unit["prompts"], "negative_prompt": [None] * n,
                     "cluster": [unit["cluster"]] * n, "generator": [gen] * n}, schema=SHARD_SCHEMA)


def test_sort_out_shards_lists_once_and_checks_ids_against_the_derived_units(tmp_path):
    info = _info()
    gen = "vanilla"
    plan = build_plan(gen, info, vanilla_models(info), balance="per_group", per_group=7, unit_size=3, seed=0,
                      sampling={}, base_model="b")
    units = PlanUnits(plan)
    run = CountingRun(str(tmp_path / "run"))
    for n in range(len(units)):
        write_shard(run, gen, n, _shard(gen, units.expand(n)))
    folder = tmp_path / "run" / shards_dir(gen)
    wrong = units.expand(4)
    wrong["ids"] = list(reversed(wrong["ids"]))  # same ids, wrong order: not this unit's shard
    write_shard(run, gen, 4, _shard(gen, wrong))
    short = units.expand(6)
    write_shard(run, gen, 6, _shard(gen, {**short, **{k: short[k][:-1] for k in ("ids", "seeds", "prompts")}}))
    (folder / "unit-00002.parquet").write_bytes((folder / "unit-00002.parquet").read_bytes()[:200])
    write_shard(run, gen, len(units) + 3, _shard(gen, units.expand(0)))  # a unit the plan has not
    (folder / ".tmp-0123-unit-00001.parquet").write_bytes(b"half")
    CountingRun.listings = 0
    whole, broken = sort_out_shards(run, gen, plan)
    assert CountingRun.listings == 1
    assert broken == [2, 4, 6] and whole == [n for n in range(len(units)) if n not in (2, 4, 6)]
    assert sorted(p.name for p in folder.iterdir()) == [f"unit-{n:05d}.parquet" for n in whole]
    assert shard_is_whole(run, gen, 0, units.ids(0)) and not shard_is_whole(run, gen, 0, units.ids(1))
