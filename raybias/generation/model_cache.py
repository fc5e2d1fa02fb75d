"""A per-node disk cache of the model folders sampler actors load from a remote run directory.

With an `s3://` (or `gs://`) run directory, a LoRA adapter or DreamBooth pipeline folder
must be on a local disk to load. Every sampler actor of a node shares one cache folder,
`private_cache_dir()/models` (this user's, mode 0700: `$RAYBIAS_CACHE_DIR` puts it on a
node's local disk), instead of each copying every model it uses into a temporary folder of
its own that nothing ever capped or deleted:

- An entry is `<source>-<version>/`: <source> hashes the run's URI and the model's
  run-relative path, <version> the remote listing (each file's path, size and modification
  time), so a rebuilt model is a new entry. Its files are downloaded into a fresh
  `.fetch-<entry>-*` folder, its fetch manifest written last, and the folder renamed into
  place: an entry is whole or absent.
- Two actors wanting the same model at once: one fetches under the entry's `.fill` flock,
  the other waits on it and then uses the copy.
- In use: an actor holds a shared flock on the entry's `.use` file for as long as it keeps
  the model loaded (`CachedModel.release` when its `ModelSwitcher` drops it). flock locks
  end with their process, so a killed actor pins nothing.
- Cap (generate.model_cache_gb): before a fetch, and after it, the least recently used
  entries that no actor holds are deleted until the cache fits (an entry is first renamed to
  `.evict-*` under the cache's `.lock`, so nobody picks it up half deleted). Entries in use
  are never deleted; when they alone exceed the cap the cache stays over it (a warning).
- Start: the `.fetch-*` folders of fetches nobody is running any more (a killed actor's)
  and `.evict-*` leftovers are deleted.

Reuse checks the entry's manifest against the remote listing and each file's size (a copy
only appears by rename once complete, and the folder is private, so no hash is recomputed
at every load of a multi-GB model).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

from raybias.diffusion.backbone import (FETCH_MANIFEST, check_private_dir, download_folder, private_cache_dir,
                                        remote_listing)
from raybias.rundir import RunDir, StageFailed

log = logging.getLogger("raybias.generation")

CACHE_SUBDIR = "models"
LOCK_FILE = ".lock"
FETCH_PREFIX = ".fetch-"
EVICT_PREFIX = ".evict-"
FILL_SUFFIX = ".fill"
USE_SUFFIX = ".use"
GB = 1e9


@contextlib.contextmanager
def _flock(path: str, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases its lock


def _try_flock(path: str) -> Optional[int]:
    """An open descriptor holding an exclusive flock on `path`, or None if someone holds a lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def entry_key(source: str, listing) -> str:
    """`<source>-<version>`: the model's full path and its listing (path, size, mtime per file)."""
    src = hashlib.sha256(source.encode()).hexdigest()[:16]
    version = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return f"{src}-{version}"


class CachedModel:
    """A model folder in the cache, held in use until `release()`."""

    def __init__(self, cache: Optional["ModelCache"], key: str, path: str, fetched: bool):
        self.cache, self.key, self.path, self.fetched = cache, key, path, fetched
        self._released = False

    def release(self) -> None:
        if not self._released and self.cache is not None:
            self._released = True
            self.cache._release(self.key)


class ModelCache:
    """The node's cache of model folders of one run directory (see the module docstring)."""

    def __init__(self, run: RunDir, cap_gb: float, root: Optional[str] = None):
        self.run = run
        self.cap_bytes = int(float(cap_gb) * GB)
        if root is None:
            root = os.path.join(private_cache_dir(), CACHE_SUBDIR)
        os.makedirs(root, mode=0o700, exist_ok=True)
        check_private_dir(root)
        self.root = root
        self._threads = threading.Lock()  # this process's threads; flocks keep processes apart
        self._held: Dict[str, List[int]] = {}  # key -> [descriptor holding the shared .use lock, count]
        self.fetches = 0  # downloads this object made
        self.removed_at_start = self.clean_temporaries()

    # --- paths ---------------------------------------------------------------------------
    def _p(self, name: str) -> str:
        return os.path.join(self.root, name)

    @contextlib.contextmanager
    def _cache_locked(self) -> Iterator[None]:
        with self._threads, _flock(self._p(LOCK_FILE)):
            yield

    # --- entries ---------------------------------------------------------------------------
    def _whole(self, key: str, listing) -> bool:
        folder = self._p(key)
        if not os.path.isdir(folder) or os.path.islink(folder):
            return False
        try:
            with open(os.path.join(folder, FETCH_MANIFEST), encoding="utf-8") as f:
                if json.load(f).get("listing") != listing:
                    return False
            return all(os.path.getsize(os.path.join(folder, *rel.split("/"))) == size for rel, size, _ in listing)
        except (OSError, ValueError):
            return False

    def entries(self) -> List[Tuple[float, str, int]]:
        """(last use, key, bytes) of every whole-looking entry, least recently used first."""
        out = []
        for name in os.listdir(self.root):
            path = self._p(name)
            if name.startswith(".") or not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                with open(os.path.join(path, FETCH_MANIFEST), encoding="utf-8") as f:
                    size = sum(int(s) for _, s, _ in json.load(f)["listing"])
                used = os.stat(path).st_mtime
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no manifest: not an entry (nothing renames a folder here without one)
            out.append((used, name, size))
        return sorted(out)

    def size_bytes(self) -> int:
        return sum(size for _, _, size in self.entries())

    def _mark_in_use(self, key: str) -> None:
        """Under the cache lock: a shared flock on the entry's .use file, and its last use now."""
        held = self._held.get(key)
        if held is not None:
            held[1] += 1
        else:
            fd = os.open(self._p(key + USE_SUFFIX), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._held[key] = [fd, 1]
        os.utime(self._p(key))

    def _release(self, key: str) -> None:
        with self._threads:
            held = self._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del self._held[key]
                os.close(held[0])  # drops the shared lock

    def _evict_locked(self, budget: int) -> List[str]:
        """Under the cache lock: rename least recently used entries nobody holds out of the way
        until the cache holds at most `budget` bytes; returns the folders to delete."""
        entries = self.entries()
        total = sum(size for _, _, size in entries)
        doomed = []
        for _, key, size in entries:
            if total <= budget:
                break
            if key in self._held:
                continue
            fd = _try_flock(self._p(key + USE_SUFFIX))
            if fd is None:
                continue  # another actor has it loaded
            try:
                gone = self._p(f"{EVICT_PREFIX}{uuid.uuid4().hex[:12]}")
                os.rename(self._p(key), gone)
                os.unlink(self._p(key + USE_SUFFIX))  # reopened only under the cache lock, which is held
            finally:
                os.close(fd)
            doomed.append(gone)
            total -= size
        if total > budget:
            log.warning("model cache %s holds %.2f GB, over generate.model_cache_gb=%.2f: the rest is in use",
                        self.root, total / GB, self.cap_bytes / GB)
        return doomed

    @staticmethod
    def _delete(folders: List[str]) -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    # --- the API ---------------------------------------------------------------------------
    def acquire(self, rel: str) -> CachedModel:
        """A local copy of the run's folder `rel`, held in use until `.release()`."""
        source = self.run.path(rel)  # refuses a path outside the run
        try:
            listing = remote_listing(self.run, rel)
        except OSError as exc:
            raise StageFailed(f"cannot list model folder {source}: {exc}") from exc
        if not listing:
            raise StageFailed(f"model folder {source} holds no files (was its fine-tuning finished?)")
        key = entry_key(source, listing)
        with self._cache_locked():
            if key in self._held or self._whole(key, listing):
                self._mark_in_use(key)
                return CachedModel(self, key, self._p(key), fetched=False)
        size = sum(s for _, s, _ in listing)
        with _flock(self._p(key + FILL_SUFFIX)):  # one fetch of a model per node; the others wait here
            with self._cache_locked():
                if self._whole(key, listing):  # fetched by the actor we waited for
                    self._mark_in_use(key)
                    return CachedModel(self, key, self._p(key), fetched=False)
                doomed = self._evict_locked(self.cap_bytes - size)
            self._delete(doomed)
            tmp = tempfile.mkdtemp(prefix=f"{FETCH_PREFIX}{key}-", dir=self.root)  # 0700, a fresh name
            try:
                started = time.perf_counter()
                download_folder(self.run, rel, listing, tmp)
                with self._cache_locked():
                    if os.path.lexists(self._p(key)):  # a damaged copy (failed the size check)
                        stale = self._p(f"{EVICT_PREFIX}{uuid.uuid4().hex[:12]}")
                        os.rename(self._p(key), stale)
                        doomed = [stale]
                    else:
                        doomed = []
                    os.rename(tmp, self._p(key))
                    tmp = None
                    self._mark_in_use(key)
                    doomed += self._evict_locked(self.cap_bytes)  # it is held: never itself
                self._delete(doomed)
            except OSError as exc:
                raise StageFailed(f"cannot copy model folder {source} into the model cache {self.root}: "
                                  f"{exc}") from exc
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        self.fetches += 1
        log.info("model cache: fetched %s (%.1f MB) in %.1f s", rel, size / 1e6, time.perf_counter() - started)
        return CachedModel(self, key, self._p(key), fetched=True)

    def clean_temporaries(self) -> List[str]:
        """Delete `.fetch-*` folders no live fetch owns (its entry's .fill lock is free) and
        `.evict-*` leftovers; returns their names."""
        removed = []
        for name in os.listdir(self.root):
            path = self._p(name)
            if name.startswith(EVICT_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            elif name.startswith(FETCH_PREFIX):
                key = name[len(FETCH_PREFIX):].rsplit("-", 1)[0]
                fd = _try_flock(self._p(key + FILL_SUFFIX))
                if fd is None:
                    continue  # being fetched right now
                try:
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(fd)
                removed.append(name)
        return removed
