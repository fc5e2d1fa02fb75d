"""Bad input to `raybias prepare`: each case exits non-zero, names the file or field on
stderr, and leaves nothing marked done (no finished manifest stage, no data/real/_SUCCESS,
no temporary folders)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fixtures_data import MAKERS, rewrite_csv
from raybias.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.fixture
def data(tmp_path):
    """A fresh fixture dataset (exact real format) that the test may break."""
    def make(name):
        return MAKERS[name](tmp_path / "data" / name)
    return make


def assert_nothing_done(run_dir: Path) -> None:
    if (run_dir / "manifest.json").exists():
        stage = json.loads((run_dir / "manifest.json").read_text())["stages"].get("prepare")
        assert stage is None or stage["done"] is False
    assert not (run_dir / "data/real/_SUCCESS").exists()
    assert not (run_dir / "data/info.json").exists()
    if run_dir.exists():
        assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


def fails(capsys, run_dir: Path, *args: str) -> str:
    """Run `raybias prepare`; assert the failure contract; return stderr."""
    rc = main(["prepare", QUICKSTART, *args, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "raybias: error: " in err
    assert "Traceback" not in err
    assert_nothing_done(run_dir)
    return err


def first_train_file(root: Path, fx_csv: str = "metadata.csv") -> str:
    import csv

    with open(root / fx_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] in ("train", "0"):
                return row["path"] if "path" in row else row["img_filename"]
    raise AssertionError


# --- images -------------------------------------------------------------------------------

def test_corrupt_image(data, tmp_path, capsys):
    fx = data("celeba")
    (fx.root / "img_align_celeba/000007.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "img_align_celeba/000007.jpg" in err and "cannot decode image" in err


def test_truncated_image(data, tmp_path, capsys):
    fx = data("waterbirds")
    rel = first_train_file(fx.root)
    raw = (fx.root / rel).read_bytes()
    (fx.root / rel).write_bytes(raw[: len(raw) // 2])
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert rel in err and "truncated" in err


def test_empty_image_file(data, tmp_path, capsys):
    fx = data("utkface")
    victim = sorted((fx.root / "UTKFace").glob("2*_0_*.jpg.chip.jpg"))[0]
    victim.write_bytes(b"")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert victim.name in err and "empty" in err


def test_missing_image_file(data, tmp_path, capsys):
    fx = data("csv")
    rel = first_train_file(fx.root)
    os.remove(rel if os.path.isabs(rel) else fx.root / rel)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "image file not found" in err and Path(rel).name in err


def test_a_bad_image_in_a_later_shard_leaves_no_partial_table(data, tmp_path, capsys):
    fx = data("waterbirds")
    run_dir = tmp_path / "run"
    # A finished table from an earlier prepare, then a fresh prepare that fails in shard 3:
    assert main(["prepare", QUICKSTART, *fx.overrides("original"), "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "data/real/_SUCCESS").exists()
    import csv

    with open(fx.root / "metadata.csv", newline="") as f:
        late = list(csv.DictReader(f))[150]["img_filename"]
    (fx.root / late).write_bytes(b"\x89PNG garbage")
    err = fails(capsys, run_dir, *fx.overrides("original"), "data.shard_rows=40")
    assert late in err
    assert not (run_dir / "data/real").exists()  # the stale table went with the failed redo


# --- metadata files -------------------------------------------------------------------------

def test_missing_csv_column(data, tmp_path, capsys):
    fx = data("waterbirds")
    rewrite_csv(fx.root / "metadata.csv",
                lambda rows, fields: ([{k: v for k, v in r.items() if k != "place"} for r in rows],
                                      [f for f in fields if f != "place"]))
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "metadata.csv is missing column(s) 'place'" in err


def test_non_integer_label(data, tmp_path, capsys):
    fx = data("csv")

    def edit(rows, fields):
        rows[4]["y"] = "cat"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "metadata.csv, line 6: column 'y' has 'cat'; expected an integer" in err


@pytest.mark.parametrize("column, value, allowed", [("y", "2", "0, 1"), ("place", "-1", "0, 1")])
def test_label_out_of_range(data, tmp_path, capsys, column, value, allowed):
    fx = data("waterbirds")

    def edit(rows, fields):
        rows[9][column] = value
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert f"line 11: column '{column}' has '{value}', out of range" in err and allowed in err


def test_negative_label_in_user_csv(data, tmp_path, capsys):
    fx = data("csv")

    def edit(rows, fields):
        rows[0]["a"] = "-3"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "line 2: column 'a' has '-3', out of range" in err and ">= 0" in err


def test_celeba_value_not_plus_minus_one(data, tmp_path, capsys):
    fx = data("celeba")
    path = fx.root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    parts = lines[5].split()
    parts[1 + 9] = "0"  # Blond_Hair is the 10th attribute
    lines[5] = " ".join(parts)
    path.write_text("\n".join(lines) + "\n")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "list_attr_celeba.txt, line 6: attribute Blond_Hair has '0'; allowed: 1, -1" in err


def test_celeba_attribute_not_in_header(data, tmp_path, capsys):
    fx = data("celeba")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"), "data.target_attr=Blonde_Hair")
    assert "data.target_attr='Blonde_Hair' is not an attribute in" in err
    assert "list_attr_celeba.txt" in err and "did you mean 'Blond_Hair'" in err


def test_celeba_truncated_attribute_file(data, tmp_path, capsys):
    fx = data("celeba")
    path = fx.root / "list_attr_celeba.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-3]) + "\n")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "list_attr_celeba.txt: line 1 says 144 images but the file lists 141" in err


def test_missing_partition_file(data, tmp_path, capsys):
    fx = data("celeba")
    (fx.root / "list_eval_partition.txt").unlink()
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "CelebA partition file not found" in err and "list_eval_partition.txt" in err


def test_image_without_partition_line(data, tmp_path, capsys):
    fx = data("celeba")
    path = fx.root / "list_eval_partition.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("000010.jpg")))
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "1 image(s) of list_attr_celeba.txt have no line in" in err and "'000010.jpg'" in err


def test_missing_metadata_file(data, tmp_path, capsys):
    fx = data("waterbirds")
    (fx.root / "metadata.csv").unlink()
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "Waterbirds metadata not found" in err and "metadata.csv" in err


def test_bad_split_value(data, tmp_path, capsys):
    fx = data("csv")

    def edit(rows, fields):
        rows[2]["split"] = "training"
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "line 4: column 'split' has 'training'; allowed: train, val, test (or 0, 1, 2)" in err


def test_image_listed_twice(data, tmp_path, capsys):
    fx = data("csv")

    def edit(rows, fields):
        rows[7]["path"] = rows[6]["path"]
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "line 9: image" in err and "already listed on line 8" in err


def test_class_numbers_with_a_gap(data, tmp_path, capsys):
    fx = data("csv")

    def edit(rows, fields):
        for r in rows:
            r["y"] = "2" if r["y"] == "1" else r["y"]
        return rows, fields
    rewrite_csv(fx.root / "metadata.csv", edit)
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "column 'y' has values [0, 2]" in err and "no row has y=1" in err


# --- empty data and missing folders ------------------------------------------------------

def test_empty_dataset(data, tmp_path, capsys):
    fx = data("csv")
    rewrite_csv(fx.root / "metadata.csv", lambda rows, fields: ([], fields))
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "metadata.csv has a header but no rows: the dataset is empty" in err


def test_folder_without_any_dataset_images(tmp_path, capsys):
    root = tmp_path / "faces"
    root.mkdir()
    (root / "notes.txt").write_text("nothing here")
    (root / "holiday.jpg").write_bytes(b"x")
    err = fails(capsys, tmp_path / "run", "data.source=utkface", f"data.root={root}")
    assert "no UTKFace images named [age]_[gender]_[race]_[date&time].jpg" in err and "'holiday.jpg'" in err


def test_no_image_in_the_age_bins(data, tmp_path, capsys):
    fx = data("utkface")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"), "data.young_ages=[90,95]",
                "data.old_ages=[100,110]")
    assert "data.young_ages [90, 95]" in err and "data.old_ages [100, 110]" in err


def test_missing_data_root(tmp_path, capsys):
    err = fails(capsys, tmp_path / "run", "data.source=waterbirds")
    assert "config key 'data.root' has bad value None" in err
    err = fails(capsys, tmp_path / "run", "data.source=waterbirds", f"data.root={tmp_path / 'nowhere'}")
    assert f"data.root '{tmp_path / 'nowhere'}' does not exist" in err


def test_class_with_no_aligned_images(data, tmp_path, capsys):
    fx = data("csv")
    # Remove class 1's a = 0 training rows, then declare a = 0 aligned for both classes.
    rewrite_csv(fx.root / "metadata.csv", lambda rows, fields: (
        [r for r in rows if not (r["y"] == "1" and r["a"] == "0" and r["split"] == "train")], fields))
    err = fails(capsys, tmp_path / "run", *fx.overrides(0.95), "data.aligned=[0,0]")
    assert "class y=1 has no bias-aligned training images (aligned bias value a=0)" in err
    assert "data.aligned" in err


def test_aligned_value_out_of_range(data, tmp_path, capsys):
    fx = data("waterbirds")
    err = fails(capsys, tmp_path / "run", *fx.overrides(0.95), "data.aligned=[0,5]")
    assert "data.aligned[1] = 5 is not a bias value (allowed 0..1)" in err


# --- paths that leave the dataset folder ---------------------------------------------------

def _set_first_path(root: Path, value: str) -> None:
    def edit(rows, fields):
        rows[0]["path"] = value
        return rows, fields
    rewrite_csv(root / "metadata.csv", edit)


def test_path_with_dotdot(data, tmp_path, capsys):
    fx = data("csv")
    _set_first_path(fx.root, "images/../../secret.png")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "line 2: image path 'images/../../secret.png' contains '..'" in err


def test_absolute_path_outside_root(data, tmp_path, capsys):
    fx = data("csv")
    outside = tmp_path / "outside.png"
    shutil.copy(next((fx.root / "images").rglob("*.png")), outside)
    _set_first_path(fx.root, str(outside))
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert f"line 2: image path '{outside}' is outside data.root" in err


def test_symlink_resolving_outside_root(data, tmp_path, capsys):
    fx = data("csv")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(next((fx.root / "images").rglob("*.png")), outside)
    (fx.root / "images/link.png").symlink_to(outside)
    _set_first_path(fx.root, "images/link.png")
    err = fails(capsys, tmp_path / "run", *fx.overrides("original"))
    assert "line 2: image path 'images/link.png' is a symlink that resolves outside data.root" in err


# --- config --------------------------------------------------------------------------------

def test_unknown_source_name(tmp_path, capsys):
    err = fails(capsys, tmp_path / "run", "data.source=imagenet", "data.root=/tmp")
    assert "config key 'data.source' has bad value 'imagenet'" in err and "waterbirds" in err


@pytest.mark.parametrize("typo, key", [("data.sevrity=0.9", "data.sevrity"), ("dta.severity=0.9", "dta")])
def test_config_key_typos(tmp_path, capsys, typo, key):
    err = fails(capsys, tmp_path / "run", typo)
    assert f"unknown config key '{key}'" in err


def test_missing_config_file(tmp_path, capsys):
    rc = main(["prepare", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in err
    assert_nothing_done(tmp_path / "run")


# --- reported, not refused -------------------------------------------------------------------

def test_empty_group_is_reported_not_hidden(data, tmp_path, capsys):
    fx = data("waterbirds")
    run_dir = tmp_path / "run"
    # FFR's rule keeps ceil(n_aligned·(1−s)/s) >= 1 conflicting images for any s < 1, so it is
    # s = 1 that leaves the conflicting groups 1 and 2 with no training image: shown and warned.
    assert main(["prepare", QUICKSTART, *fx.overrides(1.0), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 landbird/water                  no        0       5       5  <- empty in train" in out
    assert "2 waterbird/land                  no        0       4       4  <- empty in train" in out
    assert "warning: groups with no train images: 1 landbird/water, 2 waterbird/land" in out
    info = json.loads((run_dir / "data/info.json").read_text())
    assert info["empty_train_groups"] == [1, 2]


def test_ray_wrapped_project_errors_print_without_the_remote_traceback(ray_session):
    from raybias.cli import _known_cause, _known_errors
    from raybias.data.images import ImageError

    @ray_session.remote
    def load_remote():
        raise ImageError("/data/x.jpg: cannot decode image (broken)")

    with pytest.raises(Exception) as info:
        ray_session.get(load_remote.remote())
    cause = _known_cause(info.value, _known_errors())
    assert type(cause) is ImageError and str(cause) == "/data/x.jpg: cannot decode image (broken)"
    assert _known_cause(RuntimeError("unexpected"), _known_errors()) is None
