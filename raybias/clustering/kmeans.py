"""K-means (Lloyd) over vectors held as blocks in Ray's object store; the driver only sees k x d.

The result is a function of the data and the seed only, never of the order or the block
sizes in which the rows arrive (Ray Data streams blocks in whatever order they finish):

0. Canonical layout. The vectors are converted once into float32 matrices that stay in the
   object store (`VectorBlocks`), laid out canonically: each row goes to block
   hash(key) mod ceil(n / block_rows), and each block is sorted by hash(key), where the key
   is the row's id (the image id) or, without ids, the row's bytes (`key_hashes`). Built
   from a Ray Dataset this costs one extra shuffle of the vectors between tasks (one task
   per source block, one per canonical block). Every later step runs over this layout, in
   block order, so every float sum is added in the same order and the result is bitwise
   the same whatever the input order (on one machine: BLAS builds may round differently). `LocalBlocks` (an in-memory array) uses the same
   layout code, so it gives the same answer as `VectorBlocks` of the same rows.
1. k-means++ (greedy, 2 + ln k candidates per step) picks the initial centroids on a
   uniform sample of at most `sample_size` rows drawn (by seed) from the canonical layout
   and gathered on the driver (small); `n_init > 1` tries several seeds and keeps the one
   with the lowest inertia after Lloyd on the sample.
2. Each Lloyd iteration sends the k x d centroids to one task per block; a task returns its
   block's per-centroid sums (k x d), counts (k) and the sum of its rows' squared distance
   to their nearest centroid. The driver adds these up, in block order, and divides.
   Distances use ||x||^2 - 2 x.c + ||c||^2 with x.c a BLAS matmul, in cache-sized chunks of
   rows, and the sums are a second matmul (one-hot^T @ x) on the same chunk while it is in
   cache.
3. Convergence (the same rule as scikit-learn's): stop when the squared centroid shift
   sum_j ||c_j(new) - c_j(old)||^2 <= tol * mean per-dimension variance of the data, or
   after max_iter iterations. tol = 0 runs until the centroids stop moving (assignments
   unchanged).
4. An empty cluster is moved onto the row farthest from its centroid.
5. Canonical numbering (`canonical_order`): the clusters are renumbered by size, largest
   first, ties by their smallest member id (without ids: smallest position in the
   canonical layout). A last pass assigns every row to the renumbered centroids; its
   inertia and cluster sizes are what is returned.

The same code runs in-process on a numpy array (`LocalBlocks`; no Ray needed), on
`VectorBlocks` (Ray tasks, scheduled where the blocks live) and on a Ray Dataset with a
vector column (converted to `VectorBlocks` first).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

CHUNK_ROWS = 2048  # rows per matmul: a 512-d float32 chunk is 4 MiB, it stays in cache for both products
BLOCK_ROWS = 16384  # mean rows per block of the canonical layout (32 MiB at 512-d)
_LAYOUT_HASH = b"raybias-layout"  # blake2b personalisation of the layout hash (fixed: changing it moves rows)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32
    inertia: float  # sum of squared distances of every row to its centroid
    n_iter: int  # Lloyd updates done
    sizes: np.ndarray  # [k] rows per cluster
    converged: bool  # stopped by tol before max_iter

    @property
    def k(self) -> int:
        return int(len(self.centroids))


# ---------------------------------------------------------------------------------------
# Per-block kernels (pure numpy: they run inside Ray tasks or in-process).

def block_stats(x: np.ndarray) -> dict:
    """Row count, per-dimension sum and sum of squares (float64), total squared norm."""
    x64 = x.astype(np.float64, copy=False) if x.dtype != np.float64 else x
    sums = np.zeros(x.shape[1], np.float64)
    sumsq = np.zeros(x.shape[1], np.float64)
    for start in range(0, len(x), CHUNK_ROWS * 4):
        part = np.asarray(x64[start:start + CHUNK_ROWS * 4], dtype=np.float64)
        sums += part.sum(axis=0)
        sumsq += np.einsum("ij,ij->j", part, part)
    return {"n": int(len(x)), "sum": sums, "sumsq": sumsq, "sq_total": float(sumsq.sum())}


def _scores(chunk: np.ndarray, centroids_t: np.ndarray, half_c_sq: np.ndarray) -> np.ndarray:
    """0.5 ||c||^2 - x.c for every row and centroid: argmin = nearest centroid, and
    ||x||^2 + 2 * score = squared distance."""
    scores = chunk @ centroids_t
    np.subtract(half_c_sq, scores, out=scores)
    return scores


def lloyd_partial(x: np.ndarray, centroids: np.ndarray, update: bool = True,
                  chunk_rows: int = CHUNK_ROWS) -> Tuple[Optional[np.ndarray], np.ndarray, float]:
    """One block's share of a Lloyd step: (sums [k, d] float64 or None, counts [k], sum of scores).

    The block's inertia is its total squared norm + 2 * the returned score sum.
    """
    k, d = centroids.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    c_t = np.ascontiguousarray(c.T)
    half_c_sq = 0.5 * np.einsum("ij,ij->i", c, c)
    sums = np.zeros((k, d), np.float64) if update else None
    counts = np.zeros(k, np.int64)
    score_total = 0.0
    onehot = np.zeros((min(chunk_rows, len(x)), k), np.float32) if update else None
    for start in range(0, len(x), chunk_rows):
        chunk = x[start:start + chunk_rows]
        m = len(chunk)
        scores = _scores(chunk, c_t, half_c_sq)
        labels = scores.argmin(axis=1)
        rows = np.arange(m)
        score_total += float(scores[rows, labels].sum(dtype=np.float64))
        counts += np.bincount(labels, minlength=k)
        if update:
            hot = onehot[:m]
            hot.fill(0.0)
            hot[rows, labels] = 1.0
            sums += hot.T @ chunk  # [k, d]: per-centroid sums by BLAS, chunk still in cache
    return sums, counts, score_total


def assign_block(x: np.ndarray, centroids: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Index of the nearest centroid of every row (int64)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    c_t = np.ascontiguousarray(c.T)
    half_c_sq = 0.5 * np.einsum("ij,ij->i", c, c)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk_rows):
        out[start:start + chunk_rows] = _scores(x[start:start + chunk_rows], c_t, half_c_sq).argmin(axis=1)
    return out


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances (clipped at 0), for small arrays on the driver."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d = np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * x @ c.T + np.einsum("ij,ij->i", c, c)[None, :]
    return np.maximum(d, 0.0)


def farthest_rows(x: np.ndarray, centroids: np.ndarray, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """The m rows farthest from their nearest centroid: (squared distances, rows)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    half_c_sq = 0.5 * np.einsum("ij,ij->i", c, c)
    best = np.empty(len(x), np.float64)
    for start in range(0, len(x), CHUNK_ROWS):
        chunk = x[start:start + CHUNK_ROWS]
        s = _scores(chunk, np.ascontiguousarray(c.T), half_c_sq).min(axis=1)
        best[start:start + CHUNK_ROWS] = np.einsum("ij,ij->i", chunk, chunk) + 2.0 * s
    m = min(m, len(x))
    top = np.argpartition(-best, m - 1)[:m] if m < len(x) else np.arange(len(x))
    return best[top], np.array(x[top], dtype=np.float32)


def take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.array(x[rows], dtype=np.float32)


def take_ids(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(ids)[rows]


def first_members(x: np.ndarray, ids: Optional[np.ndarray], offset: int,
                  centroids: np.ndarray) -> Tuple[np.ndarray, List[Any]]:
    """Per centroid: how many of this block's rows are nearest to it, and the smallest id among
    them (without ids: the smallest global position, offset + row; None when there are none)."""
    labels = assign_block(x, centroids)
    k = len(centroids)
    counts = np.bincount(labels, minlength=k)
    firsts: List[Any] = [None] * k
    if ids is None:
        found, first = np.unique(labels, return_index=True)
        for j, i in zip(found.tolist(), first.tolist()):
            firsts[j] = int(offset) + i
    else:
        for j in np.flatnonzero(counts).tolist():
            firsts[j] = min(ids[labels == j].tolist())
    return counts, firsts


# ---------------------------------------------------------------------------------------
# The canonical layout (pure numpy: the same code runs in Ray tasks and in-process).

def n_blocks(n: int, block_rows: int = BLOCK_ROWS) -> int:
    """Blocks of the canonical layout of n rows: ceil(n / block_rows), at least 1."""
    return max(1, -(-int(n) // max(1, int(block_rows))))


def _key_bytes(key) -> bytes:
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    return b"r" + str(key).encode("utf-8")


def key_hashes(x: np.ndarray, ids: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(hi, lo): the two uint64 halves of a 128-bit blake2b hash of every row's key, which is
    its id, or without ids the row's float32 bytes. A function of the row alone."""
    n = len(x) if ids is None else len(ids)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if ids is not None:
        keys = (_key_bytes(i) for i in ids)
    else:
        rows = np.ascontiguousarray(x, dtype=np.float32)
        width = rows.shape[1] * 4
        flat = memoryview(rows.reshape(-1)).cast("B")
        keys = (flat[i * width:(i + 1) * width] for i in range(n))
    digest = b"".join(hashlib.blake2b(k, digest_size=16, person=_LAYOUT_HASH).digest() for k in keys)
    h = np.frombuffer(digest, dtype="<u8").reshape(n, 2)
    return h[:, 0].astype(np.uint64), h[:, 1].astype(np.uint64)


def canonical_sort(x: np.ndarray, ids: Optional[np.ndarray], hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Row order within a canonical block: by key hash; rows with the same id (should ids
    repeat) by the hash of their bytes, so the order never depends on the input's."""
    order = np.lexsort((lo, hi))
    if ids is not None and len(order) > 1:
        hs, ls = hi[order], lo[order]
        if ((hs[1:] == hs[:-1]) & (ls[1:] == ls[:-1])).any():
            rhi, rlo = key_hashes(x)
            order = np.lexsort((rlo, rhi, lo, hi))
    return order


def split_for_layout(x: np.ndarray, ids: Optional[np.ndarray], n_out: int):
    """One input block -> its rows of each of the n_out canonical blocks, as (x, ids, hi, lo)
    pieces: a tuple of n_out pieces, or the piece itself when n_out == 1 (Ray's num_returns)."""
    x = np.asarray(x, dtype=np.float32)
    hi, lo = key_hashes(x, ids)
    bucket = (hi % np.uint64(n_out)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_out + 1))
    pieces = []
    for b in range(n_out):
        rows = order[bounds[b]:bounds[b + 1]]
        pieces.append((np.ascontiguousarray(x[rows]), None if ids is None else np.asarray(ids)[rows],
                       hi[rows], lo[rows]))
    return pieces[0] if n_out == 1 else tuple(pieces)


def merge_for_layout(dim: int, has_ids: bool, *pieces) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
    """The pieces of one canonical block, from any input blocks in any order -> (matrix, ids,
    stats), the rows in canonical order."""
    pieces = [p for p in pieces if len(p[0])]
    if not pieces:
        x = np.zeros((0, dim), np.float32)
        return x, (np.array([], dtype=object) if has_ids else None), block_stats(x)
    x = np.concatenate([p[0] for p in pieces])
    ids = np.concatenate([np.asarray(p[1], dtype=object) for p in pieces]) if has_ids else None
    hi = np.concatenate([p[2] for p in pieces])
    lo = np.concatenate([p[3] for p in pieces])
    order = canonical_sort(x, ids, hi, lo)
    x = np.ascontiguousarray(x[order])
    return x, (ids[order] if has_ids else None), block_stats(x)


def canonical_layout(x: np.ndarray, ids: Optional[np.ndarray] = None,
                     block_rows: int = BLOCK_ROWS) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The canonical layout of an in-memory array: [(block, its ids or None)], empty blocks left
    out. The same kernels as `VectorBlocks`' tasks, so the same blocks, row for row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_out = n_blocks(len(x), block_rows)
    pieces = split_for_layout(x, ids, n_out)
    out = []
    for piece in ([pieces] if n_out == 1 else pieces):
        bx, bids, _ = merge_for_layout(x.shape[1], ids is not None, piece)
        if len(bx):
            out.append((bx, bids))
    return out


# ---------------------------------------------------------------------------------------
# Where the blocks live.

class _Blocks(ABC):
    """Common driver-side logic; subclasses say how to run a kernel on every block.

    The blocks are in the canonical layout (see the module docstring): "block order" and a
    row's "global position" refer to it, not to the order the rows came in.
    """

    sizes: List[int]
    dim: int
    _stats: Optional[dict] = None

    @abstractmethod
    def map(self, fn: Callable, *args) -> list:
        """fn(block, *args) for every block, in block order."""

    @abstractmethod
    def map_each(self, fn: Callable, per_block: Sequence[tuple], blocks: Optional[Sequence[int]] = None) -> list:
        """fn(block_b, *per_block[i]) for the i-th of `blocks` (default: all), in that order."""

    @abstractmethod
    def map_with_ids(self, fn: Callable, *args) -> list:
        """fn(block, its ids or None, its global offset, *args) for every block, in block order."""

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    @property
    @abstractmethod
    def has_ids(self) -> bool:
        """Whether the rows came with ids (their keys; otherwise a row's key is its bytes)."""

    def __len__(self) -> int:
        return self.n

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def stats(self) -> dict:
        if self._stats is None:
            self._stats = _combine_stats(self.map(block_stats))
        return self._stats

    def mean_variance(self) -> float:
        """Mean over dimensions of the per-dimension variance (scales `tol`, as in scikit-learn)."""
        s = self.stats()
        if s["n"] == 0:
            return 0.0
        mean = s["sum"] / s["n"]
        return float(np.mean(np.maximum(s["sumsq"] / s["n"] - mean * mean, 0.0)))

    def _per_block_rows(self, rows: np.ndarray) -> List[np.ndarray]:
        off = self.offsets
        return [rows[(rows >= off[b]) & (rows < off[b + 1])] - off[b] for b in range(len(self.sizes))]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at these global positions (sorted ascending), gathered on the driver."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        parts = self._per_block_rows(rows)
        picked = [(b, r) for b, r in enumerate(parts) if len(r)]
        out = self.map_each(take_rows, [(r,) for _, r in picked], blocks=[b for b, _ in picked])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def sample_rows(self, m: int, seed: int) -> np.ndarray:
        """Global positions of a uniform sample of min(m, n) rows, deterministic by seed (and,
        the layout being canonical, the same rows whatever order the data came in)."""
        if m >= self.n:
            return np.arange(self.n, dtype=np.int64)
        return np.sort(np.random.default_rng(seed).choice(self.n, size=m, replace=False))

    def sample(self, m: int, seed: int) -> np.ndarray:
        return self.take(self.sample_rows(m, seed))

    def labels(self, centroids: np.ndarray) -> np.ndarray:
        """Cluster index of every row, in (canonical) block order (n ints on the driver)."""
        parts = self.map(assign_block, np.asarray(centroids, np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _combine_stats(parts: Sequence[dict]) -> dict:
    out = {"n": 0, "sum": 0.0, "sumsq": 0.0, "sq_total": 0.0}
    for p in parts:
        for key in out:
            out[key] = out[key] + p[key]
    return out


class LocalBlocks(_Blocks):
    """A numpy matrix in this process (for tests and small data), in the canonical layout.

    `ids` (one per row, e.g. image ids) are the rows' keys; without them a row's key is its
    bytes. `block_rows` is the layout's mean block size (default: `BLOCK_ROWS`, as `VectorBlocks`).
    """

    def __init__(self, x: np.ndarray, block_rows: Optional[int] = None, ids: Optional[Sequence] = None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array, not shape {x.shape}")
        if ids is not None:
            ids = np.asarray(ids, dtype=object)
            if len(ids) != len(x):
                raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        layout = canonical_layout(x, ids, block_rows or BLOCK_ROWS) or [(x, ids)]
        self._set(layout, int(x.shape[1]))

    @classmethod
    def wrap(cls, x: np.ndarray, ids: Optional[Sequence] = None) -> "LocalBlocks":
        """x as one block in its own row order: for rows already in canonical order (a sample)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self = cls.__new__(cls)
        self._set([(x, None if ids is None else np.asarray(ids, dtype=object))], int(x.shape[1]))
        return self

    def _set(self, layout: List[Tuple[np.ndarray, Optional[np.ndarray]]], dim: int) -> None:
        self.blocks = [b for b, _ in layout]
        self.ids = [i for _, i in layout]
        self.sizes = [len(b) for b in self.blocks]
        self.dim = dim
        self._stats = None

    @property
    def has_ids(self) -> bool:
        return all(i is not None for i in self.ids)

    def map(self, fn, *args) -> list:
        return [fn(b, *args) for b in self.blocks]

    def map_each(self, fn, per_block, blocks=None) -> list:
        idx = range(len(self.blocks)) if blocks is None else blocks
        return [fn(self.blocks[b], *args) for b, args in zip(idx, per_block)]

    def map_with_ids(self, fn, *args) -> list:
        return [fn(b, i, int(o), *args) for b, i, o in zip(self.blocks, self.ids, self.offsets)]

    def take_ids(self, rows: np.ndarray) -> np.ndarray:
        """Row ids at these global positions (sorted ascending)."""
        if any(i is None for i in self.ids):
            raise ValueError("these vectors were given without ids")
        parts = self._per_block_rows(np.sort(np.asarray(rows, dtype=np.int64)))
        out = [self.ids[b][r] for b, r in enumerate(parts) if len(r)]
        return np.concatenate(out) if out else np.array([], dtype=object)


_APPLY = None


def _remote(fn_name: str):
    """A one-CPU Ray task that runs kernel `fn` on a block (the remote function is made once)."""
    global _APPLY
    if _APPLY is None:
        import ray

        _APPLY = ray.remote(num_cpus=1)(_apply)
    return _APPLY.options(name=f"kmeans.{fn_name}")


def _apply(fn, block, *args):
    return fn(block, *args)


def _shape(x: np.ndarray) -> dict:
    return {"n": int(len(x)), "dim": int(x.shape[1]) if x.ndim == 2 else 0}


def _to_vectors(block, span, column: str, id_column: Optional[str]):
    """A Ray Data block (or the slice of one a bundle refers to) -> (matrix, ids, shape)."""
    from ray.data.block import BlockAccessor

    from raybias.embed.vectors import column_to_matrix

    table = BlockAccessor.for_block(block).to_arrow()
    if span is not None:
        table = table.slice(span[0], span[1] - span[0])
    x = column_to_matrix(table.column(column))
    ids = np.asarray(table.column(id_column).to_pylist(), dtype=object) if id_column else None
    return x, ids, _shape(x)


def _split_vectors(block, span, column: str, id_column: Optional[str], key_column: str, keys: Sequence[int]):
    """A Ray Data block -> per key: matrix, ids, shape (3 * len(keys) return values, key-major)."""
    from ray.data.block import BlockAccessor

    from raybias.embed.vectors import column_to_matrix

    table = BlockAccessor.for_block(block).to_arrow()
    if span is not None:
        table = table.slice(span[0], span[1] - span[0])
    x = column_to_matrix(table.column(column))
    key = table.column(key_column).to_numpy()
    ids = np.asarray(table.column(id_column).to_pylist(), dtype=object) if id_column else None
    out = []
    for k in keys:
        rows = np.flatnonzero(key == k)
        part = np.ascontiguousarray(x[rows]) if len(rows) else np.zeros((0, x.shape[1]), np.float32)
        out += [part, ids[rows] if ids is not None else None, _shape(part)]
    return tuple(out)


def _block_spans(ds) -> Iterator[Tuple[Any, Optional[Tuple[int, int]]]]:
    """(block ref, row span or None) of every block of `ds`, executing it as a stream."""
    for bundle in ds.iter_internal_ref_bundles():
        slices = getattr(bundle, "slices", None) or [None] * len(bundle.block_refs)
        for block_ref, piece in zip(bundle.block_refs, slices):
            yield block_ref, (None if piece is None else (int(piece.start_offset), int(piece.end_offset)))


class VectorBlocks(_Blocks):
    """float32 matrices in Ray's object store (one per block), optionally with their row ids,
    in the canonical layout.

    Built once from a Ray Dataset (`from_dataset`, `split_dataset`) or a numpy array
    (`from_array`); every K-means pass then runs one task per block where the block lives and
    returns only k x d numbers, so the driver never holds the vectors.
    """

    def __init__(self, refs: list, sizes: Sequence[int], dim: int, id_refs: Optional[list] = None,
                 stats: Optional[dict] = None):
        self.refs = list(refs)
        self.sizes = [int(s) for s in sizes]
        self.dim = int(dim)
        self.id_refs = list(id_refs) if id_refs is not None else None
        self._stats = stats

    @property
    def has_ids(self) -> bool:
        return self.id_refs is not None

    @classmethod
    def from_dataset(cls, ds, column: str = "vector", id_column: Optional[str] = None,
                     block_rows: int = BLOCK_ROWS) -> "VectorBlocks":
        """Execute `ds` (streaming), convert each of its blocks into a matrix, lay them out canonically."""
        import ray

        convert = ray.remote(num_cpus=1, num_returns=3)(_to_vectors).options(name="kmeans.to_vectors")
        refs, id_refs, shape_refs = [], [], []
        for block_ref, span in _block_spans(ds):
            x_ref, ids_ref, shape_ref = convert.remote(block_ref, span, column, id_column)
            refs.append(x_ref)
            id_refs.append(ids_ref)
            shape_refs.append(shape_ref)
        return cls._layout(refs, id_refs if id_column else None, ray.get(shape_refs), block_rows)

    @classmethod
    def split_dataset(cls, ds, key_column: str, keys: Sequence[int], column: str = "vector",
                      id_column: Optional[str] = None, block_rows: int = BLOCK_ROWS) -> Dict[int, "VectorBlocks"]:
        """One pass over `ds`: the rows of each key (e.g. each group) as their own VectorBlocks."""
        import ray

        keys = [int(k) for k in keys]
        if not keys:
            return {}
        split = ray.remote(num_cpus=1, num_returns=3 * len(keys))(_split_vectors).options(name="kmeans.split")
        per_key: Dict[int, Tuple[list, list, list]] = {k: ([], [], []) for k in keys}
        for block_ref, span in _block_spans(ds):
            out = split.remote(block_ref, span, column, id_column, key_column, keys)
            for i, k in enumerate(keys):
                per_key[k][0].append(out[3 * i])
                per_key[k][1].append(out[3 * i + 1])
                per_key[k][2].append(out[3 * i + 2])
        result = {}
        for k in keys:
            # One key at a time, dropping its pieces as soon as they are laid out: the extra
            # copy in the object store is one key's vectors at most.
            refs, id_refs, shape_refs = per_key.pop(k)
            result[k] = cls._layout(refs, id_refs if id_column else None, ray.get(shape_refs), block_rows)
            del refs, id_refs, shape_refs
        return result

    @classmethod
    def _layout(cls, refs: list, id_refs: Optional[list], shapes: List[dict], block_rows: int) -> "VectorBlocks":
        """Blocks of any size in any order -> the canonical layout: one task per input block
        cuts it into the canonical blocks' pieces, one task per canonical block sorts its pieces.
        Empties `refs` and `id_refs`, so that each input block is freed once it is cut."""
        import ray

        keep = [i for i, s in enumerate(shapes) if s["n"] > 0]
        dim = max([s["dim"] for s in shapes] + [0])
        has_ids = id_refs is not None
        n = sum(shapes[i]["n"] for i in keep)
        if n == 0:
            return cls([], [], dim, [] if has_ids else None, None)
        n_out = n_blocks(n, block_rows)
        split = ray.remote(num_cpus=1, num_returns=n_out)(split_for_layout).options(name="kmeans.layout_split")
        merge = ray.remote(num_cpus=1, num_returns=3)(merge_for_layout).options(name="kmeans.layout_merge")
        pieces = []
        for i in keep:
            out = split.remote(refs[i], id_refs[i] if has_ids else None, n_out)
            pieces.append([out] if n_out == 1 else list(out))
        refs.clear()  # the split tasks hold their input blocks until they have cut them
        if has_ids:
            id_refs.clear()
        merged = [merge.remote(dim, has_ids, *[p[b] for p in pieces]) for b in range(n_out)]
        del pieces, out
        stats = ray.get([m[2] for m in merged])
        full = [b for b, s in enumerate(stats) if s["n"] > 0]
        return cls([merged[b][0] for b in full], [stats[b]["n"] for b in full], dim,
                   [merged[b][1] for b in full] if has_ids else None, _combine_stats([stats[b] for b in full]))

    @classmethod
    def from_array(cls, x: np.ndarray, block_rows: int = BLOCK_ROWS, ids: Optional[Sequence] = None) -> "VectorBlocks":
        """An in-memory array (and its row ids) -> the canonical layout, put in the object store."""
        import ray

        x = np.ascontiguousarray(x, dtype=np.float32)
        if ids is not None:
            ids = np.asarray(ids, dtype=object)
            if len(ids) != len(x):
                raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        layout = canonical_layout(x, ids, block_rows)
        refs = [ray.put(b) for b, _ in layout]
        id_refs = [ray.put(i) for _, i in layout] if ids is not None else None
        return cls(refs, [len(b) for b, _ in layout], x.shape[1], id_refs)

    def map(self, fn, *args) -> list:
        import ray

        task = _remote(fn.__name__)
        return ray.get([task.remote(fn, ref, *args) for ref in self.refs])

    def map_each(self, fn, per_block, blocks=None) -> list:
        import ray

        task = _remote(fn.__name__)
        idx = range(len(self.refs)) if blocks is None else blocks
        return ray.get([task.remote(fn, self.refs[b], *args) for b, args in zip(idx, per_block)])

    def map_with_ids(self, fn, *args) -> list:
        import ray

        task = _remote(fn.__name__)
        ids = self.id_refs if self.id_refs is not None else [None] * len(self.refs)
        return ray.get([task.remote(fn, ref, i, int(o), *args) for ref, i, o in zip(self.refs, ids, self.offsets)])

    def take_ids(self, rows: np.ndarray) -> np.ndarray:
        """Row ids at these global positions (sorted ascending)."""
        import ray

        if self.id_refs is None:
            raise ValueError("these vectors were loaded without ids")
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        parts = self._per_block_rows(rows)
        task = _remote("take_ids")
        out = ray.get([task.remote(take_ids, self.id_refs[b], r) for b, r in enumerate(parts) if len(r)])
        return np.concatenate(out) if out else np.array([], dtype=object)

    def iter_labels(self, centroids: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(ids, cluster labels) block by block: the driver holds one block's ids at a time."""
        import ray

        if self.id_refs is None:
            raise ValueError("these vectors were loaded without ids")
        task = _remote("assign_block")
        c = np.asarray(centroids, np.float32)
        label_refs = [task.remote(assign_block, ref, c) for ref in self.refs]
        for id_ref, label_ref in zip(self.id_refs, label_refs):
            yield ray.get(id_ref), ray.get(label_ref)


def as_blocks(data, column: str = "vector") -> _Blocks:
    """numpy [n, d] -> LocalBlocks; VectorBlocks/LocalBlocks as they are; a Ray Dataset -> VectorBlocks."""
    if isinstance(data, _Blocks):
        return data
    if isinstance(data, np.ndarray):
        return LocalBlocks(data)
    if hasattr(data, "iter_internal_ref_bundles"):
        return VectorBlocks.from_dataset(data, column=column)
    raise TypeError(f"cannot cluster a {type(data).__name__}: pass a numpy array, VectorBlocks or a Ray Dataset")


# ---------------------------------------------------------------------------------------
# The algorithm.

def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding on a (small) in-memory array: k rows of x, float32."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if k > n:
        raise ValueError(f"cannot pick {k} centroids from {n} rows")
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), np.float64)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = squared_distances(x, centers[:1])[:, 0]
    for j in range(1, k):
        potential = closest.sum()
        if potential <= 0:
            # Every row sits on a centre already: any other row will do.
            centers[j] = x[int(rng.integers(n))]
            continue
        cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * potential)
        cand = np.minimum(cand, n - 1)
        dist = np.minimum(closest[None, :], squared_distances(x, x[cand]).T)
        best = int(np.argmin(dist.sum(axis=1)))
        centers[j] = x[cand[best]]
        closest = dist[best]
    return centers.astype(np.float32)


def canonical_order(blocks: _Blocks, centroids: np.ndarray) -> np.ndarray:
    """The canonical numbering of the clusters of these centroids: order[i] is the cluster that
    becomes cluster i. Largest cluster first; equal sizes by their smallest member id (without
    ids, the smallest global position); clusters with no rows last, in their old order."""
    c = np.asarray(centroids, dtype=np.float32)
    k = len(c)
    parts = blocks.map_with_ids(first_members, c)
    counts = np.sum([p[0] for p in parts], axis=0) if parts else np.zeros(k, np.int64)
    firsts: List[Any] = [None] * k
    for _, block_firsts in parts:
        for j, v in enumerate(block_firsts):
            if v is not None and (firsts[j] is None or v < firsts[j]):
                firsts[j] = v

    def rank(j: int):
        return (-int(counts[j]), 0, firsts[j]) if firsts[j] is not None else (0, 1, j)

    return np.array(sorted(range(k), key=rank), dtype=np.int64)


def lloyd(blocks: _Blocks, centroids: np.ndarray, max_iter: int, tol_abs: float,
          progress: Optional[Any] = None, canonical: bool = False) -> KMeansResult:
    """Lloyd iterations from `centroids` until the squared shift <= tol_abs or max_iter, then
    (canonical) the clusters renumbered by `canonical_order`, then a last assignment pass."""
    stats = blocks.stats()
    c = np.array(centroids, dtype=np.float32)
    k = len(c)
    converged = False
    n_iter = 0
    for _ in range(max_iter):
        parts = blocks.map(lloyd_partial, c, True)
        sums = np.sum([p[0] for p in parts], axis=0)
        counts = np.sum([p[1] for p in parts], axis=0)
        new = c.copy()
        filled = counts > 0
        new[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        if not filled.all():
            new[~filled] = _relocate(blocks, c, int((~filled).sum()))
        shift = float(np.sum((new.astype(np.float64) - c.astype(np.float64)) ** 2))
        c = new
        n_iter += 1
        if progress is not None:
            progress.update(1)
        if shift <= tol_abs:
            converged = True
            break
    if canonical:
        c = np.ascontiguousarray(c[canonical_order(blocks, c)])
    # Sizes and inertia from the final (renumbered) centroids: the same kernel labels the rows later.
    parts = blocks.map(lloyd_partial, c, False)
    counts = np.sum([p[1] for p in parts], axis=0).astype(np.int64)
    inertia = max(0.0, stats["sq_total"] + 2.0 * sum(p[2] for p in parts))
    return KMeansResult(centroids=c, inertia=float(inertia), n_iter=n_iter, sizes=counts.reshape(k),
                        converged=converged)


def _relocate(blocks: _Blocks, centroids: np.ndarray, m: int) -> np.ndarray:
    """m rows farthest from their centroid, farthest first (new homes for empty clusters)."""
    parts = blocks.map(farthest_rows, centroids, m)
    dist = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    order = np.argsort(-dist, kind="stable")[:m]
    return rows[order]


def initial_centroids(blocks: _Blocks, k: int, seed: int = 0, sample_size: int = 10000, n_init: int = 1,
                      max_iter: int = 50, tol: float = 1e-4, sample: Optional[np.ndarray] = None) -> np.ndarray:
    """k-means++ on a sample; with n_init > 1 the seeding whose Lloyd-on-the-sample inertia is lowest."""
    if sample is None:
        sample = blocks.sample(sample_size, seed)
    if n_init <= 1:
        return kmeans_plusplus(sample, k, np.random.default_rng(seed))
    local = LocalBlocks.wrap(sample)  # the sample is in canonical order already
    tol_abs = tol * local.mean_variance()
    best = None
    for trial in range(n_init):
        start = kmeans_plusplus(sample, k, np.random.default_rng([seed, trial]))
        fit = lloyd(local, start, max_iter, tol_abs)
        if best is None or fit.inertia < best.inertia:
            best = fit
    return best.centroids


def kmeans_dataset(data, k: int, init_centroids: Optional[np.ndarray] = None, max_iter: int = 50,
                   tol: float = 1e-4, seed: int = 0, sample_size: int = 10000, n_init: int = 1,
                   column: str = "vector", progress: bool = False,
                   sample: Optional[np.ndarray] = None) -> KMeansResult:
    """K-means of `data` (numpy [n, d], VectorBlocks, LocalBlocks, or a Ray Dataset whose
    `column` holds the vectors) into k clusters, numbered canonically (`canonical_order`).
    See the module docstring for the method; the result depends on the rows and the seed,
    not on their order (a numpy array or a Dataset without ids: rows are keyed by their bytes)."""
    blocks = as_blocks(data, column)
    n = blocks.n
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} clusters needs 1 <= k <= the number of rows ({n})")
    if init_centroids is None:
        start = initial_centroids(blocks, k, seed, sample_size, n_init, max_iter, tol, sample=sample)
    else:
        start = np.asarray(init_centroids, dtype=np.float32)
        if start.shape != (k, blocks.dim):
            raise ValueError(f"init_centroids has shape {start.shape}; expected ({k}, {blocks.dim})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=f"k-means k={k}", leave=False, unit="iter")
    try:
        return lloyd(blocks, start, max_iter, tol * blocks.mean_variance(), bar, canonical=True)
    finally:
        if bar is not None:
            bar.close()


def _assign_batch(batch, centroids: np.ndarray, column: str, out_column: str):
    from raybias.embed.vectors import column_to_matrix

    labels = assign_block(column_to_matrix(batch.column(column)), centroids)
    return batch.append_column(out_column, pa.array(labels, type=pa.int64()))


def assign(data, centroids: np.ndarray, column: str = "vector", out_column: str = "cluster"):
    """Nearest centroid of every row.

    numpy array -> labels [n]; LocalBlocks/VectorBlocks -> labels in (canonical) block order;
    a Ray Dataset -> the same Dataset (lazy) with an int64 `out_column` added.
    """
    c = np.asarray(centroids, dtype=np.float32)
    if isinstance(data, np.ndarray):
        return assign_block(np.ascontiguousarray(data, dtype=np.float32), c)
    if isinstance(data, _Blocks):
        return data.labels(c)
    if hasattr(data, "map_batches"):
        return data.map_batches(_assign_batch, fn_kwargs={"centroids": c, "column": column, "out_column": out_column},
                                batch_format="pyarrow")
    raise TypeError(f"cannot assign a {type(data).__name__}: pass a numpy array, VectorBlocks or a Ray Dataset")
