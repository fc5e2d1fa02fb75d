"""Safety: artifacts load without unpickling, dataset paths stay inside their root, and a
local Ray listens on 127.0.0.1 only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("raybias", "jobs")

# Calls that unpickle (run arbitrary code from a file): module -> functions.
UNPICKLERS = {
    "pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads"},
    "_pickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "cloudpickle": {"load", "loads"},
    "joblib": {"load"},
    "pandas": {"read_pickle"},
    "pd": {"read_pickle"},
    "shelve": {"open"},
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def unsafe_loads(source: str, where: str = "<source>") -> List[str]:
    """Every call in `source` that can run code from a file it loads, as 'where:line: why'."""
    tree = ast.parse(source, filename=where)
    imported = {}  # local name -> "module.function" for `from m import f [as g]`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []

    def flag(node, why):
        found.append(f"{where}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if "." not in name and name in imported:
            name = imported[name]
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        module, _, func = name.rpartition(".")
        if name in ("torch.load", "torch.serialization.load"):
            if not _is_true(kwargs.get("weights_only")):
                flag(node, f"{name} without weights_only=True")
        if func in UNPICKLERS.get(module.rsplit(".", 1)[-1], ()) and module:
            flag(node, f"{name} unpickles")
        if name in ("numpy.load", "np.load") and not _is_false(kwargs.get("allow_pickle", ast.Constant(False))):
            flag(node, f"{name} with allow_pickle")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _dotted(kwargs["Loader"]) if "Loader" in kwargs else ""
            if loader.rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                flag(node, f"{name} without a safe Loader")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
            flag(node, f"{name} can build arbitrary objects")
        # Only an explicit literal False is allowed: a variable could turn it on.
        if "trust_remote_code" in kwargs and not _is_false(kwargs["trust_remote_code"]):
            flag(node, f"{name or 'a call'}(trust_remote_code=...) may run code from the hub")
    return found


def _package_files() -> List[Path]:
    files = []
    for d in SOURCE_DIRS:
        files += sorted((REPO / d).rglob("*.py"))
    return files


def test_the_checker_catches_every_unsafe_load():
    bad = '''
import torch, pickle, yaml, numpy as np
from torch import load as tload
from transformers import AutoModel
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
tload("m.pt")
pickle.loads(blob)
np.load("a.npy", allow_pickle=True)
yaml.load(text)
AutoModel.from_pretrained("x", trust_remote_code=remote)
pipeline("x", trust_remote_code=True)
'''
    found = unsafe_loads(bad)
    assert len(found) == 8, found
    good = '''
import torch, yaml, numpy as np
from safetensors.torch import load_file
torch.load("m.pt", weights_only=True, map_location="cpu")
load_file("m.safetensors")
np.load("a.npy")
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
AutoModel.from_pretrained("x", revision="main")
AutoTokenizer.from_pretrained("x", trust_remote_code=False)
'''
    assert unsafe_loads(good) == []


def test_package_source_loads_artifacts_without_unpickling():
    files = _package_files()
    assert len(files) > 10  # the scan saw the package
    problems = []
    for f in files:
        problems += unsafe_loads(f.read_text(), str(f.relative_to(REPO)))
    assert problems == [], "unsafe loads:\n" + "\n".join(problems)


# --- dataset paths stay inside data.root ------------------------------------------------------

def _png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(path)


def _csv_dataset(root: Path, escape: str) -> None:
    """A csv-source folder whose last row names `escape`; every other row is a real file."""
    rows = ["path,y,a,split"]
    for i, (y, a, split) in enumerate([(0, 0, "train"), (0, 1, "train"), (1, 0, "train"), (1, 1, "train"),
                                       (0, 0, "val"), (1, 1, "val"), (0, 1, "test"), (1, 0, "test")]):
        _png(root / "images" / f"img{i}.png")
        rows.append(f"images/img{i}.png,{y},{a},{split}")
    rows.append(f"{escape},1,1,train")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def _waterbirds_dataset(root: Path, escape: str) -> None:
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (y, place, split) in enumerate([(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (1, 1, 1),
                                           (0, 1, 2), (1, 0, 2)]):
        name = f"001.Bird/img{i}.jpg"
        _png(root / name)
        rows.append(f"{i},{name},{y},{split},{place},/x/place{i}.jpg")
    rows.append(f"99,{escape},1,0,1,/x/place99.jpg")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


SOURCE_WRITERS = {"csv": ("raybias.data.sources.csv_source", _csv_dataset),
                  "waterbirds": ("raybias.data.sources.waterbirds", _waterbirds_dataset)}


@pytest.mark.parametrize("source", sorted(SOURCE_WRITERS))
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_dataset_paths_cannot_escape_their_root(tmp_path, capsys, ray_session, source, how):
    module, write = SOURCE_WRITERS[source]
    pytest.importorskip(module, reason=f"the {source} source is not written yet")
    from raybias.cli import main
    from raybias.rundir import RunDir

    root = tmp_path / "dataset"
    outside = tmp_path / "secret" / "outside.png"
    _png(outside)
    if how == "dotdot":
        escape = "../secret/outside.png"
    elif how == "absolute":
        escape = str(outside)
    else:  # a link inside the root whose target is outside it
        (root / "images").mkdir(parents=True)
        os.symlink(outside, root / "images" / "link.png")
        escape = "images/link.png"
    write(root, escape)
    run_dir = tmp_path / "run"
    rc = main(["prepare", "configs/quickstart.yaml", f"data.source={source}", f"data.root={root}",
               "data.severity=original", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "raybias: error:" in err
    assert escape in err or os.path.basename(escape) in err, err  # names the offending entry
    assert not RunDir(str(run_dir)).is_done("prepare")


# --- a local Ray listens on loopback only -------------------------------------------------------

PROBE = r"""
import json, os, psutil, ray
from raybias.config import config_from_dict
from raybias.ray_utils import init_ray

init_ray(config_from_dict({"ray": {"num_cpus": 1, "object_store_mb": 100}}), quiet=True)

@ray.remote
def where():
    return ray.util.get_node_ip_address()

worker_ip = ray.get(where.remote())
me = psutil.Process()
procs = [me] + me.children(recursive=True)  # GCS, raylet, workers, agents: all started by this driver
listening = []
for p in procs:
    try:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                listening.append([p.name(), c.laddr.ip, c.laddr.port])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
print("PROBE " + json.dumps({
    "gcs": ray.get_runtime_context().gcs_address,
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
    "worker_ip": worker_ip,
    "listening": listening,
}))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost"}


def test_a_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    probe = json.loads(lines[0][len("PROBE "):])
    assert probe["gcs"].rsplit(":", 1)[0] == "127.0.0.1"
    assert probe["nodes"] == ["127.0.0.1"]
    assert probe["worker_ip"] == "127.0.0.1"
    assert probe["listening"], "found no listening sockets of the Ray processes"
    exposed = [x for x in probe["listening"] if x[1] not in LOOPBACK]
    assert exposed == [], f"listening beyond loopback: {exposed}"
