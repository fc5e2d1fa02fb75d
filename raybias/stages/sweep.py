"""Stage `sweep`: Ray Tune over severity × synthetic_ratio × method × seed.

Work that does not depend on the method, ratio or seed (prepare, embed, cluster,
finetune, generate, filter, DDB's generator) is done once per severity, in its own run
directory `sweeps/<name>/severity-<s>/`, by the same pipeline stages `raybias run` uses.
The Tune trials then train classifiers only: each trial function builds its own
`TorchTrainer` (Ray Train V2), so trials run in parallel up to the cluster's CPUs/GPUs,
with optional ASHA early stopping on validation worst-group accuracy. Re-running the
command restores the Tune experiment (`Tuner.restore`) and finishes what is missing.
Results: `sweeps/<name>/results.csv`, `report.md` and a WGA-vs-severity plot.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pandas as pd
from ray.tune import Callback

from raybias.config import severity_value, with_overrides
from raybias.console import say
from raybias.layout import SWEEP_REPORT, SWEEP_RESULTS, SWEEP_TUNE, metrics_path, severity_dir, sweep_dir
from raybias.ray_utils import init_ray, require_gpus
from raybias.registry import GENERATORS
from raybias.rundir import RunDir
from raybias.stages import STAGES, plan_stages


def severity_name(severity: Any) -> str:
    value = severity_value(severity)
    return "original" if value is None else f"{value:g}"


def trial_grid(cfg) -> List[Dict[str, Any]]:
    """Every (severity, synthetic_ratio, method, seed) the sweep trains.

    The synthetic/real ratio only changes generator methods' stage 1, so the baselines are
    trained once per (severity, seed), under the first ratio.
    """
    sw = cfg.sweep
    methods = list(sw.methods or cfg.methods)
    seeds = list(sw.seeds or cfg.seeds)
    ratios = list(sw.synthetic_ratios)
    grid = []
    for severity in sw.severities:
        for method in methods:
            for ratio in (ratios if method in GENERATORS else ratios[:1]):
                for seed in seeds:
                    grid.append({"severity": severity_name(severity), "synthetic_ratio": float(ratio),
                                 "method": method, "seed": int(seed)})
    return grid


def output_name(method: str, ratio: float, ratios: List[float]) -> str:
    """Classifier folder name: the method, plus the ratio when a sweep varies it."""
    return method if len(ratios) == 1 or method not in GENERATORS else f"{method}@r{ratio:g}"


def severity_run_spec(sweep_root: str, severity: str) -> str:
    """The run directory of one severity inside a sweep (keeps S3 options on the URI)."""
    return RunDir(sweep_root).child_spec(severity_dir(severity))


def _severity_config(cfg, severity: str, sweep_root: str, methods: List[str]):
    sub = with_overrides(cfg, [f"data.severity={severity}"])
    sub.run_dir = severity_run_spec(sweep_root, severity)
    sub.methods = methods
    return sub


def prepare_shared_stages(cfg, sweep_root: str, mode: str, verbose: bool = True) -> None:
    """Run once per severity every stage whose work depends on no method, ratio or seed
    (the stage table's `shared`; the trials train, the sweep reports)."""
    methods = list(cfg.sweep.methods or cfg.methods)
    for severity in cfg.sweep.severities:
        name = severity_name(severity)
        sub = _severity_config(cfg, name, sweep_root, methods)
        run = RunDir(sub.run_dir)
        for stage in plan_stages(sub):
            if not STAGES[stage].shared:
                continue
            say(f"[sweep] severity {name}: {stage}", flush=True)
            STAGES[stage].pipeline_step()(sub, run, mode, verbose)


def _trial(config: Dict[str, Any]) -> None:
    """One Tune trial: train one classifier; metrics reach Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raybias.config import config_from_dict
    from raybias.classify.runner import train_classifier

    base = config_from_dict(config["base_config"])
    t = config["trial"]
    sub = _severity_config(base, t["severity"], config["sweep_root"], [t["method"]])
    sub = with_overrides(sub, [f"train.synthetic_ratio={t['synthetic_ratio']}"])
    run = RunDir(sub.run_dir)
    name = output_name(t["method"], t["synthetic_ratio"], config["ratios"])
    metrics = train_classifier(sub, run, t["method"], t["seed"], mode="resume", name=name,
                               callbacks=[TuneReportCallback()])
    tune.report({"val_wga": metrics["val"]["wga"], "test_wga": metrics["test"]["wga"],
                 "test_aga": metrics["test"]["aga"], "test_acc": metrics["test"]["acc"]})


def collect_results(cfg, sweep_root: str) -> pd.DataFrame:
    """results.csv rows from the classifiers' metrics.json (the source of truth, not Tune)."""
    ratios = list(cfg.sweep.synthetic_ratios)
    rows = []
    for t in trial_grid(cfg):
        run = RunDir(severity_run_spec(sweep_root, t["severity"]))
        rel = metrics_path(output_name(t["method"], t["synthetic_ratio"], ratios), t["seed"])
        if not run.exists(rel):
            continue
        m = run.read_json(rel)
        row = dict(t)
        row.update({"wga": m["test"]["wga"], "aga": m["test"]["aga"], "acc": m["test"]["acc"],
                    "val_wga": m["val"]["wga"], "best_epoch": m.get("best_epoch")})
        for g, acc in m["test"].get("group_acc", {}).items():
            row[f"g{g}"] = acc
        rows.append(row)
    return pd.DataFrame(rows)


class TrialsBar(Callback):
    """One progress bar over the sweep's trials (Tune's own tables go to the log).

    Tune pickles its callbacks with the experiment's state, so the bar (which holds the
    terminal's stream) is made on first use and left out of the pickle."""

    def __init__(self, total: int):
        self.total = int(total)
        self._bar = None

    def __getstate__(self):
        return {"total": self.total, "_bar": None}

    def _get_bar(self):
        if self._bar is None:
            from raybias.console import bar

            self._bar = bar(total=self.total, desc="sweep trials", unit="trial")
        return self._bar

    def on_trial_complete(self, iteration, trials, trial, **info):
        wga = (trial.last_result or {}).get("test_wga")
        if wga is not None:
            self._get_bar().set_postfix_str(f"last test WGA {100 * wga:.1f}", refresh=False)
        self._get_bar().update(1)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._get_bar().update(1)

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()


def run_sweep(cfg, run: RunDir, mode: str = "auto", verbose: bool = True) -> pd.DataFrame:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raybias.classify.metrics import summarize
    from raybias.stages.preflight import check_sweep
    from raybias.stages.report import write_sweep_report

    check_sweep(cfg)  # every stage of every severity, before any work
    init_ray(cfg)
    sw = cfg.sweep
    require_gpus(sw.gpus_per_trial, "sweep trials (sweep.gpus_per_trial)")
    sweep_root = run.child_spec(sweep_dir(sw.name))
    sweep = RunDir(sweep_root)
    say(f"raybias sweep '{sw.name}': {sweep_root}", flush=True)
    prepare_shared_stages(cfg, sweep_root, "resume" if mode == "resume" else "auto", verbose)

    grid = trial_grid(cfg)
    say(f"[sweep] {len(grid)} trials, up to {sw.max_concurrent} at a time", flush=True)
    from omegaconf import OmegaConf

    param_space = {
        "trial": tune.grid_search(grid),
        "base_config": OmegaConf.to_container(cfg, resolve=True),
        "sweep_root": sweep_root,
        "ratios": list(sw.synthetic_ratios),
    }
    # The trial function itself only waits on its TorchTrainer, whose workers hold the CPUs/GPUs;
    # Tune refuses an all-zero request, so the trial asks for a sliver of a CPU.
    trainable = tune.with_resources(_trial, {"cpu": 0.01})
    # Tune keeps its experiment state beside the results (locally, or on the run's object store)
    storage = sweep.url(SWEEP_TUNE)
    exp_path = f"{storage}/{sw.name}"
    scheduler = None
    if sw.asha:
        from raybias.classify.recipes import epochs_reported
        from raybias.methods import method_config

        trial_methods = list(sw.methods or cfg.methods)
        scheduler = ASHAScheduler(metric="val_wga", mode="max", time_attr="training_iteration",
                                  max_t=max(epochs_reported(method_config(cfg, m).train) for m in trial_methods),
                                  grace_period=max(1, cfg.train.epochs // 4))
    if tune.Tuner.can_restore(exp_path) and mode != "fresh":
        # No param_space: the experiment keeps the one it started with (Tune would refuse a
        # config that gained a key since, e.g. after an upgrade), and it holds no object refs.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=sw.max_concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name=sw.name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[TrialsBar(len(grid))]),
        )
    result = tuner.fit()
    errors = [r.error for r in result if r.error is not None]
    df = collect_results(cfg, sweep_root)
    sweep.write_text(SWEEP_RESULTS, df.to_csv(index=False))
    if errors:
        say(f"[sweep] {len(errors)} trial(s) failed; first error: {errors[0]}", flush=True)
    if not df.empty:
        write_sweep_report(sweep_root)
        df2 = df.copy()
        summary = summarize(df2, keys=["severity", "synthetic_ratio", "method"])
        say(summary[["severity", "synthetic_ratio", "method", "wga_mean", "wga_std", "n_seeds"]]
            .to_string(index=False, float_format=lambda v: f"{100 * v:.1f}"))
    say(f"[sweep] results: {sweep.path(SWEEP_RESULTS)}; report: {sweep.path(SWEEP_REPORT)}")
    if errors:
        from raybias.rundir import StageFailed

        raise StageFailed(f"{len(errors)} of {len(grid)} sweep trials failed: {errors[0]}")
    return df
