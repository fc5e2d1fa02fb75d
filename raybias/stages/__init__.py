"""The stage table: every command that works on a run directory, once, in pipeline order.

The CLI builds its sub-commands from it, `raybias run` (stages/pipeline.py) and a sweep's
shared work (stages/sweep.py) walk it, and a Ray job's `--entry` is checked against it
(raybias/submit.py). Every stage module (raybias/stages/<name>.py, but `run`: pipeline.py) has
one entry of one signature,

    run_<stage>(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True)

(`mode`: fresh | resume | auto, see raybias/rundir.py; `verbose`: print the stage's progress and
summary on the terminal). The modules are imported only when a stage runs, so reading the table
costs no torch or Ray import (`raybias --help`, `raybias submit`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from raybias.methods import generators_needed
from raybias.registry import GENERATORS


@dataclass(frozen=True)
class StageSpec:
    """A stage as the table describes it (a stage running in a run directory is
    raybias.rundir's Stage)."""

    name: str
    help: str
    # What `raybias run` runs as this stage, when it differs from the entry (same signature):
    # the command `raybias train` trains train.method, `raybias run` every `methods:` entry.
    step: Optional[str] = None
    # Work that depends on no method, ratio or seed: a sweep does it once per severity
    # (train and report are the trials' and the sweep report's).
    shared: bool = True
    # A command that runs other stages (run, sweep): it checks them itself, and without
    # --resume it skips what is finished with the same config (mode auto), like make.
    chain: bool = False
    module: str = ""  # "": raybias.stages.<name>
    entry: str = ""  # the function `raybias <name>` runs; "": run_<name>

    def __post_init__(self):
        object.__setattr__(self, "module", self.module or f"raybias.stages.{self.name}")
        object.__setattr__(self, "entry", self.entry or f"run_{self.name}")

    def function(self, name: str) -> Callable:
        return getattr(importlib.import_module(self.module), name)

    def command(self) -> Callable:
        """What `raybias <name>` runs."""
        return self.function(self.entry)

    def pipeline_step(self) -> Callable:
        """What `raybias run` (and a sweep's shared work) runs as this stage."""
        return self.function(self.step or self.entry)


STAGES: Dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prepare", "read the data source, apply bias severity, write data/real/ and print group counts"),
    StageSpec("base", "build the embedded text-to-image backbone (render the font corpus and pretrain), "
                  "or check a diffusers model loads"),
    StageSpec("embed", "image embeddings of the real training set with a Ray Data actor pool -> embed/*.parquet"),
    StageSpec("cluster", "distributed K-means per group -> embed/clusters.parquet, clusters.json, plots"),
    StageSpec("finetune", "fine-tune one diffusion model per group (LoRA, DreamBooth) or per (group, cluster) "
                      "on Ray Train"),
    StageSpec("generate", "generate the group-balanced synthetic set with Ray Data actor pools -> synthetic/<method>/"),
    StageSpec("filter", "score synthetic images (class prompt + group centroid) and keep the top fraction"),
    StageSpec("ddb", "Diffusing DeBias: class-conditional diffusion model, bias-aligned set, bias amplifier "
                 "-> generators/ddb/"),
    StageSpec("train", "train a classifier with train.method on Ray Train -> classifiers/<method>/<seed>/metrics.json",
          step="run_train_methods", shared=False),
    StageSpec("report", "write report/report.md with tables, plots and sample grids (CONFIG, or a run/sweep "
                    "directory)", shared=False),
    StageSpec("run", "every stage for every method in `methods:` and every seed, then the report", shared=False,
          chain=True, module="raybias.stages.pipeline", entry="run_pipeline"),
    StageSpec("sweep", "Ray Tune sweep over severity x synthetic_ratio x method x seed -> sweeps/<name>/",
          shared=False, chain=True),
)}


def plan_stages(cfg) -> List[str]:
    """The ordered stage names `raybias run` goes through for this config: only what the
    `methods:` need (the classifier baselines need only prepare and train; a generator its
    chain; DDB its own)."""
    gens = generators_needed(list(cfg.methods))
    diffusion = [GENERATORS[g] for g in gens if g in GENERATORS]
    wanted = {"prepare", "train", "report"}
    # The builtin backbone ships with the package (rebuilding it is `raybias base`, minutes of
    # work); any other base model is checked to load before hours of fine-tuning depend on it.
    if (diffusion or "ddb" in gens) and cfg.base.model != "builtin":
        wanted.add("base")
    clustered = any(g.clusters for g in diffusion)
    if clustered or (diffusion and cfg.filter.enabled):
        wanted.update(("embed", "cluster") if clustered else ("embed",))
    if any(g.finetuned for g in diffusion):
        wanted.add("finetune")
    if diffusion:
        wanted.update(("generate", "filter"))
    if "ddb" in gens:
        wanted.add("ddb")
    return [name for name, stage in STAGES.items() if name in wanted and not stage.chain]
