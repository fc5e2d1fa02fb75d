"""csv: a user's own image folder (data.root) described by a CSV (data.csv_file).

The CSV (a path relative to data.root, or absolute) has a header row and the columns
- `path`: the image file, relative to data.root (absolute paths are accepted when they
  point inside it). A path may not leave the folder: `..` components, absolute paths
  outside it and symlinks resolving outside it are refused, naming the line, and so is
  one file listed on two lines (also through a symlink alias or a hard link).
- `y`: the target class, an integer 0..K-1 (every class present; K <= 1000)
- `a`: the bias attribute, an integer 0..B-1 (every value present; B <= 1000)
- `split`: train / val / test (or 0 / 1 / 2)
- optionally `id`: a unique id per row (default: derived from the path)
Other columns are ignored. Each image may be listed once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raybias.data.sources import (DataError, SourceData, dataset_root, file_table, int_column,
                                  read_csv_strings, split_column)

REQUIRED = ("path", "y", "a", "split")
# More classes or bias values than this is a typo in the labels, not a dataset (and each
# of 0..K-1 must appear on some row, so a label is also below the number of rows).
MAX_LABELS = 1000


def _numbered(values: np.ndarray, column: str, where: Path, kind: str) -> int:
    """K for values that must be exactly 0..K-1 (values already checked to be small)."""
    present = np.unique(values)
    count = int(present[-1]) + 1
    gaps = np.setdiff1d(np.arange(count), present)
    if len(gaps):
        shown = ", ".join(map(str, present[:20].tolist())) + (", ..." if len(present) > 20 else "")
        raise DataError(f"{where}: column '{column}' has values [{shown}]; {kind} must be numbered "
                        f"0..{count - 1} with each present, but no row has {column}="
                        f"{', '.join(map(str, gaps[:5].tolist()))}")
    if count < 2:
        raise DataError(f"{where}: column '{column}' has only the value {int(present[0])}; "
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
    top = min(len(df), MAX_LABELS) - 1
    why = (f"; labels are numbered from 0 with each value present, and the file has {len(df)} rows"
           + ("" if len(df) <= MAX_LABELS else f" (at most {MAX_LABELS} values are allowed)"))
    y = int_column(df, "y", csv_path, minimum=0, maximum=top, why=why)
    a = int_column(df, "a", csv_path, minimum=0, maximum=top, why=why)
    split = split_column(df, "split", csv_path)
    n_classes = _numbered(y, "y", csv_path, "classes")
    n_bias = _numbered(a, "a", csv_path, "bias values")
    if "id" in df.columns and (df["id"].str.strip() != "").all():
        ids = [f"csv-{v.strip()}" for v in df["id"]]
    else:
        ids = lambda rel_paths: [f"csv-{r}" for r in rel_paths]  # noqa: E731 - from the checked paths
    table = file_table(ids=ids, paths=df["path"].tolist(), y=y, a=a, split=split, n_bias=n_bias, root=root,
                       where=str(csv_path), labels=[f"line {i + 2}" for i in range(len(df))])
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
