"""Stage `generate`: the group-balanced synthetic set of every generator in `methods:`.

For each generator (vanilla, lora, dreambooth, clustered_dreambooth) `generate_set` builds
the plan (`raybias.generation.plan`), saves it as `synthetic/<gen>/plan.json`, and runs the
unfinished work units through a Ray Data actor pool of `SamplerActor`s, each of which
writes its unit's shard `synthetic/<gen>/shards/unit-NNNNN.parquet` atomically. The stage
key is `generate/<gen>`; a unit's shard is its record, and the stage's record lists the
units once, when it finishes. The plan is a unit table, not a list of images (see
`raybias.generation.plan`), so it costs the same for ten images as for ten million.

Modes: `fresh` deletes the generator's synthetic folder and makes everything; `resume` and
`auto` keep every shard that reads whole with the planned ids (a shard of a crashed run
is never half there: see `raybias.generation.shards`) and make the rest, so the set ends
with exactly the planned images, none twice. A config change (auto) starts afresh.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from raybias.config import config_hash
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.diffusion.backbone import resolve_base_model
from raybias.generation.plan import build_plan, describe_plan, is_current, load_plan, models_for, same_plan, save_plan
from raybias.generation.runner import missing_units, run_units, sample_grid, sampling_settings, unit_key
from raybias.generation.shards import sort_out_shards
from raybias.layout import PREPARE_KEY, finetune_key, generate_key, generator_dir, scores_path, synthetic_dir, synthetic_samples
from raybias.methods import generate_sections, generators_needed
from raybias.ray_utils import init_ray, require_gpus
from raybias.registry import GENERATORS, finetuned_generators
from raybias.rundir import RunDir, Stage, StageFailed

log = logging.getLogger("raybias.generation")


def open_set(cfg, run: RunDir, generator: str, key: str, sections: Sequence[str], mode: str, *,
             needs: Sequence[str], exclude: Sequence[str] = ()) -> Tuple[Stage, Optional[Dict[str, Any]]]:
    """Begin the stage `key` of `generator`'s synthetic set: (the stage, the plan an earlier run
    saved, or None). Partial: a resumed (or damaged) set keeps every shard that reads whole
    with its planned ids; the set is whole when every planned shard reads whole."""
    plan = load_plan(run, generator)

    def shards_whole() -> Optional[str]:
        # A unit's shard is its record: the set is whole when every planned shard reads whole.
        if not is_current(plan):  # missing, or an earlier raybias's (same_plan below may keep its shards)
            return "its plan is missing" if plan is None else "its plan is in an earlier raybias's form"
        whole, _ = sort_out_shards(run, generator, plan)
        missing = plan["n_units"] - len(whole)
        return f"{missing} of its {plan['n_units']} shards are missing or broken" if missing else None

    st = run.stage(key, cfg, sections, mode, exclude=exclude, owns=(synthetic_dir(generator),), partial=True,
                   verify=shards_whole, needs=needs)
    return st, plan


def make_set(cfg, run: RunDir, st: Stage, old: Optional[Dict[str, Any]], plan: Dict[str, Any], *, what: str,
             gpus_for: str, grid: Callable[[Dict[str, Any]], Optional[str]], verbose: bool = True,
             progress: bool = True, lines: Sequence[str] = (), desc: Optional[str] = None
             ) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str]]:
    """Make the units of `plan` that have no whole shard yet, through the sampler actor pool, and
    finish the stage `st` (opened by `open_set`, not skipped); `old` is the plan saved before.

    Returns (the stage's record, the runtime facts of the units made now, the sample grid's
    path). `what` names the set in errors, `gpus_for` in the GPU check; with `verbose` the
    `lines` (the plan) and the resume count are said; `grid(plan)` draws the sample grid."""
    generator = plan["generator"]
    if st.resumable and not same_plan(old, plan):
        # the same config over other inputs (a re-run fine-tune, another data description)
        run.delete(synthetic_dir(generator))
    save_plan(run, plan)
    # A unit's shard is its record: finishing one costs no manifest write (a rewrite per unit
    # was quadratic over a stage), and resume reads the shards' footers (sort_out_shards).
    whole, broken = sort_out_shards(run, generator, plan)
    done = set(whole)
    todo = [n for n in range(plan["n_units"]) if n not in done]
    if verbose:
        for line in lines:
            say(line)
        if done:
            say(f"resuming: {len(done)} of {plan['n_units']} units already whole"
                + (f", {len(broken)} broken shard(s) redone" if broken else ""))
    g = cfg.generate
    facts: Dict[str, Any] = {}
    if todo:
        # scores of an older set would silently filter the new one
        run.delete(scores_path(generator))
        init_ray(cfg)
        require_gpus(g.num_gpus, gpus_for)
        facts = run_units(run, plan, todo, base_model=plan["base"], base_revision=cfg.base.revision,
                          concurrency=g.concurrency, num_gpus=g.num_gpus, num_cpus=g.num_cpus,
                          progress=progress, desc=desc, allow_pickle=cfg.base.allow_pickle,
                          model_cache_gb=g.model_cache_gb)
    left = missing_units(run, generator, plan)
    if left:
        raise StageFailed(f"{what}: {len(left)} planned unit(s) have no shard "
                          f"(e.g. {unit_key(left[0])}); rerun with --resume")
    if facts:
        plan["runtime"] = {k: facts[k] for k in ("attention", "device", "dtype") if k in facts}
        save_plan(run, plan)
    drawn = grid(plan) if plan["n_units"] else None
    record = {"n_images": plan["n_images"], "units": plan["n_units"],
              "made_now": facts.get("images", 0), "images_per_s": round(facts.get("images_per_s", 0.0), 3),
              **plan.get("runtime", {})}
    st.finish(record, units=[unit_key(n) for n in range(plan["n_units"])])
    return record, facts, drawn


def generate_set(cfg, run: RunDir, generator: str, mode: str = "fresh", *, verbose: bool = True,
                 sections: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Make (or finish) `generator`'s synthetic set; returns a summary (counts, images/s, paths)."""
    sections = tuple(sections or generate_sections(generator))
    needs = (PREPARE_KEY, finetune_key(generator)) if generator in finetuned_generators() else (PREPARE_KEY,)
    st, plan = open_set(cfg, run, generator, generate_key(generator), sections, mode, needs=needs)
    if st.skip:
        if verbose:
            say(f"generate {generator}: finished earlier ({plan['n_images']} images), skipped")
        return _summary(run, generator, plan, st.record_info)

    g = cfg.generate
    info = DatasetInfo.load(run)
    manifest_base, models = models_for(run, generator, info, g.negative_prompt)
    base_model = resolve_base_model(cfg, run)
    if manifest_base and manifest_base not in (cfg.base.model, base_model):
        log.warning("%s was fine-tuned from %r; sampling with base.model=%r",
                    generator_dir(generator), manifest_base, base_model)
    new_plan = build_plan(generator, info, models, balance=g.balance, per_group=g.per_group,
                          unit_size=g.unit_size, seed=g.seed, sampling=sampling_settings(g),
                          base_model=base_model, config_hash=config_hash(cfg, sections))
    record, facts, grid = make_set(
        cfg, run, st, plan, new_plan, what=f"generate {generator}", gpus_for=f"generate ({generator})",
        grid=lambda p: sample_grid(run, p, info, synthetic_samples(generator)), verbose=verbose, progress=verbose,
        lines=(f"generate {generator}: plan ({g.balance})", describe_plan(new_plan, info)) if verbose else ())
    if verbose:
        rate = f" at {facts['images_per_s']:.2f} images/s" if facts.get("images") else ""
        say(f"generate {generator}: {new_plan['n_images']} images in {run.path(synthetic_dir(generator))}{rate}"
            + (f"; samples: {grid}" if grid else ""))
    return _summary(run, generator, new_plan, record)


def _summary(run: RunDir, generator: str, plan: Dict[str, Any], record: Dict[str, Any]) -> Dict[str, Any]:
    return {"generator": generator, "n_images": plan["n_images"], "units": plan["n_units"],
            "group_counts": {int(k): v for k, v in plan["group_counts"].items()},
            "path": run.path(synthetic_dir(generator)), **record}


def run_generate(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Dict[str, Any]]:
    """`raybias generate`: every text-to-image generator named in `methods:`."""
    generators = [g for g in generators_needed(list(cfg.methods)) if g in GENERATORS]
    if not generators:
        if verbose:
            say(f"generate: no generator in methods ({', '.join(GENERATORS)}); nothing to do")
        return {}
    return {gen: generate_set(cfg, run, gen, mode, verbose=verbose) for gen in generators}
