"""Bias severity (FFR's minority_to_keep), applied to the training split only.

For each class y, keep every bias-aligned training image and subsample the
bias-conflicting ones so that a fraction s of the class is aligned:
    n_conflict_kept = floor(n_aligned * (1 - s) / s)
split over the conflicting bias values in proportion to their sizes (largest
remainders get the leftover images). Deterministic by seed. Validation and test are
never touched. When a class has fewer conflicting images than the formula asks for,
all are kept and a warning says the class stays below s.

Which bias value is aligned with class y: data.aligned[y] if set, else the source's
default, else the class's majority bias value in train. When several classes share the
same majority value (CelebA: women are the majority of both blond and non-blond
people), a severity built on it would not tie the bias to the class at all, so the
classes get distinct values instead: the assignment with the most aligned training
images (CelebA: blond <-> female, not blond <-> male, as in the papers).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import pandas as pd

from raybias.data.sources import DataError


def train_counts(train: pd.DataFrame, n_classes: int, n_bias: int) -> np.ndarray:
    """counts[y, a] of training rows."""
    counts = np.zeros((n_classes, n_bias), dtype=np.int64)
    if len(train):
        np.add.at(counts, (train["y"].to_numpy(np.int64), train["a"].to_numpy(np.int64)), 1)
    return counts


def aligned_values(train: pd.DataFrame, n_classes: int, n_bias: int,
                   configured: Optional[List[int]], default: Optional[List[int]]) -> List[int]:
    """aligned[y]: the configured value, else the source's default, else the majority
    (made distinct across classes when the majorities collide; see the module doc)."""
    if configured is not None:
        if len(configured) != n_classes:
            raise DataError(f"data.aligned has {len(configured)} entries; the data has {n_classes} classes")
        for y, a in enumerate(configured):
            if not 0 <= a < n_bias:
                raise DataError(f"data.aligned[{y}] = {a} is not a bias value (allowed 0..{n_bias - 1})")
        return [int(a) for a in configured]
    if default is not None:
        return [int(a) for a in default]
    counts = train_counts(train, n_classes, n_bias)
    for y in range(n_classes):
        if counts[y].sum() == 0:
            raise DataError(f"class y={y} has no training images, so it has no aligned bias value")
    majority = [int(np.argmax(counts[y])) for y in range(n_classes)]  # ties: the smaller value
    if len(set(majority)) == n_classes or n_bias < n_classes:
        return majority
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(counts, maximize=True)
    out = [0] * n_classes
    for r, c in zip(rows, cols):
        out[int(r)] = int(c)
    return out


def apply_severity(table: pd.DataFrame, severity: Optional[float], aligned: List[int], seed: int,
                   warnings: Optional[List[str]] = None) -> pd.DataFrame:
    """Subsample bias-conflicting training rows; val/test untouched. severity None = original.

    Messages about classes that cannot reach `severity` are appended to `warnings`."""
    table = table.reset_index(drop=True)
    if severity is None:
        return table
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    keep_idx = [table.index[table["split"] != "train"].to_numpy()]
    for y in sorted(int(v) for v in train["y"].unique()):
        cls = train[train["y"] == y]
        a_al = aligned[y]
        al = cls[cls["a"] == a_al]
        if len(al) == 0:
            raise DataError(
                f"class y={y} has no bias-aligned training images (aligned bias value a={a_al}); "
                "set data.aligned to a bias value the class has, or use data.severity=original")
        conflict = cls[cls["a"] != a_al]
        wanted = int(np.floor(len(al) * (1.0 - severity) / severity + 1e-9))
        budget = min(wanted, len(conflict))
        if wanted > len(conflict) and warnings is not None:
            warnings.append(f"class y={y} has only {len(conflict)} bias-conflicting training images; "
                            f"severity {severity:g} asks for {wanted}, so all are kept and "
                            f"{len(al) / (len(al) + len(conflict)):.3f} of the class is aligned")
        keep_idx.append(al.index.to_numpy())
        if budget and len(conflict):
            # split the budget over conflicting bias values in proportion to their sizes
            sizes = conflict["a"].value_counts().sort_index()
            exact = sizes.to_numpy() / sizes.to_numpy().sum() * budget
            shares = np.floor(exact).astype(int)
            remainder = budget - int(shares.sum())
            for j in np.argsort(-(exact - shares), kind="stable")[:remainder]:
                shares[j] += 1
            for a_val, take in zip(sizes.index, shares):
                pool = np.sort(conflict.index[conflict["a"] == a_val].to_numpy())
                keep_idx.append(rng.choice(pool, size=int(take), replace=False))
    kept = table.loc[np.sort(np.concatenate(keep_idx))]
    return kept.reset_index(drop=True)


def group_counts(table: pd.DataFrame, n_groups: int) -> pd.DataFrame:
    """Rows: group; columns: splits; zero-count groups are kept (and shown)."""
    counts = table.groupby(["group", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=range(n_groups), fill_value=0)
    for s in ("train", "val", "test"):
        if s not in counts.columns:
            counts[s] = 0
    return counts[["train", "val", "test"]].astype(int)
