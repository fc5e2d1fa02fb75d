"""The run report: which sets the sample grid draws, that it reads only the drawn images, stage
timings whose total is the run's wall clock, and the machine/versions line.

The run directory is built by hand with the project's own writers (data.io.write_table_batches
for the real table, generation.shards for synthetic shards, the filter's scores writer, the
manifest's JSON): no Ray, no stage runs.
"""

from __future__ import annotations

import importlib.metadata
import re
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybias.data.images import encode_png
from raybias.data.info import DatasetInfo
from raybias.data.io import write_table_batches
from raybias.generation.shards import unit_table, write_shard
from raybias.layout import MANIFEST, REAL
from raybias.rundir import RunDir
from raybias.stages import report

N_GROUPS = 4  # 2 classes x 2 colours
_POOLS = []  # proxy memory pools stay alive: arrow may free into them after the measurement


def _info(run: RunDir) -> DatasetInfo:
    info = DatasetInfo(source="colored_digits", n_classes=2, n_bias=2, class_names=["zero", "one"],
                       bias_names=["red", "green"], class_words=[["zero"], ["one"]], bias_words=["red", "green"],
                       prompt_template="a {bias} {class}", aligned=[0, 1], image_size=8, severity=0.9,
                       counts={"train": {str(g): 10 for g in range(N_GROUPS)}})
    info.save(run)
    return info


def _png(value: int) -> bytes:
    return encode_png(np.full((8, 8, 3), value % 256, np.uint8))


def _write_real(run: RunDir, per_group: int = 10) -> None:
    rows = []
    for split in ("train", "val", "test"):
        for g in range(N_GROUPS):
            for i in range(per_group):
                rows.append({"id": f"real-{split}-g{g}-{i:03d}", "image": _png(g * 40 + i), "y": g // 2, "a": g % 2,
                             "group": g, "split": split, "source": "real"})
    df = pd.DataFrame(rows)
    write_table_batches(run, REAL, [df.iloc[:50], df.iloc[50:]])  # two shards


def _unit(gen: str, number: int, group: int, ids, y: int = 0) -> dict:
    return {"unit": number, "ids": list(ids), "y": y, "a": -1 if group < 0 else group % 2, "group": group,
            "seeds": list(range(len(ids))), "prompts": ["p"] * len(ids), "negative_prompt": None, "cluster": None}


def _write_synthetic(run: RunDir, gen: str, units, image=None) -> None:
    """One shard per unit; image(unit, k) gives the k-th image (default: a PNG distinct per row)."""
    image = image or (lambda unit, k: _png(unit * 16 + k))
    for u in units:
        write_shard(run, gen, u["unit"], unit_table(gen, u, [image(u["unit"], k) for k in range(len(u["ids"]))]))


@pytest.fixture
def run_dir(tmp_path):
    """Real data, a group-labelled generator (vanilla, half its rows dropped by the filter) and
    DDB's bias-aligned set (group -1, as the ddb stage writes it)."""
    from raybias.stages.filter import _write_scores

    run = RunDir(str(tmp_path / "run"))
    _info(run)
    _write_real(run)
    units = [_unit("vanilla", g, g, [f"vanilla-g{g}-{i:03d}" for i in range(8)], y=g // 2) for g in range(N_GROUPS)]
    _write_synthetic(run, "vanilla", units)
    ids = [i for u in units for i in u["ids"]]
    keep = [int(i[-3:]) % 2 == 0 for i in ids]  # odd ids dropped
    _write_scores(run, "vanilla", pd.DataFrame({"id": ids, "group": [int(i.split("-g")[1][0]) for i in ids],
                                                "score": 0.5, "keep": keep, "prompt_score": 0.0,
                                                "centroid_score": 0.0}))
    _write_synthetic(run, "ddb", [_unit("ddb", c, -1, [f"ddb-y{c}-{i:06d}" for i in range(6)], y=c)
                                  for c in range(2)])
    run.write_bytes("synthetic/ddb/samples.png", _png(0))  # the ddb stage's own per-class grid
    return run


# --- the sample grid's columns and rows ---------------------------------------------------------

def test_choose_columns_leaves_out_sets_without_group_labels():
    metas = {"real": pd.DataFrame({"id": ["a", "b"], "group": [0, 3]}),
             "ddb": pd.DataFrame({"id": ["x", "y"], "group": [-1, -1]}),
             "lora": pd.DataFrame({"id": [], "group": []}),
             "vanilla": pd.DataFrame({"id": ["v"], "group": [2]})}
    drawn, left_out = report.choose_columns(metas, N_GROUPS)
    assert drawn == ["real", "vanilla"]
    assert set(left_out) == {"ddb", "lora"} and "group" in left_out["ddb"]


def test_choose_rows_is_deterministic_per_group_and_without_repeats():
    meta = pd.DataFrame({"id": [f"i{k:03d}" for k in range(200)], "group": [k % 4 for k in range(200)],
                         "file": [k // 50 for k in range(200)], "row": [k % 50 for k in range(200)]})
    picks = report.choose_rows(meta, N_GROUPS, per_group=6, seed=0, name="real")
    again = report.choose_rows(meta.sample(frac=1.0, random_state=1), N_GROUPS, per_group=6, seed=0, name="real")
    assert set(picks) == set(range(N_GROUPS))
    for g, df in picks.items():
        assert len(df) == 6 and df["id"].is_unique and df["id"].is_monotonic_increasing
        assert set(meta.set_index("id").loc[df["id"], "group"]) == {g}
        pd.testing.assert_frame_equal(df, again[g])  # shard order does not change the draw
    few = report.choose_rows(meta[meta["group"] == 1].head(2), N_GROUPS, per_group=6)
    assert list(few) == [1] and len(few[1]) == 2


def test_grid_has_no_empty_ddb_column(run_dir):
    plan = report.plan_sample_grid(run_dir, N_GROUPS, per_group=3)
    assert plan.columns == ["real", "vanilla"]
    assert "ddb" in plan.left_out
    for name in plan.columns:  # every drawn column has images in every group
        assert sorted(plan.picks[name]) == list(range(N_GROUPS))
        assert all(len(df) == 3 for df in plan.picks[name].values())
    real_ids = [i for df in plan.picks["real"].values() for i in df["id"]]
    assert all(i.startswith("real-train-") for i in real_ids)  # training split only
    vanilla_ids = [i for df in plan.picks["vanilla"].values() for i in df["id"]]
    assert all(int(i[-3:]) % 2 == 0 for i in vanilla_ids)  # only rows the filter kept

    fig = report.sample_grid(run_dir, per_group=3, plan=plan)
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles == ["real (train)", "vanilla"]
    assert all(ax.images for ax in fig.axes)  # no empty cell: each group had 3 images per column

    text = report.write_run_report(run_dir)
    assert "Not in the grid: ddb" in text and "../synthetic/ddb/samples.png" in text
    assert run_dir.exists("report/samples.png")


def test_read_picks_returns_the_picked_rows_images(run_dir):
    plan = report.plan_sample_grid(run_dir, N_GROUPS, per_group=4)
    images = report.read_picks(run_dir, plan)
    full = pd.concat([pq.read_table(run_dir.path(f)).to_pandas() for f in plan.files["vanilla"]])
    by_id = dict(zip(full["id"], full["image"]))
    for g, df in plan.picks["vanilla"].items():
        assert images["vanilla"][g] == [by_id[i] for i in df["id"]]


def test_sample_grid_reads_only_the_drawn_rows(tmp_path):
    """100 generation units of 64 rows of 8 KB images (51 MB of image bytes): choosing and
    reading the grid's images holds a small fraction of that, in Arrow and in Python memory."""
    run = RunDir(str(tmp_path / "run"))
    _write_real(run, per_group=2)
    size, per_unit, n_units = 8192, 64, 100

    def noise(unit, k):
        return np.random.default_rng([unit, k]).bytes(size)  # incompressible

    units = [_unit("big", u, u % N_GROUPS, [f"big-{u:03d}-{i:02d}" for i in range(per_unit)]) for u in range(n_units)]
    _write_synthetic(run, "big", units, image=noise)
    total = size * per_unit * n_units

    proxy = pa.proxy_memory_pool(pa.default_memory_pool())
    _POOLS.append(proxy)
    old = pa.default_memory_pool()
    tracemalloc.start()
    pa.set_memory_pool(proxy)
    try:
        plan = report.plan_sample_grid(run, N_GROUPS, per_group=6)
        images = report.read_picks(run, plan)
    finally:
        pa.set_memory_pool(old)
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    drawn = [b for by_group in images["big"].values() for b in by_group]
    assert len(drawn) == 6 * N_GROUPS == plan.n_drawn() - sum(len(v) for v in plan.picks["real"].values())
    assert all(len(b) == size for b in drawn)
    assert proxy.max_memory() < total / 10, (proxy.max_memory(), total)
    assert py_peak < total / 10, (py_peak, total)


# --- stage timings ------------------------------------------------------------------------------

def _manifest_stages():
    def rec(t0, t1):
        return {"done": True, "started_at": t0, "finished_at": t1, "seconds": t1 - t0}

    return {
        "prepare": rec(1000.0, 1010.0),
        # three classifiers trained in parallel: 405 s of compute in 200 s of wall time
        "train/erm/0": rec(1010.0, 1110.0),
        "train/erm/1": rec(1010.0, 1120.0),
        "train/jtt/0": rec(1015.0, 1210.0),
        "finetune/lora": {"done": False, "started_at": 900.0, "seconds": 3.0},  # unfinished: not counted
    }


def _rows(table: str) -> dict:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and not set(cells[0]) <= set("-"):
            out[cells[0]] = cells[1:]
    return out


def test_timings_total_is_the_run_wall_clock_not_a_sum_of_overlapping_stages():
    stages = _manifest_stages()
    table = report.timings_table(stages, {"started_at": 999.0, "finished_at": 1215.0, "prepare": 11.0,
                                          "train": 204.0, "total": 216.0})
    rows = _rows(table)
    assert rows["train"] == ["200.0", "405.0", "3"]  # wall: first start -> last finish; compute: summed
    assert rows["prepare"] == ["10.0", "10.0", "1"]
    assert rows["**run (wall clock)**"][0] == "216.0"  # the pipeline's start -> finish
    assert "finetune" not in rows


def test_timings_total_while_the_run_is_going_and_without_a_pipeline_record():
    stages = _manifest_stages()
    going = _rows(report.timings_table(stages, {"started_at": 999.0}, now=1230.0))
    assert going["**run (wall clock)**"][0] == "231.0"
    assert "so far" in report.timings_table(stages, {"started_at": 999.0}, now=1230.0)
    # stages run one by one (no report/timings.json): the time some key ran, overlaps once
    alone = _rows(report.timings_table(stages, None))
    assert alone["**run (wall clock)**"][0] == "210.0"  # 1000 -> 1210, not 10 + 405
    old = _rows(report.timings_table(stages, {"prepare": 11.0, "train": 204.0, "total": 216.0}))
    assert old["**run (wall clock)**"][0] == "216.0"


def test_union_seconds_counts_overlaps_once():
    assert report.union_seconds([(0, 10), (5, 20), (30, 31)]) == 21
    assert report.union_seconds([]) == 0


def test_report_md_has_timings_from_the_manifest_and_pipeline(run_dir):
    m = run_dir.manifest()
    m["stages"] = _manifest_stages()
    run_dir.write_json(MANIFEST, m)
    run_dir.write_json("report/timings.json", {"started_at": 999.0, "finished_at": 1215.0, "total": 216.0})
    rows = _rows(report.write_run_report(run_dir))
    assert rows["**run (wall clock)**"][0] == "216.0" and rows["train"][0] == "200.0"


# --- the machine --------------------------------------------------------------------------------

def test_report_names_the_machine_and_versions(run_dir):
    from raybias import machine

    text = report.write_run_report(run_dir)
    section = text.split("## Machine", 1)[1]
    line = section.strip().splitlines()[0]
    assert machine.cpu_model() in line and machine.cores() in line
    assert re.search(r"\d+ GiB memory", line)
    assert "GPU: " in line
    for dist in ("raybias", "ray", "torch", "diffusers"):
        assert f"{dist} {machine.version(dist)}" in line
        assert machine.version(dist).split("+")[0] == importlib.metadata.version(dist).split("+")[0]


def test_machine_line_names_gpus_by_model_and_count():
    from raybias import machine

    info = {"cpu": "Some CPU", "cores": "16 cores", "memory_bytes": 128 * 2 ** 30,
            "gpus": ["NVIDIA H200", "NVIDIA H200"], "cuda": "12.4", "python": "3.11.7",
            "versions": {"raybias": "0.1.0", "ray": "2.9", "torch": "2.3", "diffusers": "0.30"}}
    line = machine.machine_line(info)
    assert line.startswith("Some CPU, 16 cores, 128 GiB memory; GPU: 2 × NVIDIA H200 (CUDA 12.4)")
    assert line.endswith("raybias 0.1.0, ray 2.9, torch 2.3, diffusers 0.30")
    assert "GPU: none" in machine.machine_line(dict(info, gpus=[], cuda=None))


# --- the data section ---------------------------------------------------------------------------

def test_report_names_the_severity_rule_and_validation_protocol(run_dir):
    text = report.write_run_report(run_dir)
    data = text.split("## Data", 1)[1].split("##", 1)[0]
    line = data.strip().splitlines()[0]
    assert line.startswith("Severity 0.9: FFR's minority_to_keep rule") and "ceil(n_aligned·(1−s)/s)" in line
    assert "val_protocol untouched: validation as the source ships it" in line
    info = DatasetInfo.load(run_dir)
    info.val_protocol = "biased"
    info.save(run_dir)
    line = report.write_run_report(run_dir).split("## Data", 1)[1].strip().splitlines()[0]
    assert "val_protocol biased" in line and "at least 10 bias-conflicting" in line
    info.severity = None
    info.save(run_dir)
    line = report.write_run_report(run_dir).split("## Data", 1)[1].strip().splitlines()[0]
    assert line.startswith("Severity: original")


# --- two-stage: which stage 2; the synthetic sets' diagnostics ----------------------------------

def _metrics(run: RunDir, method: str, seed: int, val_wga: float, test_wga: float, stage2=None) -> None:
    acc = {str(g): test_wga for g in range(N_GROUPS)}
    rec = {"method": method, "seed": seed, "best_epoch": 3, "seconds": 1.0,
           "val": {"wga": val_wga, "aga": val_wga, "acc": val_wga},
           "test": {"wga": test_wga, "aga": test_wga, "acc": test_wga, "group_acc": acc}}
    if stage2 is not None:
        rec["stage2"] = stage2
    run.write_json(f"classifiers/{method}/{seed}/metrics.json", rec)


def test_report_says_which_stage2_each_two_stage_classifier_kept(run_dir):
    order = ["head+erm", "full+erm", "full+groupdro"]
    cands = {"head+erm": {"val_wga": 0.62, "final_val_wga": 0.60, "test_wga": 0.64},
             "full+erm": {"val_wga": 0.90, "final_val_wga": 0.85, "test_wga": 0.88},
             "full+groupdro": {"val_wga": 0.97, "final_val_wga": 0.95, "test_wga": 0.937}}
    _metrics(run_dir, "lora", 0, 0.97, 0.937, {"mode": "auto", "order": order, "chosen": "full+groupdro",
                                               "rank": "final", "candidates": cands})
    _metrics(run_dir, "lora", 1, 0.70, 0.68, {"mode": "head", "order": ["head+groupdro"], "chosen": "head+groupdro"})
    _metrics(run_dir, "erm", 0, 0.5, 0.4)  # not two-stage: not in the section
    text = report.write_run_report(run_dir, ["erm", "lora"])
    section = text.split("## Two-stage: stage 2", 1)[1].split("\n## ", 1)[0]
    assert ("- lora seed 0: stage 2: full+groupdro chosen, val WGA at the candidates' last epoch 95.0 "
            "(head+erm 60.0, full+erm 85.0)") in section
    assert "- lora seed 1: stage 2: head+groupdro (fixed), val WGA 70.0" in section
    rows = [line for line in section.splitlines() if line.startswith("| lora")]
    assert rows[0] == ("| lora | 0 | full+groupdro (auto) | 62.0 / 60.0 (64.0) | 90.0 / 85.0 (88.0) | "
                       "**97.0 / 95.0 (93.7)** | – |")
    assert rows[1] == "| lora | 1 | head+groupdro (fixed) | – | – | – | **70.0 (68.0)** |"
    assert "| erm |" not in section


def _diag_record(gen: str, fidelity: float, kid_value: float) -> dict:
    groups = [{"group": g, "name": f"g{g}", "n_generated": 20, "n_sampled": 8, "n_real": 10, "n_kept_sampled": 4,
               "class_fidelity": fidelity, "bias_fidelity": 1.0, "fidelity": fidelity - 0.01 * g,
               "fidelity_kept": fidelity, "real_fidelity": 0.9, "diversity": 0.4, "real_diversity": 0.2,
               "kid": kid_value * (g + 1)} for g in range(N_GROUPS)]
    return {"generator": gen, "embedder": "builtin", "reader": "oracle", "sample_per_group": 8, "seed": 0,
            "groups": groups, "seconds": 1.0}


def test_report_renders_the_diagnostics_table_and_plot(run_dir):
    run_dir.write_json("synthetic/vanilla/diagnostics.json", _diag_record("vanilla", 0.9, 0.001))
    text = report.write_run_report(run_dir, ["vanilla"])
    section = text.split("## Synthetic data diagnostics", 1)[1].split("\n## ", 1)[0]
    assert "| vanilla | g1 | 20 | 8 (10) | 90.0 | 100.0 | 89.0 | 90.0 | 90.0 | 0.400 (0.200) | 2.00 |" in section
    # per generator: mean fidelity over groups 88.5, worst 87.0, diversity twice the real's, mean KID 2.5e-3
    assert "| vanilla | 88.5 | 87.0 | 2.00 | 2.50 |" in section
    assert "![diagnostics per generator and group](diagnostics.png)" in section
    assert run_dir.exists("report/diagnostics.png")
    run_dir.delete("synthetic/vanilla/diagnostics.json")
    text = report.write_run_report(run_dir, ["vanilla"], diagnostics_problem="ConfigError: no reader")
    assert "## Synthetic data diagnostics\n\n(diagnostics unavailable: ConfigError: no reader)" in text
