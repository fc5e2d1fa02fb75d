"""The run directory: manifest, modes (fresh / resume / auto), atomic writes, table markers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import small_config
from raybias.cli import main
from raybias.config import config_hash
from raybias.data.io import MARKER, TableMissing, read_table, write_table, write_table_batches
from raybias.rundir import ResumeRefused, RunDir

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def leftovers(root: Path):
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_manifest_records_units_hash_and_versions(tmp_path):
    cfg = small_config(tmp_path)
    run = RunDir(tmp_path / "run")
    st = run.begin_stage("finetune/lora", cfg, ("data", "finetune"), "fresh")
    assert not st.skip and st.done_units == []
    run.mark_units("finetune/lora", ["g0", "g1"])
    run.mark_units("finetune/lora", ["g1", "g2"])  # a unit is recorded once
    run.finish_stage("finetune/lora", {"models": 3})
    m = manifest(tmp_path / "run")
    rec = m["stages"]["finetune/lora"]
    assert rec["units"] == ["g0", "g1", "g2"] and rec["done"] is True and rec["info"] == {"models": 3}
    assert rec["hash"] == config_hash(cfg, ("data", "finetune"))
    assert rec["values"]["finetune.lr"] == cfg.finetune.lr
    assert rec["seconds"] >= 0
    assert len(m["config_hash"]) == 16
    for pkg in ("python", "ray", "torch", "pyarrow", "omegaconf"):
        assert m["versions"][pkg]
    assert run.is_done("finetune/lora") and not run.is_done("prepare")


def test_resume_keeps_finished_units_and_fresh_drops_them(tmp_path):
    cfg = small_config(tmp_path)
    run = RunDir(tmp_path / "run")
    run.begin_stage("generate/lora", cfg, ("data", "generate"))
    run.mark_units("generate/lora", ["unit-0", "unit-1"])  # killed before finishing
    st = run.begin_stage("generate/lora", cfg, ("data", "generate"), "resume")
    assert not st.skip and st.done_units == ["unit-0", "unit-1"]
    st = run.begin_stage("generate/lora", cfg, ("data", "generate"), "auto")
    assert st.done_units == ["unit-0", "unit-1"]
    st = run.begin_stage("generate/lora", cfg, ("data", "generate"), "fresh")
    assert st.done_units == []
    run.finish_stage("generate/lora")
    assert run.begin_stage("generate/lora", cfg, ("data", "generate"), "resume").skip
    # auto redoes a stage whose config changed (like make); resume refuses it, naming the key
    changed = small_config(tmp_path, generate={"steps": 7})
    with pytest.raises(ResumeRefused, match=r"generate.steps: 25 -> 7"):
        run.begin_stage("generate/lora", changed, ("data", "generate"), "resume")
    st = run.begin_stage("generate/lora", changed, ("data", "generate"), "auto")
    assert not st.skip and st.done_units == []


def test_execution_keys_and_unread_keys_do_not_make_finished_work_stale(tmp_path):
    cfg = small_config(tmp_path)
    run = RunDir(tmp_path / "run")
    sections = ("data", "finetune")
    run.begin_stage("finetune/lora", cfg, sections)
    run.finish_stage("finetune/lora")
    # resources / concurrency are how the work ran, not what it made
    faster = small_config(tmp_path, finetune={"num_cpus_per_job": 0.5, "max_concurrent_jobs": 4})
    assert run.begin_stage("finetune/lora", faster, sections, "resume").skip
    # a run directory made before a key existed: its record lacks the key
    m = manifest(tmp_path / "run")
    m["stages"]["finetune/lora"]["hash"] = "0" * 16
    del m["stages"]["finetune/lora"]["values"]["finetune.num_cpus_per_job"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))
    assert run.begin_stage("finetune/lora", cfg, sections, "resume").skip
    # a key the stage says it does not read (the DDB recipes' LfF keys for ddb/model)
    run.begin_stage("ddb/model", cfg, ("data", "ddb"), exclude=("ddb.lff_min_weight",))
    run.finish_stage("ddb/model")
    floor = small_config(tmp_path, ddb={"lff_min_weight": 0.2})
    assert run.begin_stage("ddb/model", floor, ("data", "ddb"), "resume", exclude=("ddb.lff_min_weight",)).skip
    run.begin_stage("train/ddb_recipe2/0", cfg, ("data", "ddb"))  # which does read it
    run.finish_stage("train/ddb_recipe2/0")
    with pytest.raises(ResumeRefused, match=r"ddb.lff_min_weight: 0.01 -> 0.2"):
        run.begin_stage("train/ddb_recipe2/0", floor, ("data", "ddb"), "resume")
    # what the work makes still counts
    with pytest.raises(ResumeRefused, match=r"finetune.steps"):
        run.begin_stage("finetune/lora", small_config(tmp_path, finetune={"steps": 3}), sections, "resume")


@pytest.mark.usefixtures("ray_session")
def test_cli_resume_skips_refuses_and_fresh_redoes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["prepare", QUICKSTART, "data.severity=0.95", "data.image_size=8"]
    where = ["--run-dir", str(run_dir)]
    assert main(args + where) == 0
    first = manifest(run_dir)["stages"]["prepare"]
    shards = sorted((run_dir / "data/real").glob("*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    capsys.readouterr()

    # --resume: nothing is redone (same shard files, same finish time), counts printed again
    assert main(args + where + ["--resume"]) == 0
    assert "digit<5/red" in capsys.readouterr().out
    again = manifest(run_dir)["stages"]["prepare"]
    assert again["finished_at"] == first["finished_at"]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "data/real").glob("*.parquet")} == stamps

    # --resume with another config: refused, naming the changed key and both values
    assert main(args + ["data.seed=1"] + where + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "raybias: error: cannot --resume stage 'prepare'" in err and "data.seed: 0 -> 1" in err
    assert manifest(run_dir)["stages"]["prepare"]["finished_at"] == first["finished_at"]

    # no --resume (fresh): the stage is redone
    assert main(args + where) == 0
    redone = manifest(run_dir)["stages"]["prepare"]
    assert redone["done"] and redone["finished_at"] > first["finished_at"]
    assert not leftovers(run_dir)


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_json("a/b/info.json", {"x": 1})
    run.write_text("a/b/info.json", '{"x": 2}')
    run.write_bytes("c.bin", b"\0" * 1000)
    assert run.read_json("a/b/info.json") == {"x": 2}
    assert run.listdir("a/b") == ["info.json"]
    assert not leftovers(tmp_path)


def _rows(n, start=0):
    return pd.DataFrame({"id": [f"r{i}" for i in range(start, start + n)], "image": [b"x"] * n,
                         "y": [0] * n, "a": [1] * n, "group": [1] * n, "split": ["train"] * n,
                         "source": ["real"] * n})


@pytest.mark.usefixtures("ray_session")
def test_tables_are_published_whole_or_not_at_all(tmp_path):
    run = RunDir(tmp_path / "run")
    write_table(run, "data/t", _rows(30), shard_rows=10)
    assert run.exists("data/t", MARKER) and len(read_table(run, "data/t")) == 30
    assert not leftovers(tmp_path)

    def batches():
        yield _rows(5)
        yield _rows(5, 5)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_table_batches(run, "data/u", batches())
    assert not run.exists("data/u") and not leftovers(tmp_path)
    names = write_table_batches(run, "data/u", iter([_rows(5), _rows(5, 5)]))
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    assert read_table(run, "data/u")["id"].tolist() == [f"r{i}" for i in range(10)]


@pytest.mark.usefixtures("ray_session")
def test_read_table_refuses_a_table_without_its_marker(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(TableMissing, match=r"data/real does not exist \(run `raybias prepare` first\)"):
        read_table(run, "data/real", stage="prepare")
    write_table(run, "data/real", _rows(4))
    (tmp_path / "run/data/real" / MARKER).unlink()
    with pytest.raises(TableMissing, match="data/real is incomplete"):
        read_table(run, "data/real", stage="prepare")
