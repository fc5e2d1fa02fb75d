"""Each on-disk source, read from a fixture in its exact real format, through `raybias prepare`.

The expected group counts are worked out by hand in tests/fixtures_data.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures_data import (BACKGROUNDS, FOREGROUNDS, make_celeba, make_csv, make_utkface,
                           make_waterbirds)
from raybias.cli import main
from raybias.data.images import decode

pytestmark = pytest.mark.usefixtures("ray_session")
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
SIZE = 16


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    return {
        "celeba": make_celeba(base / "celeba"),
        "celeba_kaggle": make_celeba(base / "celeba_kaggle", variant="kaggle"),
        "waterbirds": make_waterbirds(base / "waterbirds"),
        "utkface": make_utkface(base / "utkface"),
        "csv": make_csv(base / "csv"),
        "csv_codes": make_csv(base / "csv_codes", split_style="codes", csv_file="labels.csv"),
    }


def prepare(fx, severity, run_dir: Path, *more: str) -> int:
    return main(["prepare", QUICKSTART, *fx.overrides(severity), f"data.image_size={SIZE}", *more,
                 "--run-dir", str(run_dir)])


def group_counts(df: pd.DataFrame, n_groups: int):
    return {s: [int(((df["split"] == s) & (df["group"] == g)).sum()) for g in range(n_groups)]
            for s in ("train", "val", "test")}


def check_prepared(fx, severity, run_dir: Path) -> pd.DataFrame:
    """The shared assertions: counts, schema, unique ids, images at size, in the right rows."""
    info = json.loads((run_dir / "data/info.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["prepare"]["done"] is True
    expected = fx.expected(severity)
    n_groups = len(expected["train"])
    assert info["aligned"] == fx.aligned
    assert {s: [info["counts"][s][str(g)] for g in range(n_groups)] for s in expected} == expected

    df = pd.read_parquet(run_dir / "data/real")  # plain pandas reads the folder
    assert group_counts(df, n_groups) == expected
    assert df["id"].is_unique
    assert set(df["source"]) == {"real"}
    assert (df["group"] == df["y"] * fx.n_bias + df["a"]).all()
    assert not [c for c in df.columns if c.startswith("_")]  # internal columns never written
    for rel in df["path"]:
        assert not rel.startswith("/") and (fx.root / rel).is_file()
    for row in df.itertuples():
        img = decode(row.image)
        assert img.shape == (SIZE, SIZE, 3)
        # The picture belongs to its row: background colour of its bias value, blob of its class.
        corner = img[:2, :2].reshape(-1, 3).mean(0)
        centre = img[SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1].reshape(-1, 3).mean(0)
        assert np.abs(corner - BACKGROUNDS[row.a]).max() < 45, (row.id, corner)
        assert np.abs(centre - FOREGROUNDS[row.y]).max() < 60, (row.id, centre)
    return df


@pytest.mark.parametrize("name", ["celeba", "celeba_kaggle", "waterbirds", "utkface", "csv", "csv_codes"])
def test_source_group_counts_at_each_severity(name, datasets, tmp_path, capsys):
    fx = datasets[name]
    for severity in ("original", 0.95, 0.99):
        run_dir = tmp_path / f"run-{severity}"
        assert prepare(fx, severity, run_dir) == 0
        df = check_prepared(fx, severity, run_dir)
        out = capsys.readouterr().out
        assert f"prepared {fx.source}" in out
        expected = fx.expected(severity)
        assert len(df) == sum(sum(v) for v in expected.values())
        # The printed table: one line per group with its train/val/test counts, then totals.
        lines = out.splitlines()
        for g in range(len(expected["train"])):
            row = next(line for line in lines if line.startswith(f"{g} "))
            empty = row.endswith("<- empty in train")
            row = row.replace("<- empty in train", "")
            assert [int(v) for v in row.split()[-3:]] == [expected[s][g] for s in ("train", "val", "test")]
            assert empty == (expected["train"][g] == 0)
        total = next(line for line in lines if line.startswith("total")).split()[1:]
        assert total == [str(sum(expected[s])) for s in ("train", "val", "test")]


def test_celeba_words_and_kaggle_variant_agree(datasets, tmp_path):
    runs = {}
    for name in ("celeba", "celeba_kaggle"):
        assert prepare(datasets[name], 0.95, tmp_path / name) == 0
        runs[name] = pd.read_parquet(tmp_path / name / "data/real").sort_values("id").reset_index(drop=True)
        info = json.loads((tmp_path / name / "data/info.json").read_text())
        assert info["class_names"] == ["dark-haired", "blond"]
        assert info["bias_words"] == ["female", "male"]
        assert "blond" in info["class_words"][1]
        assert info["prompt_template"].format(member="blond", bias="female") == "a photo of a blond female person"
    # The same images, labels and severity choices from either format.
    a, b = runs["celeba"], runs["celeba_kaggle"]
    assert a["id"].tolist() == b["id"].tolist()
    assert (a[["y", "a", "split"]].to_numpy() == b[["y", "a", "split"]].to_numpy()).all()


def test_celeba_other_attributes_use_generic_words(datasets, tmp_path):
    fx = datasets["celeba"]
    assert main(["prepare", QUICKSTART, *fx.overrides("original"), "data.target_attr=Wearing_Hat",
                 "data.bias_attr=Young", "--run-dir", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "data/info.json").read_text())
    assert info["class_names"] == ["not Wearing_Hat", "Wearing_Hat"]
    assert info["class_words"] == [["not wearing hat"], ["wearing hat"]]
    assert info["bias_words"] == ["old", "young"]
    # All 144 images are used, whatever the attributes.
    assert sum(sum(info["counts"][s].values()) for s in ("train", "val", "test")) == fx.n_images == 144


def test_waterbirds_words_come_from_the_species_folders(datasets, tmp_path):
    fx = datasets["waterbirds"]
    assert prepare(fx, "original", tmp_path, "data.shard_rows=50") == 0
    info = json.loads((tmp_path / "data/info.json").read_text())
    assert info["class_words"] == fx.notes["class_words"]
    assert info["bias_words"] == ["land", "water"]
    # 179 rows in shards of 50: four shard files, read back whole.
    shards = sorted(p.name for p in (tmp_path / "data/real").glob("*.parquet"))
    assert len(shards) == 4
    assert len(pd.read_parquet(tmp_path / "data/real")) == fx.n_images


def test_utkface_reports_skipped_files_and_splits_by_seed(datasets, tmp_path, capsys):
    fx = datasets["utkface"]
    assert prepare(fx, "original", tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "warning: utkface: skipped 3 file(s)" in out and "face.jpg" in out
    df = pd.read_parquet(tmp_path / "a/data/real")
    # The one name without its race field (a real UTKFace quirk) is used; other ages are dropped.
    assert df["path"].str.match(r"UTKFace/\d+_1_\d+\.jpg\.chip\.jpg$").sum() == 1
    ages = df["path"].str.extract(r"/(\d+)_")[0].astype(int)
    assert ages.between(0, 5).sum() + ages.between(20, 50).sum() == len(df)
    # Same seed, same split; another seed, another split with the same per-group sizes.
    assert prepare(fx, "original", tmp_path / "b") == 0
    assert prepare(fx, "original", tmp_path / "c", "data.seed=1") == 0
    same = pd.read_parquet(tmp_path / "b/data/real")
    other = pd.read_parquet(tmp_path / "c/data/real")

    def val_ids(d):
        return set(d.loc[d["split"] == "val", "id"])

    assert val_ids(df) == val_ids(same)
    assert val_ids(df) != val_ids(other)
    assert group_counts(other, 4) == fx.expected("original")


def test_image_format_and_stretching_options(datasets, tmp_path):
    fx = datasets["waterbirds"]
    assert prepare(fx, 0.99, tmp_path, "data.image_format=jpeg", "data.center_crop=false",
                   "data.load_workers=2") == 0
    df = pd.read_parquet(tmp_path / "data/real")
    assert all(bytes(b[:3]) == b"\xff\xd8\xff" for b in df["image"])  # JPEG
    assert all(decode(b).shape == (SIZE, SIZE, 3) for b in df["image"])
    assert group_counts(df, 4) == fx.expected(0.99)


def test_center_crop_keeps_the_middle_of_a_tall_image(tmp_path):
    from PIL import Image

    from raybias.data.images import load_file

    arr = np.zeros((40, 20, 3), np.uint8)
    arr[:10] = (255, 0, 0)  # red top band, cropped away
    arr[10:30] = (0, 0, 255)  # the centred 20x20 square
    arr[30:] = (0, 255, 0)
    Image.fromarray(arr).save(tmp_path / "tall.png")
    cropped = decode(load_file(str(tmp_path / "tall.png"), 8, center_crop=True))
    stretched = decode(load_file(str(tmp_path / "tall.png"), 8, center_crop=False))
    assert (cropped[..., 2] > 200).all() and (cropped[..., 0] < 50).all()
    assert stretched[0, 0, 0] > 200 and stretched[-1, 0, 1] > 200
