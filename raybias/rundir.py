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

import functools
import io
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Any, Dict, Iterator, List, Optional, Sequence

import pyarrow.fs as pafs

from raybias.config import EXECUTION_KEYS, config_hash, same_values, section_values
from raybias.layout import LEASE, LOGS, MANIFEST, MANIFEST_LOCK
from raybias.errors import first_line
from raybias.paths import absolute, is_uri

log = logging.getLogger("raybias")

MODES = ("fresh", "resume", "auto")


class ResumeRefused(RuntimeError):
    """--resume on a run directory whose stage was made with a different config."""


class StageFailed(RuntimeError):
    """A stage could not finish; nothing it wrote is marked done."""


class InputMissing(StageFailed):
    """A stage's input (another stage's output) has not been made, or is no longer whole."""


class RunDirBusy(StageFailed):
    """Another live raybias process holds this run directory's lease."""


@functools.lru_cache(maxsize=1)
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


_THREAD_LOCKS: Dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()  # the run directories whose manifest lock this thread holds


def _thread_lock(uri: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(uri, threading.Lock())


HASHED_BYTES = 1 << 20  # outputs up to this size are recorded with their sha256 too


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def owner_info() -> str:
    """Who is writing, in words: "pid 123 on host h"."""
    return f"pid {os.getpid()} on host {socket.gethostname()}"


@dataclass
class StageState:
    key: str
    skip: bool  # finished earlier with the same config
    done_units: List[str] = field(default_factory=list)


def _manifest_problem(m: Any) -> Optional[str]:
    """What is wrong with a parsed manifest.json, or None."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    stages = m.get("stages")
    if not isinstance(stages, dict):
        return "no 'stages' object"
    for key, rec in stages.items():
        if not isinstance(rec, dict):
            return f"stage '{key}' is a JSON {type(rec).__name__}, not an object"
        if not isinstance(rec.get("units", []), list):
            return f"stage '{key}' has units that are not a list"
    return None


class RunDir:
    """A run directory on a local disk or an object store."""

    def __init__(self, uri: str):
        uri = str(uri)
        if is_uri(uri):
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise StageFailed(f"cannot use run directory {uri}: {first_line(exc)} "
                                  "(a local path, or a URI such as s3://bucket/run or gs://bucket/run)") from exc
            base = uri.split("?", 1)[0]
            self.uri = base.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            # absolute at once: the spec travels to Ray workers, which run elsewhere
            uri = root = absolute(uri)
            self.uri = root
        self.root = root.rstrip("/")
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as exc:  # a missing bucket, no credentials, an unreachable endpoint
            raise StageFailed(f"cannot use run directory {self.uri}: {exc}") from exc
        self._source_uri = uri
        # Identifies the stage records this object began: finish_stage and mark_units touch
        # only those (another process that began the same stage since owns it now).
        self.owner = uuid.uuid4().hex[:12]

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
        """Path inside the filesystem (for `self.fs` and for Ray Data with filesystem=).

        Confined to the run directory: a run-relative path that climbs out (a generator
        manifest's `folder: ../../x`) is refused rather than resolved somewhere else."""
        rel = "/".join(p.strip("/") for p in parts if p)
        if ".." in rel.split("/"):
            raise StageFailed(f"{rel!r} points outside the run directory {self.uri}; run-relative paths "
                              "may not contain '..'")
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

    @contextmanager
    def open_atomic(self, rel: str) -> Iterator[Any]:
        """`with run.open_atomic(rel) as f: ...write to f...`: the file appears under `rel`
        whole or not at all. `f` is the filesystem's output stream to a temporary `.tmp-…`
        name beside it (streamed out, no copy of the content in memory), moved to `rel`
        (a copy+delete on S3) when the body returns; if the body raises, the temporary is
        deleted. A crash leaves at most the temporary (`clean_temporaries` deletes it)."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                yield f
            self.fs.move(tmp, target)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:  # never created, or already gone
                pass
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a temporary name, then a rename (a copy+delete on S3)."""
        with self.open_atomic(rel) as f:
            f.write(data)

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
        """A JSON file of the run; StageFailed naming the file if it is not JSON."""
        try:
            return json.loads(self.read_text(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StageFailed(f"{self.path(rel)} is damaged (not JSON: {exc}); delete it to redo the work "
                              "that wrote it, or use a new --run-dir") from exc

    def delete(self, *parts: str) -> None:
        p = self.path(*parts)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    @contextmanager
    def publishing(self, rel: str, last: Optional[str] = None) -> Iterator[str]:
        """`with run.publishing("generators/x/models/g0") as folder:` fill the local `folder`;
        when the block ends normally it replaces `rel` in the run directory whole, so a reader
        never sees half a folder: on a local disk the folder is a `.tmp-` sibling renamed into
        place (a crash leaves only the temporary, which the next writer removes); on an object
        store the files are uploaded after `rel` is cleared, `last` (the file whose presence
        says "whole", e.g. training.json) after all others. On an error nothing is published.
        `self.is_local` tells the filler whether it may hard-link files into `folder`."""
        import shutil
        import tempfile

        if self.is_local:
            final, tmp = self.local_path(rel), self.local_path(self.staging(rel))
            os.makedirs(tmp)
            try:
                yield tmp
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        with tempfile.TemporaryDirectory(prefix="raybias-publish-") as tmp:
            yield tmp
            self.delete(rel)
            files = sorted(os.path.relpath(os.path.join(d, n), tmp).replace(os.sep, "/")
                           for d, _, names in os.walk(tmp) for n in names)
            for name in sorted(files, key=lambda n: n == last):  # `last` goes last
                target = self.path(rel, name)
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with open(os.path.join(tmp, name), "rb") as src, self.fs.open_output_stream(target) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    def write_figure(self, rel: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        self.write_bytes(rel, buf.getvalue())

    # --- whole tables and outputs ---------------------------------------------
    MARKER = "_SUCCESS"

    def write_marker(self, rel_dir: str, shards: Sequence[str]) -> None:
        """Write `rel_dir`'s `_SUCCESS` marker, last: the shard names and sizes it holds."""
        sizes = {n: int(self.fs.get_file_info(self.path(rel_dir, n)).size or 0) for n in shards}
        self.write_text(f"{rel_dir}/{self.MARKER}", json.dumps({"shards": sizes}, sort_keys=True) + "\n")

    def staging(self, rel: str) -> str:
        """A fresh temporary name beside `rel` (run-relative) to write a table or file under
        before `publish_table` / a move puts it in place; the next lease holder removes any a
        dead writer left (`clean_temporaries`)."""
        head, _, name = rel.rstrip("/").rpartition("/")
        tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        return f"{head}/{tmp}" if head else tmp

    def publish_table(self, staged: str, rel_dir: str) -> List[str]:
        """Put the finished shards written under `staged` (see `staging`) in place as the table
        `rel_dir` — a rename on a local disk, a move per shard on an object store — then write
        its `_SUCCESS` marker last. Returns the shard names."""
        self.delete(rel_dir)
        if self.is_local:
            self.fs.move(self.path(staged), self.path(rel_dir))
        else:
            self.makedirs(rel_dir)
            for name in self.listdir(staged):
                self.fs.move(self.path(staged, name), self.path(rel_dir, name))
            self.delete(staged)
        shards = [n for n in self.listdir(rel_dir) if n.endswith(".parquet")]
        self.write_marker(rel_dir, shards)
        return shards

    def url(self, *parts: str) -> str:
        """A folder of the run as Ray Tune / Train take a storage path: a local path, or the
        run's URI (without its options) and the folder."""
        rel = "/".join(p.strip("/") for p in parts if p)
        if self.is_local:
            return self.path(rel)
        self.path(rel)  # confinement check
        return f"{self.uri}/{rel}" if rel else self.uri

    def table_problem(self, rel_dir: str) -> Optional[str]:
        """Why the table in `rel_dir` is not whole ("does not exist", "is incomplete",
        "is damaged: shard x is missing" …), or None when it is."""
        if not self.exists(rel_dir, self.MARKER):
            return "is incomplete" if self.exists(rel_dir) else "does not exist"
        try:
            text = self.read_text(f"{rel_dir}/{self.MARKER}").strip()
        except (OSError, UnicodeDecodeError):
            return f"is damaged: its {self.MARKER} cannot be read"
        if not text:
            return None  # a marker from before markers listed their shards: presence only
        try:
            expected = json.loads(text)["shards"]
            assert isinstance(expected, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"is damaged: its {self.MARKER} is not a shard list"
        infos = {i.base_name: i for i in self.fs.get_file_info(
            pafs.FileSelector(self.path(rel_dir), recursive=False))}
        for name, size in sorted(expected.items()):
            info = infos.get(name)
            if info is None:
                return f"is damaged: shard {self.path(rel_dir, name)} is missing"
            if int(info.size or 0) != int(size):
                return (f"is damaged: shard {self.path(rel_dir, name)} has {info.size} bytes where "
                        f"{size} were written")
        return None

    def output_record(self, rels: Sequence[str]) -> Dict[str, Any]:
        """What a finished stage wrote, to check on resume: a table's marker is its record
        ("table"), a file its size in bytes."""
        out: Dict[str, Any] = {}
        for rel in rels:
            if self.exists(rel, self.MARKER):
                out[rel] = "table"
            else:
                info = self.fs.get_file_info(self.path(rel))
                if info.type == pafs.FileType.File:
                    size = int(info.size or 0)
                    # small files (JSON records, scores) also by content: an edit of the same length
                    out[rel] = {"bytes": size, "sha256": _sha256(self.read_bytes(rel))} if size <= HASHED_BYTES else size
                elif info.type == pafs.FileType.Directory:
                    out[rel] = "dir"
                else:
                    raise StageFailed(f"stage output {self.path(rel)} does not exist; nothing is marked done")
        return out

    def outputs_problem(self, rec: Dict[str, Any]) -> Optional[str]:
        """Why the outputs a finished stage recorded are no longer whole, or None."""
        for rel, what in sorted((rec.get("outputs") or {}).items()):
            if what == "table":
                problem = self.table_problem(rel)
                if problem:
                    return f"{self.path(rel)} {problem}"
            elif what == "dir":
                if not self.exists(rel):
                    return f"{self.path(rel)} is missing"
            else:
                info = self.fs.get_file_info(self.path(rel))
                if info.type != pafs.FileType.File:
                    return f"{self.path(rel)} is missing"
                size = what["bytes"] if isinstance(what, dict) else what
                if int(info.size or 0) != int(size):
                    return f"{self.path(rel)} has {info.size} bytes where {size} were written"
                if isinstance(what, dict) and _sha256(self.read_bytes(rel)) != what.get("sha256"):
                    return f"{self.path(rel)} was changed since it was written (its content differs)"
        return None

    def clean_temporaries(self) -> List[str]:
        """Delete what dead writers left half-done: `<table>.tmp-*` folders, `.tmp-*` files of
        interrupted atomic writes. Call only while holding the lease (no live writer)."""
        removed = []
        if not self.exists():
            return removed
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            name = info.base_name
            if ".tmp-" not in name or f"/{LOGS}/" in info.path:
                continue
            try:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
                removed.append(info.path)
            except (FileNotFoundError, OSError):
                continue  # inside a folder removed a moment ago
        return removed

    # --- manifest ----------------------------------------------------------

    def manifest(self) -> Dict[str, Any]:
        if not self.exists(MANIFEST):
            return {"stages": {}, "versions": package_versions(), "created": time.time()}
        m = self.read_json(MANIFEST)
        problem = _manifest_problem(m)
        if problem:
            raise StageFailed(f"{self.path(MANIFEST)} is not a raybias manifest ({problem}); move it away "
                              "to start this run directory afresh, or use a new --run-dir")
        return m

    def _save_manifest(self, m: Dict[str, Any]) -> None:
        m["versions"] = dict(package_versions())
        self.write_json(MANIFEST, m)

    @contextmanager
    def _manifest_locked(self) -> Iterator[None]:
        """Read-modify-write of manifest.json by one thread of one process at a time: a
        process-wide lock per run directory, and on a local disk an flock that other
        processes (Tune trials writing the same run) respect too. On an object store the
        run directory's lease (one writing command) is what keeps writers apart."""
        held = getattr(_HELD, "uris", None)
        if held is None:
            held = _HELD.uris = set()
        if self.uri in held:  # re-entered (a Stage begins under the lock it also takes)
            yield
            return
        with _thread_lock(self.uri):
            held.add(self.uri)
            try:
                with self._manifest_flock():
                    yield
            finally:
                held.discard(self.uri)

    @contextmanager
    def _manifest_flock(self) -> Iterator[None]:
        if not self.is_local:
            yield
            return
        import fcntl

        with open(self.path(MANIFEST_LOCK), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _owned_record(self, m: Dict[str, Any], key: str, action: str) -> Dict[str, Any]:
        """The record of stage `key` if this object began it; StageFailed otherwise."""
        rec = m["stages"].get(key)
        if rec is None:
            raise StageFailed(f"cannot {action} stage '{key}' in {self.uri}: its record is gone from "
                              f"{MANIFEST} (another process reset it); nothing is marked done")
        if rec.get("owner") not in (None, self.owner):
            holder = rec.get("owner_info", "another process")
            raise StageFailed(f"cannot {action} stage '{key}' in {self.uri}: {holder} began it again while this "
                              "process ran, so its outputs may be that process's; nothing is marked done")
        return rec

    def stage_record(self, key: str) -> Optional[Dict[str, Any]]:
        return self.manifest()["stages"].get(key)

    def is_done(self, key: str) -> bool:
        """Stage `key` finished and what it recorded is still whole (what a later stage
        checks before it reads another stage's outputs)."""
        rec = self.stage_record(key)
        return bool(rec and rec.get("done") and not self.outputs_problem(rec))

    def require(self, *keys: str) -> None:
        """Before a stage reads other stages' outputs: each stage of `keys` that this run
        directory has a record of has finished, and what it recorded is still whole;
        InputMissing naming the stage, the damaged file and the command that makes it otherwise.
        (Inputs with no record at all — put in place by hand or by another tool — are left to
        their readers, which refuse a missing or unfinished table by name.)"""
        for key in keys:
            rec = self.stage_record(key)
            if rec is None:
                continue
            command = key.split("/", 1)[0]
            if not rec.get("done"):
                raise InputMissing(f"stage '{key}' of {self.uri} has not finished (run `raybias {command}` first, "
                                   "or with --resume to finish it)")
            problem = self.outputs_problem(rec)
            if problem:
                raise InputMissing(f"{problem}: stage '{key}' must be made again before this one reads it "
                                   f"(run `raybias {command}`, or `raybias run`)")

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
        with self._manifest_locked():
            return self._begin_stage(key, cfg, sections, mode, exclude, h, values)

    def _begin_stage(self, key, cfg, sections, mode, exclude, h, values) -> StageState:
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
        if rec is not None and mode != "fresh" and rec.get("done"):
            damaged = self.outputs_problem(rec)
            if damaged:  # done means whole: a finished stage whose outputs were since damaged is redone
                log.warning("stage '%s' finished earlier but %s; redoing it", key, damaged)
                rec = None
        if rec is not None and mode != "fresh":
            if rec.get("done"):
                return StageState(key, skip=True, done_units=list(rec.get("units", [])))
            done_units = list(rec.get("units", []))
        else:
            done_units = []
        m["stages"][key] = {"hash": h, "values": values, "done": False, "units": done_units,
                            "started_at": time.time(), "owner": self.owner, "owner_info": owner_info(),
                            "seconds": (rec or {}).get("seconds", 0.0) if done_units else 0.0}
        self._save_manifest(m)
        return StageState(key, skip=False, done_units=done_units)

    def mark_units(self, key: str, units: Sequence[str]) -> None:
        with self._manifest_locked():
            m = self.manifest()
            rec = self._owned_record(m, key, "record units of")
            have = set(rec.get("units", []))
            rec["units"] = list(rec.get("units", [])) + [u for u in units if u not in have]
            self._save_manifest(m)

    def finish_stage(self, key: str, info: Optional[Dict[str, Any]] = None,
                     outputs: Sequence[str] = (), units: Optional[Sequence[str]] = None) -> None:
        """Mark stage `key` done: only a record this object began (see `_owned_record`).
        `outputs` (tables, folders, files relative to the run) are recorded and checked
        whole before the stage is ever skipped as done. `units`: the stage's whole list of
        units, for a stage whose units keep their own record (generation's shards) and are
        summarised here once instead of written one by one."""
        record = self.output_record(outputs) if outputs else None
        with self._manifest_locked():
            m = self.manifest()
            rec = self._owned_record(m, key, "finish")
            if record is not None:
                rec["outputs"] = record
            if units is not None:
                rec["units"] = list(units)
            rec["done"] = True
            rec["finished_at"] = time.time()
            rec["seconds"] = rec.get("seconds", 0.0) + rec["finished_at"] - rec.get("started_at", rec["finished_at"])
            if info:
                rec["info"] = info
            self._save_manifest(m)

    def stage_seconds(self) -> Dict[str, float]:
        return {k: float(v.get("seconds", 0.0)) for k, v in self.manifest()["stages"].items() if v.get("done")}

    def stage(self, key: str, cfg, sections: Sequence[str], mode: str = "fresh", *,
              exclude: Sequence[str] = (), outputs: Sequence[str] = (), owns: Sequence[str] = (),
              partial: bool = False, verify: Optional[Callable[[], Optional[str]]] = None,
              needs: Sequence[str] = ()) -> "Stage":
        """Begin stage `key`: the one lifecycle every stage goes through (see `Stage`)."""
        return Stage(self, key, cfg, sections, mode, exclude=exclude, outputs=outputs, owns=owns,
                     partial=partial, verify=verify, needs=needs)


class Stage:
    """One stage's lifecycle in a run directory: begin -> skip or resume -> wipe what another
    config (or a fresh start) made -> work, unit by unit -> verify -> finish.

    Every stage goes through this, so the run directory's promises hold for all of them at once:

    - **skip** only what is whole: a stage finished earlier with the same config is skipped only
      if the outputs it recorded are still whole (`RunDir.outputs_problem`) and the stage's own
      `verify()` (e.g. "every planned shard reads whole") finds nothing wrong; otherwise it is
      begun again, keeping what is whole when `partial`.
    - **resume** (`resumable`): mode is not fresh and the earlier record was made with the same
      config, so partial work on disk (finished units, checkpoints, whole shards) may be kept.
      `partial=False` stages (one table written in one go) never keep partial work.
    - **inputs**: the stages it `needs` (whose outputs it reads) must have finished whole
      (`RunDir.require`), checked before anything is wiped or begun.
    - **wipe**: when the stage is not resumable, the paths it `owns` are deleted before any work,
      so nothing another config made can be taken for this one's, and a failure later can never
      leave old outputs looking finished.
    - **finish** marks done only a record this process began (another writer restarting the stage
      makes this one's finish refuse), records `outputs` to check on every later skip, and
      happens only when the work returned normally: as a context manager, on leaving the block
      without an exception (unless `finish()` was called, or the stage was skipped).
    """

    def __init__(self, run: RunDir, key: str, cfg, sections: Sequence[str], mode: str, *,
                 exclude: Sequence[str], outputs: Sequence[str], owns: Sequence[str], partial: bool,
                 verify: Optional[Callable[[], Optional[str]]], needs: Sequence[str] = ()):
        self.run, self.key, self.outputs = run, key, list(outputs)
        self.info: Dict[str, Any] = {}
        self.units: Optional[List[str]] = None
        self.finished = False
        run.require(*needs)  # before the record is touched: a refusal changes nothing
        with run._manifest_locked():
            self.previous = run.stage_record(key)
            same = run.matches(self.previous, cfg, sections, exclude)
            st = run.begin_stage(key, cfg, sections, mode, exclude)
            if st.skip and verify is not None:
                problem = verify()
                if problem:  # done means whole: begin again, keeping what is whole
                    log.warning("stage '%s' finished earlier but %s; redoing it", key, problem)
                    st = run.begin_stage(key, cfg, sections, "fresh", exclude)
                    mode = "resume"
        self.skip = st.skip
        self.resumable = bool(partial and mode != "fresh" and same)
        self.done_units: List[str] = list(st.done_units) if self.resumable or self.skip else []
        if not self.skip and not self.resumable:
            for rel in owns:
                run.delete(rel)

    @property
    def record_info(self) -> Dict[str, Any]:
        """The `info` the stage recorded when it finished earlier (for a skipped stage)."""
        return dict((self.previous or {}).get("info") or {})

    def unit_done(self, *names: str) -> None:
        """Record finished units one by one (for units that keep no record of their own)."""
        self.run.mark_units(self.key, names)
        self.done_units.extend(n for n in names if n not in self.done_units)

    def finish(self, info: Optional[Dict[str, Any]] = None, outputs: Sequence[str] = (),
               units: Optional[Sequence[str]] = None) -> None:
        """Verify and record the stage's outputs, then mark it done (see `RunDir.finish_stage`)."""
        if self.skip:
            raise StageFailed(f"stage '{self.key}' was skipped as done; it cannot be finished again")
        if self.finished:
            return
        if info is not None:
            self.info = dict(info)
        if units is not None:
            self.units = list(units)
        self.outputs += [o for o in outputs if o not in self.outputs]
        self.run.finish_stage(self.key, self.info or None, outputs=self.outputs, units=self.units)
        self.finished = True

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self.skip and not self.finished:
            self.finish()
        return False  # an error propagates; the stage stays not done, its units kept for --resume


# --- the lease: one writing command per run directory ---------------------------------------

LEASE_TTL_S = 90.0  # a lease whose heartbeat is older than this is a dead writer's
HEARTBEAT_S = 15.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class Lease:
    """The run directory's single-writer lease, held by one raybias command at a time.

    `lease.json` names its holder (owner id, host, pid, command, start) and a heartbeat a
    background thread renews every HEARTBEAT_S. A second command is refused with the holder
    and its heartbeat's age; a lease is taken over when its heartbeat is older than
    LEASE_TTL_S, or at once when its holder was on this host and its process is gone (a
    SIGKILLed run). On a local disk the lease is created with an exclusive link (atomic:
    of two commands starting at once, one wins); on an object store, which pyarrow gives no
    conditional put, it is written and read back, and the heartbeat re-checks it is still
    this command's.
    """

    def __init__(self, run: "RunDir", command: str):
        self.run, self.command = run, command
        self.record = {"owner": run.owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "command": command, "started_at": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    # --- holder ---------------------------------------------------------
    def holder(self) -> Optional[Dict[str, Any]]:
        if not self.run.exists(LEASE):
            return None
        try:
            rec = json.loads(self.run.read_text(LEASE))
        except (OSError, ValueError):
            return {}  # half-written or damaged: a dead writer's
        return rec if isinstance(rec, dict) else {}

    @staticmethod
    def is_stale(rec: Dict[str, Any], now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        try:
            beat = float(rec.get("heartbeat", 0))
        except (TypeError, ValueError):
            return True
        if now - beat > LEASE_TTL_S:
            return True
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            return not _pid_alive(rec["pid"])
        return False

    def _busy(self, rec: Dict[str, Any]) -> RunDirBusy:
        age = time.time() - float(rec.get("heartbeat", 0))
        return RunDirBusy(
            f"run directory {self.run.uri} is in use by `raybias {rec.get('command', '?')}` (pid {rec.get('pid')} on "
            f"host {rec.get('host')}, owner {rec.get('owner')}, heartbeat {age:.0f} s ago); wait for it to finish "
            f"or use another --run-dir (a lease whose heartbeat is over {LEASE_TTL_S:.0f} s old is taken over)")

    # --- acquire / renew / release -------------------------------------------
    def _enclosing_holder(self) -> Optional[Dict[str, Any]]:
        """A live lease on a run directory that holds this one (a sweep's per-severity
        sub-runs live inside the sweep's run directory, written by its trials): a command on the
        sub-run would write under that holder's feet. Local disks only (a cheap walk up)."""
        if not self.run.is_local:
            return None
        here = os.path.dirname(self.run.root)
        while here and here != os.path.dirname(here):
            path = os.path.join(here, LEASE)
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        rec = json.load(f)
                except (OSError, ValueError):
                    rec = None
                if isinstance(rec, dict) and not self.is_stale(rec):
                    return dict(rec, where=here)
            here = os.path.dirname(here)
        return None

    def acquire(self) -> "Lease":
        outer = self._enclosing_holder()
        if outer is not None:
            busy = self._busy(outer)
            raise RunDirBusy(str(busy).replace(f"run directory {self.run.uri} is in use",
                                               f"run directory {self.run.uri} is inside {outer['where']}, in use", 1))
        for _ in range(3):
            rec = self.holder()
            if rec is not None:
                if rec.get("owner") == self.run.owner:
                    break
                if not self.is_stale(rec):
                    raise self._busy(rec)
                self._take_over(rec)
            if self._create():
                break
        else:
            rec = self.holder() or {}
            raise self._busy(rec)
        mine = self.holder() or {}
        if mine.get("owner") != self.run.owner:
            raise self._busy(mine)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="raybias-lease")
        self._thread.start()
        return self

    def _payload(self) -> bytes:
        return (json.dumps(self.record, sort_keys=True) + "\n").encode()

    def _create(self) -> bool:
        """Create lease.json if absent; False if another writer created it first."""
        if not self.run.is_local:
            self.run.write_bytes(LEASE, self._payload())
            time.sleep(0.5)  # then read back: the last writer of a race sees itself
            return (self.holder() or {}).get("owner") == self.run.owner
        target = self.run.path(LEASE)
        tmp = f"{target}.tmp-{self.run.owner}"
        with open(tmp, "wb") as f:
            f.write(self._payload())
        try:
            os.link(tmp, target)  # fails if lease.json exists: exclusive, and never half-written
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: an exclusive create instead
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        finally:
            os.unlink(tmp)

    def _take_over(self, stale: Dict[str, Any]) -> None:
        """Remove a dead writer's lease (only if it is still that one)."""
        now = self.holder()
        if now is not None and now.get("owner") == stale.get("owner"):
            self.run.delete(LEASE)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                rec = self.holder() or {}
                if rec.get("owner") != self.run.owner:
                    self.lost = f"the lease of {self.run.uri} was taken by {rec.get('command')} (pid {rec.get('pid')})"
                    return
                self.record["heartbeat"] = time.time()
                self.run.write_bytes(LEASE, self._payload())
            except Exception:  # a failed heartbeat is retried; expiry decides
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            rec = self.holder()
            if rec is not None and rec.get("owner") == self.run.owner:
                self.run.delete(LEASE)
        except Exception:
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
