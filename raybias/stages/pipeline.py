"""Stage `run`: prepare → (base) → embed → cluster → finetune → generate → filter → train → report.

Every stage is skipped when the run directory already holds it finished with the same
config (mode "auto", like make) or, with --resume, continues where it stopped. Only the
stages the listed `methods:` need are run: the classifier baselines need only `prepare`
and `train`; a generator method needs its generator's chain; DDB its own.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List

from raybias.console import say
from raybias.layout import REPORT_MD, TIMINGS
from raybias.methods import generators_needed
from raybias.preflight import check_run
from raybias.ray_utils import init_ray
from raybias.registry import GENERATORS
from raybias.rundir import RunDir

def plan_stages(cfg) -> List[str]:
    """The ordered stage names `raybias run` will go through for this config."""
    gens = generators_needed(list(cfg.methods))
    diffusion = [GENERATORS[g] for g in gens if g in GENERATORS]
    stages = ["prepare"]
    # The builtin backbone ships with the package (rebuilding it is `raybias base`, minutes of
    # work); any other base model is checked to load before hours of fine-tuning depend on it.
    if (diffusion or "ddb" in gens) and cfg.base.model != "builtin":
        stages.append("base")
    clustered = any(g.clusters for g in diffusion)
    if clustered or (diffusion and cfg.filter.enabled):
        stages += ["embed", "cluster"] if clustered else ["embed"]
    if any(g.finetuned for g in diffusion):
        stages.append("finetune")
    if diffusion:
        stages += ["generate", "filter"]
    if "ddb" in gens:
        stages.append("ddb")
    stages += ["train", "report"]
    return stages


def _stage_fn(name: str) -> Callable:
    import importlib

    module, func = {
        "prepare": ("raybias.stages.prepare", "run_prepare"),
        "base": ("raybias.stages.base", "run_base"),
        "embed": ("raybias.stages.embed", "run_embed"),
        "cluster": ("raybias.stages.cluster", "run_cluster"),
        "finetune": ("raybias.stages.finetune", "run_finetune"),
        "generate": ("raybias.stages.generate", "run_generate"),
        "filter": ("raybias.stages.filter", "run_filter"),
        "ddb": ("raybias.stages.ddb", "run_ddb"),
        "train": ("raybias.stages.train", "run_train"),
        "report": ("raybias.stages.report", "run_report"),
    }[name]
    return getattr(importlib.import_module(module), func)


def run_pipeline(cfg, run: RunDir, mode: str = "auto", verbose: bool = True) -> Dict[str, float]:
    """Run every stage the config's methods need; returns seconds per stage."""
    stages = plan_stages(cfg)
    check_run(cfg, stages)  # every check the config allows, before any work
    init_ray(cfg)
    if verbose:
        say(f"raybias run: {run.uri}\n  methods: {', '.join(cfg.methods)}; seeds: "
            f"{', '.join(map(str, cfg.seeds))}\n  stages: {' -> '.join(stages)}", flush=True)
    timings: Dict[str, float] = {}
    start = time.time()
    run.write_json(TIMINGS, {"started_at": start})  # the report (last stage) reads the start
    for name in stages:
        t0 = time.time()
        if verbose:
            say(f"\n== {name} ==", flush=True)
        fn = _stage_fn(name)
        if name == "prepare":
            fn(cfg, run, mode, verbose=verbose)
        elif name == "train":  # every `methods:` entry and seed, not only train.method
            from raybias.stages.train import train_methods

            train_methods(cfg, run, list(cfg.methods), [int(s) for s in cfg.seeds], mode, progress=verbose)
        else:
            fn(cfg, run, mode)
        timings[name] = time.time() - t0
    finished = time.time()
    total = finished - start
    timings["total"] = total
    # wall-clock start and end (epoch seconds) beside the per-stage seconds; the returned dict keeps
    # stage -> seconds only
    run.write_json(TIMINGS, dict(timings, started_at=start, finished_at=finished))
    if verbose:
        say("\nstage timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total"))
        say(f"raybias run finished in {total:.0f}s ({total / 60:.1f} min); report: {run.path(REPORT_MD)}")
    return timings
