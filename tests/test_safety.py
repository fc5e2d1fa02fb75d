"""Safety: artifacts load without unpickling (weights as safetensors only), images are
opened in the allowed raster formats only, dataset paths stay inside their root in every
source, and a local Ray listens on 127.0.0.1 only."""

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


# --- images are opened in the allowed formats only; weights load as safetensors only ----------

# Files (not yet) passing formats= to Image.open; each decodes only bytes raybias itself wrote
# (the run directory's shards), never a dataset's files. Remove an entry once it passes
# formats=raybias.data.images.READ_FORMATS.
IMAGE_OPEN_PENDING: set = set()
# Receivers of from_pretrained that load no weights (tokenizers, processors, schedulers).
NO_WEIGHTS = ("tokenizer", "processor", "scheduler", "config", "feature_extractor")
# The one pickled-weights fallback (use_safetensors=None), behind base.allow_pickle
# (tests/test_backbone.py::test_pickled_weights_are_refused_unless_allow_pickle).
PICKLE_GATED = {"raybias/diffusion/backbone.py": 1}


def _receiver(node) -> str:
    """'StableDiffusionPipeline' for X.from_pretrained, 'tokenizer' for self.classes["tokenizer"]..."""
    value = node.func.value if isinstance(node.func, ast.Attribute) else None
    if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant):
        return str(value.slice.value)
    return _dotted(value) if value is not None else ""


def image_and_weight_loads(source: str, where: str = "<source>") -> List[str]:
    """Image.open without formats=; weight loads without use_safetensors=True ('where:line: why')."""
    tree = ast.parse(source, filename=where)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        name = _dotted(node.func)
        if name.endswith("Image.open") and "formats" not in kwargs:
            found.append(f"{where}:{node.lineno}: Image.open without formats= (reaches every Pillow plugin)")
        if node.func.attr in ("from_pretrained", "load_lora_weights"):
            receiver = _receiver(node).lower()
            if node.func.attr == "from_pretrained" and any(w in receiver for w in NO_WEIGHTS):
                continue
            if _is_false(kwargs.get("use_safetensors")):
                found.append(f"{where}:{node.lineno}: {name}(use_safetensors=False) loads pickled weights")
            elif not _is_true(kwargs.get("use_safetensors")):
                found.append(f"{where}:{node.lineno}: {name} without use_safetensors=True may unpickle")
    return found


def test_the_format_and_safetensors_checker_catches_each_case():
    bad = '''
from PIL import Image
Image.open(path)
PIL.Image.open(io.BytesIO(data))
UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
self.classes["unet"].from_pretrained(folder, subfolder="unet")
pipe.load_lora_weights(folder, adapter_name="x")
StableDiffusionPipeline.from_pretrained(model, use_safetensors=False)
'''
    assert len(image_and_weight_loads(bad)) == 6, image_and_weight_loads(bad)
    good = '''
Image.open(path, formats=READ_FORMATS)
self.classes["tokenizer"].from_pretrained(folder, subfolder="tokenizer")
AutoTokenizer.from_pretrained(source, trust_remote_code=False)
CLIPImageProcessor.from_pretrained(source)
CLIPModel.from_pretrained(source, use_safetensors=True)
pipe.load_lora_weights(folder, adapter_name="x", use_safetensors=True)
'''
    assert image_and_weight_loads(good) == []


def test_package_opens_images_in_allowed_formats_and_weights_as_safetensors():
    problems = []
    for f in _package_files():
        rel = f.relative_to(REPO).as_posix()
        found = image_and_weight_loads(f.read_text(), rel)
        if rel in IMAGE_OPEN_PENDING:
            found = [x for x in found if "Image.open" not in x]
        gated = [x for x in found if "use_safetensors" in x]
        if gated and len(gated) <= PICKLE_GATED.get(rel, 0):
            found = [x for x in found if x not in gated]
        problems += found
    assert problems == [], "\n".join(problems)


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


def _celeba_escape(root: Path, outside: Path, how: str) -> str:
    from fixtures_data import make_celeba

    fx = make_celeba(root)
    image_dir = fx.notes["image_dir"]
    if how == "file":
        (image_dir / "000003.jpg").unlink()
        os.symlink(outside, image_dir / "000003.jpg")
        return "000003.jpg"
    moved = outside.parent / "moved_images"
    os.rename(image_dir, moved)
    os.symlink(moved, image_dir, target_is_directory=True)
    return "img_align_celeba/000001.jpg"


def _utkface_escape(root: Path, outside: Path, how: str) -> str:
    from fixtures_data import make_utkface

    make_utkface(root)
    if how == "file":
        name = "33_0_1_20170109999999999.jpg.chip.jpg"
        os.symlink(outside, root / "UTKFace" / name)
        return name
    # a folder link is not walked into (os.walk does not follow links): nothing of it is read
    (outside.parent / "more").mkdir()
    os.symlink(outside, outside.parent / "more" / "34_1_1_20170109999999998.jpg.chip.jpg")
    os.symlink(outside.parent / "more", root / "more", target_is_directory=True)
    return ""


@pytest.mark.parametrize("source", ["celeba", "utkface"])
@pytest.mark.parametrize("how", ["file", "folder"])
def test_sources_without_paths_in_metadata_cannot_escape_either(tmp_path, capsys, ray_session, source, how):
    from raybias.cli import main
    from raybias.rundir import RunDir

    outside = tmp_path / "secret" / "outside.jpg"
    outside.parent.mkdir()
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((28, 28, 3), 128, np.uint8)).save(outside, format="JPEG")
    root = tmp_path / "dataset"
    named = (_celeba_escape if source == "celeba" else _utkface_escape)(root, outside, how)
    run_dir = tmp_path / "run"
    rc = main(["prepare", "configs/quickstart.yaml", f"data.source={source}", f"data.root={root}",
               "data.severity=original", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    if not named:  # the linked folder was never read: prepare succeeds without it
        assert rc == 0, err
        import pandas as pd

        paths = pd.read_parquet(run_dir / "data/real")["path"]
        assert not paths.str.startswith("more/").any()
        return
    assert rc == 2, err
    assert "raybias: error:" in err and named in err and "outside data.root" in err, err
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
