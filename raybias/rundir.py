"""The run directory: every stage's artifacts plus `manifest.json`.

A run lives at a local path or at any URI pyarrow understands (`s3://bucket/run`,
`gs://…`; S3 options such as `?endpoint_override=127.0.0.1:9000&scheme=http` ride on
the URI). All reads and writes go through a pyarrow filesystem so stages never care
which. The manifest records, per stage key (`prepare`, `finetune/lora`,
`train/erm/0`, …), the hash of the config sections the stage depends on, the work
units it finished, whether it is done, and how long it took.

Modes (how a stage treats what an earlier invocation left):
- "fresh": redo the stage from scratch.
- "resume": skip finished units and finished stages; refuse if the config changed.
- "auto": like resume, but a stage whose config changed is redone (what `raybias run`
  does without --resume, like make).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raybias.config import EXECUTION_KEYS, config_hash, same_values, section_values

MODES = ("fresh", "resume", "auto")


class ResumeRefused(RuntimeError):
    """--resume on a run directory whose stage was made with a different config."""


class StageFailed(RuntimeError):
    """A stage could not finish; nothing it wrote is marked done."""


def package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("raybias", "ray", "torch", "torchvision", "diffusers", "peft", "transformers",
                 "pyarrow", "scikit-learn", "omegaconf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _is_uri(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1  # "c:" on Windows is a drive letter, not a scheme


@dataclass
class StageState:
    key: str
    skip: bool  # finished earlier with the same config
    done_units: List[str] = field(default_factory=list)


class RunDir:
    """A run directory on a local disk or an object store."""

    def __init__(self, uri: str):
        uri = str(uri)
        if _is_uri(uri):
            self.fs, root = pafs.FileSystem.from_uri(uri)
            base = uri.split("?", 1)[0]
            self.uri = base.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            root = os.path.abspath(uri)
            self.uri = root
        self.root = root.rstrip("/")
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as exc:  # a missing bucket, no credentials, an unreachable endpoint
            raise StageFailed(f"cannot use run directory {self.uri}: {exc}") from exc
        self._source_uri = uri

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def spec(self) -> str:
        """What to pass to `RunDir(...)` in another process (keeps S3 options)."""
        return self._source_uri

    def child_spec(self, *parts: str) -> str:
        """The spec of a folder inside this run (e.g. a sweep's sub-run), keeping the URI's
        options (`?endpoint_override=…`) after the path, where pyarrow reads them."""
        rel = "/".join(p.strip("/") for p in parts if p)
        if self.is_local:
            return os.path.join(self.root, rel) if rel else self.root
        base, _, query = self._source_uri.partition("?")
        base = base.rstrip("/") + (f"/{rel}" if rel else "")
        return f"{base}?{query}" if query else base

    # --- paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Path inside the filesystem (for `self.fs` and for Ray Data with filesystem=)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, *parts: str) -> str:
        if not self.is_local:
            raise StageFailed(f"{self.uri} is not a local run directory; this step needs a local one")
        return self.path(*parts)

    # --- files -------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> str:
        p = self.path(*parts)
        self.fs.create_dir(p, recursive=True)
        return p

    def listdir(self, *parts: str) -> List[str]:
        p = self.path(*parts)
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(p, recursive=False))
        return sorted(i.base_name for i in infos)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a temporary name, then a rename (a copy+delete on S3)."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def delete(self, *parts: str) -> None:
        p = self.path(*parts)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    def write_figure(self, rel: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        self.write_bytes(rel, buf.getvalue())

    # --- manifest ----------------------------------------------------------
    MANIFEST = "manifest.json"

    def manifest(self) -> Dict[str, Any]:
        if not self.exists(self.MANIFEST):
            return {"stages": {}, "versions": package_versions(), "created": time.time()}
        return self.read_json(self.MANIFEST)

    def _save_manifest(self, m: Dict[str, Any]) -> None:
        m["versions"] = package_versions()
        self.write_json(self.MANIFEST, m)

    def stage_record(self, key: str) -> Optional[Dict[str, Any]]:
        return self.manifest()["stages"].get(key)

    def is_done(self, key: str) -> bool:
        rec = self.stage_record(key)
        return bool(rec and rec.get("done"))

    @staticmethod
    def matches(rec: Optional[Dict[str, Any]], cfg, sections: Sequence[str], exclude: Sequence[str] = ()) -> bool:
        """Was the stage record `rec` made with what `cfg` says now?

        The same hash of `sections`, or the same values apart from keys that only decide how
        the work runs (config.EXECUTION_KEYS) and the stage's own `exclude` (keys of a section
        it does not read), so a new CPU count, or a key added to a section later, does not
        make finished work stale.
        """
        if rec is None:
            return False
        if rec.get("hash") == config_hash(cfg, sections):
            return True
        return "values" in rec and same_values(rec["values"], section_values(cfg, sections), exclude)

    def begin_stage(self, key: str, cfg, sections: Sequence[str], mode: str = "fresh",
                    exclude: Sequence[str] = ()) -> StageState:
        """Record the start of stage `key`; say whether it can be skipped.

        Raises ResumeRefused for mode="resume" when the stage was made with other values
        of `sections` than `cfg` has now (see `matches`).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        h = config_hash(cfg, sections)
        values = section_values(cfg, sections)
        m = self.manifest()
        m["config_hash"] = config_hash(cfg, ("data", "base", "embed", "cluster", "finetune",
                                             "generate", "filter", "train", "ddb"))
        rec = m["stages"].get(key)
        if rec is not None and not self.matches(rec, cfg, sections, exclude):
            if mode == "resume":
                old = rec.get("values", {})
                diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in values.items()
                         if old.get(k) != v and k not in EXECUTION_KEYS and k not in exclude]
                diffs += [f"{k}: {v!r} -> (removed)" for k, v in old.items() if k not in values]
                raise ResumeRefused(
                    f"cannot --resume stage '{key}' in {self.uri}: it was made with a different config "
                    f"({'; '.join(diffs[:8]) or 'config sections ' + ', '.join(sections)}). "
                    "Use a new --run-dir, or drop --resume to redo the stage.")
            rec = None
        if rec is not None and mode != "fresh":
            if rec.get("done"):
                return StageState(key, skip=True, done_units=list(rec.get("units", [])))
            done_units = list(rec.get("units", []))
        else:
            done_units = []
        m["stages"][key] = {"hash": h, "values": values, "done": False, "units": done_units,
                            "started_at": time.time(),
                            "seconds": (rec or {}).get("seconds", 0.0) if done_units else 0.0}
        self._save_manifest(m)
        return StageState(key, skip=False, done_units=done_units)

    def mark_units(self, key: str, units: Sequence[str]) -> None:
        m = self.manifest()
        rec = m["stages"].setdefault(key, {"units": [], "done": False})
        have = set(rec.get("units", []))
        rec["units"] = list(rec.get("units", [])) + [u for u in units if u not in have]
        self._save_manifest(m)

    def finish_stage(self, key: str, info: Optional[Dict[str, Any]] = None) -> None:
        m = self.manifest()
        rec = m["stages"].setdefault(key, {"units": []})
        rec["done"] = True
        rec["finished_at"] = time.time()
        rec["seconds"] = rec.get("seconds", 0.0) + rec["finished_at"] - rec.get("started_at", rec["finished_at"])
        if info:
            rec["info"] = info
        self._save_manifest(m)

    def stage_seconds(self) -> Dict[str, float]:
        return {k: float(v.get("seconds", 0.0)) for k, v in self.manifest()["stages"].items() if v.get("done")}

    @contextmanager
    def stage(self, key: str, cfg, sections: Sequence[str], mode: str = "fresh") -> Iterator[StageState]:
        """`with run.stage(...) as st:` — finishes the stage only if the body returns normally."""
        st = self.begin_stage(key, cfg, sections, mode)
        yield st
        if not st.skip:
            self.finish_stage(key)
