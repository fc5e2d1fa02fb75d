"""Bias severity (FFR's minority_to_keep), applied to the training split only.

For each class y, keep every bias-aligned training image and subsample the
bias-conflicting ones so that a fraction s of the class is aligned:
    n_conflict_kept = floor(n_aligned * (1 - s) / s)
split over the conflicting bias values in proportion to their sizes. Deterministic by seed.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import pandas as pd

from raybias.data.sources import DataError


def aligned_values(train: pd.DataFrame, n_classes: int, n_bias: int,
                   configured: Optional[List[int]], default: Optional[List[int]]) -> List[int]:
    """aligned[y]: the configured value, else the source's default, else the class's majority."""
    if configured is not None:
        if len(configured) != n_classes:
            raise DataError(f"data.aligned has {len(configured)} entries; the data has {n_classes} classes")
        for y, a in enumerate(configured):
            if not 0 <= a < n_bias:
                raise DataError(f"data.aligned[{y}] = {a} is not a bias value (0..{n_bias - 1})")
        return list(configured)
    if default is not None:
        return list(default)
    out = []
    for y in range(n_classes):
        counts = train.loc[train["y"] == y, "a"].value_counts()
        if counts.empty:
            raise DataError(f"class y={y} has no training images, so it has no aligned bias value")
        out.append(int(counts.sort_index().idxmax()))
    return out


def apply_severity(table: pd.DataFrame, severity: Optional[float], aligned: List[int], seed: int) -> pd.DataFrame:
    """Subsample bias-conflicting training rows; val/test untouched. severity None = original."""
    if severity is None:
        return table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    keep_idx = [table.index[table["split"] != "train"]]
    for y in sorted(train["y"].unique()):
        cls = train[train["y"] == y]
        a_al = aligned[int(y)]
        al = cls[cls["a"] == a_al]
        if len(al) == 0:
            raise DataError(
                f"class y={y} has no bias-aligned training images (aligned bias value a={a_al}); "
                "set data.aligned or use data.severity=original")
        conflict = cls[cls["a"] != a_al]
        budget = int(np.floor(len(al) * (1.0 - severity) / severity + 1e-9))
        budget = min(budget, len(conflict))
        keep_idx.append(al.index)
        if budget and len(conflict):
            # split the budget over conflicting bias values in proportion to their sizes
            sizes = conflict["a"].value_counts().sort_index()
            shares = np.floor(sizes.values / sizes.values.sum() * budget).astype(int)
            remainder = budget - shares.sum()
            for j in np.argsort(-(sizes.values / sizes.values.sum() * budget - shares))[:remainder]:
                shares[j] += 1
            for a_val, take in zip(sizes.index, shares):
                pool = conflict.index[conflict["a"] == a_val].to_numpy()
                pool = np.sort(pool)
                keep_idx.append(pd.Index(rng.choice(pool, size=int(take), replace=False)))
    kept = table.loc[np.sort(np.concatenate([np.asarray(k) for k in keep_idx]))]
    return kept.reset_index(drop=True)


def group_counts(table: pd.DataFrame, n_groups: int) -> pd.DataFrame:
    """Rows: group; columns: splits; zero-count groups are kept (and shown)."""
    counts = table.groupby(["group", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=range(n_groups), fill_value=0)
    for s in ("train", "val", "test"):
        if s not in counts.columns:
            counts[s] = 0
    return counts[["train", "val", "test"]].astype(int)
