"""Stage `finetune`: one diffusion model per group (LoRA, DreamBooth) or per (group, cluster).

The stage's entry; the work is raybias/finetune/ (`runner.finetune_generators`).

One Ray Train job per model, several trainers at once, packs of jobs with
finetune.jobs_per_trainer > 1, resumable job by job (see raybias/finetune/runner.py).

Writes, per generator:
  generators/<gen>/<g>[-c<k>]/      the model (LoRA weights or a DreamBooth pipeline folder),
                                    training.json (loss per step, attempts, timings), previews
  generators/<gen>/manifest.json    the contract with `generate` (read_generator_manifest)
  generators/<gen>/samples.png      base vs. fine-tuned samples per model
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from raybias.config import ConfigError
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.finetune.runner import GeneratorPlan, plan_generator, real_train_ids, train_generators
from raybias.layout import CLUSTER_KEY, PREPARE_KEY, finetune_key, generator_dir, generator_manifest
from raybias.methods import generators_needed
from raybias.ray_utils import init_ray, require_gpus
from raybias.registry import GENERATORS, finetuned_generators
from raybias.rundir import RunDir, Stage


def finetune_generators(cfg, run: RunDir, generators: Sequence[str], mode: str = "fresh") -> Dict[str, Dict]:
    """Fine-tune several generators with one pool of jobs; returns {generator: its manifest}."""
    out: Dict[str, Dict] = {}
    pending: List[Tuple[str, GeneratorPlan, Stage]] = []
    info = None
    for gen in generators:
        if gen not in finetuned_generators():
            raise ConfigError(f"finetune: {gen!r} needs no fine-tuning (fine-tuned generators: "
                              + ", ".join(finetuned_generators()) + ")")
        # partial: finished jobs (their training.json) and a killed job's checkpoints are kept
        # when resuming the same config; anything else of the generator's is wiped first
        st = run.stage(finetune_key(gen), cfg, GENERATORS[gen].sections, mode, partial=True,
                       owns=(generator_dir(gen),), outputs=(generator_manifest(gen),),
                       needs=(PREPARE_KEY, CLUSTER_KEY) if GENERATORS[gen].clusters else (PREPARE_KEY,))
        if st.skip:
            out[gen] = run.read_json(generator_manifest(gen))
            continue
        if info is None:
            init_ray(cfg)
            require_gpus(cfg.finetune.num_gpus_per_job, "finetune (finetune.num_gpus_per_job)")
            info = DatasetInfo.load(run)
            ids = real_train_ids(run)
        plan = plan_generator(cfg, run, info, gen, ids)
        pending.append((gen, plan, st))
        run.delete(generator_manifest(gen))
    if pending:
        out.update(train_generators(cfg, run, pending))
    return out


def finetune_generator(cfg, run: RunDir, generator: str, mode: str = "fresh") -> Dict[str, Any]:
    """Fine-tune one generator's models; returns its generators/<gen>/manifest.json content."""
    return finetune_generators(cfg, run, [generator], mode)[generator]


def run_finetune(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Dict]:
    """Fine-tune every generator of `methods:` that needs it (lora, dreambooth, clustered_dreambooth)."""
    gens = [g for g in generators_needed(list(cfg.methods)) if g in finetuned_generators()]
    if not gens:
        if verbose:
            say(f"finetune: no method in `methods:` needs fine-tuning ({', '.join(finetuned_generators())})")
        return {}
    return finetune_generators(cfg, run, gens, mode)
