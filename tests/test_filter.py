"""The filter: α·sim(image, class prompt) + (1−α)·sim(image, group centroid), top fraction per group.

Runs the real stage on a real (tiny-model) synthetic set through Ray Data actor pools, with
the builtin embedder + an oracle saved to a folder, and with a tiny random-weight CLIP
saved with `save_pretrained`; scores are checked against the formula computed directly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing, read_table
from raybias.data.synthetic import read_synthetic
from raybias.generation.scoring import centroids_from_sums, choose_kept, class_prompt_texts, keep_count
from raybias.layout import REAL
from conftest import save_tiny_clip
from test_generate import gen_config, make_small_run, save_tiny_base

PER_GROUP = 8


@pytest.fixture(scope="module")
def synthetic_run(prepared_run, tmp_path_factory):
    """A small run whose vanilla set has PER_GROUP images in every group."""
    from raybias.stages.generate import generate_set

    tmp = tmp_path_factory.mktemp("filter")
    base = save_tiny_base(tmp / "base")
    run = make_small_run(prepared_run, tmp)
    cfg = gen_config(run, base, balance="per_group", per_group=PER_GROUP)
    generate_set(cfg, run, "vanilla", verbose=False)
    return run, base, tmp


def _cfg(run, base, **sections):
    from raybias.config import with_overrides

    cfg = gen_config(run, base, balance="per_group", per_group=PER_GROUP)
    overrides = [f"{s}.{k}={v}" for s, kv in sections.items() for k, v in kv.items()]
    return with_overrides(cfg, overrides)


def _random_oracle(folder) -> str:
    from raybias.diffusion.corpus import PALETTE_NAMES
    from raybias.diffusion.oracle import OracleNet, save_oracle

    torch.manual_seed(0)
    model = OracleNet(len(PALETTE_NAMES)).eval()
    model.palette = list(PALETTE_NAMES)
    return save_oracle(model, str(folder))


_tiny_clip = save_tiny_clip  # the shared tiny random CLIP (tests/conftest.py)


def _expected_scores(run, embedder, alpha, prompt_fn) -> pd.Series:
    """The formula, computed here directly from the embedder, real images and synthetic rows."""
    real = read_table(run, REAL, split="train")
    info = DatasetInfo.load(run)
    centroids = {}
    for g in range(info.n_groups):
        mean = embedder.embed_images(list(real.loc[real["group"] == g, "image"])).mean(axis=0)
        centroids[g] = mean / np.linalg.norm(mean)
    syn = read_synthetic(run, "vanilla", filtered=False)
    vectors = embedder.embed_images(list(syn["image"]))
    centroid_term = np.array([vectors[i] @ centroids[g] for i, g in enumerate(syn["group"])])
    prompt_term = prompt_fn(syn, vectors, info)
    return pd.Series(alpha * prompt_term + (1 - alpha) * centroid_term, index=syn["id"])


def _check_kept(run, keep_each: int):
    scores = pq.read_table(run.path("synthetic/vanilla/scores.parquet")).to_pandas()
    assert list(scores.columns[:4]) == ["id", "group", "score", "keep"]
    assert len(scores) == 4 * PER_GROUP and scores["id"].is_unique
    assert scores.groupby("group")["keep"].sum().to_dict() == {g: keep_each for g in range(4)}
    for _, part in scores.groupby("group"):  # the kept are the best of their group
        assert part.loc[part["keep"], "score"].min() >= part.loc[~part["keep"], "score"].max()
    kept = read_synthetic(run, "vanilla", filtered=True)
    assert len(kept) == 4 * keep_each and kept.groupby("group").size().to_dict() == {g: keep_each for g in range(4)}
    assert set(kept["id"]) == set(scores.loc[scores["keep"], "id"])
    return scores.set_index("id")


def test_builtin_filter_keeps_the_fraction_per_group_by_the_formula(synthetic_run):
    from raybias.data.images import decode
    from raybias.diffusion.oracle import load_oracle, predict
    from raybias.embed import get_embedder
    from raybias.stages.filter import run_filter

    run, base, tmp = synthetic_run
    oracle = _random_oracle(tmp / "oracle")
    cfg = _cfg(run, base, filter={"oracle": oracle})
    record = run_filter(cfg, run)["vanilla"]
    assert record["prompt_term"] == "oracle" and record["kept"] == {str(g): 6 for g in range(4)}
    scores = _check_kept(run, keep_each=6)  # round(0.75 * 8)

    def oracle_term(syn, vectors, info):
        probs, _ = predict(np.stack([decode(b) for b in syn["image"]]), load_oracle(oracle))
        digits = [[["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(m)
                   for m in words] for words in info.class_words]
        return np.array([probs[i, digits[y]].sum() for i, y in enumerate(syn["y"])])

    expected = _expected_scores(run, get_embedder({"embedder": "builtin"}), 0.5, oracle_term)
    np.testing.assert_allclose(scores.loc[expected.index, "score"], expected.values, atol=1e-5)
    assert run.is_done("filter/vanilla")
    assert Image.open(run.path("synthetic/vanilla/scores.png")).format == "PNG"


def test_clip_filter_scores_image_text_and_centroid_cosines(synthetic_run):
    from raybias.embed import get_embedder
    from raybias.stages.filter import filter_set

    run, base, tmp = synthetic_run
    clip = _tiny_clip(tmp / "clip")
    cfg = _cfg(run, base, embed={"embedder": "clip", "model": clip, "batch_size": 8},
               filter={"keep_fraction": 0.5, "alpha": 0.3})
    record = filter_set(cfg, run, "vanilla", verbose=False)
    assert record["prompt_term"] == "clip" and record["embedder"] == "clip"
    scores = _check_kept(run, keep_each=4)
    embedder = get_embedder({"embedder": "clip", "model": clip})

    def text_term(syn, vectors, info):
        texts = []
        for y in range(info.n_classes):
            mean = embedder.embed_texts(class_prompt_texts(info, y)).mean(axis=0)
            texts.append(mean / np.linalg.norm(mean))
        return np.array([vectors[i] @ texts[y] for i, y in enumerate(syn["y"])])

    expected = _expected_scores(run, embedder, 0.3, text_term)
    np.testing.assert_allclose(scores.loc[expected.index, "score"], expected.values, atol=1e-4)
    assert class_prompt_texts(DatasetInfo.load(run), 1)[:2] == ["a five", "a six"]


def test_disabled_filter_keeps_everything_and_missing_scores_are_redone(synthetic_run):
    from raybias.stages.filter import filter_set

    run, base, _ = synthetic_run
    cfg = _cfg(run, base, filter={"enabled": False})
    filter_set(cfg, run, "vanilla", verbose=False)
    assert len(read_synthetic(run, "vanilla", filtered=True)) == 4 * PER_GROUP
    # a regenerated set deletes its scores; an `auto` run then scores again instead of skipping
    run.delete("synthetic/vanilla/scores.parquet")
    filter_set(cfg, run, "vanilla", "auto", verbose=False)
    assert run.exists("synthetic/vanilla/scores.parquet")


def test_filter_needs_a_finished_set_and_a_prompt_scorer(prepared_run, tmp_path):
    from raybias.config import ConfigError
    from raybias.generation.scoring import prompt_term_kind
    from raybias.stages.filter import filter_set

    run = make_small_run(prepared_run, tmp_path)
    cfg = gen_config(run, "unused")
    with pytest.raises(TableMissing, match="raybias generate"):
        filter_set(cfg, run, "vanilla", verbose=False)
    with pytest.raises(ConfigError, match="filter.embedder=clip"):
        prompt_term_kind("builtin", 0.5, "celeba")
    assert prompt_term_kind("builtin", 0.0, "celeba") == "none"


def test_keep_rule_and_centroid_fallback():
    assert [keep_count(n, 0.75) for n in (0, 1, 2, 3, 8, 10)] == [0, 1, 2, 2, 6, 8]
    scores = pd.DataFrame({"id": list("abcdef"), "group": [0, 0, 0, 0, 1, 1],
                           "score": [0.1, 0.9, 0.5, 0.5, 0.2, 0.3]})
    kept = choose_kept(scores, 0.5).set_index("id")["keep"].to_dict()
    assert kept == {"a": False, "b": True, "c": True, "d": False, "e": False, "f": True}
    # group 1 has no real images: its centroid is its class's mean (groups 0 and 1)
    sums = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    counts = np.array([2, 0, 3, 1])
    c = centroids_from_sums(sums, counts, n_bias=2)
    np.testing.assert_allclose(c, [[1, 0], [1, 0], [0, 1], [0, 1]])
