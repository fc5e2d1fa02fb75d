"""raybias.layout is the one owner of the run directory's layout: no other module of the
package spells a run-relative path or a stage key, and the layout gives today's exact paths
(checked here from outside, as literals)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import pytest

from raybias import layout

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "raybias"
OWNER = PACKAGE / "layout.py"

# The run directory's top folders, and the stage keys that name a generator/method/part.
RUN_PREFIXES = ("data/", "embed/", "generators/", "synthetic/", "classifiers/", "report/", "sweeps/",
                "base/", "logs/")
KEY_PREFIXES = ("finetune/", "generate/", "filter/", "train/", "ddb/")
RUN_FILES = ("manifest.json", ".manifest.lock", "lease.json")


def _docstrings(tree: ast.AST) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def layout_literals(source: str, where: str = "<source>") -> List[str]:
    """Every string literal (f-string pieces included, docstrings not) of `source` that spells a
    run-relative path or a stage key, as 'where:line: literal'."""
    tree = ast.parse(source, filename=where)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
            continue
        text = node.value
        if text.startswith(RUN_PREFIXES + KEY_PREFIXES) or text in RUN_FILES:
            found.append(f"{where}:{node.lineno}: {text!r}")
    return found


def test_the_checker_catches_every_spelling():
    bad = '''
"""data/real in a docstring is documentation."""
REAL = "data/real"
def f(gen, m, s):
    """generators/<gen>/manifest.json"""
    a = f"generators/{gen}/manifest.json"
    b = f"classifiers/{m}/{s}/metrics.json"
    c = "synthetic/" + gen
    d = f"train/{m}/{s}"
    e = "manifest.json"
    ok = (f"{gen}/samples.png", "see data/real", "prepare", "embed", "report")
    return "sweeps/x", "embed/vectors", "report/report.md", "base/model", "logs/x", "ddb/model"
'''
    found = layout_literals(bad)
    assert len(found) == 12, found
    assert not any("docstring" in f or "<gen>" in f or "see data" in f for f in found)


def test_no_module_but_layout_spells_a_run_relative_path_or_stage_key():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == OWNER:
            continue
        found += layout_literals(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not found, "run-relative paths belong in raybias/layout.py:\n" + "\n".join(found)


def test_layout_is_a_leaf():
    tree = ast.parse(OWNER.read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "raybias"], imported


EXPECTED = [
    (layout.MANIFEST, "manifest.json"),
    (layout.MANIFEST_LOCK, ".manifest.lock"),
    (layout.LEASE, "lease.json"),
    (layout.log_file("run-20250101-000000-1.log"), "logs/run-20250101-000000-1.log"),
    (layout.INFO, "data/info.json"),
    (layout.REAL, "data/real"),
    (layout.BASE_DIR, "base"),
    (layout.BASE_MODEL_DIR, "base/model"),
    (layout.BASE_ORACLE_DIR, "base/oracle"),
    (layout.BASE_QUALITY, "base/quality.json"),
    (layout.BASE_MODEL_INFO, "base/model_info.json"),
    (layout.BASE_SAMPLES_PNG, "base/samples.png"),
    (layout.BASE_CORPUS_PNG, "base/corpus.png"),
    (layout.BASE_GUIDANCE_PNG, "base/guidance.png"),
    (layout.BASE_LOSS_PNG, "base/loss.png"),
    (layout.EMBED_DIR, "embed"),
    (layout.VECTORS, "embed/vectors"),
    (layout.CLUSTERS_PARQUET, "embed/clusters.parquet"),
    (layout.CLUSTERS_JSON, "embed/clusters.json"),
    (layout.CLUSTERS_PROJECTION_PNG, "embed/clusters_projection.png"),
    (layout.CLUSTERS_SAMPLES_PNG, "embed/clusters_samples.png"),
    (layout.generator_dir("lora"), "generators/lora"),
    (layout.generator_manifest("lora"), "generators/lora/manifest.json"),
    (layout.generator_samples("lora"), "generators/lora/samples.png"),
    (layout.model_dir("clustered_dreambooth", "g1-c2"), "generators/clustered_dreambooth/g1-c2"),
    (layout.training_json("lora", "g0"), "generators/lora/g0/training.json"),
    (layout.previews_json("lora", "g0"), "generators/lora/g0/previews.json"),
    (layout.preview_png("lora", "g0", 3), "generators/lora/g0/preview-3.png"),
    (layout.finetune_storage("dreambooth"), "generators/dreambooth/_train"),
    (layout.fault_marker("dreambooth", "g3"), "generators/dreambooth/_train/g3.fault-marker"),
    (layout.class_images_path("dreambooth", 2, 0xabc), "generators/dreambooth/_class/2-00000abc.npz"),
    (layout.DDB, "ddb"),
    (layout.DDB_MODEL_DIR, "generators/ddb/cond"),
    (layout.DDB_MANIFEST, "generators/ddb/manifest.json"),
    (layout.DDB_AMPLIFIER_DIR, "generators/ddb/amplifier"),
    (layout.DDB_AMPLIFIER_MODEL, "generators/ddb/amplifier/model.safetensors"),
    (layout.DDB_AMPLIFIER_OUTPUTS, "generators/ddb/amplifier/outputs.parquet"),
    (layout.DDB_CONFLICT_JSON, "generators/ddb/amplifier/conflict.json"),
    (layout.synthetic_dir("vanilla"), "synthetic/vanilla"),
    (layout.plan_path("vanilla"), "synthetic/vanilla/plan.json"),
    (layout.shards_dir("vanilla"), "synthetic/vanilla/shards"),
    (layout.unit_name(7), "unit-00007.parquet"),
    (layout.shard_path("vanilla", 12), "synthetic/vanilla/shards/unit-00012.parquet"),
    (layout.scores_path("lora"), "synthetic/lora/scores.parquet"),
    (layout.scores_png("lora"), "synthetic/lora/scores.png"),
    (layout.synthetic_samples("lora"), "synthetic/lora/samples.png"),
    (layout.classifier_dir("erm", 0), "classifiers/erm/0"),
    (layout.metrics_path("erm", 1), "classifiers/erm/1/metrics.json"),
    (layout.classifier_model("ddb_amplifier", 0), "classifiers/ddb_amplifier/0/model.safetensors"),
    (layout.curves_png("groupdro", 2), "classifiers/groupdro/2/curves.png"),
    (layout.trainer_name("erm", 0), "train-erm-0"),
    (layout.REPORT_DIR, "report"),
    (layout.REPORT_MD, "report/report.md"),
    (layout.TIMINGS, "report/timings.json"),
    (layout.RESULTS_BY_SEED_CSV, "report/results_by_seed.csv"),
    (layout.WGA_PNG, "report/wga_by_method.png"),
    (layout.REPORT_SAMPLES_PNG, "report/samples.png"),
    (layout.sweep_dir("grid"), "sweeps/grid"),
    (layout.severity_dir("0.95"), "severity-0.95"),
    (layout.SWEEP_RESULTS, "results.csv"),
    (layout.SWEEP_REPORT, "report.md"),
    (layout.SWEEP_TUNE, "tune"),
    (layout.severity_png(0.5), "wga_vs_severity_r0.5.png"),
    (layout.PREPARE_KEY, "prepare"),
    (layout.BASE_KEY, "base"),
    (layout.EMBED_KEY, "embed"),
    (layout.CLUSTER_KEY, "cluster"),
    (layout.finetune_key("lora"), "finetune/lora"),
    (layout.generate_key("vanilla"), "generate/vanilla"),
    (layout.filter_key("vanilla"), "filter/vanilla"),
    (layout.train_key("erm", 0), "train/erm/0"),
    (layout.DDB_MODEL_KEY, "ddb/model"),
    (layout.DDB_GENERATE_KEY, "ddb/generate"),
    (layout.DDB_AMPLIFIER_KEY, "ddb/amplifier"),
]


@pytest.mark.parametrize("got, want", EXPECTED, ids=[w for _, w in EXPECTED])
def test_layout_gives_todays_paths(got, want):
    assert got == want


def test_unit_names_round_trip_and_stage_of():
    assert layout.unit_of(layout.unit_name(42)) == 42
    assert layout.unit_of(".tmp-abc-unit-00001.parquet") is None
    assert layout.unit_of("_SUCCESS") is None
    assert [layout.stage_of(k) for k in ("prepare", "train/erm/0", "ddb/model", "finetune/lora")] == \
        ["prepare", "train", "ddb", "finetune"]
