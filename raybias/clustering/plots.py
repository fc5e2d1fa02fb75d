"""Pictures of the clusters: a 2-D PCA of each group's embeddings coloured by cluster, and a
grid of each cluster's most typical images (rows = clusters), one panel per group."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pca_2d(points: np.ndarray, extra: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Project points (and `extra`, e.g. centroids) on the points' first two principal axes."""
    points = np.asarray(points, dtype=np.float64)
    mean = points.mean(axis=0)
    centred = points - mean
    if len(points) >= 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2]
    else:
        axes = np.eye(2, points.shape[1])
    if axes.shape[0] < 2:
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], points.shape[1]))])
    proj = centred @ axes.T
    extra_proj = None if extra is None else (np.asarray(extra, np.float64) - mean) @ axes.T
    return proj, extra_proj


def projection_figure(panels: Sequence[Dict]):
    """panels: [{title, points [m, d] or None, labels [m], centroids [k, d]}] -> Figure."""
    plt = _pyplot()
    n = max(1, len(panels))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            continue
        p = panels[i]
        ax.set_title(p["title"], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if p.get("points") is None or len(p["points"]) == 0:
            ax.text(0.5, 0.5, "no training images", ha="center", va="center", transform=ax.transAxes)
            continue
        proj, cproj = pca_2d(p["points"], p.get("centroids"))
        labels = np.asarray(p["labels"])
        for c in np.unique(labels):
            m = labels == c
            ax.scatter(proj[m, 0], proj[m, 1], s=6, alpha=0.6, color=cmap(int(c) % 10), label=f"cluster {c}")
        if cproj is not None:
            ax.scatter(cproj[:, 0], cproj[:, 1], marker="x", s=60, color="black", linewidths=1.5)
        if len(np.unique(labels)) > 1:
            ax.legend(fontsize=6, loc="best", markerscale=2, frameon=False)
        ax.set_xlabel("PC 1", fontsize=7)
        ax.set_ylabel("PC 2", fontsize=7)
    fig.suptitle("Embeddings per group (PCA), coloured by K-means cluster; x = centroid", fontsize=10)
    fig.tight_layout()
    return fig


def mosaic(rows: Sequence[Sequence[np.ndarray]], per_row: int, n_rows: Optional[int] = None,
           gap: int = 2) -> np.ndarray:
    """Images laid out on a grid (one row per entry, at least n_rows rows), white gaps and blanks."""
    tiles = [im for row in rows for im in row]
    h = max(im.shape[0] for im in tiles)
    w = max(im.shape[1] for im in tiles)
    n_rows = max(len(rows), n_rows or 0)
    out = np.full((n_rows * (h + gap) - gap, per_row * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for j, im in enumerate(row[:per_row]):
            y, x = r * (h + gap), j * (w + gap)
            out[y:y + im.shape[0], x:x + im.shape[1]] = im
    return out


def samples_figure(panels: Sequence[Dict], per_cluster: int):
    """panels: [{title, rows: [(row label, [uint8 HxWx3 images])]}] -> Figure.

    One panel per group; in each, one row per cluster with its images closest to the centroid.
    """
    plt = _pyplot()
    n = max(1, len(panels))
    max_rows = max([len(p["rows"]) for p in panels] + [1])
    fig, axes = plt.subplots(1, n, figsize=(max(2.4, 0.5 * per_cluster + 1.0) * n, 0.55 * max_rows + 1.0),
                             squeeze=False)
    for ax, p in zip(axes[0], panels):
        ax.set_title(p["title"], fontsize=8)
        ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        rows = [(label, images) for label, images in p["rows"]]
        if not rows or not any(images for _, images in rows):
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no training images", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            continue
        grid = mosaic([images for _, images in rows], per_cluster, n_rows=max_rows)
        ax.imshow(grid, interpolation="nearest")
        step = grid.shape[0] / max_rows
        ax.set_yticks([step * (r + 0.5) for r in range(len(rows))])
        ax.set_yticklabels([label for label, _ in rows], fontsize=7)
        ax.tick_params(axis="y", length=0)
    fig.tight_layout()
    return fig
