"""The sampler's host work: encoding and shard writing off the sampling path, image formats.

Real code throughout: a tiny random-weight pipeline, the `SamplerActor` built in this
process (as the Ray Data pool builds it in an actor) or run through the real Ray Data
pipeline (`generate_set`), Parquet shards on disk, the classifier's own readers.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raybias.data.images import decode, encode
from raybias.data.info import DatasetInfo
from raybias.data.synthetic import finished_units, read_synthetic
from raybias.generation.plan import PlanUnits, build_plan, models_for
from raybias.generation.runner import sampling_settings
from raybias.layout import shard_path, shards_dir
from raybias.rundir import RunDir, StageFailed
from tests.test_generate import gen_config, make_small_run

ROOT = Path(__file__).resolve().parents[1]


def _plan(cfg, run: RunDir):
    info = DatasetInfo.load(run)
    _, models = models_for(run, "vanilla", info, cfg.generate.negative_prompt)
    g = cfg.generate
    plan = build_plan("vanilla", info, models, balance=g.balance, per_group=g.per_group, unit_size=g.unit_size,
                      seed=g.seed, sampling=sampling_settings(g), base_model=cfg.base.model)
    units = PlanUnits(plan)
    return dict(plan, units=[units.expand(n) for n in range(len(units))])  # every unit, expanded, for the tests


def _actor(cfg, run: RunDir, plan, cls=None):
    from raybias.generation.sampler import SamplerActor

    compact = {k: plan[k] for k in ("generator", "seed", "unit_size", "models", "runs", "n_units")}
    return (cls or SamplerActor)(run.spec(), "vanilla", cfg.base.model, None, compact, plan["sampling"])


def _shards(run: RunDir):
    """{unit: (ids, image bytes, decoded pixels)} of every finished shard."""
    out = {}
    for u in finished_units(run, "vanilla"):
        t = pq.read_table(run.path(shard_path("vanilla", u)), columns=["id", "image"])
        images = t.column("image").to_pylist()
        out[u] = (t.column("id").to_pylist(), images, [decode(b) for b in images])
    return out


@pytest.fixture(scope="module")
def small(prepared_run, tmp_path_factory, tiny_base_folder):
    """A small prepared run and its vanilla config (units of 3: several units per group)."""
    run = make_small_run(prepared_run, tmp_path_factory.mktemp("host"))
    return run, gen_config(run, tiny_base_folder, unit_size=3, batch_size=3)


def _copy(run: RunDir, dest: Path) -> RunDir:
    import shutil

    shutil.copytree(run.path(), dest / "run")
    return RunDir(str(dest / "run"))


def test_two_calls_at_once_make_the_same_shards_as_one_at_a_time(small, tmp_path):
    run0, cfg = small
    serial, threaded = _copy(run0, tmp_path / "serial"), _copy(run0, tmp_path / "threaded")
    plan = _plan(cfg, run0)
    assert len(plan["units"]) >= 4
    one = _actor(cfg, serial, plan)
    for unit in plan["units"]:
        one.make_unit(unit)

    from raybias.generation.sampler import SamplerActor

    class Overlapping(SamplerActor):
        """Unit 0's encoding waits until unit 1 is sampling: proves the two overlap (it would
        time out, and fail, if encoding held the sampling path)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.second_sampling = threading.Event()
            self.overlapped = False

        def sample_images(self, unit):
            if unit["unit"] == 1:
                self.second_sampling.set()
            return super().sample_images(unit)

        def encode_images(self, images):
            if not self.overlapped:
                self.overlapped = self.second_sampling.wait(60)
            return super().encode_images(images)

    two = _actor(cfg, threaded, plan, Overlapping)
    with ThreadPoolExecutor(max_workers=2) as calls:  # Ray Data's two call slots of an actor
        counts = list(calls.map(two.make_unit, plan["units"]))
    assert two.overlapped, "unit 0 was encoded before unit 1 began sampling"
    assert counts == [len(u["ids"]) for u in plan["units"]]
    a, b = _shards(serial), _shards(threaded)
    assert sorted(a) == sorted(b) == [u["unit"] for u in plan["units"]]
    for u in a:
        assert a[u][0] == b[u][0] == plan["units"][u]["ids"]
        assert all(np.array_equal(x, y) for x, y in zip(a[u][2], b[u][2]))
        assert a[u][1] == b[u][1]  # same pixels, same (deterministic) PNG bytes
    assert two.stats["units"] == len(plan["units"]) and two.stats["images"] == sum(counts)
    assert not [n for n in os.listdir(threaded.path(shards_dir("vanilla"))) if n.startswith(".tmp")]


def test_a_failure_in_encoding_is_the_error_of_its_own_unit(small, tmp_path):
    run0, cfg = small
    run = _copy(run0, tmp_path)
    plan = _plan(cfg, run)

    from raybias.generation.sampler import SamplerActor

    class BadImage(SamplerActor):
        def sample_images(self, unit):
            images = super().sample_images(unit)
            if unit["unit"] == 1:
                images[1] = np.zeros((4, 4, 5), np.uint8)  # five channels: no image format holds that
            return images

    actor = _actor(cfg, run, plan, BadImage)
    with ThreadPoolExecutor(max_workers=2) as calls:
        futures = [calls.submit(actor.make_unit, u) for u in plan["units"][:3]]
    assert futures[0].result() == len(plan["units"][0]["ids"])
    assert futures[2].result() == len(plan["units"][2]["ids"])
    with pytest.raises(TypeError):
        futures[1].result()
    assert finished_units(run, "vanilla") == [0, 2]
    assert not [n for n in run.listdir(shards_dir("vanilla")) if n.startswith(".tmp")]


def test_a_failing_unit_fails_the_stage_through_ray_naming_the_error(small, tmp_path):
    """An encoder error raised in a Ray actor reaches the driver as the stage's error."""
    from raybias.generation.runner import run_units

    run0, cfg = small
    run = _copy(run0, tmp_path)
    plan = _plan(cfg, run)
    plan["sampling"]["image_format"], plan["sampling"]["image_quality"] = "jpeg", 0  # the config refuses 0
    with pytest.raises(StageFailed, match="image quality must be in 1..100"):
        run_units(run, plan, [0, 1], base_model=cfg.base.model, base_revision=None, concurrency=1,
                  num_gpus=0, num_cpus=1, progress=False)
    assert finished_units(run, "vanilla") == []
    assert not [n for n in run.listdir(shards_dir("vanilla")) if n.startswith(".tmp")]


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_jpeg_and_webp_shards_are_read_by_the_classifier_filter_and_embedder(small, tmp_path, fmt, magic):
    import torch

    from raybias.classify.data import _decode_rows, load_images, synthetic_set
    from raybias.embed.builtin import BuiltinEmbedder
    from raybias.stages.generate import generate_set

    run0, cfg0 = small
    run = _copy(run0, tmp_path)
    cfg = gen_config(run, cfg0.base.model, unit_size=3, batch_size=3, image_format=fmt, image_quality=90)
    generate_set(cfg, run, "vanilla", "fresh", verbose=False)  # the real Ray Data pipeline
    df = read_synthetic(run, "vanilla", filtered=False)
    assert all(b[:len(magic)] == magic for b in df["image"])
    assert {Image.open(io.BytesIO(b)).format for b in df["image"]} == {fmt.upper()}

    # the same units sampled here and kept as PNG (lossless): the stored bytes are exactly
    # those pixels in the format asked for, at the quality asked for
    png_run = _copy(run0, tmp_path / "png")
    png = _plan(gen_config(png_run, cfg0.base.model, unit_size=3, batch_size=3), png_run)
    actor = _actor(cfg0, png_run, png)
    reference = {}
    for unit in png["units"]:
        for i, blob in zip(unit["ids"], actor.sample_unit(unit)):
            reference[i] = decode(blob)

    stored = dict(zip(df["id"], df["image"]))
    assert sorted(stored) == sorted(reference)
    assert all(stored[i] == encode(reference[i], fmt, 90) for i in stored)
    assert all(encode(reference[i], fmt, 20) != stored[i] for i in list(stored)[:3])  # the quality mattered

    ds = synthetic_set(run, "vanilla")
    x = load_images(run, ds, 16)  # the classifier's in-memory path
    assert x.dtype == torch.uint8 and tuple(x.shape) == (len(df), 3, 16, 16)
    for r, i in enumerate(ds.meta["id"]):
        assert np.array_equal(x[r].numpy().transpose(1, 2, 0), decode(stored[i]))
    import pyarrow as pa

    batch = pa.table({"id": list(df["id"]), "image": list(df["image"]), "split": ["train"] * len(df)})
    streamed = _decode_rows(batch, None, 16)  # the classifier's streaming path (a Ray Data UDF)
    order = {i: r for r, i in enumerate(ds.meta["id"])}
    for i, img in zip(streamed["id"], streamed["image"]):
        assert np.array_equal(img, x[order[i]].numpy())
    feats = BuiltinEmbedder().embed_images(list(df["image"][:4]))  # embed / filter's decoder
    assert feats.shape[0] == 4 and np.isfinite(feats).all()


def test_a_writer_killed_mid_shard_leaves_no_shard_and_resume_removes_its_temporary(small, tmp_path):
    from raybias.generation.shards import sort_out_shards

    run0, cfg = small
    run = _copy(run0, tmp_path)
    plan = _plan(cfg, run)
    # A child process samples unit 0 and starts writing its shard, then stops half way (its
    # Parquet writer writes one page and waits); it is SIGKILLed there.
    child = textwrap.dedent(f"""
        import json, sys, time
        import pyarrow.parquet as pq
        sys.path.insert(0, {str(ROOT)!r})
        from raybias.generation import shards
        from raybias.generation.sampler import SamplerActor

        def stalled_write(table, where, **kw):
            where.write(b"PAR1" + b"x" * 4096)
            where.flush()
            print("WRITING", flush=True)
            time.sleep(600)

        shards.pq.write_table = stalled_write
        plan = json.load(open({str(tmp_path / "plan.json")!r}))
        compact = {{k: plan[k] for k in ("generator", "seed", "unit_size", "models", "runs", "n_units")}}
        actor = SamplerActor({run.spec()!r}, "vanilla", {cfg.base.model!r}, None, compact, plan["sampling"])
        actor.make_unit(plan["units"][0])
    """)
    import json

    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT, text=True)
    try:
        line = ""
        deadline = time.time() + 300
        while time.time() < deadline and "WRITING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WRITING" in line, f"the child never began writing: {proc.stdout.read()[-2000:]}"
        temps = [n for n in os.listdir(run.path(shards_dir("vanilla"))) if n.startswith(".tmp-")]
        assert len(temps) == 1 and os.path.getsize(run.path(shards_dir("vanilla"), temps[0])) > 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = os.listdir(run.path(shards_dir("vanilla")))
    assert finished_units(run, "vanilla") == [] and len(names) == 1 and names[0].startswith(".tmp-")
    whole, broken = sort_out_shards(run, "vanilla", plan)  # what --resume does first
    assert whole == [] and broken == [] and os.listdir(run.path(shards_dir("vanilla"))) == []


def test_encode_formats_and_quality():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert np.array_equal(decode(encode(img, "png")), img)  # lossless
    for fmt in ("jpeg", "webp"):
        low, high = encode(img, fmt, 20), encode(img, fmt, 95)
        assert len(low) < len(high)
        err_low = np.abs(decode(low).astype(int) - img).mean()
        err_high = np.abs(decode(high).astype(int) - img).mean()
        assert err_high < err_low
    with pytest.raises(ValueError, match="one of"):
        encode(img, "gif")
    with pytest.raises(ValueError, match="1..100"):
        encode(img, "jpeg", 0)


def test_config_checks_the_image_format_quality_and_cache_cap():
    from raybias.config import ConfigError, config_from_dict

    cfg = config_from_dict({"generate": {"image_format": "webp", "image_quality": 80}})
    assert cfg.generate.image_format == "webp" and sampling_settings(cfg.generate)["image_quality"] == 80
    assert config_from_dict({}).generate.image_format == "png"  # the default: the quickstart's table
    for key, value, allowed in (("image_format", "gif", "png, jpeg, webp"), ("image_quality", 0, r"\[1, 100\]"),
                                ("image_quality", 101, r"\[1, 100\]"), ("model_cache_gb", 0, r"\(0,")):
        with pytest.raises(ConfigError, match=rf"'generate.{key}'.*{allowed}"):
            config_from_dict({"generate": {key: value}})


def test_open_atomic_publishes_whole_files_only(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="half way"):
        with run.open_atomic("synthetic/vanilla/shards/unit-00000.parquet") as f:
            f.write(b"PAR1" + b"x" * 1000)
            raise RuntimeError("the writer failed half way")
    assert run.listdir(shards_dir("vanilla")) == []  # neither the file nor its temporary
    with run.open_atomic("synthetic/vanilla/shards/unit-00000.parquet") as f:
        f.write(b"whole")
    assert run.listdir(shards_dir("vanilla")) == ["unit-00000.parquet"]
    assert run.read_bytes("synthetic/vanilla/shards/unit-00000.parquet") == b"whole"
