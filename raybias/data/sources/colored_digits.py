"""colored_digits: scikit-learn's handwritten digits (1,797 8x8 images), coloured.

Target y = digit >= 5; bias a = foreground colour index into `data.colors`. Split into
train/val/test by `data.seed` (fixed fractions). Train holds every digit in every colour
(colour independent of y: the "original" data), so severity s keeps each class's aligned
colour and subsamples the others, e.g. s = 0.99 gives train groups of about [630, 6, 6, 630].
Val and test hold each digit once, in a colour drawn independently of y (balanced).
Needs no download: the digits ship inside scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from raybias.data.images import encode_png
from raybias.data.sources import SourceData
from raybias.palette import COLOR_RGB

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def colorize(gray8: np.ndarray, rgb, size: int) -> np.ndarray:
    """8x8 intensities 0..16 -> size x size RGB uint8, colour on black."""
    g = Image.fromarray((gray8 / 16.0 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    g = np.asarray(g, dtype=np.float32) / 255.0
    return np.clip(g[..., None] * np.asarray(rgb, np.float32)[None, None, :], 0, 255).astype(np.uint8)


def load(cfg) -> SourceData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    n = len(labels)
    colors = list(cfg.colors)
    n_a = len(colors)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    n_test = int(round(cfg.test_fraction * n))
    split_of = np.empty(n, dtype=object)
    split_of[order[:n_val]] = "val"
    split_of[order[n_val:n_val + n_test]] = "test"
    split_of[order[n_val + n_test:]] = "train"
    # Evaluation colours: balanced and independent of y.
    eval_color = rng.integers(0, n_a, size=n)

    rows = []
    for i in range(n):
        y = int(labels[i] >= 5)
        split = split_of[i]
        color_ids = range(n_a) if split == "train" else [int(eval_color[i])]
        for c in color_ids:
            rows.append({
                "id": f"cd-{i:04d}-c{c}",
                "image": encode_png(colorize(images[i], COLOR_RGB[colors[c]], cfg.image_size)),
                "y": y, "a": c, "group": y * n_a + c, "split": split, "source": "real",
                "digit": int(labels[i]),
            })
    table = pd.DataFrame(rows)
    return SourceData(
        table=table, n_classes=2, n_bias=n_a,
        class_names=["digit<5", "digit>=5"], bias_names=colors,
        class_words=[DIGIT_WORDS[:5], DIGIT_WORDS[5:]],
        bias_words=colors,
        prompt_template="a {bias} {member}",
        default_aligned=[y % n_a for y in range(2)],
        extra={"digit_words": DIGIT_WORDS},
    )
