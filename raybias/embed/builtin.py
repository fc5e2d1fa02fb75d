"""The built-in embedder: fixed, hand-designed shape + colour features (no weights, no download).

Every image is resized to 16 x 16 (any input size works) and turned into a 227-d vector:

- shape, colour-invariant: the per-pixel maximum over RGB, divided by the image's maximum, so
  a digit drawn in red and the same digit in green give the same intensity map;
  - 8 x 8 mean-pooled intensities, centred, L2-normalised (64 d, weight 0.5);
  - gradient-orientation histograms (HOG-like: 8 unsigned orientations, soft-binned,
    magnitude-weighted) pooled over a 4 x 4 grid of cells (128 d) and a 2 x 2 grid (32 d),
    each L2-normalised (weight 1);
- colour: the intensity-weighted mean RGB as a unit vector (3 d, weight 0.5). Within one
  group of colored_digits it is a constant, so it does not move the clusters; across groups
  it separates colours, which the filter's group-centroid term wants.

The whole vector is L2-normalised. Measured on colored_digits at severity 0.95 (see
docs/design.md and benchmarks/bench_embed.py): K-means(k=5) clusters inside each group agree
with the digit labels far better than raw pixels do. It has no text encoder.
"""

from __future__ import annotations

import io
from typing import Any, Dict

import numpy as np
from PIL import Image

from raybias.config import ConfigError
from raybias.data.images import READ_FORMATS, decode
from raybias.embed.embedders import Embedder, l2_normalize

WORK_SIZE = 16
N_ORIENT = 8
PIXEL_GRID = 8
HOG_GRIDS = (4, 2)
PIXEL_WEIGHT = 0.5
COLOUR_WEIGHT = 0.5


def _unit_rows(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


def orientation_maps(intensity: np.ndarray, n_orient: int = N_ORIENT) -> np.ndarray:
    """[N, S, S] intensities -> [N, S, S, n_orient] gradient magnitude split over soft orientation bins."""
    gy, gx = np.gradient(intensity, axis=(1, 2))
    mag = np.hypot(gx, gy)
    # Unsigned orientation in [0, pi): a stroke's two edges vote for the same bin.
    pos = np.mod(np.arctan2(gy, gx), np.pi) * (n_orient / np.pi)
    low = np.floor(pos)
    frac = (pos - low)[..., None]
    low = low.astype(np.int64)[..., None] % n_orient
    high = (low + 1) % n_orient
    bins = np.arange(n_orient)
    weights = (low == bins) * (1.0 - frac) + (high == bins) * frac
    return (weights * mag[..., None]).astype(np.float32)


def pool_grid(maps: np.ndarray, grid: int) -> np.ndarray:
    """[N, S, S, C] -> [N, grid * grid * C] sums over a grid x grid partition of the image."""
    n, s, _, c = maps.shape
    cell = s // grid
    return maps.reshape(n, grid, cell, grid, cell, c).sum(axis=(2, 4)).reshape(n, -1)


def features(rgb: np.ndarray) -> np.ndarray:
    """uint8 or float [N, S, S, 3] (S = WORK_SIZE) -> unnormalised [N, 227] float32 features."""
    x = np.asarray(rgb, dtype=np.float32)
    if x.max(initial=0.0) > 1.0:
        x = x / 255.0
    n = len(x)
    intensity = x.max(axis=-1)
    peak = intensity.reshape(n, -1).max(axis=1)
    intensity = intensity / np.maximum(peak, 1e-6)[:, None, None]

    cell = WORK_SIZE // PIXEL_GRID
    pixels = intensity.reshape(n, PIXEL_GRID, cell, PIXEL_GRID, cell).mean(axis=(2, 4)).reshape(n, -1)
    pixels = pixels - pixels.mean(axis=1, keepdims=True)
    blocks = [PIXEL_WEIGHT * _unit_rows(pixels)]

    orient = orientation_maps(intensity)
    for grid in HOG_GRIDS:
        blocks.append(_unit_rows(pool_grid(orient, grid)))

    weight = intensity[..., None]
    colour = (x * weight).reshape(n, -1, 3).sum(axis=1) / np.maximum(weight.reshape(n, -1).sum(axis=1), 1e-6)[:, None]
    blocks.append(COLOUR_WEIGHT * _unit_rows(colour))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _decode_rgb(data: bytes, size: int, where: str) -> np.ndarray:
    """raybias.data.images.decode without its copy when the image is RGB already (hot path)."""
    try:
        img = Image.open(io.BytesIO(data), formats=READ_FORMATS)
        img.load()
    except Exception:  # noqa: BLE001 - let the shared decoder raise its ImageError with the reason
        return decode(data, size, where=where)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img)


FEATURE_DIM = PIXEL_GRID * PIXEL_GRID + sum(g * g * N_ORIENT for g in HOG_GRIDS) + 3


class BuiltinEmbedder(Embedder):
    """Deterministic hand-designed features; the embedded default (see module docstring)."""

    name = "builtin"
    dim = FEATURE_DIM

    def __init__(self, options: Dict[str, Any] | None = None, device: str = "cpu"):
        # No weights: nothing to load, the device does not matter.
        self.device = "cpu"
        # A blank (all-black) image has no shape or colour; it maps to this fixed unit vector.
        self._blank = np.full(self.dim, 1.0 / np.sqrt(self.dim), np.float32)

    def decode(self, images) -> np.ndarray:
        return np.stack([_decode_rgb(b, WORK_SIZE, f"image {i}") for i, b in enumerate(images)])

    def _images(self, images: list) -> np.ndarray:
        feats = features(self.decode(images))
        out = l2_normalize(feats)
        blank = np.linalg.norm(feats, axis=1) < 1e-6
        if blank.any():
            out[blank] = self._blank
        return out

    def _texts(self, texts: list) -> np.ndarray:
        raise ConfigError(
            "embed.embedder=builtin has no text encoder: the filter's class-prompt term "
            "(filter.alpha > 0) needs an image-text model; set embed.embedder=clip (or "
            "filter.embedder=clip) with embed.model a CLIP hub id or local folder, or set filter.alpha=0")

    def describe(self) -> Dict[str, Any]:
        return {"embedder": self.name, "dim": self.dim, "work_size": WORK_SIZE,
                "features": "8x8 centred intensity + HOG 4x4 and 2x2 (8 orientations) + mean colour"}
