"""The filter's scores: α·sim(image, class prompt) + (1−α)·sim(image, group centroid).

- Group centroid: the mean embedding of the group's real training images (the class's mean
  when the group has none), with the filter's embedder; the term is a cosine similarity.
- Class prompt: with CLIP, the cosine between the image and the class's text embedding (the
  mean over the class's members of the dataset's prompt with the bias word dropped, e.g.
  "a seven"). With the builtin embedder (no text encoder; colored_digits), the oracle
  classifier's probability that the digit is one of the class's members.

`GroupSums` (real shards -> per-group embedding sums) and `FilterScorer` (synthetic shards
-> scores) are Ray Data actors that read their shards themselves; the driver sums the
centroids, picks the top fraction per group, and never builds a model.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from raybias.config import ConfigError

PROMPT_TERMS = ("clip", "oracle", "none")


def class_prompt_texts(info, y: int) -> List[str]:
    """The dataset's prompt for each member of class y with the bias word left out."""
    from raybias.generation.plan import fill_template

    return [" ".join(fill_template(info.prompt_template, bias="", member=m).split()) for m in info.class_words[y]]


def group_prompt_texts(info, g: int) -> List[str]:
    """The dataset's prompt for each member of group g's class with g's bias word (CLIP zero-shot
    reads a group as the text nearest an image, raybias.generation.diagnostics)."""
    from raybias.generation.plan import fill_template

    y, a = info.y_a(g)
    return [" ".join(fill_template(info.prompt_template, bias=info.bias_words[a], member=m).split())
            for m in info.class_words[y]]


def mean_text_embeddings(embedder, texts_per_entry: List[List[str]]) -> np.ndarray:
    """[n_entries, d]: the unit-norm mean text embedding of each entry's texts (a class's or a
    group's prompts)."""
    means = [embedder.embed_texts(texts).mean(axis=0) for texts in texts_per_entry]
    return np.stack([m / max(float(np.linalg.norm(m)), 1e-12) for m in means]).astype(np.float32)


def oracle_probs(images: List[bytes], oracle):
    """(digit probabilities, colour probabilities) the oracle gives encoded images."""
    from raybias.data.images import decode
    from raybias.diffusion.oracle import predict

    return predict(np.stack([decode(b) for b in images]), oracle)


def class_digits(info) -> List[List[int]]:
    """Digit indices of each class's members (colored_digits: the oracle reads digits)."""
    return member_digits(info.class_words, info.class_names)


def member_digits(class_words, class_names) -> List[List[int]]:
    """Digit indices of each class's member words; ConfigError naming data.class_words if one
    is not a digit word. Needs no Ray and no run directory (raybias.stages.preflight calls it)."""
    from raybias.diffusion.tokenizer import DIGIT_WORDS

    out = []
    for y, members in enumerate(class_words):
        unknown = [m for m in members if m not in DIGIT_WORDS]
        if unknown:
            raise ConfigError(f"filter: class {class_names[y]!r} has members {unknown} (data.class_words[{y}]) "
                              "that are not digit words, so the oracle cannot score the class-prompt term; set "
                              "filter.embedder=clip (with embed.model) or filter.alpha=0")
        out.append([DIGIT_WORDS.index(m) for m in members])
    return out


def prompt_term_kind(embedder: str, alpha: float, source: str) -> str:
    """How the class-prompt term is computed: clip, oracle (builtin on colored_digits) or none (α = 0)."""
    if alpha <= 0:
        return "none"
    if embedder == "clip":
        return "clip"
    if source == "colored_digits":
        return "oracle"
    raise ConfigError(f"filter.alpha={alpha} needs a class-prompt score, but filter embedder {embedder!r} has no "
                      f"text encoder and data.source={source!r} has no oracle; set filter.embedder=clip with "
                      "embed.model a CLIP hub id or folder, or filter.alpha=0")


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, n_bias: int) -> np.ndarray:
    """Unit-norm centroid per group; a group without real images takes its class's mean."""
    n_groups, dim = sums.shape
    out = np.zeros((n_groups, dim), np.float32)
    for g in range(n_groups):
        if counts[g] > 0:
            mean = sums[g] / counts[g]
        else:
            y = g // n_bias
            members = range(y * n_bias, (y + 1) * n_bias)
            total = sum(counts[k] for k in members)
            if total == 0:
                continue  # no real image of the class at all: the centroid term is 0 for it
            mean = sum(sums[k] for k in members) / total
        norm = float(np.linalg.norm(mean))
        if norm > 0:
            out[g] = mean / norm
    return out


def _read_shard(run_spec: str, path: str, columns: List[str]) -> pa.Table:
    import pyarrow.parquet as pq

    from raybias.rundir import RunDir

    return pq.read_table(path, columns=columns, filesystem=RunDir(run_spec).fs)


class FilterScorer:
    """Ray Data actor: reads whole synthetic shards (one path per row) and scores their images.

    Shards are read here with pyarrow, one work unit at a time, instead of through
    `read_parquet`: the unit is already the streaming granule, and only (id, group, scores)
    go back to the driver.
    """

    def __init__(self, run_spec: str, embed_options: Dict[str, Any], alpha: float, centroids: List[List[float]],
                 prompt_term: str, class_prompts: Optional[List[List[str]]] = None,
                 digits: Optional[List[List[int]]] = None, oracle_folder: Optional[str] = None):
        from raybias.embed import get_embedder

        self.run_spec = run_spec
        self.batch_size = int(embed_options.get("batch_size") or 256)
        self.alpha = float(alpha)
        self.centroids = np.asarray(centroids, np.float32)
        self.prompt_term = prompt_term
        needs_images = self.alpha < 1 or prompt_term == "clip"
        self.embedder = get_embedder(embed_options) if needs_images else None
        self.class_text = None
        if prompt_term == "clip":  # [n_classes, d]: unit-norm mean text embedding of each class's prompts
            self.class_text = mean_text_embeddings(self.embedder, class_prompts)
        self.digits = digits
        self.oracle = None
        if prompt_term == "oracle":
            from raybias.diffusion.oracle import load_oracle

            self.oracle = load_oracle(oracle_folder)

    def score_table(self, table: pa.Table) -> pa.Table:
        images = table.column("image").to_pylist()
        groups = table.column("group").to_numpy().astype(np.int64)
        ys = table.column("y").to_numpy().astype(np.int64)
        n = len(images)
        centroid = np.zeros(n, np.float32)
        prompt = np.zeros(n, np.float32)
        vectors = self.embedder.embed_images(images) if self.embedder is not None else None
        if vectors is not None and self.alpha < 1:
            centroid = np.einsum("nd,nd->n", vectors, self.centroids[groups])
        if self.prompt_term == "clip":
            prompt = np.einsum("nd,nd->n", vectors, self.class_text[ys])
        elif self.prompt_term == "oracle":
            digit_probs, _ = oracle_probs(images, self.oracle)
            prompt = np.array([digit_probs[i, self.digits[y]].sum() for i, y in enumerate(ys)], np.float32)
        score = self.alpha * prompt + (1 - self.alpha) * centroid
        return pa.table({"id": table.column("id"), "group": pa.array(groups), "score": pa.array(score, pa.float64()),
                         "prompt_score": pa.array(prompt, pa.float64()),
                         "centroid_score": pa.array(centroid, pa.float64())})

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        parts = []
        for path in batch["path"]:
            table = _read_shard(self.run_spec, str(path), ["id", "group", "y", "image"])
            for start in range(0, table.num_rows, self.batch_size):
                parts.append(self.score_table(table.slice(start, self.batch_size)))
        return pa.concat_tables(parts)


class GroupSums:
    """Ray Data actor: per real shard, the per-group sums and counts of training-image embeddings."""

    def __init__(self, run_spec: str, embed_options: Dict[str, Any], n_groups: int):
        from raybias.embed import get_embedder

        self.run_spec = run_spec
        self.embedder = get_embedder(embed_options)
        self.batch_size = int(embed_options.get("batch_size") or 256)
        self.n_groups = int(n_groups)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import pyarrow.compute as pc

        sums = np.zeros((self.n_groups, self.embedder.dim), np.float64)
        counts = np.zeros(self.n_groups, np.int64)
        for path in batch["path"]:
            table = _read_shard(self.run_spec, str(path), ["group", "split", "image"])
            table = table.filter(pc.equal(table["split"], "train"))
            for start in range(0, table.num_rows, self.batch_size):
                chunk = table.slice(start, self.batch_size)
                groups = chunk.column("group").to_numpy().astype(np.int64)
                np.add.at(sums, groups, self.embedder.embed_images(chunk.column("image").to_pylist()))
                counts += np.bincount(groups, minlength=self.n_groups)
        return {"sums": sums.reshape(1, -1), "counts": counts.reshape(1, -1)}


def keep_count(n: int, keep_fraction: float) -> int:
    """Images a group keeps: round(keep_fraction · n), at least one of a non-empty group."""
    if n <= 0:
        return 0
    return max(1, min(n, int(math.floor(keep_fraction * n + 0.5))))


def choose_kept(scores: pd.DataFrame, keep_fraction: float) -> pd.DataFrame:
    """Adds `keep`: the top keep_fraction of each group by score (ties broken by id)."""
    scores = scores.sort_values(["group", "score", "id"], ascending=[True, False, True], kind="stable")
    rank = scores.groupby("group").cumcount()
    sizes = scores.groupby("group")["id"].transform("size")
    limit = sizes.map(lambda n: keep_count(int(n), keep_fraction))
    scores = scores.assign(keep=(rank < limit).to_numpy())
    return scores.sort_values("id", kind="stable").reset_index(drop=True)


def group_sums_from_batches(batches, n_groups: int, dim: Optional[int] = None):
    """(sums [G, d], counts [G]) of vectors streamed as pyarrow batches with `group`, `vector`."""
    from raybias.embed.vectors import column_to_matrix

    sums = None
    counts = np.zeros(n_groups, np.int64)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        vectors = column_to_matrix(batch.column("vector"))
        groups = batch.column("group").to_numpy().astype(np.int64)
        if sums is None:
            sums = np.zeros((n_groups, vectors.shape[1]), np.float64)
        np.add.at(sums, groups, vectors)
        counts += np.bincount(groups, minlength=n_groups)
    if sums is None:
        sums = np.zeros((n_groups, dim or 1), np.float64)
    return sums, counts
