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

from typing import Dict

from raybias.console import say
from raybias.finetune.runner import finetune_generators
from raybias.methods import generators_needed
from raybias.registry import finetuned_generators
from raybias.rundir import RunDir


def run_finetune(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Dict]:
    """Fine-tune every generator of `methods:` that needs it (lora, dreambooth, clustered_dreambooth)."""
    gens = [g for g in generators_needed(list(cfg.methods)) if g in finetuned_generators()]
    if not gens:
        if verbose:
            say(f"finetune: no method in `methods:` needs fine-tuning ({', '.join(finetuned_generators())})")
        return {}
    return finetune_generators(cfg, run, gens, mode)
