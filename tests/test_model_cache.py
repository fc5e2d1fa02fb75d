"""The per-node model cache of remote run directories: a real S3 server (moto's) on 127.0.0.1,
several processes on this one node sharing one cache folder, real flocks, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_s3 import _uri, s3_server  # noqa: F401  (fixture; sets the dummy AWS credentials)

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000

CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    args = json.loads(sys.argv[1])
    import raybias.generation.model_cache as mc
    from raybias.rundir import RunDir

    if args.get("stall"):
        def stalled(run, rel, listing, dest):  # a fetch that begins and never ends: killed here
            with open(os.path.join(dest, listing[0][0]), "wb") as f:
                f.write(b"x" * 100)
            print("FETCHING", flush=True)
            time.sleep(600)
        mc.download_folder = stalled
    cache = mc.ModelCache(RunDir(args["run"]), args["cap_gb"], root=args["root"])
    print("READY", flush=True)
    held = []
    for rel in args["acquire"]:
        m = cache.acquire(rel)
        held.append(m)
        print(json.dumps({{"rel": rel, "fetched": m.fetched, "path": m.path}}), flush=True)
    print("HOLDING", flush=True)
    sys.stdin.readline()
    for m in held:
        m.release()
""")


class Child:
    """A process on this node using the cache (what another sampler actor is)."""

    def __init__(self, run_spec: str, root: str, acquire, cap_gb: float = 1.0, stall: bool = False):
        args = {"run": run_spec, "root": root, "acquire": list(acquire), "cap_gb": cap_gb, "stall": stall}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT)
        self.results = []

    def wait_for(self, word: str, timeout: float = 300):
        deadline = time.time() + timeout
        seen = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("child ended early:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("{"):
                self.results.append(json.loads(line))
            if line.strip() == word:
                return
        raise AssertionError(f"no {word} from the child in {timeout} s:\n" + "".join(seen))

    def finish(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(60) == 0, self.proc.stdout.read()

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def _put_model(run, rel: str, n_files: int = 2, size: int = MB, seed: int = 0):
    """A model folder of random files on the run's filesystem; returns {name: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n_files):
        data = rng.integers(0, 256, size // n_files, dtype=np.uint8).tobytes()
        name = f"part{i}.safetensors" if i else "sub/config.json"
        run.write_bytes(f"{rel}/{name}", data)
        files[name] = data
    return files


def _tree(folder: str):
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            if not n.startswith(".raybias-fetch"):
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/")] = f.read()
    return out


def _entries(root: str):
    return sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))


@pytest.fixture
def remote(s3_server, tmp_path):
    from raybias.rundir import RunDir

    run = RunDir(_uri(s3_server, f"cache-{tmp_path.name}"))
    root = str(tmp_path / "node-cache")
    return run, root


def test_two_processes_wanting_one_model_fetch_it_once(remote):
    from raybias.diffusion.backbone import remote_listing
    from raybias.generation.model_cache import FILL_SUFFIX, ModelCache, _flock, entry_key

    run, root = remote
    files = _put_model(run, "generators/lora/g0")
    ModelCache(run, 1.0, root=root)  # makes the (private) folder
    assert (os.stat(root).st_mode & 0o777) == 0o700
    key = entry_key(run.path("generators/lora/g0"), remote_listing(run, "generators/lora/g0"))
    # Both start while the model's fill lock is taken, so both reach it before either has a copy.
    with _flock(os.path.join(root, key + FILL_SUFFIX)):
        kids = [Child(run.spec(), root, ["generators/lora/g0"]) for _ in range(2)]
        for k in kids:
            k.wait_for("READY")
        time.sleep(2)
    for k in kids:
        k.wait_for("HOLDING")
    results = [k.results[0] for k in kids]
    assert sorted(r["fetched"] for r in results) == [False, True]  # one fetched, the other waited for it
    assert results[0]["path"] == results[1]["path"] == os.path.join(root, key)
    assert _tree(results[0]["path"]) == files
    assert _entries(root) == [key] and not [n for n in os.listdir(root) if n.startswith(".fetch-")]
    for k in kids:
        k.finish()


def test_the_cap_evicts_the_least_recently_used_models_no_process_holds(remote):
    from raybias.generation.model_cache import ModelCache

    run, root = remote
    models = [_put_model(run, f"generators/db/m{i}", seed=i) for i in range(4)]  # 1 MB each
    cap_gb = 2.5 * MB / 1e9  # room for two models
    holder = Child(run.spec(), root, ["generators/db/m0"], cap_gb=cap_gb)  # another actor keeps m0 loaded
    holder.wait_for("HOLDING")
    m0 = holder.results[0]["path"]

    cache = ModelCache(run, cap_gb, root=root)
    m1 = cache.acquire("generators/db/m1")
    m1.release()  # loaded, then dropped by this actor's in-memory LRU
    time.sleep(0.05)
    m2 = cache.acquire("generators/db/m2")  # 3 MB > cap: m1 goes (m0 is older but held)
    assert os.path.isdir(m0) and not os.path.exists(m1.path) and os.path.isdir(m2.path)
    assert cache.size_bytes() == 2 * MB
    m3 = cache.acquire("generators/db/m3")  # both m0 and m2 are held: over the cap, nothing deleted
    assert all(os.path.isdir(p) for p in (m0, m2.path, m3.path)) and cache.size_bytes() == 3 * MB
    m2.release()

    holder.kill()  # a killed actor's hold ends with it (flock)
    again = cache.acquire("generators/db/m1")  # fetched again; m0 (now free, oldest) and m2 make room
    assert again.fetched and _entries(root) == sorted(os.path.basename(p) for p in (m3.path, again.path))
    assert _tree(again.path) == models[1] and _tree(m3.path) == models[3]
    assert cache.size_bytes() == 2 * MB
    m3.release()
    again.release()


def test_a_killed_fetch_leaves_no_model_and_its_folder_is_removed_on_start(remote):
    from raybias.generation.model_cache import FILL_SUFFIX, ModelCache, _flock

    run, root = remote
    files = _put_model(run, "generators/lora/g1")
    kid = Child(run.spec(), root, ["generators/lora/g1"], stall=True)
    kid.wait_for("FETCHING")
    temps = [n for n in os.listdir(root) if n.startswith(".fetch-")]
    assert len(temps) == 1 and _entries(root) == []
    # A new cache object while the fetch runs leaves its folder alone (its fill lock is held).
    assert ModelCache(run, 1.0, root=root).removed_at_start == []
    kid.kill()
    assert _entries(root) == []  # never a half copy under the entry's name

    key = temps[0][len(".fetch-"):].rsplit("-", 1)[0]
    with _flock(os.path.join(root, key + FILL_SUFFIX)):  # a live fetch of the same model: kept
        assert ModelCache(run, 1.0, root=root).removed_at_start == []
    cache = ModelCache(run, 1.0, root=root)  # what the next actor on the node does first
    assert cache.removed_at_start == temps and not [n for n in os.listdir(root) if n.startswith(".fetch-")]
    got = cache.acquire("generators/lora/g1")
    assert got.fetched and _tree(got.path) == files
    got.release()


def test_a_rewritten_model_is_fetched_again_and_files_are_checked(remote):
    from raybias.generation.model_cache import ModelCache
    from raybias.rundir import StageFailed

    run, root = remote
    _put_model(run, "generators/lora/g2", seed=1)
    cache = ModelCache(run, 1.0, root=root)
    first = cache.acquire("generators/lora/g2")
    assert first.fetched and not cache.acquire("generators/lora/g2").fetched  # reused
    first.release()
    first.release()  # a second release is harmless
    newer = _put_model(run, "generators/lora/g2", seed=2, size=MB // 2)  # retrained: other sizes
    second = cache.acquire("generators/lora/g2")
    assert second.fetched and second.path != first.path and _tree(second.path) == newer
    # a damaged copy (a truncated file) is not used: fetched again
    victim = os.path.join(second.path, "part1.safetensors")
    with open(victim, "r+b") as f:
        f.truncate(10)
    second.release()
    third = cache.acquire("generators/lora/g2")
    assert third.fetched and _tree(third.path) == newer
    third.release()
    with pytest.raises(StageFailed, match="generators/lora/missing.*(holds no files|does not exist)"):
        cache.acquire("generators/lora/missing")
    assert cache.fetches == 3


def test_sampler_loads_a_lora_from_s3_through_the_cache_and_releases_it(remote, tmp_path):
    """A remote LoRA loads through the node cache and samples exactly what the local folder
    gives; the switcher holds its copy while loaded and lets it go when it drops the model."""
    import pyarrow.fs as pafs

    from raybias.diffusion.backbone import build_pipeline, load_pipeline, save_pipeline
    from raybias.diffusion.sampling import sample
    from raybias.generation.model_cache import USE_SUFFIX, ModelCache, _try_flock
    from raybias.generation.sampler import ModelSwitcher
    from tests.test_generate import save_lora

    run, root = remote
    base = save_pipeline(build_pipeline("tiny", seed=0), str(tmp_path / "base"))
    for name, seed in (("g0", 1), ("g3", 2)):
        local = save_lora(base, tmp_path / name, seed)
        pafs.copy_files(local, run.path(f"generators/lora/{name}"), destination_filesystem=run.fs)
    cache = ModelCache(run, 1.0, root=root)
    pipe = load_pipeline(base)
    switcher = ModelSwitcher(pipe, run, 1, prepare=lambda p: None, disk_cache=cache)
    switcher.activate({"kind": "lora", "folder": "generators/lora/g0", "name": "g0"})
    got = sample(pipe, ["a red one"], [7], steps=2, batch_size=1)[0]
    ref = load_pipeline(base)
    ref.load_lora_weights(str(tmp_path / "g0"))
    assert np.array_equal(got, sample(ref, ["a red one"], [7], steps=2, batch_size=1)[0])
    (key,) = _entries(root)
    assert _try_flock(os.path.join(root, key + USE_SUFFIX)) is None  # held: no other actor may evict it
    switcher.activate({"kind": "lora", "folder": "generators/lora/g3", "name": "g3"})  # cache of one: g0 out
    fd = _try_flock(os.path.join(root, key + USE_SUFFIX))
    assert fd is not None  # g0's copy is free to evict now
    os.close(fd)
    assert len(_entries(root)) == 2 and cache.fetches == 2
