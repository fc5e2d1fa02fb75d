"""Small datasets in EXACTLY the real on-disk formats, with known group counts.

Each `make_*` function writes a dataset into a folder and returns a `DataFixture`: the
folder, the config overrides that point raybias at it, and the group counts per split
that `raybias prepare` must produce at severity original, 0.95 and 0.99 (worked out by
hand below from FFR's rule, n_conflict_kept = ceil(n_aligned * (1 - s) / s) as FFR's
make_harder computes it in float64 (it removes int(n_conflict - to_keep) images), split
over the conflicting bias values in proportion to their sizes). Every validation group here
has fewer than 10 images, so `data.val_protocol: biased` (FFR's, at least 10 conflicting per
class) keeps the validation counts as they are. The images are real small
JPEG/PNG files whose content depends on the group (a background colour per bias
value, a bright or dark central blob per class, noise), so a classifier can learn them.

Reusable from any test: `from fixtures_data import make_celeba` (pytest puts tests/ on
sys.path), then e.g. `raybias prepare configs/celeba.yaml *fx.overrides(0.95)`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

# The 40 attribute names of list_attr_celeba.txt, in the file's order.
CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
assert len(CELEBA_ATTRS) == 40

BACKGROUNDS = [(40, 90, 40), (40, 60, 160), (150, 60, 60)]  # per bias value
FOREGROUNDS = [(70, 50, 30), (235, 215, 120)]  # per class: dark / bright blob


@dataclass
class DataFixture:
    source: str
    root: Path
    # severity ("original", "0.95", "0.99") -> split -> count per group (group = y * n_bias + a)
    counts: Dict[str, Dict[str, List[int]]]
    aligned: List[int]
    n_bias: int = 2
    extra_overrides: List[str] = field(default_factory=list)
    notes: Dict[str, object] = field(default_factory=dict)

    def overrides(self, severity="original", **more) -> List[str]:
        """`key=value` overrides that point a config at this dataset."""
        out = [f"data.source={self.source}", f"data.root={self.root}", f"data.severity={severity}"]
        out += self.extra_overrides
        out += [f"data.{k}={v}" for k, v in more.items()]
        return out

    def expected(self, severity) -> Dict[str, List[int]]:
        return self.counts[str(severity)]

    @property
    def n_images(self) -> int:
        return sum(sum(v) for v in self.counts["original"].values())


def group_image(y: int, a: int, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A uint8 HxWx3 picture of group (y, a): background by a, blob by y, noise."""
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[a % len(BACKGROUNDS)]
    cy, cx = height / 2 + rng.uniform(-2, 2), width / 2 + rng.uniform(-2, 2)
    r = min(width, height) * rng.uniform(0.25, 0.35)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[blob] = FOREGROUNDS[y % len(FOREGROUNDS)]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())


def _rows(counts: Dict[str, List[int]], n_bias: int, rng: np.random.Generator):
    """(y, a, split) for every image, shuffled so files are not sorted by group."""
    rows = []
    for split, per_group in counts.items():
        for g, n in enumerate(per_group):
            rows += [(g // n_bias, g % n_bias, split)] * n
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


# --- CelebA ---------------------------------------------------------------------------------

# Groups (Blond_Hair y, Male a): 0 dark-haired/female, 1 dark-haired/male, 2 blond/female,
# 3 blond/male. Like the real data, women are the majority of both classes in train
# (44 > 40, 30 > 6), so aligned = the distinct assignment with the most aligned images:
# [1, 0] (40 + 30 = 70 beats 44 + 6 = 50): dark-haired <-> male, blond <-> female.
#   s = 0.95: class 0 keeps ceil(40 * 0.05 / 0.95) = ceil(2.11) = 3 women;
#             class 1 keeps ceil(30 * 0.05 / 0.95) = ceil(1.58) = 2 men.
#   s = 0.99: ceil(40 * 0.01 / 0.99) = ceil(0.40) = 1; ceil(30 * 0.01 / 0.99) = 1.
CELEBA_COUNTS = {"train": [44, 40, 30, 6], "val": [4, 3, 3, 2], "test": [4, 3, 3, 2]}
CELEBA_EXPECTED = {
    "original": CELEBA_COUNTS,
    "0.95": {"train": [3, 40, 30, 2], "val": [4, 3, 3, 2], "test": [4, 3, 3, 2]},
    "0.99": {"train": [1, 40, 30, 1], "val": [4, 3, 3, 2], "test": [4, 3, 3, 2]},
}


def make_celeba(root: Path, variant: str = "txt", seed: int = 0) -> DataFixture:
    """CelebA as distributed (`variant="txt"`) or as on Kaggle (`"kaggle"`: nested image
    folder, list_attr_celeba.csv, list_eval_partition.csv). 144 JPEGs of 26x32 px
    (the 178x218 aspect)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    image_dir = root / ("img_align_celeba/img_align_celeba" if variant == "kaggle" else "img_align_celeba")
    rows = _rows(CELEBA_COUNTS, 2, rng)
    it, ib = CELEBA_ATTRS.index("Blond_Hair"), CELEBA_ATTRS.index("Male")
    names, attrs, parts = [], [], []
    for i, (y, a, split) in enumerate(rows, start=1):
        name = f"{i:06d}.jpg"
        write_image(image_dir / name, group_image(y, a, rng, 26, 32))
        values = rng.choice([-1, 1], size=40)
        values[it] = 1 if y else -1
        values[ib] = 1 if a else -1
        names.append(name)
        attrs.append(values)
        parts.append({"train": 0, "val": 1, "test": 2}[split])
    if variant == "kaggle":
        with open(root / "list_attr_celeba.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", *CELEBA_ATTRS])
            for n, v in zip(names, attrs):
                w.writerow([n, *v.tolist()])
        with open(root / "list_eval_partition.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "partition"])
            for n, p in zip(names, parts):
                w.writerow([n, p])
    else:
        # The real file: a count, the names (with a trailing space), then right-aligned
        # values separated by one space, so "-1  1" has two spaces between values.
        lines = [str(len(names)), " ".join(CELEBA_ATTRS) + " "]
        lines += [f"{n} " + " ".join(f"{int(x):>2}" for x in v) for n, v in zip(names, attrs)]
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    return DataFixture("celeba", root, CELEBA_EXPECTED, aligned=[1, 0],
                       notes={"variant": variant, "image_dir": image_dir})


# --- Waterbirds -----------------------------------------------------------------------------

# Groups (y bird, a place): 0 landbird/land, 1 landbird/water, 2 waterbird/land,
# 3 waterbird/water. Majorities are distinct: aligned = [0, 1].
#   s = 0.95: class 0 keeps ceil(99 * 0.05 / 0.95) = ceil(5.21) = 6 on water;
#             class 1 keeps ceil(30 * 0.05 / 0.95) = ceil(1.58) = 2 on land.
#   s = 0.99: class 0 keeps 1 (99 * 0.01 / 0.99 = 1; in float64 1.0000000000000009, but
#             FFR's 10 - int(10 - to_keep) rounds that back to 1); class 1 ceil(0.30) = 1.
WATERBIRDS_COUNTS = {"train": [99, 10, 4, 30], "val": [5, 5, 4, 4], "test": [5, 5, 4, 4]}
WATERBIRDS_EXPECTED = {
    "original": WATERBIRDS_COUNTS,
    "0.95": {"train": [99, 6, 2, 30], "val": [5, 5, 4, 4], "test": [5, 5, 4, 4]},
    "0.99": {"train": [99, 1, 1, 30], "val": [5, 5, 4, 4], "test": [5, 5, 4, 4]},
}
WATERBIRDS_SPECIES = {
    0: ["020.Yellow_breasted_Chat", "094.White_breasted_Nuthatch"],
    1: ["001.Black_footed_Albatross", "059.California_Gull"],
}
PLACES = {0: ["/b/bamboo_forest", "/f/forest/broadleaf"], 1: ["/o/ocean", "/l/lake/natural"]}


def make_waterbirds(root: Path, seed: int = 0) -> DataFixture:
    """metadata.csv (img_id, img_filename, y, split, place, place_filename) and 179 JPEGs
    of varied sizes in species folders."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = _rows(WATERBIRDS_COUNTS, 2, rng)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, (y, a, split) in enumerate(rows, start=1):
            folder = WATERBIRDS_SPECIES[y][i % 2]
            species = folder.split(".", 1)[1]
            rel = f"{folder}/{species}_{i:04d}_{1000 + i}.jpg"
            width, height = [(32, 24), (28, 28), (24, 30)][i % 3]
            write_image(root / rel, group_image(y, a, rng, width, height))
            place = f"{PLACES[a][i % 2]}/{i:08d}.jpg"
            w.writerow([i, rel, y, {"train": 0, "val": 1, "test": 2}[split], a, place])
    return DataFixture("waterbirds", root, WATERBIRDS_EXPECTED, aligned=[0, 1], notes={
        "class_words": [["white breasted nuthatch", "yellow breasted chat"],
                        ["black footed albatross", "california gull"]]})


# --- UTKFace --------------------------------------------------------------------------------

# Groups (y gender: 0 male, 1 female; a age bin: 0 young 0-5, 1 old 20-50), all files:
# 20, 60, 40, 12. No split ships: raybias splits each group by seed, round(0.15 n) to val
# and to test: 20 -> 3/3, 60 -> 9/9, 40 -> 6/6, 12 -> round(1.8) = 2/2; train the rest.
# Train [14, 42, 28, 8]; majorities distinct: aligned = [1, 0] (men old, women young).
#   s = 0.95: class 0 keeps ceil(42 * 0.05 / 0.95) = ceil(2.21) = 3 young men;
#             class 1 keeps ceil(28 * 0.05 / 0.95) = ceil(1.47) = 2 old women.
#   s = 0.99: ceil(42 / 99) = 1; ceil(28 / 99) = 1.
UTKFACE_TOTALS = [20, 60, 40, 12]
UTKFACE_EXPECTED = {
    "original": {"train": [14, 42, 28, 8], "val": [3, 9, 6, 2], "test": [3, 9, 6, 2]},
    "0.95": {"train": [3, 42, 28, 2], "val": [3, 9, 6, 2], "test": [3, 9, 6, 2]},
    "0.99": {"train": [1, 42, 28, 1], "val": [3, 9, 6, 2], "test": [3, 9, 6, 2]},
}
# Files that are not used: ages outside both bins, and names not in the format.
UTKFACE_OTHER_AGES = [6, 7, 12, 19, 51, 85]
UTKFACE_MALFORMED = ["_1_0_20170109150557335.jpg.chip.jpg", "25_2_0_20170116174525125.jpg.chip.jpg",
                     "face.jpg"]


def make_utkface(root: Path, seed: int = 0) -> DataFixture:
    """`UTKFace/[age]_[gender]_[race]_[date&time].jpg.chip.jpg` files (the aligned and
    cropped release), 132 usable, including one real-style name without the race field,
    plus 6 with ages outside both bins, 3 malformed names and a README.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "UTKFace"
    stamp = 20170109142408075
    n = 0
    for g, total in enumerate(UTKFACE_TOTALS):
        y, a = g // 2, g % 2
        for _ in range(total):
            n += 1
            age = int(rng.integers(0, 6)) if a == 0 else int(rng.integers(20, 51))
            race = int(rng.integers(0, 5))
            name = f"{age}_{y}_{race}_{stamp + n}.jpg.chip.jpg"
            if g == 3 and n == sum(UTKFACE_TOTALS):  # like the real 39_1_20170116174525125.jpg.chip.jpg
                name = f"{age}_{y}_{stamp + n}.jpg.chip.jpg"
            write_image(folder / name, group_image(y, a, rng, 28, 28))
    for age in UTKFACE_OTHER_AGES:
        n += 1
        write_image(folder / f"{age}_0_1_{stamp + n}.jpg.chip.jpg", group_image(0, 1, rng, 28, 28))
    for name in UTKFACE_MALFORMED:
        write_image(folder / name, group_image(1, 1, rng, 28, 28))
    (root / "README.txt").write_text("UTKFace test fixture\n")
    return DataFixture("utkface", root, UTKFACE_EXPECTED, aligned=[1, 0],
                       notes={"malformed": len(UTKFACE_MALFORMED), "other_ages": len(UTKFACE_OTHER_AGES)})


# --- csv ------------------------------------------------------------------------------------

# Two classes, three bias values (groups y * 3 + a). Train: class 0 has a = 0, 1, 2:
# 60, 9, 3; class 1: 4, 8, 50. Majorities distinct: aligned = [0, 2].
#   s = 0.95: class 0 keeps ceil(60 * 0.05 / 0.95) = ceil(3.16) = 4 conflicting, split
#             in proportion 9 : 3 -> 3, 1 exactly: a = 1 keeps 3, a = 2 keeps 1.
#             class 1 keeps ceil(50 * 0.05 / 0.95) = ceil(2.63) = 3, split 4 : 8 -> 1, 2.
#   s = 0.99: class 0 keeps ceil(60 / 99) = 1, split 9 : 3 -> 0.75, 0.25 -> 0 + 0, the
#             leftover to the largest remainder: a = 1; class 1 ceil(50 / 99) = 1, split
#             4 : 8 -> 0.33, 0.67: a = 1.
CSV_COUNTS = {"train": [60, 9, 3, 4, 8, 50], "val": [2] * 6, "test": [2] * 6}
CSV_EXPECTED = {
    "original": CSV_COUNTS,
    "0.95": {"train": [60, 3, 1, 1, 2, 50], "val": [2] * 6, "test": [2] * 6},
    "0.99": {"train": [60, 1, 0, 0, 1, 50], "val": [2] * 6, "test": [2] * 6},
}


def make_csv(root: Path, split_style: str = "names", csv_file: str = "metadata.csv", seed: int = 0) -> DataFixture:
    """A user's folder: PNG and JPEG files in subfolders and a CSV with path, y, a, split
    (+ an ignored `note` column); one row gives its path as an absolute path inside the
    folder. `split_style`: "names" (train/val/test) or "codes" (0/1/2)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = _rows(CSV_COUNTS, 3, rng)
    lines = []
    for i, (y, a, split) in enumerate(rows):
        ext = ".png" if i % 2 else ".jpg"
        rel = f"images/{split}/class{y}/img_{i:04d}{ext}"
        write_image(root / rel, group_image(y, a, rng, 24, 24))
        path = str(root / rel) if i == 0 else rel
        code = {"train": "0", "val": "1", "test": "2"}[split] if split_style == "codes" else split
        lines.append([path, y, a, code, f"row {i}"])
    with open(root / csv_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "y", "a", "split", "note"])
        w.writerows(lines)
    extra = [] if csv_file == "metadata.csv" else [f"data.csv_file={csv_file}"]
    return DataFixture("csv", root, CSV_EXPECTED, aligned=[0, 2], n_bias=3, extra_overrides=extra)


MAKERS = {"celeba": make_celeba, "waterbirds": make_waterbirds, "utkface": make_utkface, "csv": make_csv}


def rewrite_csv(path: Path, edit) -> None:
    """Apply `edit(rows)` (a list of dicts) to a CSV and write it back (bad-input tests)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields: Sequence[str] = reader.fieldnames or []
        rows = list(reader)
    rows, fields = edit(rows, list(fields)) or (rows, fields)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
