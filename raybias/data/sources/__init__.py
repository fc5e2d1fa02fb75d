"""Data sources: each reads one on-disk format and returns rows of the raybias schema.

A source is a function `load(data_cfg) -> SourceData`, registered by name. It returns
every split as shipped (severity is applied afterwards by `raybias.data.severity`). Its
table holds either the images themselves (`image`: encoded bytes at `data.image_size`,
as colored_digits makes them) or, for sources that read image files, the column
`FILE_COLUMN` (absolute path of each file) and no `image`: `prepare` then loads only the
rows that severity keeps, in parallel, while it writes the shards. Sources on disk also
keep `path`, the file relative to `data.root`.

The helpers below are shared by the on-disk sources: they turn every problem into a
`DataError` that names the file, the line or row, the bad value and what is allowed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd

FILE_COLUMN = "_file"  # absolute image path; internal, never written to the run directory
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset on disk is missing, malformed or unusable; the message names the file/field."""


@dataclass
class SourceData:
    table: pd.DataFrame
    n_classes: int
    n_bias: int
    class_names: List[str]
    bias_names: List[str]
    class_words: List[List[str]]  # members of each class, drawn from in prompts
    bias_words: List[str]
    prompt_template: str  # uses {member} and {bias}
    default_aligned: Optional[List[int]] = None  # aligned[y]; None: majority in train
    extra: Dict[str, object] = field(default_factory=dict)


_MODULES = {
    "colored_digits": "raybias.data.sources.colored_digits",
    "celeba": "raybias.data.sources.celeba",
    "waterbirds": "raybias.data.sources.waterbirds",
    "utkface": "raybias.data.sources.utkface",
    "csv": "raybias.data.sources.csv_source",
}


def get_source(name: str) -> Callable:
    if name not in _MODULES:
        raise DataError(f"unknown data.source {name!r}: allowed {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).load


def load_source(data_cfg) -> SourceData:
    src = get_source(data_cfg.source)(data_cfg)
    if data_cfg.class_words is not None:
        src.class_words = [list(w) for w in data_cfg.class_words]
    if data_cfg.bias_words is not None:
        src.bias_words = list(data_cfg.bias_words)
    if data_cfg.prompt_template is not None:
        src.prompt_template = data_cfg.prompt_template
    if len(src.class_words) != src.n_classes:
        raise DataError(f"data.class_words has {len(src.class_words)} entries; the data has {src.n_classes} classes")
    if len(src.bias_words) != src.n_bias:
        raise DataError(f"data.bias_words has {len(src.bias_words)} entries; the data has {src.n_bias} bias values")
    if len(src.table) == 0:
        raise DataError(f"data.source={data_cfg.source} at {data_cfg.root}: the dataset is empty")
    for y, members in enumerate(src.class_words):
        if not members:
            raise DataError(f"data.class_words[{y}] is empty; give at least one word for class {y}")
    return src


# --- helpers for sources that read files under data.root --------------------------------

def dataset_root(data_cfg) -> Path:
    """data.root as an existing folder (the resolved path)."""
    if not data_cfg.root:
        raise DataError(f"data.root is not set: data.source={data_cfg.source} reads its files from that folder")
    root = Path(os.path.expanduser(str(data_cfg.root)))
    if not root.exists():
        raise DataError(f"data.root {str(root)!r} does not exist (data.source={data_cfg.source})")
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder (data.source={data_cfg.source})")
    return root.resolve()


def find_first(root: Path, candidates: Iterable[str], want_dir: bool = False) -> Optional[Path]:
    """The first of `candidates` (paths relative to root) that exists, else None."""
    for rel in candidates:
        p = root / rel
        if (p.is_dir() if want_dir else p.is_file()):
            return p
    return None


def read_csv_strings(path: Path, required: Sequence[str], what: str = "") -> pd.DataFrame:
    """A CSV with a header row, every cell kept as the string written (no type guessing),
    refusing a missing file, a parse error or a missing required column by name."""
    label = f"{what} " if what else ""
    if not path.is_file():
        raise DataError(f"{label}file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty; expected a header row with columns {', '.join(required)}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} is missing column(s) {', '.join(repr(c) for c in missing)}; "
                        f"it needs {', '.join(required)} and has {', '.join(map(repr, df.columns))}")
    return df


def int_column(df: pd.DataFrame, column: str, where: Path, allowed: Optional[Sequence[int]] = None,
               minimum: Optional[int] = None, first_line: int = 2) -> np.ndarray:
    """Column of integer strings -> int64 array; the first bad cell is named by file and line.

    `first_line` is the file line of the first data row (2 under a header row)."""
    raw = df[column].astype(str).str.strip()
    num = pd.to_numeric(raw, errors="coerce")
    bad = num.isna() | (num != np.floor(num))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where}, line {i + first_line}: column '{column}' has {raw.iloc[i]!r}; "
                        f"expected an integer{_allowed_text(allowed, minimum)}")
    values = num.to_numpy().astype(np.int64)
    out = np.zeros(len(values), dtype=bool)
    if allowed is not None:
        out |= ~np.isin(values, list(allowed))
    if minimum is not None:
        out |= values < minimum
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise DataError(f"{where}, line {i + first_line}: column '{column}' has {raw.iloc[i]!r}, "
                        f"out of range;{_allowed_text(allowed, minimum)[1:]}")
    return values


def _allowed_text(allowed, minimum) -> str:
    if allowed is not None:
        return " (allowed: " + ", ".join(str(a) for a in allowed) + ")"
    if minimum is not None:
        return f" (allowed: an integer >= {minimum})"
    return ""


def split_column(df: pd.DataFrame, column: str, where: Path, first_line: int = 2) -> np.ndarray:
    """Split names (train/val/test, any case) or codes (0/1/2) -> train/val/test strings."""
    raw = df[column].astype(str).str.strip()
    names = {"train": "train", "val": "val", "test": "test", "valid": "val", "validation": "val"}
    names.update(SPLIT_CODES)
    names.update({f"{k}.0": v for k, v in SPLIT_CODES.items()})
    mapped = raw.str.lower().map(names)
    if mapped.isna().any():
        i = int(np.flatnonzero(mapped.isna().to_numpy())[0])
        raise DataError(f"{where}, line {i + first_line}: column '{column}' has {raw.iloc[i]!r}; "
                        "allowed: train, val, test (or 0, 1, 2)")
    return mapped.to_numpy(dtype=object)


def safe_file(root: Path, rel: str, where: str) -> Path:
    """`rel` joined to `root`, refused if it leaves the dataset folder: a `..` component,
    an absolute path outside root, or a symlink that resolves outside root."""
    text = str(rel).strip()
    if not text:
        raise DataError(f"{where}: the image path is empty")
    parts = Path(text.replace("\\", "/")).parts
    if ".." in parts:
        raise DataError(f"{where}: image path {text!r} contains '..'; paths must stay inside data.root {str(root)!r}")
    p = Path(text) if os.path.isabs(text) else root / text
    resolved = Path(os.path.realpath(p))
    if os.path.commonpath([str(resolved), str(root)]) != str(root):
        kind = "is a symlink that resolves" if not os.path.isabs(text) else "is"
        raise DataError(f"{where}: image path {text!r} {kind} outside data.root {str(root)!r} "
                        f"({str(resolved)!r}); paths must stay inside the dataset folder")
    return p


def relative_to_root(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def file_table(ids, files, rel_paths, y, a, split, n_bias: int, where: str) -> pd.DataFrame:
    """The schema's columns for a source that reads files (images are loaded by prepare)."""
    y = np.asarray(y, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    table = pd.DataFrame({
        "id": list(ids), "y": y, "a": a, "group": y * n_bias + a, "split": list(split),
        "source": "real", "path": list(rel_paths), FILE_COLUMN: [str(f) for f in files],
    })
    dup = table["id"].duplicated()
    if dup.any():
        raise DataError(f"{where}: image id {table.loc[dup, 'id'].iloc[0]!r} appears twice; "
                        "each image may be listed once")
    return table
