"""Stage `embed`: image embeddings of the real training split -> `embed/vectors/`.

Reads `data/real` (train rows only) with Ray Data, embeds the images with an actor pool
(`raybias.embed.embed_dataset`: embed.concurrency actors, embed.batch_size images per call,
embed.num_gpus GPUs each) and writes `id, group, vector` Parquet shards + `_SUCCESS`.
"""

from __future__ import annotations

from typing import Any, Dict

import pyarrow.parquet as pq

from raybias.console import say
from raybias.data.images import ImageError
from raybias.data.info import DatasetInfo
from raybias.data.io import read_dataset, shard_paths
from raybias.embed import embed_dataset, write_vectors
from raybias.layout import EMBED_KEY, PREPARE_KEY, REAL, VECTORS
from raybias.methods import EMBED
from raybias.ray_utils import init_ray, require_gpus
from raybias.rundir import RunDir, StageFailed


def _cause(exc: BaseException, kind: type):
    """The `kind` error an actor raised, from the exception Ray hands the driver (or None).

    Ray wraps a worker's error (RayTaskError.cause, __cause__); when the original object does
    not survive the trip, its type and message are still in the formatted traceback.
    """
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    name = f"{kind.__module__}.{kind.__name__}: "
    text = str(exc)
    if name in text:
        return kind(text.split(name, 1)[1].splitlines()[0].strip())
    return None


def run_embed(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Any]:
    """Embed every real training image; returns {embedder, dim, n} (also kept in the manifest)."""
    if cfg.embed.num_gpus > 0:
        # Fail before touching the manifest: a finished stage stays finished.
        init_ray(cfg)
        require_gpus(cfg.embed.num_gpus, "embed (embed.num_gpus)")
    st = run.stage(EMBED_KEY, cfg, EMBED, mode, outputs=(VECTORS,), owns=(VECTORS,), needs=(PREPARE_KEY,))
    if st.skip:
        info = st.record_info
        if verbose:
            say(f"embed: already done ({info.get('n', '?')} vectors), skipped")
        return info
    init_ray(cfg)
    data_info = DatasetInfo.load(run)
    expected = sum(data_info.train_count(g) for g in range(data_info.n_groups))

    from ray.data.expressions import col

    real = read_dataset(run, REAL, columns=["id", "group", "split", "image"], stage="prepare")
    train = real.filter(expr=col("split") == "train")
    vectors = embed_dataset(train, cfg.embed, keep=("id", "group"))
    try:
        n = write_vectors(run, vectors, VECTORS)
    except Exception as exc:  # Ray wraps the actor's exception; surface the project's own error
        bad = _cause(exc, ImageError)
        if bad is not None:
            raise ImageError(f"embed: {run.path(REAL)}: {bad}") from exc
        from raybias.config import ConfigError

        bad = _cause(exc, ConfigError)
        if bad is not None:
            raise ConfigError(str(bad)) from exc
        raise StageFailed(f"embed failed while embedding {run.path(REAL)}: {exc}") from exc
    if n != expected:
        raise StageFailed(f"embed wrote {n} vectors but {REAL} has {expected} training images")
    dim = 0
    for path in shard_paths(run, VECTORS):
        dim = pq.read_schema(path, filesystem=run.fs).field("vector").type.list_size
        break
    info = {"embedder": cfg.embed.embedder, "model": cfg.embed.model, "dim": int(dim), "n": int(n)}
    st.finish(info)
    if verbose:
        say(f"embedded {n} training images with embed.embedder={cfg.embed.embedder} "
            f"(dim {dim}) -> {run.path(VECTORS)}")
    return info
