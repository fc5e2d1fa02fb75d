"""Group metrics and their summary over seeds.

All accuracies are fractions in [0, 1] (in metrics.json and in `summarize`'s DataFrame);
the printed tables show percentages.

- per-group accuracy: correct / total within each group that has examples in the split;
- WGA: the smallest per-group accuracy; AGA: the unweighted mean of per-group accuracies;
- acc: plain accuracy over the split.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from raybias.layout import CLASSIFIERS_DIR, metrics_path


def metrics_from_counts(correct: Sequence[float], total: Sequence[float]) -> Dict:
    """{group_acc: {g: acc or None}, wga, aga, acc, n: {g: total}} from per-group counts.

    Groups with no examples in the split have accuracy None and are left out of WGA/AGA.
    """
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    present = total > 0
    acc = np.divide(correct, total, out=np.zeros_like(correct), where=present)
    group_acc = {str(g): (float(acc[g]) if present[g] else None) for g in range(len(total))}
    if not present.any():
        return {"group_acc": group_acc, "wga": None, "aga": None, "acc": None,
                "n": {str(g): 0 for g in range(len(total))}}
    return {
        "group_acc": group_acc,
        "wga": float(acc[present].min()),
        "aga": float(acc[present].mean()),
        "acc": float(correct.sum() / total.sum()),
        "n": {str(g): int(total[g]) for g in range(len(total))},
    }


def selection_key(m: Dict) -> tuple:
    """How validation metrics rank (model selection: epochs, and stage-2 candidates): worst-group
    accuracy, then average-group accuracy; a missing value ranks lowest."""
    return (m["wga"] if m["wga"] is not None else -1.0, m["aga"] if m["aga"] is not None else -1.0)


def group_metrics(pred: Sequence[int], y: Sequence[int], groups: Sequence[int], n_groups: int) -> Dict:
    """Metrics of a prediction table (one row per example)."""
    pred, y, groups = (np.asarray(v, dtype=np.int64) for v in (pred, y, groups))
    correct = np.bincount(groups, weights=(pred == y).astype(np.float64), minlength=n_groups)
    total = np.bincount(groups, minlength=n_groups).astype(np.float64)
    return metrics_from_counts(correct, total)


def metrics_records(run, methods: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, int, Dict]]:
    """(method, seed, metrics.json) of every finished classifier of the run (of `methods` only)."""
    wanted = None if methods is None else set(methods)
    for method in run.listdir(CLASSIFIERS_DIR):
        if wanted is not None and method not in wanted:
            continue
        for seed in run.listdir(CLASSIFIERS_DIR, method):
            rel = metrics_path(method, seed)
            if run.exists(rel):
                m = run.read_json(rel)
                yield method, int(m.get("seed", seed)), m


def collect_metrics(run, methods: Optional[Iterable[str]] = None, seeds: Optional[Iterable[int]] = None,
                    split: str = "test") -> pd.DataFrame:
    """One row per (method, seed) with a classifiers/<method>/<seed>/metrics.json: method, seed,
    wga, aga, acc, g<g> (each group's accuracy; NaN where the split has none of it) of `split`,
    and val_wga, best_epoch, seconds. `methods`/`seeds`: only those (default: all found)."""
    wanted_seeds = None if seeds is None else {int(s) for s in seeds}
    rows = []
    for method, seed_no, m in metrics_records(run, methods):
        if wanted_seeds is not None and seed_no not in wanted_seeds:
            continue
        part = m[split]
        row = {"method": method, "seed": seed_no, "wga": part["wga"],
               "aga": part["aga"], "acc": part["acc"], "val_wga": m.get("val", {}).get("wga"),
               "best_epoch": m.get("best_epoch"), "seconds": m.get("seconds")}
        for g, acc in part.get("group_acc", {}).items():
            row[f"g{g}"] = np.nan if acc is None else acc
        rows.append(row)
    return pd.DataFrame(rows)


def group_columns(df: pd.DataFrame, suffix: str = "") -> List[str]:
    """The per-group accuracy columns of a `collect_metrics` (suffix "") or `summarize` ("_mean")
    table, in group order: g0, g1, ..."""
    gs = [c[1:len(c) - len(suffix)] for c in df.columns
          if c.startswith("g") and c.endswith(suffix) and c[1:len(c) - len(suffix)].isdigit()]
    return [f"g{g}{suffix}" for g in sorted(gs, key=int)]


def summarize(df: pd.DataFrame, keys: Sequence[str] = ("method",), order: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Mean and sample std (ddof=1; NaN for one seed) over seeds of WGA, AGA, acc and each
    group's accuracy (fractions), one row per `keys` value, with n_seeds. `order`: the methods'
    order when keys is just "method" (default: sorted)."""
    if df.empty:
        return pd.DataFrame()
    keys = list(keys)
    metric_cols = ["wga", "aga", "acc"] + group_columns(df)
    agg = df.groupby(keys)[metric_cols].agg(["mean", "std"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    agg["n_seeds"] = df.groupby(keys).size()
    agg = agg.reset_index()
    if order is not None and keys == ["method"]:
        rank = {m: i for i, m in enumerate(order)}
        agg = agg.sort_values("method", key=lambda col: col.map(lambda m: rank.get(m, len(rank))))
    return agg.reset_index(drop=True)


def pct(mean: float, std: Optional[float] = None) -> str:
    """In percent; "-" for no value; no ± for no spread (std None, or NaN for one seed)."""
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and np.isnan(std)):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_summary(df: pd.DataFrame, group_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of `summarize` output in percent (mean ± std)."""
    if df.empty:
        return "(no results)"
    gcols = [c[1:-5] for c in group_columns(df, "_mean")]
    names = [group_names[int(g)] if group_names else f"g{g}" for g in gcols]
    width = max([16] + [len(n) + 2 for n in names])
    head = f"{'method':<22}{'seeds':>6}{'WGA':>14}{'AGA':>14}{'acc':>14}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head]
    for _, r in df.iterrows():
        line = (f"{r['method']:<22}{int(r['n_seeds']):>6}{pct(r['wga_mean'], r['wga_std']):>14}"
                f"{pct(r['aga_mean'], r['aga_std']):>14}{pct(r['acc_mean'], r['acc_std']):>14}")
        line += "".join(f"{pct(r[f'g{g}_mean'], r[f'g{g}_std']):>{width}}" for g in gcols)
        lines.append(line)
    return "\n".join(lines)


def format_runs(records: Sequence[Dict], group_names: Optional[Sequence[str]] = None, split: str = "test") -> str:
    """Per-(method, seed) table of per-group accuracy, WGA, AGA, acc in percent."""
    if not records:
        return "(no results)"
    n_groups = len(records[0][split]["group_acc"])
    names = [group_names[g] if group_names else f"g{g}" for g in range(n_groups)]
    width = max([14] + [len(n) + 2 for n in names])  # group names can be long ("digit>=5/green")
    lines = [f"{'method':<22}{'seed':>5}{'best':>6}" + "".join(f"{n:>{width}}" for n in names)
             + f"{'WGA':>8}{'AGA':>8}{'acc':>8}"]
    for r in records:
        s = r[split]
        line = f"{r['method']:<22}{r['seed']:>5}{r['best_epoch']:>6}"
        line += "".join(f"{pct(s['group_acc'][str(g)]):>{width}}" for g in range(n_groups))
        line += f"{pct(s['wga']):>8}{pct(s['aga']):>8}{pct(s['acc']):>8}"
        lines.append(line)
    return "\n".join(lines)
