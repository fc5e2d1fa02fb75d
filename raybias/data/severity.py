"""Bias severity (FFR's `minority_to_keep`), applied to the training split (and, with
`data.val_protocol: biased`, to the validation split as FFR does).

For each class y, keep every bias-aligned training image and subsample the
bias-conflicting ones so that a fraction s of the class is aligned. The number kept is
FFR's (From Fake to Real, datasets/dataset.py `make_harder`), float arithmetic included:
    to_keep = n_aligned * r / (1 - r),  r = 1 - s        (a float64)
    kept    = n_conflict - int(n_conflict - to_keep)     (≈ ceil(to_keep))
FFR removes int(n_conflict - to_keep) images, so it keeps the ceiling, never the floor
(one image more in every non-integer case, and 1 where the floor keeps 0). Because the
float64 values are used as they are, a count that is an integer in exact arithmetic may
come out one higher: CelebA-HQ at 0.97, 5335 * 0.03 / 0.97 = 165 exactly, is
165.00000000000017 in float64, 592 - 165.00000000000017 = 426.99999999999983, and FFR's
shipped split keeps 592 - 426 = 166 (at 99 * 0.01 / 0.99 the excess is lost in the
subtraction and 1 is kept). Reproducing FFR's shipped splits (tests/test_prepare.py) needs
exactly this arithmetic, so it is FFR's expression, not math.ceil with a tolerance.
When a class has fewer conflicting images than to_keep, all are kept (FFR skips the class)
and a warning says the class stays below s. The kept images are split over the conflicting
bias values in proportion to their sizes (largest remainders get the leftover images;
with one conflicting value, as in FFR, it is the whole budget). Deterministic by seed.

Validation (`val_protocol`): "untouched" (the default) keeps the source's validation split
as shipped; "biased" applies the same rule to it with at least VAL_MIN_CONFLICT conflicting
images per class (FFR's `keep_min`: to_keep = max(to_keep, 10)), so model selection sees the
training distribution, as in FFR. Test is never touched.

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

from raybias.config import VAL_PROTOCOLS
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


VAL_MIN_CONFLICT = 10  # FFR's keep_min for the validation split

# One line per protocol, for the report and the prepare summary.
SEVERITY_RULE = ("FFR's minority_to_keep rule: per class, ceil(n_aligned·(1−s)/s) bias-conflicting "
                 "training images kept (FFR's float arithmetic)")
VAL_PROTOCOL_TEXT = {
    "untouched": "validation as the source ships it (not subsampled)",
    "biased": (f"validation subsampled by the same rule, at least {VAL_MIN_CONFLICT} bias-conflicting "
               "images per class (FFR's protocol)"),
}


def ffr_to_keep(n_aligned: int, severity: float) -> float:
    """FFR's float to_keep = n_aligned·r/(1−r), r = 1 − s, computed in FFR's order."""
    r = 1.0 - float(severity)
    return (n_aligned * r) / (1.0 - r) if r < 1.0 else float("inf")


def conflicting_to_keep(n_aligned: int, n_conflict: int, severity: float, minimum: int = 0) -> int:
    """How many of a class's n_conflict bias-conflicting images FFR's `make_harder` keeps.

    to_keep = n_aligned·r/(1−r) with r = 1 − s (float64, as FFR computes it); a class with
    no more than to_keep conflicting images keeps them all; else to_keep = max(to_keep,
    minimum) and FFR removes int(n_conflict − to_keep) images (so keeps the ceiling). With
    fewer than `minimum` conflicting images FFR's draw would fail; here they are all kept."""
    to_keep = ffr_to_keep(n_aligned, severity)
    if to_keep > n_conflict:
        return int(n_conflict)
    to_keep = max(to_keep, float(minimum))
    if to_keep > n_conflict:
        return int(n_conflict)
    return int(n_conflict - int(n_conflict - to_keep))


def _split_budget(conflict: pd.DataFrame, budget: int, rng: np.random.Generator) -> List[np.ndarray]:
    """`budget` rows of `conflict`, split over its bias values in proportion to their sizes."""
    if not budget or not len(conflict):
        return []
    sizes = conflict["a"].value_counts().sort_index()
    exact = sizes.to_numpy() / sizes.to_numpy().sum() * budget
    shares = np.floor(exact).astype(int)
    remainder = budget - int(shares.sum())
    for j in np.argsort(-(exact - shares), kind="stable")[:remainder]:
        shares[j] += 1
    out = []
    for a_val, take in zip(sizes.index, shares):
        pool = np.sort(conflict.index[conflict["a"] == a_val].to_numpy())
        out.append(rng.choice(pool, size=int(take), replace=False))
    return out


def apply_severity(table: pd.DataFrame, severity: Optional[float], aligned: List[int], seed: int,
                   warnings: Optional[List[str]] = None, val_protocol: str = "untouched") -> pd.DataFrame:
    """Subsample bias-conflicting training rows (and, with val_protocol "biased", validation
    rows, at least VAL_MIN_CONFLICT per class); test untouched. severity None = original.

    Messages about classes that cannot reach `severity` are appended to `warnings`."""
    if val_protocol not in VAL_PROTOCOLS:
        raise ValueError(f"val_protocol {val_protocol!r}: allowed {', '.join(VAL_PROTOCOLS)}")
    table = table.reset_index(drop=True)
    if severity is None:
        return table
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    touched = ["train"] + (["val"] if val_protocol == "biased" else [])
    keep_idx = [table.index[~table["split"].isin(touched)].to_numpy()]
    for y in sorted(int(v) for v in train["y"].unique()):
        cls = train[train["y"] == y]
        a_al = aligned[y]
        al = cls[cls["a"] == a_al]
        if len(al) == 0:
            raise DataError(
                f"class y={y} has no bias-aligned training images (aligned bias value a={a_al}); "
                "set data.aligned to a bias value the class has, or use data.severity=original")
        conflict = cls[cls["a"] != a_al]
        budget = conflicting_to_keep(len(al), len(conflict), severity)
        wanted = ffr_to_keep(len(al), severity)
        if wanted > len(conflict) and warnings is not None:
            warnings.append(f"class y={y} has only {len(conflict)} bias-conflicting training images; "
                            f"severity {severity:g} asks for {int(np.ceil(wanted))}, so all are kept and "
                            f"{len(al) / (len(al) + len(conflict)):.3f} of the class is aligned")
        keep_idx.append(al.index.to_numpy())
        keep_idx.extend(_split_budget(conflict, budget, rng))
    if val_protocol == "biased":
        # its own stream, so the training rows kept do not depend on the validation protocol
        val_rng = np.random.default_rng([int(seed), 1])
        val = table[table["split"] == "val"]
        for y in sorted(int(v) for v in val["y"].unique()):
            cls = val[val["y"] == y]
            al = cls[cls["a"] == aligned[y]]
            conflict = cls[cls["a"] != aligned[y]]
            budget = conflicting_to_keep(len(al), len(conflict), severity, minimum=VAL_MIN_CONFLICT)
            keep_idx.append(al.index.to_numpy())
            keep_idx.extend(_split_budget(conflict, budget, val_rng))
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
