"""Stage `run`: prepare → (base) → embed → cluster → finetune → generate → filter → train → report.

Every stage is skipped when the run directory already holds it finished with the same
config (mode "auto", like make) or, with --resume, continues where it stopped. Only the
stages the listed `methods:` need are run (`raybias.stages.plan_stages`: the classifier
baselines need only `prepare` and `train`; a generator method needs its generator's chain;
DDB its own), each through the stage table's step with the one entry signature.
"""

from __future__ import annotations

import time
from typing import Dict

from raybias.console import say
from raybias.layout import REPORT_MD, TIMINGS
from raybias.ray_utils import init_ray
from raybias.rundir import RunDir
from raybias.stages import STAGES, plan_stages
from raybias.stages.preflight import check_run


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
        STAGES[name].pipeline_step()(cfg, run, mode, verbose)
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
