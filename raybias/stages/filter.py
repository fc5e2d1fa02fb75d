"""Stage `filter`: score every synthetic image and keep the top fraction of each group.

score = α·sim(image, class prompt) + (1−α)·sim(image, group centroid) (Basu et al.; α =
filter.alpha), see `raybias.generation.scoring`. The generator's shards stream through a
Ray Data actor pool of `FilterScorer`s (embed.concurrency actors, embed.num_gpus each; one
shard per call, embedded embed.batch_size images at a time); only (id, group, scores) come back.
Each group keeps its top filter.keep_fraction, so the set stays group-balanced.

Writes `synthetic/<gen>/scores.parquet` (id, group, score, keep, prompt_score,
centroid_score) atomically, and `synthetic/<gen>/scores.png` (score histograms per group
with the cut). `raybias.data.synthetic.read_synthetic(run, gen, filtered=True)` then
returns the kept rows. filter.enabled=false keeps everything (score left empty).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Dict, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing, shard_paths
from raybias.data.synthetic import finished_units
from raybias.embed.vectors import embedding_pool
from raybias.generation.scoring import (FilterScorer, GroupSums, centroids_from_sums, choose_kept,
                                        class_digits, class_prompt_texts, group_sums_from_batches,
                                        prompt_term_kind)
from raybias.layout import (EMBED_KEY, PREPARE_KEY, REAL, VECTORS, filter_key, generate_key, scores_path, scores_png, shard_path,
                            shards_dir, synthetic_dir)
from raybias.methods import EMBED, filter_sections, generators_needed
from raybias.ray_utils import init_ray, require_gpus
from raybias.registry import GENERATORS
from raybias.rundir import RunDir

log = logging.getLogger("raybias.generation")


def filter_embed_options(cfg) -> Dict[str, Any]:
    """The embed section with the filter's embedder (filter.embedder, else embed.embedder)."""
    from raybias.embed import embed_options

    opts = embed_options(cfg.embed)
    opts["embedder"] = cfg.filter.embedder or cfg.embed.embedder
    return opts


def _shard_dataset(paths):
    """One row per Parquet shard path; the actors read the shards themselves."""
    import ray

    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths)))


def real_centroids(cfg, run: RunDir, info: DatasetInfo, opts: Dict[str, Any]) -> Tuple[np.ndarray, str]:
    """Unit-norm centroid of each group's real training images in the filter embedder's space.

    Reuses embed/vectors/ when it was made by the same embedder config; else embeds the real
    training images with an actor pool (per shard: group sums and counts come back).
    """
    same = (opts["embedder"] == cfg.embed.embedder and run.table_problem(VECTORS) is None
            and run.matches(run.stage_record(EMBED_KEY), cfg, EMBED))
    if same:
        batches = (pq.read_table(p, columns=["group", "vector"], filesystem=run.fs)
                   for p in shard_paths(run, VECTORS))
        sums, counts = group_sums_from_batches(batches, info.n_groups)
        return centroids_from_sums(sums, counts, info.n_bias), VECTORS
    paths = shard_paths(run, REAL, "prepare")
    ds = _shard_dataset(paths).map_batches(
        GroupSums, fn_constructor_kwargs=dict(run_spec=run.spec(), embed_options=opts, n_groups=info.n_groups),
        **embedding_pool(opts, len(paths)))
    sums, counts = None, np.zeros(info.n_groups, np.int64)
    for row in ds.iter_rows():
        part = np.asarray(row["sums"], np.float64).reshape(info.n_groups, -1)
        sums = part if sums is None else sums + part
        counts += np.asarray(row["counts"], np.int64)
    where = f"{int(counts.sum())} real training images embedded with {opts['embedder']}"
    return centroids_from_sums(sums, counts, info.n_bias), where


def _write_scores(run: RunDir, generator: str, scores: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(scores[["id", "group", "score", "keep", "prompt_score", "centroid_score"]],
                                 preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    run.write_bytes(scores_path(generator), buf.getvalue())


def _score_plot(run: RunDir, generator: str, scores: pd.DataFrame, info: DatasetInfo) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(scores["group"].unique())
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 2.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        part = scores[scores["group"] == g]
        bins = np.histogram_bin_edges(part["score"], bins=20)
        ax.hist(part.loc[part["keep"], "score"], bins=bins, color="tab:green", label="kept")
        ax.hist(part.loc[~part["keep"], "score"], bins=bins, color="tab:gray", label="dropped")
        if (~part["keep"]).any():
            ax.axvline(part.loc[part["keep"], "score"].min(), color="k", lw=0.8, ls="--")
        ax.set_title(f"g{g} {info.group_name(int(g))}\n{int(part['keep'].sum())}/{len(part)} kept", fontsize=8)
        ax.set_xlabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{generator}: filter scores per group", fontsize=9)
    fig.tight_layout()
    run.write_figure(scores_png(generator), fig)
    plt.close(fig)


def filter_set(cfg, run: RunDir, generator: str, mode: str = "fresh", verbose: bool = True) -> Dict[str, Any]:
    """Score and cut `generator`'s synthetic set; returns kept/total counts per group."""
    key = filter_key(generator)
    sections = filter_sections(generator)
    # A regenerated set deletes its scores: the recorded output is then gone and the set is scored again.
    st = run.stage(key, cfg, sections, mode, outputs=(scores_path(generator),),
                   owns=(scores_path(generator), scores_png(generator)), needs=(PREPARE_KEY,))
    if st.skip:
        if verbose:
            say(f"filter {generator}: finished earlier, skipped")
        return st.record_info
    if not run.is_done(generate_key(generator)):
        raise TableMissing(f"{run.path(synthetic_dir(generator))} is not finished "
                           f"(run `raybias generate` for generator {generator!r} first)")
    info = DatasetInfo.load(run)
    paths = [run.path(shard_path(generator, u)) for u in finished_units(run, generator)]
    if not paths:
        raise TableMissing(f"{run.path(shards_dir(generator))} has no shards (run `raybias generate` first)")
    f = cfg.filter
    init_ray(cfg)
    if not f.enabled:
        scores = pd.concat([pq.read_table(p, columns=["id", "group"], filesystem=run.fs).to_pandas() for p in paths],
                           ignore_index=True)
        scores = scores.assign(score=np.nan, prompt_score=np.nan, centroid_score=np.nan, keep=True)
        embedder, term = None, "disabled"
    else:
        from raybias.console import bar as progress_bar

        opts = filter_embed_options(cfg)
        embedder = opts["embedder"]
        term = prompt_term_kind(embedder, float(f.alpha), info.source)
        require_gpus(float(opts.get("num_gpus") or 0), "filter (embed.num_gpus)")
        centroids, centroid_source = (real_centroids(cfg, run, info, opts) if f.alpha < 1
                                      else (np.zeros((info.n_groups, 1), np.float32), "unused (alpha=1)"))
        class_prompts = [class_prompt_texts(info, y) for y in range(info.n_classes)] if term == "clip" else None
        digits = class_digits(info) if term == "oracle" else None
        ds = _shard_dataset(paths).map_batches(
            FilterScorer,
            fn_constructor_kwargs=dict(run_spec=run.spec(), embed_options=opts, alpha=float(f.alpha),
                                       centroids=centroids.tolist(), prompt_term=term, class_prompts=class_prompts,
                                       digits=digits, oracle_folder=f.oracle),
            **embedding_pool(opts, len(paths)))
        total = sum(pq.ParquetFile(p, filesystem=run.fs).metadata.num_rows for p in paths)
        parts = []
        with progress_bar(total=total, unit="img", desc=f"filter {generator}", disable=not verbose) as bar:
            for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
                parts.append(batch)
                bar.update(len(batch))
        scores = pd.concat(parts, ignore_index=True)
        if verbose:
            say(f"filter {generator}: centroids from {centroid_source}; class-prompt term: {term}")
    scores = choose_kept(scores, float(f.keep_fraction) if f.enabled else 1.0)
    _write_scores(run, generator, scores)
    if f.enabled:
        _score_plot(run, generator, scores, info)
    per_group = scores.groupby("group")["keep"].agg(["sum", "size"])
    record = {"embedder": embedder, "prompt_term": term, "alpha": float(f.alpha),
              "keep_fraction": float(f.keep_fraction) if f.enabled else 1.0,
              "kept": {str(int(g)): int(r["sum"]) for g, r in per_group.iterrows()},
              "total": {str(int(g)): int(r["size"]) for g, r in per_group.iterrows()}}
    st.finish(record)
    if verbose:
        say(f"filter {generator}: kept {int(scores['keep'].sum())} of {len(scores)} images "
            + ", ".join(f"g{g} {record['kept'][g]}/{record['total'][g]}" for g in record["kept"]))
    return record


def run_filter(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Dict[str, Any]]:
    """`raybias filter`: every text-to-image generator named in `methods:`."""
    generators = [g for g in generators_needed(list(cfg.methods)) if g in GENERATORS]
    if not generators:
        if verbose:
            say(f"filter: no generator in methods ({', '.join(GENERATORS)}); nothing to do")
        return {}
    return {gen: filter_set(cfg, run, gen, mode, verbose=verbose) for gen in generators}
