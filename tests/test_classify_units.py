"""Exact checks of the classifier pieces: Group-DRO, SupCon, group metrics, sampling,
augmentation, models, the stage-1 mix, summaries. No Ray needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from raybias.classify.data import DataSet, Multiplicity, augment, epoch_draw, generator, mix_real_into
from raybias.classify.losses import GroupDRO, group_means, supcon_loss
from raybias.classify.recipes import (JTT, GroupDROLoss, LossInput, Phase, get_method,
                                      group_balanced_weights, registered)
from raybias.classify.metrics import collect_metrics, format_summary, group_metrics, summarize
from raybias.classify.models import (build_model, cached_weights_path, check_pretrained, load_classifier,
                                     model_bytes)
from raybias.config import ConfigError, config_from_dict
from raybias.ray_utils import ResourceError
from raybias.rundir import RunDir


# --- Group-DRO ----------------------------------------------------------------------------

def test_groupdro_weights_equal_hand_computation():
    eta, c = 0.5, 1.0
    train_counts = [100, 4, 9, 0]  # group 3 has no training data: no adjustment for it
    dro = GroupDRO(4, eta, c, train_counts)
    steps = [  # (per-sample losses, groups) of three batches; group 2 absent in the first
        ([0.2, 0.4, 1.0, 3.0], [0, 0, 1, 1]),
        ([0.5, 2.0, 1.5], [0, 2, 2]),
        ([0.1, 0.3, 0.9, 0.6], [1, 0, 3, 3]),
    ]
    q = [0.25, 0.25, 0.25, 0.25]
    for losses, groups in steps:
        # by hand: l_g = mean loss of group g in the batch (0 if absent)
        ell = []
        for g in range(4):
            vals = [l for l, gg in zip(losses, groups) if gg == g]
            ell.append(sum(vals) / len(vals) if vals else 0.0)
        adj = [c / math.sqrt(n) if n > 0 else 0.0 for n in train_counts]
        q = [q[g] * math.exp(eta * (ell[g] + adj[g])) for g in range(4)]
        total = sum(q)
        q = [v / total for v in q]
        expected_loss = sum(q[g] * ell[g] for g in range(4))

        per_sample = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        loss = dro.loss(per_sample, torch.tensor(groups))
        assert dro.q.tolist() == pytest.approx(q, rel=1e-12)
        assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-12)
    # the gradient flows through the group means only: d loss / d l_i = q_g / n_g
    loss.backward()
    expect = [q[1] / 1, q[0] / 1, q[3] / 2, q[3] / 2]
    assert per_sample.grad.tolist() == pytest.approx(expect, rel=1e-12)


def test_groupdro_hook_state_roundtrip():
    hook = GroupDROLoss(2, 0.1, 0.0, [10, 10])
    inp = LossInput(logits=torch.tensor([[2.0, 0.0], [0.0, 1.0]]), y=torch.tensor([1, 1]),
                    groups=torch.tensor([0, 1]), rows=torch.tensor([0, 1]))
    hook(inp)
    other = GroupDROLoss(2, 0.1, 0.0, [10, 10])
    other.load_state_dict(hook.state_dict())
    assert torch.equal(other.dro.q, hook.dro.q)
    assert hook.dro.q[0] > hook.dro.q[1]  # the misclassified group gains weight


def test_group_means_absent_group_is_zero():
    m = group_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert m.tolist() == [2.0, 0.0, 5.0]


# --- SupCon -------------------------------------------------------------------------------

def test_supcon_with_positive_anchors_equals_formula_by_loops():
    """anchors=with_positive, no base temperature: raybias's SupCon before the reference's rule."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # label 2 has no positive: not an anchor
    tau = 0.3
    z = [f / torch.linalg.norm(f) for f in feats]
    losses = []
    for i in range(6):
        pos = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(6) if a != i)
        li = -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
        losses.append(li)
    expected = sum(losses) / len(losses)
    assert float(supcon_loss(feats, labels, tau, anchors="with_positive")) == pytest.approx(expected, rel=1e-10)
    # the reference's rule averages over all 6 anchors, the one without a positive adding 0
    assert float(supcon_loss(feats, labels, tau, anchors="all")) == pytest.approx(sum(losses) / 6, rel=1e-10)


@pytest.mark.parametrize("anchors", ["all", "with_positive"])
def test_supcon_without_positives_is_zero_and_differentiable(anchors):
    feats = torch.randn(3, 4, requires_grad=True)
    loss = supcon_loss(feats, torch.tensor([0, 1, 2]), 0.1, 0.07, anchors)
    loss.backward()
    assert float(loss.detach()) == 0.0 and feats.grad is not None


def reference_supcon_loss(features, labels, temperature=0.07, base_temperature=0.07):
    """HobbitLong/SupContrast's SupConLoss (losses.py, contrast_mode 'all'), re-typed from the
    reference's computation: features [batch, views, dim], already L2-normalised (its model
    normalises the projection); the views stacked view-major as anchors and contrasts; logits
    shifted by their row maximum; self-contrast masked out of the positives and the denominator;
    an anchor without a positive gets mean log-prob 0 (its divisor clamped to 1); the loss is
    -(temperature / base_temperature) * that, averaged over every anchor."""
    batch, views = features.shape[0], features.shape[1]
    contrast = torch.cat([features[:, v] for v in range(views)], dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(features.dtype).repeat(views, views)
    not_self = 1 - torch.eye(batch * views, dtype=features.dtype)
    positives = same * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    n_pos = positives.sum(1)
    n_pos = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    mean_log_prob_pos = (positives * log_prob).sum(1) / n_pos
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(views, batch).mean()


def reference_projection(dim_in: int, feat_dim: int = 128):
    """SupConResNet's 'mlp' head (networks/resnet_big.py), re-typed: Linear(d, d), ReLU, Linear(d, 128)."""
    return torch.nn.Sequential(torch.nn.Linear(dim_in, dim_in), torch.nn.ReLU(), torch.nn.Linear(dim_in, feat_dim))


@pytest.mark.parametrize("temperature,base", [(0.07, 0.07), (0.1, 0.07), (0.5, 0.5)])
def test_supcon_equals_the_reference_supconloss_on_random_inputs(temperature, base):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(24, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (24,), generator=gen)
    labels[:2] = torch.tensor([7, 8])  # two anchors without a positive: the averaging rule matters
    ours = supcon_loss(feats, labels, temperature, base, "all")
    ref = reference_supcon_loss(torch.nn.functional.normalize(feats, dim=1)[:, None], labels, temperature, base)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    g_ours, = torch.autograd.grad(ours, feats)
    g_ref, = torch.autograd.grad(ref, feats)
    assert torch.allclose(g_ours, g_ref, rtol=1e-7, atol=1e-12)
    # the earlier rule (anchors with a positive only) is the reference's mean over 22 of 24 anchors
    older = supcon_loss(feats, labels, temperature, base, "with_positive")
    assert float(older.detach()) == pytest.approx(float(ref.detach()) * 24 / 22, rel=1e-9)


def test_stage1_loss_through_the_projection_head_equals_the_reference():
    """The model carries SupContrast's mlp head; stage 1's loss on a batch is beta CE on the
    logits + (1 - beta) SupConLoss on the L2-normalised head output, as the reference computes."""
    from raybias.classify.recipes import CEPlusSupCon
    from raybias.classify.models import ProjectionSpec

    model = build_model("small_cnn", 2, seed=0, projection=ProjectionSpec("mlp", 128))
    ref_head = reference_projection(model.feature_dim, 128).double()
    ref_head.load_state_dict(model.projection.state_dict())  # same layout, or this raises
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=gen)
    logits, z = model(x, with_features=True)
    hook = CEPlusSupCon(beta=0.3, temperature=0.1, base_temperature=0.07, anchors="all")
    ours = hook(LossInput(logits=logits, y=y, groups=y, rows=torch.arange(16), features=z))
    feats = model.features(x)
    ref_z = torch.nn.functional.normalize(ref_head(feats), dim=1)
    ref = 0.3 * torch.nn.functional.cross_entropy(model.head(feats), y) + 0.7 * reference_supcon_loss(ref_z[:, None], y, 0.1, 0.07)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    assert float(z.min()) < 0  # the projection, unlike the post-ReLU features, can point anywhere


def test_projection_head_leaves_encoder_and_head_init_alone_and_round_trips():
    from raybias.classify.models import ProjectionSpec

    plain = build_model("small_cnn", 2, seed=4)
    spec = ProjectionSpec("mlp", 32, 64)
    with_head = build_model("small_cnn", 2, seed=4, projection=spec)
    for k, v in plain.state_dict().items():  # old behaviour reachable: same initial encoder and head
        assert torch.equal(v, with_head.state_dict()[k]), k
    shapes = [tuple(p.shape) for p in with_head.projection.parameters()]
    assert shapes == [(64, with_head.feature_dim), (64,), (32, 64), (32,)]
    again = load_classifier(model_bytes(with_head, "small_cnn"))
    assert again.projection_spec == spec
    x = torch.rand(3, 3, 16, 16)
    with_head.eval(), again.eval()
    assert torch.equal(again(x, with_features=True)[1], with_head(x, with_features=True)[1])
    assert load_classifier(model_bytes(plain, "small_cnn")).projection is None


def test_two_stage_projection_from_config():
    from raybias.classify.models import ProjectionSpec

    method = get_method("two_stage")
    assert method.projection(config_from_dict({}).train) == ProjectionSpec("mlp", 128, None)
    assert method.projection(config_from_dict({"train": {"stage1": {"projection": "none"}}}).train) is None
    assert method.projection(config_from_dict({"train": {"stage1": {"beta": 1.0}}}).train) is None  # no SupCon
    lin = config_from_dict({"train": {"stage1": {"projection": "linear", "projection_dim": 16}}}).train
    assert method.projection(lin) == ProjectionSpec("linear", 16, None)


# --- stage 2 chosen by validation ---------------------------------------------------------

def _val(wga, aga, final=None):
    """A candidate's record: its best epoch's validation metrics, and its last epoch's."""
    final = (wga, aga) if final is None else final
    return {"val": {"wga": wga, "aga": aga}, "final": {"wga": final[0], "aga": final[1]}}


@pytest.mark.parametrize("rank", ["final", "best"])
def test_stage2_auto_keeps_the_candidate_validation_ranks_first(rank):
    from raybias.classify.recipes import choose_stage2

    order = ["head+erm", "head+reweight", "head+groupdro", "full+erm", "full+reweight", "full+groupdro"]
    cands = {"head+erm": _val(0.62, 0.80), "head+reweight": _val(0.70, 0.81), "head+groupdro": _val(0.68, 0.83),
             "full+erm": _val(0.10, 0.55), "full+reweight": _val(0.96, 0.97), "full+groupdro": _val(0.97, 0.97)}
    assert choose_stage2(cands, order, rank) == "full+groupdro"  # the argmax of validation WGA
    # a tie in WGA goes to the higher AGA; a tie in both to the earlier in the list
    cands["head+reweight"] = _val(0.97, 0.98)
    assert choose_stage2(cands, order, rank) == "head+reweight"
    cands["head+reweight"] = _val(0.97, 0.97)
    assert choose_stage2(cands, order, rank) == "head+reweight"
    assert choose_stage2(cands, list(reversed(order)), rank) == "full+groupdro"
    cands["full+erm"] = _val(None, None)  # no validation value ranks last
    assert choose_stage2({"full+erm": cands["full+erm"], "head+erm": cands["head+erm"]}, order, rank) == "head+erm"


def test_stage2_rank_final_takes_a_candidate_for_its_last_epoch_not_a_passing_peak():
    from raybias.classify.recipes import choose_stage2

    order = ["head+groupdro", "full+groupdro"]
    # the full network peaks at its first epoch and falls as it learns the shortcut
    cands = {"head+groupdro": _val(0.71, 0.80, final=(0.68, 0.79)), "full+groupdro": _val(0.79, 0.82, final=(0.54, 0.75))}
    assert choose_stage2(cands, order, "best") == "full+groupdro"
    assert choose_stage2(cands, order, "final") == "head+groupdro"


def test_stage2_auto_phases_start_from_the_stage1_model_and_draw_alike():
    t = config_from_dict({"train": {"stage2": "auto", "stage2_candidates": ["full+groupdro", "head+erm"],
                                    "epochs": 3, "stage1": {"epochs": 2}}}).train
    s1, a, b = get_method("two_stage").phases(t)
    assert s1.name == "stage1" and not s1.select
    assert (a.candidate, a.reinit, a.freeze_encoder) == ("full+groupdro", "none", False)
    assert (b.candidate, b.reinit, b.freeze_encoder) == ("head+erm", "head", True)
    assert a.start_from == b.start_from == "stage1_model.safetensors"
    assert a.rng_phase == b.rng_phase == 1 and a.select and b.select
    fixed = get_method("two_stage").phases(config_from_dict({"train": {"stage2": "full", "stage2_method": "erm"}}).train)
    assert [p.candidate for p in fixed] == [None, "full+erm"]
    from raybias.classify.recipes import epochs_reported

    t.method = "two_stage"
    assert epochs_reported(t) == 2 + 2 * 3  # what a sweep's ASHA must allow a trial


# --- metrics ------------------------------------------------------------------------------

def test_wga_aga_on_hand_made_table():
    # group: 0 0 0 0 1 1 2 2 2 (group 3 absent)
    y = [0, 0, 0, 0, 0, 0, 1, 1, 1]
    g = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 0, 1, 1, 0, 1, 1, 1]  # group accs 3/4, 1/2, 3/3
    m = group_metrics(pred, y, g, 4)
    assert m["group_acc"] == {"0": 0.75, "1": 0.5, "2": 1.0, "3": None}
    assert m["wga"] == 0.5
    assert m["aga"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["acc"] == pytest.approx(7 / 9)
    assert m["n"] == {"0": 4, "1": 2, "2": 3, "3": 0}


def _write_metrics(run, method, seed, wga, aga, accs):
    rec = {"method": method, "seed": seed, "train_method": method, "best_epoch": 1,
           "test": {"wga": wga, "aga": aga, "acc": aga, "group_acc": {str(i): a for i, a in enumerate(accs)}},
           "val": {"wga": wga, "aga": aga, "acc": aga, "group_acc": {str(i): a for i, a in enumerate(accs)}}}
    run.write_json(f"classifiers/{method}/{seed}/metrics.json", rec)


def test_summarize_mean_std_over_seeds(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _write_metrics(run, "erm", 0, 0.1, 0.5, [0.9, 0.1])
    _write_metrics(run, "erm", 1, 0.3, 0.6, [0.9, 0.3])
    _write_metrics(run, "erm", 2, 0.9, 0.9, [0.9, 0.9])  # another seed, not asked for
    _write_metrics(run, "groupdro", 0, 0.7, 0.8, [0.9, 0.7])
    _write_metrics(run, "jtt", 0, 0.5, 0.5, [0.5, None])  # group 1 absent from the split
    df = summarize(collect_metrics(run, ["erm", "groupdro", "jtt"], [0, 1]), order=["jtt", "groupdro", "erm"])
    assert list(df["method"]) == ["jtt", "groupdro", "erm"]
    erm = df.set_index("method").loc["erm"]
    assert erm["n_seeds"] == 2
    assert erm["wga_mean"] == pytest.approx(0.2)
    assert erm["wga_std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert erm["g1_mean"] == pytest.approx(0.2)
    dro = df.set_index("method").loc["groupdro"]
    assert dro["n_seeds"] == 1 and np.isnan(dro["wga_std"])  # one seed: no spread
    assert np.isnan(df.set_index("method").loc["jtt"]["g1_mean"])
    table = format_summary(df, ["small", "large"])
    assert "20.0 ± 14.1" in table and "70.0" in table and "70.0 ± nan" not in table
    assert table.splitlines()[0].split()[-2:] == ["small", "large"]
    # every seed found when none are named
    assert sorted(collect_metrics(run, ["erm"])["seed"]) == [0, 1, 2]


# --- sampling and augmentation ------------------------------------------------------------

def test_group_balanced_weights_and_draw():
    groups = np.array([0] * 90 + [1] * 10)
    w, size = group_balanced_weights(groups)
    assert size == 100
    assert w[:90].sum() == pytest.approx(w[90:].sum())
    draw = epoch_draw(100, w, 20000, generator(0, 0, 0))
    frac_minority = float((draw >= 90).double().mean())
    assert abs(frac_minority - 0.5) < 0.02
    assert torch.equal(draw, epoch_draw(100, w, 20000, generator(0, 0, 0)))  # seeded
    perm = epoch_draw(100, None, None, generator(1))
    assert sorted(perm.tolist()) == list(range(100))


def _jtt_ctx(**train):
    class Ctx:
        pass

    Ctx.train = config_from_dict({"train": train}).train
    Ctx.sets = {"train": DataSet(pd.DataFrame({"id": list("abcde"), "y": [0] * 5}), [])}
    Ctx.method_state = {"error_rows": [1, 4]}
    return Ctx


def test_jtt_epoch_holds_each_error_row_exactly_lambda_times():
    """The JTT paper's upweighted set (BalancingGroups' construction): in one epoch every error
    row appears exactly lambda times and every other row once, in a seeded shuffled order."""
    draw, size = JTT().sample_weights(Phase("final", "train", 1, 0.1), _jtt_ctx(jtt_lambda=20))
    assert isinstance(draw, Multiplicity) and draw.counts.tolist() == [1, 20, 1, 1, 20] and size == 43
    for epoch in range(3):
        order = epoch_draw(5, draw, size, generator(0, 1, epoch, 1))
        assert len(order) == 43
        assert np.bincount(order.numpy(), minlength=5).tolist() == [1, 20, 1, 1, 20]
    a, b = (epoch_draw(5, draw, size, generator(0, 1, e, 1)) for e in (0, 1))
    assert torch.equal(a, epoch_draw(5, draw, size, generator(0, 1, 0, 1)))  # seeded
    assert not torch.equal(a, b)  # shuffled anew each epoch
    assert not torch.equal(a, torch.sort(a).values)
    # larger: 1000 rows, 37 errors, lambda 100
    counts = np.ones(1000, dtype=np.int64)
    counts[np.arange(0, 1000, 27)] = 100
    order = epoch_draw(1000, Multiplicity(counts), int(counts.sum()), generator(5))
    assert np.array_equal(np.bincount(order.numpy(), minlength=1000), counts)


def test_jtt_with_replacement_is_kept_as_an_option():
    w, size = JTT().sample_weights(Phase("final", "train", 1, 0.1), _jtt_ctx(jtt_lambda=20, jtt_draw="replacement"))
    assert w.tolist() == [1, 20, 1, 1, 20] and size == 43
    assert JTT().sample_weights(Phase("identify", "train", 1, 0.1), _jtt_ctx()) is None
    with pytest.raises(ConfigError, match=r"train.jtt_lambda.*integer.*jtt_draw"):
        config_from_dict({"train": {"jtt_lambda": 2.5}})
    config_from_dict({"train": {"jtt_lambda": 2.5, "jtt_draw": "replacement"}})
    with pytest.raises(ConfigError, match="train.jtt_draw"):
        config_from_dict({"train": {"jtt_draw": "sometimes"}})


def test_jtt_phases_take_its_own_optimizer_settings():
    t = config_from_dict({"train": {"jtt_optimizer": "sgd", "jtt_lr": 1e-5, "jtt_weight_decay": 1.0,
                                    "jtt_epochs": 60, "epochs": 7}}).train
    ident, final = JTT().phases(t)
    assert (ident.epochs, final.epochs) == (60, 7)
    for ph in (ident, final):
        assert (ph.optimizer, ph.lr, ph.weight_decay) == ("sgd", 1e-5, 1.0)
    from raybias.classify.loop import make_optimizer

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], t, final.lr, final.optimizer, final.weight_decay)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["weight_decay"] == 1.0
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 1e-5
    plain = JTT().phases(config_from_dict({}).train)  # unset: train.optimizer / lr / weight_decay
    assert plain[1].optimizer is None and plain[1].weight_decay is None and plain[1].lr == 1e-3
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], config_from_dict({}).train, 1e-3)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 1e-4


def test_augment_keeps_colour_and_repeats_with_seed():
    x = torch.zeros(4, 3, 16, 16)
    x[:, 0, 4:12, 4:12] = 0.9  # a red square: the colour is the bias attribute
    x[:, 1, 4:12, 4:12] = 0.2
    a = augment(x, generator(3))
    b = augment(x, generator(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    lit = a.sum(1) > 0
    ratio = a[:, 1][lit] / a[:, 0][lit]  # green/red ratio: hue unchanged
    assert torch.allclose(ratio, torch.full_like(ratio, 0.2 / 0.9), atol=1e-5)
    assert a.shape == x.shape and float(a.max()) <= 1.0


# --- models -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 28, 64])
def test_small_cnn_accepts_sizes(size):
    m = build_model("small_cnn", 3, seed=0)
    logits, feats = m(torch.rand(2, 3, size, size), with_features=True)
    assert logits.shape == (2, 3) and feats.shape == (2, m.feature_dim)


def test_resnet18_random_init_and_roundtrip():
    m = build_model("resnet18", 2, seed=0)
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 2) and m.feature_dim == 512
    again = load_classifier(model_bytes(m, "resnet18"))
    again.eval()
    assert torch.equal(again(x), out)


def test_seeded_init_and_head_reset():
    a, b = build_model("small_cnn", 2, seed=5), build_model("small_cnn", 2, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    enc = {k: v.clone() for k, v in a.encoder.state_dict().items()}
    a.reset_head(generator(1))
    assert not torch.equal(a.head.weight, b.head.weight)
    assert all(torch.equal(v, a.encoder.state_dict()[k]) for k, v in enc.items())


def test_imagenet_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(ResourceError, match="train.pretrained=imagenet .*resnet18.*does not exist"):
        check_pretrained("resnet18", "imagenet")
    with pytest.raises(ConfigError, match="train.pretrained"):
        config_from_dict({"train": {"model": "small_cnn", "pretrained": "imagenet"}})


def test_imagenet_weights_load_from_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = cached_weights_path("resnet18")
    import os

    os.makedirs(os.path.dirname(path))
    torch.save(ref.state_dict(), path)  # stands in for the real file torchvision would have cached
    m = build_model("resnet18", 2, pretrained="imagenet", seed=1)
    assert torch.equal(m.encoder.conv1.weight, ref.conv1.weight)
    assert m.head.out_features == 2


# --- registry, stage-1 mix ----------------------------------------------------------------

def test_registry_and_unknown_method():
    assert {"erm", "reweight", "groupdro", "jtt", "two_stage"} <= set(registered())
    with pytest.raises(ConfigError, match="no_such_method"):
        get_method("no_such_method")
    with pytest.raises(ConfigError, match="train.method"):
        config_from_dict({"train": {"method": "no_such_method"}})


def _meta(prefix, n):
    return pd.DataFrame({"id": [f"{prefix}{i:03d}" for i in range(n)], "y": 0, "a": 0, "group": 0,
                         "source": prefix})


@pytest.mark.parametrize("ratio,n_syn,n_real", [(0.0, 40, 0), (0.2, 40, 10), (0.5, 40, 40), (0.8, 12, 50),
                                                (1.0, 0, 50)])
def test_stage1_mix_ratio(ratio, n_syn, n_real):
    syn = DataSet(_meta("s", 40), ["synthetic/x/shards/unit-00000.parquet"])
    real = DataSet(_meta("r", 50), ["data/real/a.parquet"], "train")
    mixed = mix_real_into(syn, real, ratio, seed=0)
    counts = mixed.meta["source"].value_counts()
    assert counts.get("s", 0) == n_syn and counts.get("r", 0) == n_real
    assert mixed.meta["id"].is_unique
    again = mix_real_into(syn, real, ratio, seed=0)
    assert again.meta["id"].tolist() == mixed.meta["id"].tolist()
