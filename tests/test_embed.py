"""Embedders (built-in and a tiny random CLIP built offline) and the embed stage."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from raybias.config import ConfigError
from raybias.palette import COLOR_RGB
from raybias.data.images import ImageError, encode_png
from raybias.embed import get_embedder, read_vectors
from raybias.embed.builtin import FEATURE_DIM


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_image(size=16, color="red", seed=0, digit=None):
    """A colored_digits-style image of one of scikit-learn's digits."""
    from raybias.data.sources.colored_digits import colorize

    d = _digits()
    i = seed if digit is None else int(np.flatnonzero(d.target == digit)[seed])
    return encode_png(colorize(d.images[i], COLOR_RGB[color], size))


# --- built-in embedder ------------------------------------------------------------------

def test_builtin_vectors_are_unit_deterministic_and_any_size():
    emb = get_embedder({"embedder": "builtin"})
    assert emb.dim == FEATURE_DIM == 227
    imgs = [digit_image(seed=i) for i in range(6)]
    a, b = emb.embed_images(imgs), get_embedder(None).embed_images(imgs)
    assert a.shape == (6, 227) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    for size in (8, 28, 64):
        v = emb.embed_images([digit_image(size=size, seed=0)])
        assert v.shape == (1, 227)
        assert float((v @ a[0])[0]) > 0.9  # the same digit at another resolution stays close
    blank = emb.embed_images([encode_png(np.zeros((16, 16, 3), np.uint8))])
    assert np.linalg.norm(blank) == pytest.approx(1.0, abs=1e-5)
    assert emb.embed_images([]).shape == (0, 227)


def test_builtin_shape_features_ignore_colour_and_tell_digits_apart():
    emb = get_embedder({"embedder": "builtin"})
    red, green = emb.embed_images([digit_image(color="red", seed=3), digit_image(color="green", seed=3)])
    # Only the 3 colour dims differ (up to the uint8 rounding of the two colours).
    np.testing.assert_allclose(red[:-3], green[:-3], atol=5e-3)
    assert float(red[-3:] @ green[-3:]) < 0.5 * 0.5 * 0.5
    zeros = emb.embed_images([digit_image(digit=0, seed=s) for s in range(5)])
    ones = emb.embed_images([digit_image(digit=1, seed=s) for s in range(5)])
    within = (zeros @ zeros.T)[np.triu_indices(5, 1)].mean()
    across = (zeros @ ones.T).mean()
    assert within > across + 0.1


def test_builtin_has_no_text_encoder():
    with pytest.raises(ConfigError, match="clip"):
        get_embedder({"embedder": "builtin"}).embed_texts(["a red seven"])


def test_unknown_embedder_and_bad_image():
    with pytest.raises(ConfigError, match="embed.embedder"):
        get_embedder({"embedder": "nope"})
    with pytest.raises(ImageError):
        get_embedder(None).embed_images([b"not an image"])


# --- tiny random CLIP, built offline ------------------------------------------------------

WORDS = ["a", "photo", "of", "red", "green", "zero", "one", "two", "three", "four", "five", "six",
         "seven", "eight", "nine"]


def build_tiny_clip(folder):
    """A random-weight CLIP with a BPE tokenizer written here and a 16-px image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges, seen = ["#version: 0.2"], set()
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in seen:
                seen.add((parts[0], parts[1]))
                merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=12)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_images_and_texts(tiny_clip):
    assert (tiny_clip / "model.safetensors").exists()
    emb = get_embedder({"embedder": "clip", "model": str(tiny_clip)})
    assert emb.dim == 12
    imgs = [digit_image(seed=i) for i in range(4)] + [digit_image(size=28, seed=9)]
    v = emb.embed_images(imgs)
    assert v.shape == (5, 12) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    again = get_embedder({"embedder": "clip", "model": str(tiny_clip)}).embed_images(imgs)
    np.testing.assert_allclose(v, again, atol=1e-6)
    t = emb.embed_texts(["a red seven", "a green two", "a red seven"])
    assert t.shape == (3, 12)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    assert not np.allclose(t[0], t[1])


def test_clip_folder_without_model_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="embed.model"):
        get_embedder({"embedder": "clip", "model": str(tmp_path / "empty")})


def test_clip_through_the_actor_pool(ray_session, tiny_clip):
    import pyarrow as pa
    import ray

    from raybias.embed import embed_dataset
    from raybias.embed.vectors import column_to_matrix

    imgs = [digit_image(seed=i) for i in range(10)]
    ds = ray.data.from_items([{"id": f"x{i}", "group": i % 2, "image": b} for i, b in enumerate(imgs)])
    out = embed_dataset(ds, {"embedder": "clip", "model": str(tiny_clip), "batch_size": 4, "concurrency": 1,
                             "num_gpus": 0.0})
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    assert pa.types.is_fixed_size_list(table.schema.field("vector").type)
    got = column_to_matrix(table.column("vector"))
    order = [int(i[1:]) for i in table.column("id").to_pylist()]
    want = get_embedder({"embedder": "clip", "model": str(tiny_clip)}).embed_images(imgs)
    np.testing.assert_allclose(got, want[order], atol=1e-5)


# --- the embed stage --------------------------------------------------------------------

def test_embed_stage_writes_one_vector_per_training_image(embedded_run):
    from raybias.data.io import read_table

    cfg, run, info = embedded_run
    assert run.is_done("embed") and run.exists("embed/vectors/_SUCCESS")
    ids, groups, m = read_vectors(run)
    real = read_table(run, "data/real", columns=["id", "group", "split"], split="train")
    assert ids.tolist() == real["id"].tolist()
    assert groups.tolist() == real["group"].tolist()
    assert m.shape == (len(real), 227) and m.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    assert run.stage_record("embed")["info"] == {"embedder": "builtin", "model": None, "dim": 227, "n": len(real)}
    # Vectors are the embedder's own output, row for row.
    sample = read_table(run, "data/real", columns=["id", "image"], split=None).set_index("id").loc[ids[:5]]
    np.testing.assert_allclose(get_embedder(cfg.embed).embed_images(sample["image"].tolist()), m[:5], atol=1e-6)


def test_builtin_separates_digits_within_groups(embedded_run):
    """Measured quality: K-means(k=5) of each large group vs the digit labels (adjusted Rand index)."""
    from sklearn.metrics import adjusted_rand_score

    from raybias.clustering import assign, kmeans_dataset
    from raybias.data.io import read_table

    _, run, info = embedded_run
    ids, groups, m = read_vectors(run)
    digit = read_table(run, "data/real", columns=["id", "digit", "split"], split="train").set_index("id").loc[ids, "digit"]
    scores = []
    for g in range(info.n_groups):
        rows = groups == g
        if rows.sum() < 100:
            continue
        fit = kmeans_dataset(m[rows], 5, seed=0, n_init=4)
        scores.append(adjusted_rand_score(digit.to_numpy()[rows], assign(m[rows], fit.centroids)))
    assert len(scores) == 2 and min(scores) >= 0.7, scores


def test_embed_stage_resume_skips_and_gpu_request_fails_fast(embedded_run):
    from raybias.ray_utils import ResourceError
    from raybias.stages.embed import run_embed

    cfg, run, _ = embedded_run
    before = run.listdir("embed/vectors")
    info = run_embed(cfg, run, mode="resume", verbose=False)
    assert info["n"] > 0 and run.listdir("embed/vectors") == before
    gpu = cfg.copy()
    gpu.embed.num_gpus = 1.0
    with pytest.raises(ResourceError, match="GPU"):
        run_embed(gpu, run, mode="fresh", verbose=False)


def test_embed_stage_names_a_corrupt_image(ray_session, tmp_path):
    import pandas as pd

    from conftest import small_config
    from raybias.data.info import DatasetInfo
    from raybias.data.io import write_table
    from raybias.rundir import RunDir
    from raybias.stages.embed import run_embed

    cfg = small_config(tmp_path)
    run = RunDir(cfg.run_dir)
    rows = [{"id": f"r{i}", "image": digit_image(seed=i), "y": 0, "a": 0, "group": 0, "split": "train",
             "source": "real"} for i in range(6)]
    rows[4]["image"] = b"\x89PNG broken"
    write_table(run, "data/real", pd.DataFrame(rows))
    DatasetInfo(source="colored_digits", n_classes=1, n_bias=1, class_names=["c"], bias_names=["b"],
                class_words=[["c"]], bias_words=["b"], prompt_template="{member}", aligned=[0], image_size=16,
                severity=None, counts={"train": {"0": 6}}).save(run)
    with pytest.raises(ImageError, match="r4"):
        run_embed(cfg, run, verbose=False)
    assert not run.is_done("embed") and not run.exists("embed/vectors/_SUCCESS")
