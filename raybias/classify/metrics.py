"""Group metrics and their summary over seeds.

All accuracies are fractions in [0, 1] (in metrics.json and in `summarize`'s DataFrame);
the printed tables show percentages.

- per-group accuracy: correct / total within each group that has examples in the split;
- WGA: the smallest per-group accuracy; AGA: the unweighted mean of per-group accuracies;
- acc: plain accuracy over the split.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd


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


def group_metrics(pred: Sequence[int], y: Sequence[int], groups: Sequence[int], n_groups: int) -> Dict:
    """Metrics of a prediction table (one row per example)."""
    pred, y, groups = (np.asarray(v, dtype=np.int64) for v in (pred, y, groups))
    correct = np.bincount(groups, weights=(pred == y).astype(np.float64), minlength=n_groups)
    total = np.bincount(groups, minlength=n_groups).astype(np.float64)
    return metrics_from_counts(correct, total)


def metrics_path(method: str, seed: int) -> str:
    return f"classifiers/{method}/{seed}/metrics.json"


def load_metrics(run, method: str, seed: int) -> Dict:
    from raybias.data.io import TableMissing

    rel = metrics_path(method, seed)
    if not run.exists(rel):
        raise TableMissing(f"{run.path(rel)} does not exist (run `raybias train` with "
                           f"method {method!r} and seed {seed} first)")
    return json.loads(run.read_text(rel))


def _mean_std(values: List[float]):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(run, methods: Iterable[str], seeds: Iterable[int], split: str = "test",
              missing: str = "raise") -> pd.DataFrame:
    """One row per method: mean and sample std (ddof=1) over seeds of WGA, AGA, acc, each group.

    Columns: method, n_seeds, seeds, wga_mean, wga_std, aga_mean, aga_std, acc_mean, acc_std,
    group_<g>_mean, group_<g>_std (fractions in [0, 1]); `split` is "test" or "val".
    `missing="skip"` leaves out (method, seed) pairs without metrics.json; "raise" raises
    TableMissing naming the file.
    """
    rows = []
    for method in methods:
        recs = []
        used = []
        for seed in seeds:
            try:
                recs.append(load_metrics(run, method, seed))
                used.append(int(seed))
            except FileNotFoundError:
                if missing == "raise":
                    raise
        if not recs:
            continue
        row = {"method": method, "n_seeds": len(recs), "seeds": used,
               "train_method": recs[0].get("train_method", method)}
        for key in ("wga", "aga", "acc"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[split][key] for r in recs])
        groups = sorted({g for r in recs for g in r[split]["group_acc"]}, key=int)
        for g in groups:
            row[f"group_{g}_mean"], row[f"group_{g}_std"] = _mean_std(
                [r[split]["group_acc"].get(g) for r in recs])
        rows.append(row)
    return pd.DataFrame(rows)


def pct(mean: float, std: Optional[float] = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_summary(df: pd.DataFrame, group_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of `summarize` output in percent (mean ± std)."""
    if df.empty:
        return "(no results)"
    gcols = sorted({c[6:-5] for c in df.columns if c.startswith("group_") and c.endswith("_mean")}, key=int)
    names = [group_names[int(g)] if group_names else f"g{g}" for g in gcols]
    head = f"{'method':<22}{'seeds':>6}{'WGA':>14}{'AGA':>14}{'acc':>14}" + "".join(f"{n:>16}" for n in names)
    lines = [head]
    for _, r in df.iterrows():
        line = (f"{r['method']:<22}{int(r['n_seeds']):>6}{pct(r['wga_mean'], r['wga_std']):>14}"
                f"{pct(r['aga_mean'], r['aga_std']):>14}{pct(r['acc_mean'], r['acc_std']):>14}")
        line += "".join(f"{pct(r[f'group_{g}_mean'], r[f'group_{g}_std']):>16}" for g in gcols)
        lines.append(line)
    return "\n".join(lines)


def format_runs(records: Sequence[Dict], group_names: Optional[Sequence[str]] = None, split: str = "test") -> str:
    """Per-(method, seed) table of per-group accuracy, WGA, AGA, acc in percent."""
    if not records:
        return "(no results)"
    n_groups = len(records[0][split]["group_acc"])
    names = [group_names[g] if group_names else f"g{g}" for g in range(n_groups)]
    lines = [f"{'method':<22}{'seed':>5}{'best':>6}" + "".join(f"{n:>14}" for n in names)
             + f"{'WGA':>8}{'AGA':>8}{'acc':>8}"]
    for r in records:
        s = r[split]
        line = f"{r['method']:<22}{r['seed']:>5}{r['best_epoch']:>6}"
        line += "".join(f"{pct(s['group_acc'][str(g)]):>14}" for g in range(n_groups))
        line += f"{pct(s['wga']):>8}{pct(s['aga']):>8}{pct(s['acc']):>8}"
        lines.append(line)
    return "\n".join(lines)
