"""Diffusing DeBias: the bias amplifier's pseudo split, both recipes through `raybias run`,
and that the training path reads no bias label."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import small_config
from raybias.classify.data import DataSet
from raybias.classify.ddb import GeneralizedCE, LfFWeightedCE, Recipe1, Recipe2, pseudo_groups
from raybias.classify.recipes import LossInput, get_method


# --- hooks, no Ray ------------------------------------------------------------------------

def test_pseudo_groups_split_each_class_by_amplifier_correctness():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 0, 2])
    assert pseudo_groups(y, pred).tolist() == [0, 1, 2, 3, 4]


def test_recipes_are_registered_hooks():
    assert isinstance(get_method("ddb_recipe1"), Recipe1)
    assert isinstance(get_method("ddb_recipe2"), Recipe2)
    assert get_method("ddb_amplifier").phases(type("T", (), {"epochs": 3, "lr": 0.1})())[0].data == "stage1"


def test_generalized_ce_is_q_p_to_the_q_times_ce():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    inp = LossInput(logits=logits, y=y, groups=y, rows=torch.arange(2))
    p = torch.softmax(logits, 1)[:, 0]
    want = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * p ** 0.7 * 0.7).mean()
    assert torch.allclose(GeneralizedCE(0.7)(inp), want)


def test_lff_weights_favour_what_the_amplifier_gets_wrong():
    # rows 0,1 class 0; rows 2,3 class 1. Amplifier CE high on rows 1 and 3 (bias-conflicting).
    amp_ce = np.array([0.1, 2.0, 0.2, 4.0])
    y = np.array([0, 0, 1, 1])
    hook = LfFWeightedCE(amp_ce, y, n_classes=2, ema=0.7)
    logits = torch.zeros(4, 2)  # the debiased model: equal CE everywhere
    inp = LossInput(logits=logits, y=torch.as_tensor(y), groups=torch.as_tensor(y), rows=torch.arange(4))
    loss = hook(inp)
    ce = float(np.log(2))
    # L_D = ce for every row (LfF: the first visit stores the loss whole), / class max -> 1;
    # L_B / class max: [0.05, 1, 0.05, 1]
    w = np.array([0.05 / 1.05, 0.5, 0.05 / 1.05, 0.5])
    assert float(loss) == pytest.approx(float((w * ce).mean()), rel=1e-4)
    assert torch.allclose(hook.ema_d, torch.full((4,), ce))
    assert hook.visited.tolist() == [1, 1, 1, 1]
    # the EMA and the visited mask travel with the loop's checkpoint
    other = LfFWeightedCE(amp_ce, y, 2, 0.7)
    other.load_state_dict(hook.state_dict())
    assert torch.equal(other.ema_d, hook.ema_d) and torch.equal(other.visited, hook.visited)


class LfFOracle:
    """LfF (Nam et al.), re-typed from the paper's reference code (alinlab/LfF util.py `EMA`
    and train.py's weighting), in numpy float32: per-row loss EMAs with an `updated` mask, so
    a row's first visit stores its loss whole; losses divided by their class maximum over
    all rows; W = L_B / (L_B + L_D + 1e-8)."""

    def __init__(self, label, alpha):
        self.label = np.asarray(label)
        self.alpha = np.float32(alpha)
        self.parameter = np.zeros(len(label), np.float32)
        self.updated = np.zeros(len(label), np.float32)

    def update(self, data, index):
        self.parameter[index] = (self.alpha * self.parameter[index]
                                 + (np.float32(1) - self.alpha * self.updated[index]) * data)
        self.updated[index] = 1

    def max_loss(self, label):
        return self.parameter[np.where(self.label == label)[0]].max()


def lff_oracle_weights(ema_b, ema_d, index, label_batch, n_classes):
    loss_b = ema_b.parameter[index].copy()
    loss_d = ema_d.parameter[index].copy()
    for c in range(n_classes):
        cls = np.where(label_batch == c)[0]
        loss_b[cls] /= ema_b.max_loss(c)
        loss_d[cls] /= ema_d.max_loss(c)
    return loss_b / (loss_b + loss_d + np.float32(1e-8))


@pytest.mark.parametrize("min_weight", [0.0, 0.01])
def test_lff_ema_and_weights_match_the_lff_reference_over_epochs(min_weight):
    """Oracle: LfF's EMA (with its `updated` mask) on identical random inputs, 4 epochs of
    shuffled batches (a last short batch, so rows are visited at different steps): the same
    per-row EMA and weights to float precision, before and after a checkpoint round trip."""
    rng = np.random.default_rng(0)
    n, n_classes, batch, alpha = 53, 3, 8, 0.7
    y = rng.integers(0, n_classes, n)
    amp_ce = rng.exponential(1.0, n).astype(np.float32)
    hook = LfFWeightedCE(amp_ce, y, n_classes, alpha, min_weight=min_weight)
    # LfF's biased model is an EMA too; here its per-row loss is the fixed amplifier's CE
    ref_b, ref_d = LfFOracle(y, alpha), LfFOracle(y, alpha)
    for epoch in range(4):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            rows = order[i:i + batch]
            logits = torch.as_tensor(rng.normal(0, 2, (len(rows), n_classes)), dtype=torch.float32)
            yb = torch.as_tensor(y[rows])
            ce = torch.nn.functional.cross_entropy(logits, yb, reduction="none")
            loss = hook(LossInput(logits=logits, y=yb, groups=yb, rows=torch.as_tensor(rows)))
            ref_b.update(amp_ce[rows], rows)
            ref_d.update(ce.numpy(), rows)
            w_ref = np.maximum(lff_oracle_weights(ref_b, ref_d, rows, y[rows], n_classes), np.float32(min_weight))
            np.testing.assert_allclose(hook.ema_d.numpy(), ref_d.parameter, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(hook.visited.numpy(), ref_d.updated)
            np.testing.assert_allclose(ref_b.parameter[ref_b.updated == 1], amp_ce[ref_b.updated == 1], rtol=1e-6)
            np.testing.assert_allclose(hook.weights(torch.as_tensor(rows)).numpy(), w_ref, rtol=1e-5, atol=1e-7)
            assert float(loss) == pytest.approx(float((w_ref * ce.numpy()).mean()), rel=1e-5, abs=1e-7)
            if epoch == 0 and i == 2 * batch:  # mid-epoch: some rows seen, most not
                assert 0 < hook.visited.sum() < n
                resumed = LfFWeightedCE(amp_ce, y, n_classes, alpha, min_weight=min_weight)
                resumed.load_state_dict(hook.state_dict())
                hook = resumed  # continue from the checkpoint, as a restarted worker does
    assert ref_d.updated.all()


def test_recipe2_refuses_ddp():
    from raybias.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"train.num_workers.*ddb_recipe2.*train.num_workers=1"):
        config_from_dict({"methods": ["erm", "ddb_recipe2"], "train": {"num_workers": 2}})
    with pytest.raises(ConfigError, match=r"train.num_workers.*ddb_recipe2"):
        config_from_dict({"train": {"method": "ddb_recipe2", "num_workers": 4}})
    config_from_dict({"methods": ["erm", "ddb_recipe1"], "train": {"num_workers": 2}})  # others may
    hook = LfFWeightedCE(np.ones(4), np.array([0, 0, 1, 1]), 2, 0.7)
    with pytest.raises(ConfigError, match="train.num_workers"):
        hook(LossInput(logits=torch.zeros(2, 2), y=torch.zeros(2, dtype=torch.int64),
                       groups=torch.zeros(2, dtype=torch.int64), rows=torch.arange(2), world_size=2))


def test_lff_weight_floor_keeps_images_the_amplifier_is_sure_of():
    # a fixed, perfectly sure amplifier: L_B ~ 0 on the aligned rows 0 and 2
    amp_ce = np.array([1e-7, 5.0, 1e-7, 5.0])
    y = np.array([0, 0, 1, 1])
    logits = torch.zeros(4, 2)
    inp = LossInput(logits=logits, y=torch.as_tensor(y), groups=torch.as_tensor(y), rows=torch.arange(4))
    ce = float(np.log(2))
    plain = LfFWeightedCE(amp_ce, y, 2, 0.7)
    assert float(plain(inp)) == pytest.approx(ce * (0.5 + 0.5) / 4, rel=1e-4)  # aligned rows weigh ~0
    floored = LfFWeightedCE(amp_ce, y, 2, 0.7, min_weight=0.1)
    assert float(floored(inp)) == pytest.approx(ce * (0.1 + 0.5 + 0.1 + 0.5) / 4, rel=1e-4)


def _fake_run_with_outputs(tmp_path, meta_train, meta_val, pred_train, pred_val):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybias.layout import DDB_AMPLIFIER_OUTPUTS as OUTPUTS
    from raybias.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    out = pd.concat([
        pd.DataFrame({"id": meta_train["id"], "split": "train", "y": meta_train["y"], "pred": pred_train,
                      "ce": np.linspace(0.1, 1, len(meta_train))}),
        pd.DataFrame({"id": meta_val["id"], "split": "val", "y": meta_val["y"], "pred": pred_val,
                      "ce": np.linspace(0.1, 1, len(meta_val))})])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(out, preserve_index=False), buf)
    run.write_bytes(OUTPUTS, buf.getvalue().to_pybytes())
    return run


@pytest.mark.parametrize("method", ["ddb_recipe1", "ddb_recipe2"])
def test_recipes_read_no_bias_label(tmp_path, method):
    """Scrambling a and group of train and val changes nothing the recipe trains or selects with."""
    rng = np.random.default_rng(0)
    n = 40
    meta = lambda k: pd.DataFrame({"id": [f"{k}{i}" for i in range(n)], "y": rng.integers(0, 2, n),
                                   "a": rng.integers(0, 2, n), "group": rng.integers(0, 4, n), "source": "real"})
    train, val = meta("t"), meta("v")
    run = _fake_run_with_outputs(tmp_path, train, val, rng.integers(0, 2, n), rng.integers(0, 2, n))
    cfg = small_config(tmp_path, train={"method": method, "ddb_select_with_bias_labels": False})

    def prepared(tr, va):
        sets = {"train": DataSet(tr.copy(), []), "val": DataSet(va.copy(), []), "test": DataSet(va.copy(), [])}
        state = get_method(method).prepare(cfg, run, sets, 0)
        return state, sets["val"].meta

    state, val_meta = prepared(train, val)
    scrambled = [df.assign(a=rng.permutation(df["a"].to_numpy()), group=rng.integers(0, 4, n)) for df in (train, val)]
    state2, val_meta2 = prepared(*scrambled)
    assert state == state2
    pd.testing.assert_frame_equal(val_meta, val_meta2)
    assert (val_meta["a"] == -1).all() and val_meta["group"].max() <= 3
    # with bias labels allowed for selection, val keeps the true groups
    cfg2 = small_config(tmp_path, train={"method": method, "ddb_select_with_bias_labels": True})
    sets = {"train": DataSet(train.copy(), []), "val": DataSet(val.copy(), [])}
    get_method(method).prepare(cfg2, run, sets, 0)
    pd.testing.assert_frame_equal(sets["val"].meta, val)


# --- end to end: raybias run with methods [ddb_recipe1, ddb_recipe2] ------------------------

@pytest.fixture(scope="module")
def ddb_run(tmp_path_factory, prepared_run, tiny_base_folder):
    from raybias.rundir import RunDir
    from raybias.stages import plan_stages
    from raybias.stages.pipeline import run_pipeline

    _, source, info = prepared_run
    tmp = tmp_path_factory.mktemp("ddb")
    shutil.copytree(source.root, tmp / "run")
    cfg = small_config(tmp, data={"severity": 0.95, "image_size": 16}, base={"model": tiny_base_folder},
                       methods=["ddb_recipe1", "ddb_recipe2"], seeds=[0],
                       ddb={"steps": 20, "per_class": 10, "sample_steps": 8, "amplifier_epochs": 4},
                       generate={"unit_size": 64, "batch_size": 64},
                       train={"epochs": 2, "ddb_select_with_bias_labels": False})
    assert "ddb" in plan_stages(cfg)
    run = RunDir(cfg.run_dir)
    run_pipeline(cfg, run, "auto", verbose=False)
    return cfg, run, info


def test_pseudo_split_is_recorded_end_to_end(ddb_run):
    # The tests' backbone has random weights (a random VAE cannot reproduce colours), so the
    # generated set carries no real bias signal here: only the bookkeeping is checked.
    _, run, _ = ddb_run
    scores = run.read_json("generators/ddb/amplifier/conflict.json")
    # 634 + 34 + 33 + 623 training images at 0.95: FFR's minority_to_keep keeps ceil(n·(1−s)/s)
    assert scores["n_train"] == 1324 and 0 <= scores["n_pseudo_conflicting"] <= scores["n_train"]
    for k in ("conflicting_precision", "conflicting_recall", "aligned_precision"):
        assert scores[k] is None or 0.0 <= scores[k] <= 1.0


def test_amplifier_on_a_bias_aligned_set_flags_the_conflicting_images(tmp_path_factory, prepared_run):
    """The amplifier stage given what an ideal DDB generator makes (bias-aligned images of each
    class, here: real aligned training images, no bias label attached) finds the real
    bias-conflicting images: on colored_digits (severity 0.95, 5 % conflicting) measured
    conflicting precision 1.0 and recall 1.0, aligned precision 1.0."""
    from raybias.data.info import DatasetInfo
    from raybias.generation.shards import unit_table, write_shard
    from raybias.rundir import RunDir
    from raybias.classify.data import real_sets
    from raybias.stages.ddb import train_amplifier
    import pyarrow.parquet as pq

    _, source, info = prepared_run
    tmp = tmp_path_factory.mktemp("ddb_oracle")
    shutil.copytree(source.root, tmp / "run")
    cfg = small_config(tmp, data={"severity": 0.95, "image_size": 16}, ddb={"amplifier_epochs": 4},
                       train={"epochs": 2})
    run = RunDir(cfg.run_dir)
    train = real_sets(run)["train"].meta
    images = {}
    for f in real_sets(run)["train"].files:
        t = pq.read_table(run.path(f), columns=["id", "image"])
        images.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
    for c in range(info.n_classes):
        aligned = np.array([info.is_aligned(int(g)) for g in train["group"]])
        rows = train[(train["y"].to_numpy() == c) & aligned].head(60)
        unit = {"unit": c, "ids": [f"ddb-y{c}-{i:06d}" for i in range(len(rows))], "y": c, "a": -1, "group": -1,
                "seeds": list(range(len(rows))), "prompts": ["a x"] * len(rows), "negative_prompt": None,
                "cluster": None}
        write_shard(run, "ddb", c, unit_table("ddb", unit, [images[i] for i in rows["id"]]))
    scores = train_amplifier(cfg, run, DatasetInfo.load(run), "fresh")
    rate = scores["n_true_conflicting"] / scores["n_train"]
    assert scores["conflicting_recall"] >= 0.8
    assert scores["conflicting_precision"] >= max(0.5, 10 * rate)
    assert scores["aligned_precision"] >= 0.98
    assert run.is_done("ddb/amplifier")


def test_both_recipes_write_metrics_and_the_ddb_stages_are_recorded(ddb_run):
    from raybias.data.synthetic import read_synthetic

    cfg, run, info = ddb_run
    for method in ("ddb_recipe1", "ddb_recipe2"):
        m = run.read_json(f"classifiers/{method}/0/metrics.json")
        assert m["train_method"] == method and 0.0 <= m["test"]["wga"] <= m["test"]["aga"] <= 1.0
        assert len(m["history"]) == 2
    assert "lff_mean_weight" in run.read_json("classifiers/ddb_recipe2/0/metrics.json")["history"][-1]
    q = run.read_json("classifiers/ddb_recipe1/0/metrics.json")["history"][-1]["groupdro_q"]
    assert len(q) >= 2 * info.n_classes and abs(sum(q) - 1) < 1e-3
    for key in ("ddb/model", "ddb/generate", "ddb/amplifier"):
        assert run.is_done(key), key
    syn = read_synthetic(run, "ddb", columns=["id", "y", "a", "group", "prompt"])
    assert syn.groupby("y").size().tolist() == [10] * info.n_classes
    assert (syn["a"] == -1).all() and (syn["group"] == -1).all()
    for y, prompt in zip(syn["y"], syn["prompt"]):  # class-only prompts: a member of class y, no bias word
        assert prompt[2:] in info.class_words[y] and not any(b in prompt for b in info.bias_words)
    manifest = run.read_json("generators/ddb/manifest.json")
    assert [e["y"] for e in manifest["models"]] == list(range(info.n_classes))
    assert run.exists("generators/ddb/cond/unet")


def test_ddb_stage_is_skipped_when_done(ddb_run, capsys):
    import time

    from raybias.stages.ddb import run_ddb

    cfg, run, _ = ddb_run
    t0 = time.time()
    out = run_ddb(cfg, run, "auto")
    assert out["generate"]["n_images"] == 10 * _.n_classes and time.time() - t0 < 30
    # nothing ran: the summary says so rather than printing 0 s per part
    assert out["done_earlier"] == ["model", "generate", "amplifier"] and out["seconds"] == {}
    assert "model, generate, amplifier done earlier" in capsys.readouterr().out
