"""The synthetic sets' diagnostics: KID and diversity against re-typed oracles on small inputs,
and the measuring pass on a real local Ray (actor pool, builtin embedder, the shipped oracle)
against the same measures computed here directly from every image."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from raybias.generation.diagnostics import kid, mean_pairwise_distance, reader_kind
from raybias.rundir import RunDir


# --- the measures against re-typed oracles ------------------------------------------------------

def reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018 (Demystifying MMD GANs), eq. for the unbiased MMD^2 estimator with
    k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("m,n,d", [(2, 2, 3), (5, 7, 4), (9, 3, 16)])
def test_kid_equals_the_unbiased_polynomial_mmd_pair_by_pair(m, n, d):
    rng = np.random.default_rng([m, n, d])
    x, y = rng.normal(size=(m, d)), rng.normal(0.5, 2.0, size=(n, d))
    assert kid(x, y) == pytest.approx(reference_kid(x, y), rel=1e-12)
    assert kid(x, x[:1]) is None and kid(x[:1], y) is None  # the estimator needs two rows a side


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    same = [kid(rng.normal(size=(20, 8)), rng.normal(size=(20, 8))) for _ in range(200)]
    shifted = [kid(rng.normal(size=(20, 8)), rng.normal(1.0, 1.0, size=(20, 8))) for _ in range(20)]
    # an unbiased estimate of 0 averages to ~0 (a biased one stays positive), a real gap does not
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert min(shifted) > 10 * abs(np.mean(same))


def test_mean_pairwise_distance_is_the_mean_cosine_distance_over_pairs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5))
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i, j in pairs]
    assert mean_pairwise_distance(x) == pytest.approx(np.mean([1 - c for c in cos]), rel=1e-12)
    assert mean_pairwise_distance(np.repeat(x[:1], 4, axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_distance(x[:1]) is None


def test_reader_is_the_filters():
    assert reader_kind("clip", "celeba") == "clip" and reader_kind("clip", "colored_digits") == "clip"
    assert reader_kind("builtin", "colored_digits") == "oracle"
    assert reader_kind("builtin", "waterbirds") == "none"


# --- the measuring pass on Ray ------------------------------------------------------------------

PER_GROUP = 12


def _synthetic_rows(generator: str):
    """PER_GROUP coloured handwritten digits per group, in the generate stage's shards; in each
    group a quarter carries the other colour (what a generator that mixes up the bias does)."""
    from sklearn.datasets import load_digits

    from raybias.palette import COLOR_RGB
    from raybias.data.images import encode_png
    from raybias.data.sources.colored_digits import colorize

    digits = load_digits()
    rng = np.random.default_rng(5)
    units, images = [], []
    for g in range(4):
        y, a = divmod(g, 2)
        pool = np.flatnonzero((digits.target >= 5) == bool(y))
        ids, imgs = [], []
        for k, i in enumerate(rng.choice(pool, PER_GROUP, replace=False)):
            colour = ("red", "green")[a if k % 4 else 1 - a]
            ids.append(f"{generator}-g{g}-{k:03d}")
            imgs.append(encode_png(colorize(digits.images[i], COLOR_RGB[colour], 16)))
        units.append({"unit": g, "ids": ids, "y": y, "a": a, "group": g, "seeds": list(range(PER_GROUP)),
                      "prompts": ["p"] * PER_GROUP, "negative_prompt": None, "cluster": None})
        images.append(imgs)
    return units, images


@pytest.fixture(scope="module")
def diag_run(prepared_run, tmp_path_factory):
    """A copy of the prepared colored_digits run (0.95) with a finished, filtered vanilla set."""
    from raybias.config import with_overrides
    from raybias.generation.shards import unit_table, write_shard
    from raybias.layout import generate_key
    from raybias.methods import generate_sections
    from raybias.stages.filter import _write_scores
    from tests.conftest import small_config

    _, source, info = prepared_run
    tmp = tmp_path_factory.mktemp("diag")
    shutil.copytree(source.root, tmp / "run")
    cfg = small_config(tmp, data={"severity": 0.95, "image_size": 16})
    cfg = with_overrides(cfg, ["methods=[vanilla,erm]", "diagnostics.sample_per_group=100000"])
    run = RunDir(cfg.run_dir)
    units, images = _synthetic_rows("vanilla")
    run.begin_stage(generate_key("vanilla"), cfg, generate_sections("vanilla"), "fresh")
    for u, imgs in zip(units, images):
        write_shard(run, "vanilla", u["unit"], unit_table("vanilla", u, imgs))
    run.finish_stage(generate_key("vanilla"), {})
    ids = [i for u in units for i in u["ids"]]
    _write_scores(run, "vanilla", pd.DataFrame({"id": ids, "group": [int(i.split("-g")[1][0]) for i in ids],
                                                "score": 0.0, "keep": [int(i[-3:]) < 6 for i in ids],
                                                "prompt_score": 0.0, "centroid_score": 0.0}))
    return cfg, run, info


def _expected(cfg, run, info):
    """Every measure, from every image (the sample covers them all here), computed directly."""
    from raybias.data.images import decode
    from raybias.data.io import read_table
    from raybias.data.synthetic import read_synthetic
    from raybias.diffusion.oracle import load_oracle, predict
    from raybias.embed import embed_options, get_embedder
    from raybias.layout import REAL

    emb = get_embedder(embed_options(cfg.embed))
    oracle = load_oracle()
    colours = [oracle.palette.index(w) for w in info.bias_words]
    members = [[["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(w)
                for w in words] for words in info.class_words]
    real = read_table(run, REAL, split="train")
    syn = read_synthetic(run, "vanilla", filtered=False)
    kept = set(read_synthetic(run, "vanilla", filtered=True)["id"])

    def read(df):
        d, c = predict(np.stack([decode(b) for b in df["image"]]), oracle)
        ok = [(int(d[i].argmax()) in members[y]) and int(c[i].argmax()) == colours[a]
              for i, (y, a) in enumerate(zip(df["y"], df["a"]))]
        return np.array(ok), emb.embed_images(list(df["image"]))

    out = {}
    for g in range(info.n_groups):
        s, r = syn[syn["group"] == g], real[real["group"] == g]
        s_ok, xs = read(s)
        r_ok, xr = read(r)
        out[g] = {"fidelity": s_ok.mean(), "fidelity_kept": s_ok[s["id"].isin(kept).to_numpy()].mean(),
                  "real_fidelity": r_ok.mean(), "diversity": mean_pairwise_distance(xs),
                  "real_diversity": mean_pairwise_distance(xr), "kid": reference_kid(xs, xr) if len(r) < 80 else None,
                  "xs": xs, "xr": xr, "n_real": len(r)}
    return out


def test_diagnostics_pass_measures_every_group_as_computed_directly(diag_run, ray_session):
    from raybias.generation.diagnostics import run_diagnostics

    cfg, run, info = diag_run
    rec = run_diagnostics(cfg, run, "auto", verbose=False)["vanilla"]
    assert rec["reader"] == "oracle" and rec["embedder"] == "builtin"
    on_disk = run.read_json("synthetic/vanilla/diagnostics.json")
    assert on_disk["groups"] == rec["groups"]
    expected = _expected(cfg, run, info)
    for g in rec["groups"]:
        e = expected[g["group"]]
        assert g["n_generated"] == g["n_sampled"] == PER_GROUP and g["n_kept_sampled"] == 6
        assert g["n_real"] == e["n_real"] == info.train_count(g["group"])
        for key in ("fidelity", "fidelity_kept", "real_fidelity", "diversity", "real_diversity"):
            assert g[key] == pytest.approx(e[key], abs=1e-6), (g["group"], key)
        assert g["kid"] == pytest.approx(kid(e["xs"], e["xr"]), rel=1e-6, abs=1e-12)
        if e["kid"] is not None:  # the small groups, also pair by pair
            assert g["kid"] == pytest.approx(e["kid"], rel=1e-5, abs=1e-12)
        # a quarter of each group was drawn in the other colour: the oracle sees it
        assert g["bias_fidelity"] <= 0.75 + 1e-9
    # finished with the same config: read back, not measured again
    again = run_diagnostics(cfg, run, "auto", verbose=False)["vanilla"]
    assert again["seconds"] == rec["seconds"]


def test_diagnostics_sample_is_bounded_per_group(diag_run, ray_session):
    from raybias.config import with_overrides
    from raybias.generation.diagnostics import run_diagnostics

    cfg, run, info = diag_run
    small = with_overrides(cfg, ["diagnostics.sample_per_group=5"])
    rec = run_diagnostics(small, run, "auto", verbose=False)["vanilla"]  # a changed key: measured again
    assert all(g["n_sampled"] == 5 and g["n_real"] == min(5, info.train_count(g["group"])) for g in rec["groups"])
    assert rec["sample_per_group"] == 5
    # the draw is the seeded one: the same sample again
    fresh = run_diagnostics(small, run, "fresh", verbose=False)["vanilla"]
    assert [g["diversity"] for g in fresh["groups"]] == [g["diversity"] for g in rec["groups"]]
