"""Paths a user gives, made absolute once, at the command line's boundary.

Ray runs work far from the caller's working directory: Ray Train V2 starts each worker in
Ray's artifacts folder, Ray Tune moves every trial into its own folder, a Ray job runs in
a temporary copy of its working_dir. A relative path that reaches any of them names
another place (the quickstart's `runs/quickstart` became
`…/artifacts/pack-1-of-2/runs/quickstart`). So every local path of a config is made
absolute against the caller's working directory before anything is sent to Ray; URIs
(`s3://`, `gs://`, …) pass unchanged.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple
from urllib.parse import urlparse


def is_uri(path: str) -> bool:
    """`s3://bucket/x` and the like; "c:" on Windows is a drive letter, not a scheme."""
    return len(urlparse(str(path)).scheme) > 1


def absolute(path: str, cwd: Optional[str] = None) -> str:
    """`path` made absolute against `cwd` (default: this process's working directory);
    `~` expanded; URIs unchanged."""
    path = str(path)
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), path))


def _model_path(value: Optional[str], cwd: Optional[str]) -> Optional[str]:
    """A model reference is a hub id (`org/name`) or a local folder; only an existing local
    folder (or one spelled as a path: `./x`, `../x`, `~/x`, `/x`) is made absolute."""
    if value is None or value == "builtin" or is_uri(value):
        return value
    spelled_as_path = value.startswith((".", "~", os.sep))
    here = os.path.join(cwd or os.getcwd(), os.path.expanduser(value))
    if spelled_as_path or os.path.exists(here):
        return absolute(value, cwd)
    return value


# (config key, kind): "path" is always a local path or URI; "model" a hub id or a folder.
PATH_KEYS: Tuple[Tuple[str, str], ...] = (
    ("run_dir", "path"),
    ("data.root", "path"),
    ("base.model", "model"),
    ("base.cache_dir", "path"),
    ("embed.model", "model"),
    ("filter.oracle", "path"),
)


def relative_paths(cfg) -> List[Tuple[str, str]]:
    """The (key, value) pairs of `cfg` that are relative local paths (for `raybias submit`,
    which cannot resolve them against this machine)."""
    out = []
    for key, kind in PATH_KEYS:
        value = _get(cfg, key)
        if value is None or is_uri(value) or os.path.isabs(os.path.expanduser(str(value))):
            continue
        if kind == "model" and _model_path(value, None) == value:
            continue  # a hub id
        out.append((key, str(value)))
    return out


def make_paths_absolute(cfg, cwd: Optional[str] = None) -> None:
    """Rewrite, in place, every local path of `cfg` as an absolute one (see the module doc).

    `data.csv_file` is relative to `data.root` by definition, so it is joined to the
    (now absolute) root rather than to the working directory.
    """
    for key, kind in PATH_KEYS:
        value = _get(cfg, key)
        if value is None:
            continue
        new = _model_path(value, cwd) if kind == "model" else absolute(value, cwd)
        if new != value:
            _set(cfg, key, new)
    root, csv_file = cfg.data.root, cfg.data.csv_file
    if root and not is_uri(root) and csv_file and not os.path.isabs(os.path.expanduser(csv_file)):
        cfg.data.csv_file = os.path.join(root, csv_file)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
