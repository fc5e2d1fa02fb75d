"""utkface: UTKFace images named `[age]_[gender]_[race]_[date&time].jpg`.

The files may sit directly in data.root or in subfolders (UTKFace/, crop_part1/, ...;
the aligned-and-cropped release names them `..._[date&time].jpg.chip.jpg`).
Target y = gender (0 male, 1 female). Bias a = age bin: a = 0 (young) for ages in
data.young_ages, a = 1 (old) for ages in data.old_ages (both inclusive); other ages
are dropped. UTKFace ships no split, so the rows are split train/val/test by data.seed
with data.val_fraction / data.test_fraction, stratified by group (every group gets its
share of val and test; the same seed gives the same split).

The real release has a few malformed names (e.g. `39_1_20170116174525125.jpg.chip.jpg`
lacks the race field; it still has age and gender, so it is used). A name whose first
two fields are not an age and a gender 0/1 is skipped with a counted warning; no
usable name at all is an error. A file name seen in two subfolders (crop_part1/ is a
subset of UTKFace/) is loaded once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from raybias.data.sources import IMAGE_EXTENSIONS, DataError, SourceData, dataset_root, file_table

FORMAT = "[age]_[gender]_[race]_[date&time].jpg"


def parse_name(name: str) -> Optional[Tuple[int, int]]:
    """(age, gender) from a UTKFace file name, None if it does not follow the format."""
    fields = name.split("_")
    if len(fields) < 3 or not fields[0].isdigit() or fields[1] not in ("0", "1"):
        return None
    return int(fields[0]), int(fields[1])


def _image_files(root: Path) -> List[Path]:
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(folder) / n)
    return out


def stratified_split(groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Per group: round(val_fraction * n) rows to val, round(test_fraction * n) to test
    (halves round up), the rest to train, drawn by `seed`."""
    rng = np.random.default_rng(seed)
    split = np.full(len(groups), "train", dtype=object)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(np.floor(val_fraction * len(idx) + 0.5))
        n_test = int(np.floor(test_fraction * len(idx) + 0.5))
        split[idx[:n_val]] = "val"
        split[idx[n_val:n_val + n_test]] = "test"
    return split


def load(cfg) -> SourceData:
    root = dataset_root(cfg)
    young, old = tuple(cfg.young_ages), tuple(cfg.old_ages)
    files, ages, genders = [], [], []
    malformed: List[str] = []
    seen: Dict[str, Path] = {}
    duplicates = 0
    for path in _image_files(root):
        parsed = parse_name(path.name)
        if parsed is None:
            malformed.append(path.relative_to(root).as_posix())
            continue
        key = path.name.split(".")[0]
        if key in seen:
            duplicates += 1
            continue
        seen[key] = path
        files.append(path)
        ages.append(parsed[0])
        genders.append(parsed[1])
    if not files:
        found = f" ({len(malformed)} image file(s) with other names, e.g. {malformed[0]!r})" if malformed else ""
        raise DataError(f"no UTKFace images named {FORMAT} under data.root {str(root)!r}{found}")

    ages_arr = np.asarray(ages)
    a = np.full(len(files), -1, dtype=np.int64)
    a[(ages_arr >= young[0]) & (ages_arr <= young[1])] = 0
    a[(ages_arr >= old[0]) & (ages_arr <= old[1])] = 1
    keep = a >= 0
    if not keep.any():
        raise DataError(f"none of the {len(files)} UTKFace images under {str(root)!r} has an age in "
                        f"data.young_ages {list(young)} or data.old_ages {list(old)}")
    warnings = []
    if malformed:
        warnings.append(f"utkface: skipped {len(malformed)} file(s) not named {FORMAT} "
                        f"(e.g. {', '.join(repr(m) for m in malformed[:3])})")
    if duplicates:
        warnings.append(f"utkface: {duplicates} file name(s) appear in more than one subfolder; each was loaded once")
    dropped = int((~keep).sum())

    files = [f for f, k in zip(files, keep) if k]
    y = np.asarray(genders, dtype=np.int64)[keep]
    a = a[keep]
    split = stratified_split(y * 2 + a, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    rel = [f.relative_to(root).as_posix() for f in files]
    stems = [f.name.split(".")[0] for f in files]
    # Found by walking data.root, but a file may still be a symlink to elsewhere, or an
    # alias of another: file_table refuses both, naming the files.
    table = file_table(ids=[f"utk-{s}" for s in stems], paths=rel, y=y, a=a, split=split, n_bias=2,
                       root=root, where=str(root), labels=[f"file {r!r}" for r in rel])
    bias_names = [f"age {young[0]}-{young[1]}", f"age {old[0]}-{old[1]}"]
    return SourceData(
        table=table, n_classes=2, n_bias=2,
        class_names=["male", "female"], bias_names=bias_names,
        class_words=[["male"], ["female"]], bias_words=["young", "adult"],
        prompt_template="a close-up photo of the face of a {bias} {member} person",
        extra={"warnings": warnings, "dropped_ages": dropped, "malformed": len(malformed)},
    )
