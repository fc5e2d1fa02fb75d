"""csv: a user's own image folder (data.root) described by a CSV (data.csv_file).

The CSV (a path relative to data.root, or absolute) has a header row and the columns
- `path`: the image file, relative to data.root (absolute paths are accepted when they
  point inside it). A path may not leave the folder: `..` components, absolute paths
  outside it and symlinks resolving outside it are refused, naming the line.
- `y`: the target class, an integer 0..K-1 (every class present)
- `a`: the bias attribute, an integer 0..B-1 (every value present)
- `split`: train / val / test (or 0 / 1 / 2)
- optionally `id`: a unique id per row (default: derived from the path)
Other columns are ignored. Each image may be listed once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raybias.data.sources import (DataError, SourceData, dataset_root, file_table, int_column,
                                  read_csv_strings, relative_to_root, safe_file, split_column)

REQUIRED = ("path", "y", "a", "split")


def _numbered(values: np.ndarray, column: str, where: Path, kind: str) -> int:
    """K for values that must be exactly 0..K-1."""
    present = sorted(set(int(v) for v in values))
    count = present[-1] + 1
    gaps = sorted(set(range(count)) - set(present))
    if gaps:
        raise DataError(f"{where}: column '{column}' has values {present}; {kind} must be numbered "
                        f"0..{count - 1} with each present, but no row has {column}="
                        f"{', '.join(map(str, gaps[:5]))}")
    if count < 2:
        raise DataError(f"{where}: column '{column}' has only the value {present[0]}; "
                        f"at least 2 {kind} are needed")
    return count


def load(cfg) -> SourceData:
    root = dataset_root(cfg)
    csv_path = Path(cfg.csv_file)
    if not csv_path.is_absolute():
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise DataError(f"data.csv_file {cfg.csv_file!r} not found: {csv_path} does not exist")
    df = read_csv_strings(csv_path, REQUIRED, "data.csv_file")
    if len(df) == 0:
        raise DataError(f"{csv_path} has a header but no rows: the dataset is empty")
    y = int_column(df, "y", csv_path, minimum=0)
    a = int_column(df, "a", csv_path, minimum=0)
    split = split_column(df, "split", csv_path)
    files = [safe_file(root, p, f"{csv_path}, line {i + 2}") for i, p in enumerate(df["path"])]
    rel = [relative_to_root(f, root) for f in files]
    first_line = {}
    for i, r in enumerate(rel):
        if r in first_line:
            raise DataError(f"{csv_path}, line {i + 2}: image {r!r} is already listed on line "
                            f"{first_line[r]}; each image may be listed once")
        first_line[r] = i + 2
    n_classes = _numbered(y, "y", csv_path, "classes")
    n_bias = _numbered(a, "a", csv_path, "bias values")
    if "id" in df.columns and (df["id"].str.strip() != "").all():
        ids = [f"csv-{v.strip()}" for v in df["id"]]
    else:
        ids = [f"csv-{r}" for r in rel]
    table = file_table(ids=ids, files=files, rel_paths=rel, y=y, a=a, split=split, n_bias=n_bias,
                       where=str(csv_path))
    warnings = []
    if cfg.class_words is None or cfg.bias_words is None:
        warnings.append("csv: prompts use generic words ('class 0', 'bias 1'); set data.class_words, "
                        "data.bias_words and data.prompt_template before running a generator")
    return SourceData(
        table=table, n_classes=n_classes, n_bias=n_bias,
        class_names=[f"class {k}" for k in range(n_classes)],
        bias_names=[f"bias {k}" for k in range(n_bias)],
        class_words=[[f"class {k}"] for k in range(n_classes)],
        bias_words=[f"bias {k}" for k in range(n_bias)],
        prompt_template="a photo of a {member}, {bias}",
        extra={"warnings": warnings, "csv_file": str(csv_path)},
    )
