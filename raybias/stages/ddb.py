"""Stage `ddb`: Diffusing DeBias' bias amplifier (Ciranni et al., NeurIPS 2025).

Three recorded, resumable steps, none of which reads a bias label:

`ddb/model`      a class-conditional diffusion model with classifier-free guidance, trained on
                 the biased training set: the one fine-tuning loop (raybias.finetune, one
                 Ray Train job, full UNet like DreamBooth, no prior preservation) on the base
                 backbone, with per-image prompts "a {member}" naming the image's class only
                 (a member word of class y, drawn per image from y alone) and the prompt dropped
                 (empty) with probability ddb.cond_drop. Steps, batch, lr: ddb.*; cpus/gpus,
                 checkpointing, failures: finetune.*. A killed job resumes from its checkpoint.
                 Writes generators/ddb/cond/ (diffusers folder, training.json) and
                 generators/ddb/manifest.json (the generators/<gen>/manifest.json format: one
                 `ModelEntry` per class, bias unknown, kind dreambooth, all sharing the folder).
`ddb/generate`   ddb.per_class bias-ALIGNED images per class: the model prompted with the class
                 alone reproduces the training set's dominant bias. Its plan (`build_ddb_plan`)
                 is made by the generate stage's own path (`open_set`, `make_set`: the sampler
                 actor pool, shards, resume), CFG weight ddb.guidance, ddb.sample_steps steps;
                 shards in synthetic/ddb/ in the usual layout, with a = -1 and group = -1 ("bias unknown": DDB never
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
from dataclasses import replace
from typing import Any, Dict, List

from raybias.config import config_hash
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.layout import (DDB, DDB_AMPLIFIER_KEY, DDB_AMPLIFIER_MODEL, DDB_AMPLIFIER_OUTPUTS, DDB_CONFLICT_JSON,
                            DDB_GENERATE_KEY, DDB_MANIFEST, PREPARE_KEY, DDB_MODEL_DIR, DDB_MODEL_KEY, DDB_MODEL_NAME,
                            classifier_model, generator_dir, synthetic_samples, training_json)
from raybias.rundir import RunDir

PROMPT = "a {member}"

MODEL_SECTIONS = ("data", "base", "ddb")
GENERATE_SECTIONS = MODEL_SECTIONS + ("generate",)
AMPLIFIER_SECTIONS = GENERATE_SECTIONS + ("train",)
# Keys of the `ddb` section that only the recipes' classifier training reads: changing one
# retrains the recipes, not the diffusion model, its set or the amplifier.
RECIPE_KEYS = ("ddb.lff_ema", "ddb.lff_min_weight")


def class_prompts(ids: List[str], ys: List[int], info: DatasetInfo, seed: int) -> List[str]:
    """Per-image prompts naming the class only: a member word of class y, drawn per image."""
    from raybias.finetune.spec import member_for

    return [PROMPT.format(member=member_for(i, info.class_words[int(y)], seed)) for i, y in zip(ids, ys)]


def ddb_spec(cfg, run: RunDir):
    """The fine-tuning spec of DDB's model: a DreamBooth job's, with DDB's own values (ddb.*)."""
    from raybias.finetune.spec import finetune_spec

    d = cfg.ddb
    return replace(finetune_spec(cfg, run, "dreambooth"), steps=int(d.steps), batch_size=int(d.batch_size),
                   lr=float(d.lr), seed=int(d.seed), cond_drop=float(d.cond_drop), prior_preservation=False,
                   n_samples=0, checkpoint_every=max(1, min(int(cfg.finetune.checkpoint_every), int(d.steps))))


def train_model(cfg, run: RunDir, info: DatasetInfo, mode: str) -> Dict[str, Any]:
    """`ddb/model`: the class-conditional CFG diffusion model (see the module docstring)."""
    from raybias.classify.data import real_sets
    from raybias.finetune.runner import run_job
    from raybias.finetune.spec import FinetuneJob, ModelEntry
    from raybias.ray_utils import require_gpus

    # partial: the job's checkpoints resume a killed training of the same config
    st = run.stage(DDB_MODEL_KEY, cfg, MODEL_SECTIONS, mode, exclude=RECIPE_KEYS, partial=True,
                   owns=(generator_dir(DDB),), outputs=(DDB_MANIFEST, training_json(DDB, DDB_MODEL_NAME)),
                   needs=(PREPARE_KEY,))
    if st.skip:
        return run.read_json(DDB_MANIFEST)
    require_gpus(cfg.finetune.num_gpus_per_job, "ddb (finetune.num_gpus_per_job)")
    train = real_sets(run)["train"].meta  # id and y only are used
    ids = train["id"].astype(str).tolist()
    ys = [int(v) for v in train["y"]]
    members = [info.class_words[c][0] for c in range(info.n_classes)]
    job = FinetuneJob(name=DDB_MODEL_NAME, generator=DDB, kind="dreambooth", group=None, cluster=None,
                      prompt_template=PROMPT, members=members, ids=ids,
                      prompts=class_prompts(ids, ys, info, int(cfg.ddb.seed)))
    spec = ddb_spec(cfg, run)
    record = run_job(cfg, run, job, spec)
    manifest = {
        "generator": DDB, "base": cfg.base.model, "base_resolved": spec.base, "identifier": None,
        "conditioning": "class-only prompts, classifier-free guidance", "cond_drop": float(cfg.ddb.cond_drop),
        "models": [ModelEntry(name=f"y{c}", y=c, bias=None, group=None, kind="dreambooth", folder=DDB_MODEL_DIR,
                              prompt_template=PROMPT, members=list(info.class_words[c]),
                              n_images=int(sum(1 for y in ys if y == c)), steps=int(record["steps"]),
                              final_loss=float(record["final_loss"])).to_dict() for c in range(info.n_classes)],
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
    """`ddb/generate`: the bias-aligned synthetic set through the generate stage's path."""
    from raybias.diffusion.backbone import resolve_base_model
    from raybias.generation.runner import sample_grid
    from raybias.stages.generate import make_set, open_set

    st, old = open_set(cfg, run, DDB, DDB_GENERATE_KEY, GENERATE_SECTIONS, mode, needs=(DDB_MODEL_KEY,),
                       exclude=RECIPE_KEYS)
    if st.skip:
        return st.record_info
    plan = build_ddb_plan(cfg, info, manifest, resolve_base_model(cfg, run))

    def grid(p: Dict[str, Any]):  # rows by class: DDB's units carry no group
        return sample_grid(run, dict(p, runs=[dict(r, group=r["y"]) for r in p["runs"]]), _ClassLabels(info),
                           synthetic_samples(DDB))

    record, _, _ = make_set(cfg, run, st, old, plan, what="ddb generation",
                            gpus_for="ddb generation (generate.num_gpus)", grid=grid, verbose=False, progress=True,
                            desc="ddb bias-aligned set")
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
