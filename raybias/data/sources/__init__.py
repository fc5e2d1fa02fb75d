"""Data sources: each reads one on-disk format and returns rows of the raybias schema.

A source is a function `load(data_cfg) -> SourceData`, registered by name in
raybias/registry.py. It returns every split as shipped (severity is applied afterwards by
`raybias.data.severity`). Its table holds either the images themselves (`image`: encoded
bytes at `data.image_size`, as colored_digits makes them) or, for sources that read image
files, the column `FILE_COLUMN` (absolute path of each file) and no `image`: `prepare` then
loads only the rows that severity keeps, in parallel, while it writes the shards. Sources
on disk also keep `path`, the file relative to `data.root`.

The helpers below are shared by the on-disk sources: they turn every problem into a
`DataError` that names the file, the line or row, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from raybias.registry import SOURCES, load_code

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


def get_source(name: str) -> Callable:
    if name not in SOURCES:
        raise DataError(f"unknown data.source {name!r}: allowed {', '.join(SOURCES)}")
    return load_code(SOURCES[name].load)


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
               minimum: Optional[int] = None, first_line: int = 2,
               maximum: Optional[int] = None, why: str = "") -> np.ndarray:
    """Column of integer strings -> int64 array; the first bad cell is named by file and line.

    Range checks (`allowed`, `minimum`, `maximum`) run on the parsed numbers before
    anything else uses them, so a typo such as 30000000 fails at once, naming its line.
    `first_line` is the file line of the first data row (2 under a header row); `why`
    explains the bound in the message."""
    raw = df[column].astype(str).str.strip()
    num = pd.to_numeric(raw, errors="coerce")
    with np.errstate(invalid="ignore"):
        bad = num.isna() | ~np.isfinite(num.astype(float)) | (num != np.floor(num))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where}, line {i + first_line}: column '{column}' has {raw.iloc[i]!r}; "
                        f"expected an integer{_allowed_text(allowed, minimum, maximum)}")
    as_float = num.to_numpy(dtype=float)
    out = np.zeros(len(as_float), dtype=bool)
    if allowed is not None:
        out |= ~np.isin(as_float, [float(v) for v in allowed])
    if minimum is not None:
        out |= as_float < minimum
    if maximum is not None:
        out |= as_float > maximum
    # Whatever the bounds, a label must fit int64 (pandas parses 1e300 as a float).
    out |= np.abs(as_float) >= 2.0 ** 62
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise DataError(f"{where}, line {i + first_line}: column '{column}' has {raw.iloc[i]!r}, "
                        f"out of range{_allowed_text(allowed, minimum, maximum)}{why}")
    return as_float.astype(np.int64)


def _allowed_text(allowed, minimum, maximum=None) -> str:
    if allowed is not None:
        return " (allowed: " + ", ".join(str(a) for a in allowed) + ")"
    if minimum is not None and maximum is not None:
        return f" (allowed: an integer >= {minimum} and <= {maximum})"
    if minimum is not None:
        return f" (allowed: an integer >= {minimum})"
    if maximum is not None:
        return f" (allowed: an integer <= {maximum})"
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


def _inside(resolved: str, root: str) -> bool:
    return resolved == root or resolved.startswith(root if root.endswith(os.sep) else root + os.sep)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


# A folder that this many entries point into is listed once (one readdir) instead of one
# lstat per file: much faster on network file systems (CelebA: 200k files in one folder).
_LIST_FOLDER_AT = 32


def _listing(folder: str) -> Dict[str, os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it}
    except OSError:
        return {}


def _file_mode(path: str, entry: Optional[os.DirEntry], listed: bool) -> Optional[int]:
    """lstat's mode of `path` (None: missing), from the folder listing when there is one."""
    if listed:
        if entry is None:
            return None
        try:
            if entry.is_symlink():
                return stat.S_IFLNK
            if entry.is_file(follow_symlinks=False):
                return stat.S_IFREG
        except OSError:
            return None
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def safe_files(root: Path, entries: Sequence[str], where: str,
               labels: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """THE safe-path helper every on-disk source goes through (via `file_table`).

    Each entry (an image path as the metadata writes it: relative to root, or absolute) is
    refused, naming `where` and its label (e.g. "line 7"), when it
    - is empty or has a `..` component,
    - is an absolute path outside root, or resolves outside root through a symlink (of the
      file or of any folder on the way),
    - exists but is not a regular file (a folder, a named pipe, a device ...),
    - resolves to the same file as an earlier entry (a symlink alias, two spellings of one
      path), which would put one image in two rows and so possibly in train and test;
      both entries are named.
    A file that does not exist is not refused here: loading it reports it.

    Returns (absolute paths to open, paths relative to root), in order. String operations
    and one lstat per file (one listing per large folder; folders resolved once each), so
    CelebA's 200k names cost about a second.
    """
    root_s = os.path.realpath(str(root))

    def at(i: int) -> str:
        return f"{where}, {labels[i]}" if labels is not None else where

    parsed = []  # (text, relative text or None, path, folder, name)
    for i, entry in enumerate(entries):
        text = str(entry).strip()
        if not text:
            raise DataError(f"{at(i)}: the image path is empty")
        if ".." in text.replace("\\", "/").split("/"):
            raise DataError(f"{at(i)}: image path {text!r} contains '..'; paths must stay inside data.root "
                            f"{root_s!r}")
        # Absolute paths may name root by another spelling (a symlinked data.root): the
        # resolved file decides. (Strings, not pathlib: pathlib costs seconds per 200k names.)
        if os.path.isabs(text):
            rel_text, path = None, os.path.normpath(text)
        else:
            rel_text = text
            if "//" in text or "./" in text or text.endswith(("/", "/.")) or text == "." or os.sep != "/":
                rel_text = os.path.normpath(text)
            path = f"{root_s}/{rel_text}" if root_s != "/" else f"/{rel_text}"
        folder, _, name = path.rpartition("/")
        parsed.append((text, rel_text, path, folder or "/", name))

    per_folder = Counter(p[3] for p in parsed)
    real_folders: Dict[str, str] = {}
    listings: Dict[str, Dict[str, os.DirEntry]] = {}
    seen: Dict[str, int] = {}
    files: List[str] = []
    rels: List[str] = []
    for i, (text, rel_text, path, folder, name) in enumerate(parsed):
        real_folder = real_folders.get(folder)
        if real_folder is None:
            real_folder = real_folders[folder] = os.path.realpath(folder)
        listed = per_folder[folder] >= _LIST_FOLDER_AT
        if listed and folder not in listings:
            listings[folder] = _listing(folder)
        mode = _file_mode(path, listings[folder].get(name) if listed else None, listed)
        if mode is not None and stat.S_ISLNK(mode):
            resolved = os.path.realpath(path)
            try:
                mode = os.stat(resolved).st_mode
            except OSError:
                mode = None  # a broken link: loading reports the missing file
        else:
            resolved = f"{real_folder}/{name}" if real_folder != "/" else f"/{name}"
        if not _inside(resolved, root_s):
            how = "is" if rel_text is None else "is a symlink that resolves"
            raise DataError(f"{at(i)}: image path {text!r} {how} outside data.root {root_s!r} "
                            f"({resolved!r}); paths must stay inside the dataset folder")
        if mode is not None and not stat.S_ISREG(mode):
            raise DataError(f"{at(i)}: image path {text!r} is {_kind(mode)}, not a regular image file")
        first = seen.setdefault(resolved, i)
        if first != i:
            mine, other = (labels[i], labels[first]) if labels is not None else (f"#{i + 1}", f"#{first + 1}")
            prep = "on" if other.startswith("line") else "as"
            first_text = parsed[first][0]
            alias = "" if first_text == text else f" as {first_text!r}"
            raise DataError(f"{where}, {mine}: image {text!r} is already listed {prep} {other}{alias} "
                            f"(both are the file {resolved!r}); each image may be listed once, or one "
                            "image could land in two splits (train and test)")
        files.append(path)
        if rel_text is not None:
            rels.append(rel_text.replace(os.sep, "/"))
        else:
            shown = next(p for p in (path, f"{real_folder}/{name}", resolved) if _inside(p, root_s))
            rels.append(os.path.relpath(shown, root_s).replace(os.sep, "/"))
    return files, rels


def safe_file(root: Path, rel: str, where: str) -> Path:
    """One entry through `safe_files` (same checks, minus the duplicate check across entries)."""
    files, _ = safe_files(root, [rel], where)
    return Path(files[0])


def relative_to_root(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def file_table(ids, paths, y, a, split, n_bias: int, root: Path, where: str,
               labels: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The schema's columns for a source that reads files (images are loaded by prepare).

    `paths`: each row's image path as the metadata gives it (relative to `root`, or
    absolute inside it); every path goes through `safe_files` here, so every on-disk
    source refuses escapes and duplicates the same way. `labels`: where each row comes
    from, for messages ("line 7", "line 7 (img_id 12)"); default the row's id. `ids`: a
    list, or a function of the checked relative paths that makes them."""
    if callable(ids):
        files, rel_paths = safe_files(root, paths, where, labels)
        ids = list(ids(rel_paths))
    else:
        ids = list(ids)
        files, rel_paths = safe_files(root, paths, where, labels if labels is not None
                                      else [f"image id {i!r}" for i in ids])
    y = np.asarray(y, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    table = pd.DataFrame({
        "id": ids, "y": y, "a": a, "group": y * n_bias + a, "split": list(split),
        "source": "real", "path": rel_paths, FILE_COLUMN: files,
    })
    dup = table["id"].duplicated()
    if dup.any():
        raise DataError(f"{where}: image id {table.loc[dup, 'id'].iloc[0]!r} appears twice; "
                        "each image may be listed once")
    return table
