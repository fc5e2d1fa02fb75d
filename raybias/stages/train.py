"""Stage `train`: the classifier of `train.method` for every seed in `seeds:`, on Ray Train.

`raybias train CONFIG train.method=groupdro` writes classifiers/groupdro/<seed>/ for each
seed and prints a per-group table. With train.method=two_stage the results are written
under the generator's name (classifiers/<train.generator>/<seed>/), the `methods:` entry
that stands for it. The pipeline runs `run_train_methods`: all its methods at once.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from raybias.classify.metrics import collect_metrics, format_runs, format_summary, summarize
from raybias.classify.runner import train_classifier, train_methods  # noqa: F401  (public API)
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.rundir import RunDir


def method_entry(cfg) -> str:
    """The `methods:` entry that cfg.train stands for (a generator name for two_stage)."""
    return cfg.train.generator if cfg.train.method == "two_stage" else cfg.train.method


def run_train(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """`raybias train`: the classifier of train.method for every seed, and its table."""
    method = method_entry(cfg)
    seeds: List[int] = [int(s) for s in cfg.seeds]
    results = train_methods(cfg, run, [method], seeds, mode, progress=verbose)
    if verbose:
        info = DatasetInfo.load(run)
        names = [info.group_name(g) for g in range(info.n_groups)]
        say(f"test accuracy per group ({method}; model chosen by validation worst-group accuracy):")
        say(format_runs([results[(method, s)] for s in seeds], names))
        if len(seeds) > 1:
            say()
            say(format_summary(summarize(collect_metrics(run, [method], seeds)), names))
    return results


def run_train_methods(cfg, run: RunDir, mode: str = "fresh",
                      verbose: bool = True) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The pipeline's train step: every `methods:` entry and seed, not only train.method's
    (several trainers at once); the report that follows prints the table."""
    return train_methods(cfg, run, list(cfg.methods), [int(s) for s in cfg.seeds], mode, progress=verbose)
