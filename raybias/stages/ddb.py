"""Stage `ddb`: Diffusing DeBias' bias amplifier (Ciranni et al., NeurIPS 2025).

Three recorded, resumable steps, none of which reads a bias label:

`ddb/model`      a class-conditional diffusion model with classifier-free guidance, trained on
                 the biased training set: the one fine-tuning loop (raybias.diffusion.finetune,
                 a Ray Train job, full UNet like DreamBooth, no prior preservation) on the base
                 backbone, with per-image prompts "a {member}" naming the image's class only
                 (a member word of class y, drawn per image from y alone) and the prompt dropped
                 (empty) with probability ddb.cond_drop. Steps, batch, lr: ddb.*; cpus/gpus,
                 checkpointing, failures: finetune.*. A killed job resumes from its checkpoint.
                 Writes generators/ddb/cond/ (diffusers folder, training.json) and
                 generators/ddb/manifest.json (the generators/<gen>/manifest.json format: one
                 model entry per class, group -1, kind dreambooth, all sharing the folder).
`ddb/generate`   ddb.per_class bias-ALIGNED images per class: the model prompted with the class
                 alone reproduces the training set's dominant bias. The generation path's plan
                 units go through its Ray Data actor pool (raybias.generation.runner.run_units),
                 CFG weight ddb.guidance, ddb.sample_steps steps; shards in synthetic/ddb/ in
                 the usual layout, with a = -1 and group = -1 ("bias unknown": DDB never
                 labels the bias); whole shards are kept on --resume.
`ddb/amplifier`  the bias amplifier: a classifier of the train.model family trained by the
                 classifier loop (hook `ddb_amplifier`, GCE with q = ddb.lff_q,
                 ddb.amplifier_epochs epochs) on the synthetic set only; its predictions and
                 CE on the real train and val images go to generators/ddb/amplifier/outputs.parquet,
                 which `ddb_recipe1` / `ddb_recipe2` read. conflict.json holds the precision and
                 recall of its pseudo bias-conflicting set against the true one (evaluation only).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

from raybias.config import config_hash
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.layout import (DDB, DDB_AMPLIFIER_KEY, DDB_AMPLIFIER_MODEL, DDB_AMPLIFIER_OUTPUTS, DDB_CONFLICT_JSON,
                            DDB_GENERATE_KEY, DDB_MANIFEST, PREPARE_KEY, DDB_MODEL_DIR, DDB_MODEL_KEY, DDB_MODEL_NAME,
                            TRAINING_JSON, classifier_model, generator_dir, synthetic_dir, synthetic_samples)
from raybias.rundir import RunDir, StageFailed

PROMPT = "a {member}"

MODEL_SECTIONS = ("data", "base", "ddb")
GENERATE_SECTIONS = MODEL_SECTIONS + ("generate",)
AMPLIFIER_SECTIONS = GENERATE_SECTIONS + ("train",)
# Keys of the `ddb` section that only the recipes' classifier training reads: changing one
# retrains the recipes, not the diffusion model, its set or the amplifier.
RECIPE_KEYS = ("ddb.lff_ema", "ddb.lff_min_weight")


def class_prompts(ids: List[str], ys: List[int], info: DatasetInfo, seed: int) -> List[str]:
    """Per-image prompts naming the class only: a member word of class y, drawn per image."""
    from raybias.diffusion.finetune import member_for

    return [PROMPT.format(member=member_for(i, info.class_words[int(y)], seed)) for i, y in zip(ids, ys)]


def _ddb_finetune_dict(cfg, run: RunDir) -> Dict[str, Any]:
    from raybias.stages.finetune import _base_model, _finetune_dict

    base, base_folder = _base_model(cfg, run)
    ft = _finetune_dict(cfg, run, base, base_folder)
    d = cfg.ddb
    ft.update(steps=int(d.steps), batch_size=int(d.batch_size), dreambooth_lr=float(d.lr), seed=int(d.seed),
              cond_drop=float(d.cond_drop), prior_preservation=False, n_samples=0,
              checkpoint_every=max(1, min(int(cfg.finetune.checkpoint_every), int(d.steps))))
    return ft


def train_model(cfg, run: RunDir, info: DatasetInfo, mode: str) -> Dict[str, Any]:
    """`ddb/model`: the class-conditional CFG diffusion model (see the module docstring)."""
    from raybias.classify.data import real_sets
    from raybias.diffusion.finetune import JobSpec
    from raybias.ray_utils import require_gpus
    from raybias.stages.finetune import _run_job

    # partial: the job's checkpoints resume a killed training of the same config
    st = run.stage(DDB_MODEL_KEY, cfg, MODEL_SECTIONS, mode, exclude=RECIPE_KEYS, partial=True,
                   owns=(generator_dir(DDB),), outputs=(DDB_MANIFEST, f"{DDB_MODEL_DIR}/{TRAINING_JSON}"),
                   needs=(PREPARE_KEY,))
    if st.skip:
        return run.read_json(DDB_MANIFEST)
    require_gpus(cfg.finetune.num_gpus_per_job, "ddb (finetune.num_gpus_per_job)")
    train = real_sets(run)["train"].meta  # id and y only are used
    ids = train["id"].astype(str).tolist()
    ys = [int(v) for v in train["y"]]
    members = [info.class_words[c][0] for c in range(info.n_classes)]
    job = JobSpec(name=DDB_MODEL_NAME, generator=DDB, kind="dreambooth", group=-1, cluster=None,
                  prompt_template=PROMPT, members=members, ids=ids,
                  prompts=class_prompts(ids, ys, info, int(cfg.ddb.seed)))
    ft = _ddb_finetune_dict(cfg, run)
    record = _run_job(cfg, run, job, ft, None)
    manifest = {
        "generator": DDB, "base": cfg.base.model, "base_resolved": ft["base"], "identifier": None,
        "conditioning": "class-only prompts, classifier-free guidance", "cond_drop": float(cfg.ddb.cond_drop),
        "models": [{"name": f"y{c}", "group": -1, "y": c, "cluster": None, "weight": 1.0, "kind": "dreambooth",
                    "folder": DDB_MODEL_DIR, "prompt_template": PROMPT, "members": list(info.class_words[c]),
                    "negative_prompt": None, "n_images": int(sum(1 for y in ys if y == c)),
                    "group_images": None, "borrowed_from": None, "steps": int(record["steps"]),
                    "final_loss": float(record["final_loss"])} for c in range(info.n_classes)],
    }
    run.write_json(DDB_MANIFEST, manifest)
    st.finish(info={"steps": int(record["steps"]), "final_loss": float(record["final_loss"]),
                    "wall_seconds": record.get("wall_seconds"), "seconds_per_step": record.get("seconds_per_step")})
    return manifest


def build_ddb_plan(cfg, info: DatasetInfo, manifest: Dict[str, Any], base_model: str) -> Dict[str, Any]:
    """The generation plan: ddb.per_class images per class, class-only prompts, a = group = -1.

    Its unit table has one row per class; image i of class c is `ddb-y<c>-<i>`, its seed and
    member drawn by `image_draw(ddb.seed, "ddb", c, i)`."""
    from raybias.generation.plan import PLAN_VERSION, ModelSpec, unit_run
    from raybias.generation.runner import sampling_settings

    g, d = cfg.generate, cfg.ddb
    sampling = sampling_settings(g)
    sampling.update(guidance=float(d.guidance), steps=int(d.sample_steps))
    models = {}
    runs: List[Dict[str, Any]] = []
    n_units = 0
    for entry in manifest["models"]:
        c = int(entry["y"])
        spec = ModelSpec(name=entry["name"], group=-1, kind="dreambooth", prompt_template=entry["prompt_template"],
                         members=list(entry["members"]), folder=entry["folder"])
        models[spec.name] = spec.to_dict()
        n = int(d.per_class)
        if n > 0:
            runs.append(unit_run(spec, group=-1, y=c, a=-1, draw_group=c, id_stem=f"{DDB}-y{c}-", first_index=0,
                                 count=n, first_unit=n_units, unit_size=int(g.unit_size)))
            n_units += runs[-1]["n_units"]
    return {"version": PLAN_VERSION, "generator": DDB, "base": base_model,
            "config_hash": config_hash(cfg, GENERATE_SECTIONS), "balance": "per_class", "seed": int(d.seed),
            "unit_size": int(g.unit_size), "class_counts": {str(c): int(d.per_class) for c in range(info.n_classes)},
            "models": models, "sampling": sampling, "n_images": sum(r["count"] for r in runs), "n_units": n_units,
            "runs": runs}


class _ClassLabels:
    """Row titles of the sample grid: the class (DDB's units carry no group)."""

    def __init__(self, info: DatasetInfo):
        self.info = info

    def group_name(self, y: int) -> str:
        return f"class {self.info.class_names[y]}"


def generate_aligned(cfg, run: RunDir, info: DatasetInfo, manifest: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """`ddb/generate`: the bias-aligned synthetic set through the generation path."""
    from raybias.diffusion.backbone import resolve_base_model
    from raybias.generation.plan import is_current, load_plan, same_plan, save_plan
    from raybias.generation.runner import missing_units, run_units, sample_grid, unit_key
    from raybias.generation.shards import sort_out_shards
    from raybias.ray_utils import require_gpus

    old = load_plan(run, DDB)
    plan = build_ddb_plan(cfg, info, manifest, resolve_base_model(cfg, run))

    def shards_whole():
        if not is_current(old):  # missing, or an earlier raybias's (same_plan below may keep its shards)
            return "its plan is missing" if old is None else "its plan is in an earlier raybias's form"
        left = missing_units(run, DDB, old)
        return f"{len(left)} of its {old['n_units']} shards are missing or broken" if left else None

    st = run.stage(DDB_GENERATE_KEY, cfg, GENERATE_SECTIONS, mode, exclude=RECIPE_KEYS, partial=True,
                   owns=(synthetic_dir(DDB),), verify=shards_whole, needs=(DDB_MODEL_KEY,))
    if st.skip:
        return st.record_info
    if st.resumable and not same_plan(old, plan):
        run.delete(synthetic_dir(DDB))
    save_plan(run, plan)
    whole, _ = sort_out_shards(run, DDB, plan)  # the shards are the units' record
    done = set(whole)
    todo = [n for n in range(plan["n_units"]) if n not in done]
    g = cfg.generate
    facts: Dict[str, Any] = {}
    if todo:
        require_gpus(g.num_gpus, "ddb generation (generate.num_gpus)")
        facts = run_units(run, plan, todo, base_model=plan["base"], base_revision=cfg.base.revision,
                          concurrency=g.concurrency, num_gpus=g.num_gpus, num_cpus=g.num_cpus,
                          desc="ddb bias-aligned set", allow_pickle=cfg.base.allow_pickle)
    left = missing_units(run, DDB, plan)
    if left:
        raise StageFailed(f"ddb generation: {len(left)} planned unit(s) have no shard (e.g. {unit_key(left[0])}); "
                          "rerun with --resume")
    shown = dict(plan, runs=[dict(r, group=r["y"]) for r in plan["runs"]])
    sample_grid(run, shown, _ClassLabels(info), synthetic_samples(DDB))
    record = {"n_images": plan["n_images"], "units": plan["n_units"], "made_now": facts.get("images", 0),
              "images_per_s": round(facts.get("images_per_s", 0.0), 3)}
    st.finish(record, units=[unit_key(n) for n in range(plan["n_units"])])
    return record


def train_amplifier(cfg, run: RunDir, info: DatasetInfo, mode: str) -> Dict[str, Any]:
    """`ddb/amplifier`: classifier on the synthetic set only, then its outputs on the real images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybias.classify.data import real_sets
    from raybias.classify.ddb import amplifier_outputs, conflict_scores
    from raybias.classify.runner import train_classifier

    st = run.stage(DDB_AMPLIFIER_KEY, cfg, AMPLIFIER_SECTIONS, mode, exclude=RECIPE_KEYS,
                   outputs=(DDB_CONFLICT_JSON, DDB_AMPLIFIER_OUTPUTS),
                   owns=(DDB_CONFLICT_JSON, DDB_AMPLIFIER_OUTPUTS, DDB_AMPLIFIER_MODEL), needs=(DDB_GENERATE_KEY,))
    if st.skip:
        return run.read_json(DDB_CONFLICT_JSON)
    amp = cfg.copy()
    amp.train.epochs = int(cfg.ddb.amplifier_epochs)
    seed = int(cfg.ddb.seed)
    record = train_classifier(amp, run, "ddb_amplifier", seed, "fresh" if mode == "fresh" else "auto")
    model = run.read_bytes(classifier_model("ddb_amplifier", seed))
    run.write_bytes(DDB_AMPLIFIER_MODEL, model)
    outputs = amplifier_outputs(run, model, int(info.image_size), max(1, int(cfg.train.cpus_per_worker)))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(outputs, preserve_index=False), buf)
    run.write_bytes(DDB_AMPLIFIER_OUTPUTS, buf.getvalue().to_pybytes())
    # evaluation only: how well the pseudo split matches the true (bias-labelled) one
    scores = conflict_scores(outputs, real_sets(run)["train"].meta, info)
    scores["amplifier_synthetic_epochs"] = int(cfg.ddb.amplifier_epochs)
    scores["amplifier_test_acc"] = record["test"].get("acc")
    run.write_json(DDB_CONFLICT_JSON, scores)
    st.finish(scores)
    return scores


def run_ddb(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Any]:
    """`raybias ddb`: diffusion model -> bias-aligned set -> bias amplifier and its outputs."""
    from raybias.ray_utils import init_ray

    init_ray(cfg)
    info = DatasetInfo.load(run)
    times: Dict[str, float] = {}  # parts that ran now: seconds
    done_earlier: List[str] = []

    def part(name: str, key: str, fn, *args):
        finished = (run.stage_record(key) or {}).get("finished_at")
        t0 = time.time()
        out = fn(*args)
        rec = run.stage_record(key) or {}
        if rec.get("done") and rec.get("finished_at") == finished:  # skipped: finished by an earlier run
            done_earlier.append(name)
        else:
            times[name] = time.time() - t0
        return out

    manifest = part("model", DDB_MODEL_KEY, train_model, cfg, run, info, mode)
    gen = part("generate", DDB_GENERATE_KEY, generate_aligned, cfg, run, info, manifest, mode)
    scores = part("amplifier", DDB_AMPLIFIER_KEY, train_amplifier, cfg, run, info, mode)
    took = [f"{k} {v:.0f}s" for k, v in times.items()] + ([f"{', '.join(done_earlier)} done earlier"]
                                                          if done_earlier else [])
    if verbose:
        say(f"ddb: {gen.get('n_images')} bias-aligned images; amplifier's pseudo-conflicting set: precision "
            f"{scores.get('conflicting_precision')}, recall {scores.get('conflicting_recall')} "
            f"({scores.get('n_pseudo_conflicting')} flagged of {scores.get('n_train')}); " + "; ".join(took),
            flush=True)
    return {"generate": gen, "amplifier": scores, "seconds": times, "done_earlier": done_earlier}
