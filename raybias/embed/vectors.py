"""Embedding a table of images with a Ray Data actor pool, and the `embed/vectors/` table.

`embed_dataset(ds, cfg.embed)` maps an actor class over the rows: each actor builds its
embedder once (on a GPU when embed.num_gpus > 0) and embeds batches of embed.batch_size
images; embed.concurrency actors run at once. It keeps the columns named in `keep` and adds
`vector`, a fixed-size list of float32 (L2-normalised). The filter stage reuses it for
synthetic images.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybias.data.images import ImageError, decode
from raybias.data.io import read_dataset, shard_paths
from raybias.embed.embedders import embed_options, get_embedder
from raybias.layout import VECTORS
from raybias.rundir import RunDir


def vector_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """[N, d] float32 -> Arrow fixed_size_list<float32, d> (what Parquet stores)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), matrix.shape[1])


def column_to_matrix(column, dim: Optional[int] = None) -> np.ndarray:
    """An Arrow column of vectors (fixed-size list, list, or Ray's tensor type) -> [N, d] float32."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_to_matrix(c) for c in chunks if len(c)]
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _chunk_to_matrix(chunk) -> np.ndarray:
    n = len(chunk)
    if isinstance(chunk.type, pa.ExtensionType):
        # Ray Data's fixed-shape tensor column (numpy batches holding a 2-D array).
        arr = chunk.to_numpy() if hasattr(chunk, "to_numpy") else np.asarray(chunk.to_pylist())
        return np.ascontiguousarray(np.asarray(arr, dtype=np.float32).reshape(n, -1))
    if pa.types.is_fixed_size_list(chunk.type) or pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        if flat.size % n:
            raise ValueError("vector column has rows of different lengths")
        return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(n, flat.size // n))
    raise TypeError(f"vector column has type {chunk.type}; expected a list of floats")


class EmbedBatches:
    """Ray Data actor: builds the embedder once, then embeds one batch of images per call."""

    def __init__(self, options: dict, keep: Sequence[str] = ("id", "group"), image_column: str = "image"):
        self.embedder = get_embedder(options)
        self.keep = tuple(keep)
        self.image_column = image_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column(self.image_column).to_pylist()
        try:
            vectors = self.embedder.embed_images(images)
        except ImageError:
            raise ImageError(self._first_bad(batch, images)) from None
        columns = {c: batch.column(c) for c in self.keep}
        columns["vector"] = vector_array(vectors)
        return pa.table(columns)


    def _first_bad(self, batch: pa.Table, images: list) -> str:
        """Name the row whose image does not decode (only on the failure path)."""
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else list(range(len(images)))
        for row_id, data in zip(ids, images):
            try:
                decode(data, where=f"row id={row_id}")
            except ImageError as exc:
                return str(exc)
        return f"an image in the batch starting at row id={ids[0]} cannot be embedded"


def embed_dataset(ds, embed_cfg, keep: Sequence[str] = ("id", "group"), image_column: str = "image",
                  actor_class: type = EmbedBatches):
    """A lazy Ray Dataset of `keep` columns + `vector`, embedded by an actor pool per `embed_cfg`.

    `actor_class`: EmbedBatches or a subclass (the benchmark's adds CPU-time accounting)."""
    import ray

    from raybias.ray_utils import require_gpus

    opts = embed_options(embed_cfg)
    num_gpus = float(opts.get("num_gpus") or 0)
    require_gpus(num_gpus, "embed (embed.num_gpus)")
    remote = {"num_gpus": num_gpus} if num_gpus > 0 else {"num_cpus": 1}
    return ds.map_batches(
        actor_class,
        fn_constructor_kwargs={"options": opts, "keep": tuple(keep), "image_column": image_column},
        batch_size=int(opts.get("batch_size") or 256),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=int(opts.get("concurrency") or 1)),
        **remote,
    )


def embedding_pool(opts: Dict[str, Any], n_items: int) -> Dict[str, Any]:
    """map_batches arguments for an actor pool of embedders (`embed_options`) that takes one
    item (a shard, a list of rows) per call: at most one actor per item, a GPU each if asked."""
    import ray

    num_gpus = float(opts.get("num_gpus") or 0)
    return dict(compute=ray.data.ActorPoolStrategy(size=max(1, min(int(opts.get("concurrency") or 1), n_items))),
                batch_size=1, **({"num_gpus": num_gpus} if num_gpus > 0 else {"num_cpus": 1}))


def write_vectors(run: RunDir, ds, rel_dir: str = VECTORS) -> int:
    """Write a vector dataset as Parquet shards under `rel_dir` (temporary name, then renamed,
    then `_SUCCESS`, as raybias.data.io does). Returns the number of rows written."""
    staged = run.staging(rel_dir)
    run.makedirs(staged)
    ds.write_parquet(run.path(staged), filesystem=run.fs)
    shards = run.publish_table(staged, rel_dir)
    return sum(pq.ParquetFile(run.path(rel_dir, n), filesystem=run.fs).metadata.num_rows for n in shards)


def vectors_dataset(run: RunDir, rel_dir: str = VECTORS, columns=None):
    """`embed/vectors/` as a lazy Ray Dataset (refuses an unfinished table)."""
    return read_dataset(run, rel_dir, columns=columns, stage="embed")


def read_vectors(run: RunDir, rel_dir: str = VECTORS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, groups, matrix [N, d] float32) of the whole table, sorted by id: for small runs."""
    parts = [pq.read_table(p, columns=["id", "group", "vector"], filesystem=run.fs)
             for p in shard_paths(run, rel_dir, "embed")]
    if not parts:
        return np.array([], dtype=object), np.array([], dtype=np.int64), np.zeros((0, 0), np.float32)
    table = pa.concat_tables(parts)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    groups = table.column("group").to_numpy().astype(np.int64)
    matrix = column_to_matrix(table.column("vector"))
    order = np.argsort(ids, kind="stable")
    return ids[order], groups[order], matrix[order]
