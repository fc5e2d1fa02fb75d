"""Choosing k per group: fixed, 1 for small groups, 0 for empty ones, or by silhouette.

`cluster.k: auto` fits K-means (distributed, on every row of the group) for each candidate
k in [max(2, k_min), k_max] (k < rows in the sample) and keeps the k whose clusters have
the highest mean silhouette coefficient on the group's sample (at most cluster.sample_size
rows, the same sample k-means++ seeds from); ties go to the smaller k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from raybias.clustering.kmeans import (KMeansResult, LocalBlocks, _Blocks, assign_block, initial_centroids,
                                      kmeans_dataset)


@dataclass
class GroupClustering:
    k: int
    chosen_by: str  # "fixed", "auto", "small_group" (n < min_group_size), "empty", "few_rows"
    result: Optional[KMeansResult]
    silhouette: Dict[int, float] = field(default_factory=dict)


def candidate_ks(k_min: int, k_max: int, n_sample: int) -> List[int]:
    """k values silhouette can score on n_sample rows: 2 <= k <= n_sample - 1."""
    return [k for k in range(max(2, k_min), k_max + 1) if k <= n_sample - 1]


def silhouette(sample: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); -1 when fewer than 2 clusters are populated."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(sample):
        return -1.0
    return float(silhouette_score(sample, labels, metric="euclidean"))


def cluster_group(blocks: _Blocks, cluster_cfg, sample: Optional[np.ndarray] = None,
                  sample_ids: Optional[np.ndarray] = None, progress: bool = False) -> GroupClustering:
    """Pick k for one group's vectors per `cluster_cfg` and fit K-means with it.

    `sample` (with its `sample_ids`) is blocks.take(blocks.sample_rows(cluster.sample_size,
    cluster.seed)), when the caller has it already. Clusters are numbered canonically.
    """
    c = cluster_cfg
    n = blocks.n
    if n == 0:
        return GroupClustering(k=0, chosen_by="empty", result=None)
    n_init = int(getattr(c, "n_init", 1) or 1)
    if sample is None:
        rows = blocks.sample_rows(int(c.sample_size), int(c.seed))
        sample = blocks.take(rows)
        sample_ids = blocks.take_ids(rows) if blocks.has_ids else None
    if len(sample) == n and not isinstance(blocks, LocalBlocks):
        # The sample is the whole group, in canonical order, and already on the driver:
        # cluster it here rather than paying one Ray task round trip per Lloyd iteration for
        # a few MB of vectors. Its ids keep the canonical numbering's tie rule the same.
        blocks = LocalBlocks.wrap(sample, sample_ids)

    def fit(k: int) -> KMeansResult:
        start = initial_centroids(blocks, k, int(c.seed), int(c.sample_size), n_init, int(c.max_iter),
                                  float(c.tol), sample=sample)
        return kmeans_dataset(blocks, k, init_centroids=start, max_iter=int(c.max_iter), tol=float(c.tol),
                              progress=progress)

    if n < int(c.min_group_size):
        return GroupClustering(k=1, chosen_by="small_group", result=fit(1))
    if c.k != "auto":
        k = min(int(c.k), n)
        return GroupClustering(k=k, chosen_by="fixed" if k == int(c.k) else "few_rows", result=fit(k))
    ks = candidate_ks(int(c.k_min), int(c.k_max), len(sample))
    if not ks:
        return GroupClustering(k=1, chosen_by="few_rows", result=fit(1))
    scores: Dict[int, float] = {}
    fits: Dict[int, KMeansResult] = {}
    for k in ks:
        fits[k] = fit(k)
        scores[k] = silhouette(sample, assign_block(sample, fits[k].centroids))
    best = max(ks, key=lambda k: (scores[k], -k))
    return GroupClustering(k=best, chosen_by="auto", result=fits[best], silhouette=scores)
