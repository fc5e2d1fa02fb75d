"""The `prepare` stage on the built-in colored_digits data, and the severity rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import small_config
from raybias.cli import main
from raybias.data.io import read_table
from raybias.data.severity import aligned_values, apply_severity, group_counts
from raybias.data.sources import DataError
from raybias.layout import REAL
from raybias.rundir import RunDir
from raybias.stages.prepare import run_prepare

pytestmark = pytest.mark.usefixtures("ray_session")
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """colored_digits as shipped (severity original), seed 0."""
    tmp = tmp_path_factory.mktemp("original")
    cfg = small_config(tmp, data={"severity": "original", "image_size": 8})
    run = RunDir(cfg.run_dir)
    info = run_prepare(cfg, run, verbose=False)
    return cfg, info, read_table(run, REAL)


def test_target_is_digit_at_least_five_and_images_are_coloured(original):
    _, info, df = original
    assert (df["y"] == (df["digit"] >= 5)).all()
    assert info.class_names == ["digit<5", "digit>=5"] and info.bias_names == ["red", "green"]
    from raybias.data.images import decode

    for row in df.sample(40, random_state=0).itertuples():
        img = decode(row.image).astype(int)
        assert img.shape == (8, 8, 3)
        red, green = img[..., 0].sum(), img[..., 1].sum()
        assert (red > green) if row.a == 0 else (green > red)


def test_train_has_every_digit_in_every_colour_and_eval_colours_are_balanced(original):
    _, _, df = original
    train = df[df["split"] == "train"]
    per_digit = train.groupby(["digit", "a"]).size().unstack()
    assert (per_digit[0] == per_digit[1]).all()  # each training image in red and in green
    for split in ("val", "test"):
        part = df[df["split"] == split]
        assert part["digit"].nunique() == 10
        # Colour is drawn independently of y: the green share is about the same in each class.
        green = part.groupby("y")["a"].mean()
        assert abs(green[0] - green[1]) < 0.1, green.to_dict()
        assert 0.4 < part["a"].mean() < 0.6
        # and each image appears once (one colour) in evaluation splits
        assert part["id"].str.rsplit("-", n=1).str[0].is_unique


def test_split_is_fixed_by_seed(original, tmp_path):
    cfg0, _, df0 = original
    again = small_config(tmp_path / "same", data={"severity": "original", "image_size": 8})
    other = small_config(tmp_path / "other", data={"severity": "original", "image_size": 8, "seed": 1})
    run_prepare(again, RunDir(again.run_dir), verbose=False)
    run_prepare(other, RunDir(other.run_dir), verbose=False)
    df_same = read_table(RunDir(again.run_dir), REAL)
    df_other = read_table(RunDir(other.run_dir), REAL)

    def ids(d, split):
        return d.loc[d["split"] == split, "id"].tolist()

    for split in ("train", "val", "test"):
        assert ids(df0, split) == ids(df_same, split)
    assert (df0["image"] == df_same["image"]).all()
    assert set(ids(df0, "val")) != set(ids(df_other, "val"))
    assert len(ids(df0, "val")) == len(ids(df_other, "val"))


@pytest.mark.parametrize("severity", [0.95, 0.99])
def test_severity_counts_follow_the_formula(original, tmp_path, severity):
    _, info0, _ = original
    cfg = small_config(tmp_path, data={"severity": severity, "image_size": 8})
    info = run_prepare(cfg, RunDir(cfg.run_dir), verbose=False)
    assert info.aligned == [0, 1]  # digit<5 red, digit>=5 green
    before = {int(g): n for g, n in info0.counts["train"].items()}
    after = {int(g): n for g, n in info.counts["train"].items()}
    # aligned groups 0 (y0, red) and 3 (y1, green) are kept whole
    assert after[0] == before[0] and after[3] == before[3]
    # FFR's make_harder removes int(n_min - to_keep) images, so it keeps ceil(to_keep)
    assert after[1] == math.ceil(before[0] * (1 - severity) / severity)
    assert after[2] == math.ceil(before[3] * (1 - severity) / severity)
    assert info.counts["val"] == info0.counts["val"] and info.counts["test"] == info0.counts["test"]
    assert info.val_protocol == "untouched"
    if severity == 0.99:  # the figures the README quotes (FFR's ceiling: 6.40 -> 7, 6.29 -> 7)
        assert after == {0: 634, 1: 7, 2: 7, 3: 623}


def test_cli_prints_group_counts(tmp_path, capsys):
    assert main(["prepare", QUICKSTART, "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prepared colored_digits (severity 0.99)" in out
    assert "Severity 0.99: FFR's minority_to_keep rule" in out and "val_protocol untouched" in out
    # FFR's ceiling (6.40 and 6.29 conflicting images asked for keep 7)
    assert "0 digit<5/red                    yes      634" in out
    assert "1 digit<5/green                   no        7" in out
    assert "2 digit>=5/red                    no        7" in out
    assert "3 digit>=5/green                 yes      623" in out
    assert out.count("\ntotal") == 1
    assert "warning" not in out


def test_severity_one_reports_empty_groups(tmp_path, capsys):
    assert main(["prepare", QUICKSTART, "data.severity=1.0", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("<- empty in train") == 2
    assert "warning: groups with no train images: 1 digit<5/green, 2 digit>=5/red" in out
    info = json.loads((tmp_path / "data/info.json").read_text())
    assert info["empty_train_groups"] == [1, 2]
    assert info["counts"]["train"]["1"] == 0 and info["counts"]["val"]["1"] > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["prepare"]["done"]
    df = pd.read_parquet(tmp_path / "data/real")
    assert set(df.loc[df["split"] == "train", "group"]) == {0, 3}


# --- severity rules on small hand-made tables --------------------------------------------

def table(counts, splits=None):
    """Rows for counts[(y, a)] = n in train (n_bias = max a + 1), plus `splits` for val/test."""
    rows = []
    n_bias = max(a for _, a in counts) + 1
    for (y, a), n in counts.items():
        rows += [{"y": y, "a": a, "group": y * n_bias + a, "split": "train"}] * n
    for (y, a, split), n in (splits or {}).items():
        rows += [{"y": y, "a": a, "group": y * n_bias + a, "split": split}] * n
    df = pd.DataFrame(rows)
    df["id"] = [f"r{i:04d}" for i in range(len(df))]
    return df


def test_aligned_is_the_majority_unless_configured():
    t = table({(0, 0): 10, (0, 1): 3, (1, 0): 2, (1, 1): 8})
    assert aligned_values(t, 2, 2, None, None) == [0, 1]
    assert aligned_values(t, 2, 2, [1, 0], None) == [1, 0]
    assert aligned_values(t, 2, 2, None, [1, 1]) == [1, 1]  # a source default
    with pytest.raises(DataError, match=r"data.aligned\[1\] = 2"):
        aligned_values(t, 2, 2, [0, 2], None)
    with pytest.raises(DataError, match="data.aligned has 3 entries"):
        aligned_values(t, 2, 2, [0, 1, 0], None)


def test_colliding_majorities_become_the_best_distinct_assignment():
    # CelebA's train counts (/ 100): women are the majority of both classes.
    t = table({(0, 0): 716, (0, 1): 668, (1, 0): 228, (1, 1): 14})  # CelebA / 100
    assert aligned_values(t, 2, 2, None, None) == [1, 0]  # not blond <-> male, blond <-> female


def test_conflicting_budget_is_split_in_proportion_and_val_test_untouched():
    t = table({(0, 0): 60, (0, 1): 9, (0, 2): 3, (1, 2): 50, (1, 0): 4, (1, 1): 8},
              {(0, 1, "val"): 5, (1, 0, "test"): 7})
    kept = apply_severity(t, 0.95, [0, 2], seed=0)
    counts = group_counts(kept, 6)
    # FFR's ceiling: class 0 keeps ceil(3.16) = 4 (9 : 3 -> 3, 1), class 1 ceil(2.63) = 3 (4 : 8 -> 1, 2)
    assert counts["train"].tolist() == [60, 3, 1, 1, 2, 50]
    assert counts["val"].tolist() == [0, 5, 0, 0, 0, 0] and counts["test"].tolist() == [0, 0, 0, 7, 0, 0]
    assert apply_severity(t, None, [0, 2], seed=0).equals(t.reset_index(drop=True))


def test_severity_is_deterministic_by_seed():
    t = table({(0, 0): 200, (0, 1): 200, (1, 0): 200, (1, 1): 200})
    a = apply_severity(t, 0.9, [0, 1], seed=3)
    b = apply_severity(t, 0.9, [0, 1], seed=3)
    c = apply_severity(t, 0.9, [0, 1], seed=4)
    assert a["id"].tolist() == b["id"].tolist()
    assert a["id"].tolist() != c["id"].tolist()
    # FFR's ceiling: 200 * 0.1 / 0.9 = 22.2 -> 23
    assert group_counts(a, 4)["train"].tolist() == group_counts(c, 4)["train"].tolist() == [200, 23, 23, 200]


def test_too_few_conflicting_images_keeps_all_and_warns():
    t = table({(0, 0): 10, (0, 1): 1, (1, 0): 1, (1, 1): 10})
    notes = []
    kept = apply_severity(t, 0.5, [0, 1], seed=0, warnings=notes)
    assert group_counts(kept, 4)["train"].tolist() == [10, 1, 1, 10]
    assert len(notes) == 2 and "asks for 10" in notes[0]


def test_a_class_without_aligned_images_is_an_error():
    t = table({(0, 0): 10, (0, 1): 2, (1, 1): 5})
    with pytest.raises(DataError, match=r"class y=1 has no bias-aligned training images.*data.aligned"):
        apply_severity(t, 0.9, [0, 0], seed=0)
    # FFR's ceiling: 10 * 0.1 / 0.9 = 1.11 -> 2 (both conflicting images kept)
    assert np.array_equal(group_counts(apply_severity(t, 0.9, [0, 1], seed=0), 4)["train"].to_numpy(),
                          [10, 2, 0, 5])


# --- FFR's shipped splits -------------------------------------------------------------------

# FFR's CelebA-HQ (Smiling x Male) train split at 0.9, groups (y, a) = (0,0), (0,1), (1,0), (1,1)
# (REFERENCES.md; From Fake to Real's data/celeba_Smiling_train_0.9.pkl), and the splits FFR
# ships at each harder ratio, made by its make_harder from the 0.9 split.
FFR_CELEBA_HQ_TRAIN_09 = [592, 5335, 7797, 866]
FFR_CELEBA_HQ_TRAIN = {
    0.9: [592, 5335, 7797, 866],
    0.95: [281, 5335, 7797, 411],
    0.97: [166, 5335, 7797, 242],  # 5335 * 0.03 / 0.97 = 165 exactly, 165.00000000000017 in float64
    0.99: [54, 5335, 7797, 79],
    0.999: [6, 5335, 7797, 8],
}


def ffr_make_harder_counts(counts, s, keep_min):
    """FFR's make_harder on group counts, re-typed from its datasets/dataset.py (an oracle):
    per class, to_keep = n_max * ratio / (1 - ratio) with ratio = 1 - s; skip the class if
    to_keep > n_min; with keep_min, to_keep = max(to_keep, 10); remove int(n_min - to_keep)."""
    out = list(counts)
    for cls in (0, 1):
        g = [2 * cls, 2 * cls + 1]
        n = {k: out[k] for k in g}
        hi, lo = max(n, key=n.get), min(n, key=n.get)
        ratio = 1 - s
        to_keep = (n[hi] * ratio) / (1 - ratio)
        if to_keep > n[lo]:
            continue
        if keep_min:
            to_keep = max(to_keep, 10)
        out[lo] = n[lo] - int(n[lo] - to_keep)
    return out


@pytest.mark.parametrize("severity", sorted(FFR_CELEBA_HQ_TRAIN))
def test_severity_gives_ffrs_shipped_celeba_hq_splits(severity):
    """raybias's severity on a train split with FFR's 0.9 counts gives FFR's shipped splits."""
    t = table(dict(zip([(0, 0), (0, 1), (1, 0), (1, 1)], FFR_CELEBA_HQ_TRAIN_09)))
    aligned = aligned_values(t[t["split"] == "train"], 2, 2, None, None)
    assert aligned == [1, 0]  # the class majorities: (0, 1) and (1, 0)
    kept = apply_severity(t, severity, aligned, seed=0)
    got = group_counts(kept, 4)["train"].tolist()
    assert got == FFR_CELEBA_HQ_TRAIN[severity]
    assert got == ffr_make_harder_counts(FFR_CELEBA_HQ_TRAIN_09, severity, keep_min=False)


def test_biased_validation_follows_ffr_with_at_least_ten_per_class():
    # FFR's valid 0.99 split is 10, 666, 989, 10 (REFERENCES.md): at 0.99 the rule asks for
    # 6.7 and 10.0 conflicting images, and keep_min lifts both to 10.
    val = {(0, 0, "val"): 80, (0, 1, "val"): 666, (1, 0, "val"): 989, (1, 1, "val"): 120}
    test = {(y, a, "test"): n for (y, a, _), n in val.items()}
    t = table(dict(zip([(0, 0), (0, 1), (1, 0), (1, 1)], FFR_CELEBA_HQ_TRAIN_09)), {**val, **test})
    for s in (0.9, 0.95, 0.97, 0.99, 0.999):
        untouched = group_counts(apply_severity(t, s, [1, 0], seed=0), 4)
        assert untouched["val"].tolist() == [80, 666, 989, 120]  # the default: val as shipped
        biased = group_counts(apply_severity(t, s, [1, 0], seed=0, val_protocol="biased"), 4)
        assert biased["val"].tolist() == ffr_make_harder_counts([80, 666, 989, 120], s, keep_min=True)
        assert biased["train"].tolist() == untouched["train"].tolist() == FFR_CELEBA_HQ_TRAIN[s]
        assert biased["test"].tolist() == [80, 666, 989, 120]  # test is never subsampled
    biased = group_counts(apply_severity(t, 0.99, [1, 0], seed=0, val_protocol="biased"), 4)
    assert biased["val"].tolist() == [10, 666, 989, 10]
    # a class with fewer than 10 conflicting validation images keeps them all
    small = table({(0, 0): 50, (0, 1): 5, (1, 0): 5, (1, 1): 50},
                  {(0, 0, "val"): 40, (0, 1, "val"): 4, (1, 0, "val"): 30, (1, 1, "val"): 40})
    assert group_counts(apply_severity(small, 0.99, [0, 1], seed=0, val_protocol="biased"), 4)["val"].tolist() \
        == [40, 4, 10, 40]  # class 0: 4 < 10, all kept; class 1: 0.4 -> at least 10 of its 30


def test_val_protocol_is_a_checked_config_choice_and_recorded(tmp_path):
    from raybias.config import ConfigError, config_from_dict

    assert config_from_dict({}).data.val_protocol == "untouched"
    with pytest.raises(ConfigError, match=r"data.val_protocol.*untouched, biased"):
        config_from_dict({"data": {"val_protocol": "balanced"}})
    cfg = small_config(tmp_path, data={"severity": 0.99, "image_size": 8, "val_protocol": "biased"})
    info = run_prepare(cfg, RunDir(cfg.run_dir), verbose=False)
    assert info.val_protocol == "biased" and "val_protocol biased" in info.protocol_line()
    df = read_table(RunDir(cfg.run_dir), REAL)
    for split in ("train", "val", "test"):  # info.json's counts are the written table's
        got = df[df["split"] == split]["group"].value_counts().reindex(range(4), fill_value=0).tolist()
        assert got == [info.counts[split][str(g)] for g in range(4)]
    assert info.counts["val"]["1"] == info.counts["val"]["2"] == 10  # colour-balanced val, biased
