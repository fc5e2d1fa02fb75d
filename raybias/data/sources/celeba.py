"""celeba: CelebA as distributed, or the Kaggle CSV variant of it.

On disk (under data.root; the official archive's Img/ Anno/ Eval/ folders also work):
- `img_align_celeba/*.jpg` (Kaggle nests it: `img_align_celeba/img_align_celeba/`)
- `list_attr_celeba.txt`: line 1 the image count, line 2 the 40 attribute names, then
  `filename v1 ... v40` with values 1 / -1, whitespace-separated (often several spaces)
  — or Kaggle's `list_attr_celeba.csv` with `image_id` and one column per attribute
- `list_eval_partition.txt`: `filename 0|1|2` (train/val/test)
  — or Kaggle's `list_eval_partition.csv` with `image_id, partition`

Target y = data.target_attr == 1 (default Blond_Hair); bias a = data.bias_attr == 1
(default Male).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from raybias.data.sources import (DataError, SourceData, dataset_root, file_table, find_first,
                                  int_column, read_csv_strings, relative_to_root)

ATTR_FILES = ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt", "list_eval_partition.csv")
IMAGE_DIRS = ("img_align_celeba/img_align_celeba", "img_align_celeba", "Img/img_align_celeba")
SPLITS = {"0": "train", "1": "val", "2": "test"}

# Words for attributes that read as adjectives of a person: (value -1 words, value 1 words).
# The first word of each list also names the class / bias value.
ATTR_WORDS: Dict[str, Tuple[List[str], List[str]]] = {
    "Blond_Hair": (["dark-haired", "brown-haired", "black-haired"], ["blond", "blond-haired"]),
    "Male": (["female"], ["male"]),
    "Young": (["old"], ["young"]),
    "Smiling": (["serious", "unsmiling"], ["smiling"]),
    "Attractive": (["plain-looking"], ["attractive"]),
    "Heavy_Makeup": (["makeup-free"], ["heavily made-up"]),
    "Gray_Hair": (["dark-haired"], ["gray-haired"]),
    "Wavy_Hair": (["straight-haired"], ["wavy-haired"]),
    "Chubby": (["slim"], ["chubby"]),
    "Eyeglasses": (["glasses-free"], ["bespectacled"]),
}


def attribute_words(attr: str) -> Tuple[List[List[str]], List[str], bool]:
    """(words for value -1 and 1, their names, whether they read as adjectives)."""
    if attr in ATTR_WORDS:
        neg, pos = ATTR_WORDS[attr]
        return [list(neg), list(pos)], [neg[0], pos[0]], True
    plain = attr.replace("_", " ").lower()
    return [[f"not {plain}"], [plain]], [f"not {attr}", attr], False


def _unknown_attr(key: str, attr: str, names: Sequence[str], where: Path) -> DataError:
    close = difflib.get_close_matches(attr, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"{key}={attr!r} is not an attribute in {where}{hint}; "
                     f"its attributes are: {', '.join(names)}")


def _read_attr_txt(path: Path, target: str, bias: str) -> Tuple[List[str], np.ndarray, np.ndarray, List[int]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise DataError(f"{path}: expected the image count on line 1 and the attribute names on line 2")
    try:
        declared = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise DataError(f"{path}, line 1: expected the number of images, found {lines[0]!r}") from None
    names = lines[1].split()
    col = {n: i for i, n in enumerate(names)}
    for key, attr in (("data.target_attr", target), ("data.bias_attr", bias)):
        if attr not in col:
            raise _unknown_attr(key, attr, names, path)
    files: List[str] = []
    values: List[Tuple[str, str]] = []
    line_no: List[int] = []
    it, ib = col[target] + 1, col[bias] + 1
    for n, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DataError(f"{path}, line {n}: expected a file name and {len(names)} values, "
                            f"found {len(parts) - 1} value(s)")
        files.append(parts[0])
        values.append((parts[it], parts[ib]))
        line_no.append(n)
    if len(files) != declared:
        raise DataError(f"{path}: line 1 says {declared} images but the file lists {len(files)} "
                        "(is the file truncated?)")
    vals = np.array(values, dtype=object).reshape(-1, 2)
    out = []
    for j, attr in enumerate((target, bias)):
        column = vals[:, j] if len(vals) else np.array([], dtype=object)
        ok = np.isin(column, ["1", "-1"])
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(f"{path}, line {line_no[i]}: attribute {attr} has {column[i]!r}; allowed: 1, -1")
        out.append((column == "1").astype(np.int64))
    return files, out[0], out[1], line_no


def _read_attr_csv(path: Path, target: str, bias: str) -> Tuple[List[str], np.ndarray, np.ndarray, List[int]]:
    df = read_csv_strings(path, ["image_id"], "CelebA attribute")
    names = [c for c in df.columns if c != "image_id"]
    for key, attr in (("data.target_attr", target), ("data.bias_attr", bias)):
        if attr not in df.columns:
            raise _unknown_attr(key, attr, names, path)
    y = (int_column(df, target, path, allowed=(-1, 1)) == 1).astype(np.int64)
    a = (int_column(df, bias, path, allowed=(-1, 1)) == 1).astype(np.int64)
    return df["image_id"].str.strip().tolist(), y, a, list(range(2, len(df) + 2))


def _read_partition(path: Path) -> Dict[str, str]:
    if path.suffix == ".csv":
        df = read_csv_strings(path, ["image_id", "partition"], "CelebA partition")
        codes = int_column(df, "partition", path, allowed=(0, 1, 2))
        return dict(zip(df["image_id"].str.strip(), (SPLITS[str(c)] for c in codes)))
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in SPLITS:
                raise DataError(f"{path}, line {n}: expected 'filename 0|1|2', found {line.strip()!r}")
            out[parts[0]] = SPLITS[parts[1]]
    return out


def load(cfg) -> SourceData:
    root = dataset_root(cfg)
    target, bias = cfg.target_attr, cfg.bias_attr
    attr_file = find_first(root, ATTR_FILES)
    if attr_file is None:
        raise DataError(f"CelebA attribute file not found in data.root {str(root)!r}: expected "
                        f"{' or '.join(ATTR_FILES)}")
    part_file = find_first(root, PARTITION_FILES)
    if part_file is None:
        raise DataError(f"CelebA partition file not found in data.root {str(root)!r}: expected "
                        f"{' or '.join(PARTITION_FILES)}")
    image_dir = find_first(root, IMAGE_DIRS, want_dir=True)
    if image_dir is None:
        raise DataError(f"CelebA image folder not found in data.root {str(root)!r}: expected "
                        f"{' or '.join(d + '/' for d in IMAGE_DIRS)}")

    reader = _read_attr_csv if attr_file.suffix == ".csv" else _read_attr_txt
    files, y, a, lines = reader(attr_file, target, bias)
    for name in files:
        # Entries are bare file names inside the image folder.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{attr_file}: entry {name!r} is not a plain file name inside {image_dir}")
    partition = _read_partition(part_file)
    missing = [f for f in files if f not in partition]
    if missing:
        raise DataError(f"{len(missing)} image(s) of {attr_file.name} have no line in {part_file} "
                        f"(e.g. {missing[0]!r}); every image needs a partition 0, 1 or 2")
    split = [partition[f] for f in files]
    # Plain string joins: pathlib costs seconds per 200k names. file_table checks each file
    # (inside data.root, also through symlinks of the file or its folder; listed once).
    rel_folder = relative_to_root(image_dir, root)
    table = file_table(
        ids=[f"celeba-{f.rsplit('.', 1)[0]}" for f in files], paths=[f"{rel_folder}/{f}" for f in files],
        y=y, a=a, split=split, n_bias=2, root=root, where=str(attr_file),
        labels=[f"line {n}" for n in lines])

    class_words, class_names, class_adj = attribute_words(target)
    bias_members, bias_names, bias_adj = attribute_words(bias)
    if class_adj and bias_adj:
        template = "a photo of a {member} {bias} person"
    else:
        template = "a photo of a person, {member}, {bias}"
    return SourceData(
        table=table, n_classes=2, n_bias=2,
        class_names=class_names, bias_names=bias_names,
        class_words=class_words, bias_words=[m[0] for m in bias_members],
        prompt_template=template,
        extra={"attr_file": str(attr_file), "partition_file": str(part_file), "image_dir": str(image_dir)},
    )

