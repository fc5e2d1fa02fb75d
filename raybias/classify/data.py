"""Training data for the classifier loop.

On the driver, each data set the loop uses ("train", "val", "test", and "stage1" for
two-stage training) is described by its metadata (id, y, a, group, source: no images,
one row per example, the row number is the example's index everywhere) and the Parquet
files holding its images. Workers get images one of two ways:

- in memory (`train.in_memory`, small data): each worker reads the files once and decodes
  the set into a uint8 tensor;
- streaming: the driver hands Ray Train a Ray Dataset per training set (Parquet -> decode in
  Ray Data tasks); workers iterate their split, `ray.train.get_dataset_shard(name)`, and read
  evaluation sets from Parquet batch by batch. Sampling is the same in both paths:
  an epoch is a seeded draw of row indices (a permutation, weighted with replacement, or an
  exact multiplicity per row, shuffled);
  the streaming path repeats each streamed row as often as the draw picked it and shuffles
  through a seeded buffer.

Augmentation (random crop from a zero-padded image, brightness scaling) keeps colours,
the bias attribute of colored digits, and is driven by a seeded torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

META_COLUMNS = ["id", "y", "a", "group", "source"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, phase, epoch, stream, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# --- driver side: what each data set is ---------------------------------------------------

@dataclass
class DataSet:
    """Metadata of one data set and where its images are.

    `split`: the value of the `split` column the images are selected by in `files`
    (None: every row of the files whose id is in `meta`).
    """

    meta: pd.DataFrame
    files: List[str]  # run-relative Parquet paths
    split: Optional[str] = None

    def __len__(self) -> int:
        return len(self.meta)


def real_sets(run) -> Dict[str, DataSet]:
    """train/val/test metadata of the prepared real data (data/real)."""
    from raybias.data.io import read_table
    from raybias.layout import REAL

    table = read_table(run, REAL, columns=META_COLUMNS + ["split"], stage="prepare")
    files = [f"{REAL}/{n}" for n in run.listdir(REAL) if n.endswith(".parquet")]
    out = {}
    for split in ("train", "val", "test"):
        part = table[table["split"] == split][META_COLUMNS].reset_index(drop=True)
        out[split] = DataSet(part, files, split)
    return out


def synthetic_set(run, generator_name: str) -> DataSet:
    """The generator's (filtered) synthetic set, as written by the generate/filter stages."""
    from raybias.data.synthetic import finished_units, read_synthetic
    from raybias.layout import shard_path

    meta = read_synthetic(run, generator_name, filtered=True, columns=META_COLUMNS)
    files = [shard_path(generator_name, u) for u in finished_units(run, generator_name)]
    return DataSet(meta[META_COLUMNS].reset_index(drop=True), files, None)


def mix_real_into(synthetic: DataSet, real_train: DataSet, ratio: float, seed: int) -> DataSet:
    """Stage-1 set: synthetic rows plus real training rows making up a fraction `ratio`.

    ratio 0: synthetic only; 1: real only. Otherwise n_real = ratio / (1 - ratio) * n_syn real
    rows drawn without replacement (seeded); if the real set is too small, the synthetic
    part is subsampled instead so that the fraction holds.
    """
    rng = np.random.default_rng(derive_seed(seed, 101))
    syn, real = synthetic.meta, real_train.meta
    if ratio <= 0:
        meta = syn
    elif ratio >= 1:
        meta = real
    else:
        n_real = int(round(ratio / (1 - ratio) * len(syn)))
        n_syn = len(syn)
        if n_real > len(real):
            n_real = len(real)
            n_syn = int(round(n_real * (1 - ratio) / ratio))
        syn_rows = np.sort(rng.choice(len(syn), size=n_syn, replace=False))
        real_rows = np.sort(rng.choice(len(real), size=n_real, replace=False))
        meta = pd.concat([syn.iloc[syn_rows], real.iloc[real_rows]], ignore_index=True)
    meta = meta.sort_values("id", kind="stable").reset_index(drop=True)
    files = (list(synthetic.files) if ratio < 1 else []) + (list(real_train.files) if ratio > 0 else [])
    # rows are selected by id (the real files also hold val/test rows, never in `meta`)
    return DataSet(meta, files, None)


def _decode_rows(batch, split: Optional[str], size: int):
    """Ray Data UDF: pyarrow batch (id, image, split) -> {id, image uint8 N x 3 x H x W}."""
    from raybias.data.images import decode

    ids = batch.column("id").to_pylist()
    images = batch.column("image").to_pylist()
    if split is not None and "split" in batch.column_names:
        keep = [s == split for s in batch.column("split").to_pylist()]
        ids = [i for i, k in zip(ids, keep) if k]
        images = [b for b, k in zip(images, keep) if k]
    if not ids:
        return {"id": np.array([], dtype=object), "image": np.zeros((0, 3, size, size), np.uint8)}
    arr = np.stack([decode(b, size, where=i) for i, b in zip(ids, images)]).transpose(0, 3, 1, 2)
    return {"id": np.array(ids, dtype=object), "image": np.ascontiguousarray(arr)}


def _settle_fsspec_http() -> None:
    """Ray Data resolves paths in threads, each trying `fsspec.implementations.http`; without
    aiohttp that import fails, and racing threads can see the half-imported module (ImportError
    instead of ModuleNotFoundError, which Ray expects). Fail it once, for good, here."""
    import sys

    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules["fsspec.implementations.http"] = None  # later imports: ModuleNotFoundError


def stream_dataset(run, ds: DataSet, size: int):
    """A Ray Dataset streaming `ds`'s rows as {id, image (uint8 3 x H x W)}.

    Rows of the files not in `ds.meta` (e.g. synthetic rows the filter dropped) are
    skipped by the worker, which maps ids to rows.
    """
    import ray

    _settle_fsspec_http()
    paths = [run.path(f) for f in ds.files]
    cols = ["id", "image", "split"]
    data = ray.data.read_parquet(paths, filesystem=run.fs, columns=cols)
    return data.map_batches(_decode_rows, fn_kwargs={"split": ds.split, "size": size},
                            batch_format="pyarrow", batch_size=256)


# --- worker side --------------------------------------------------------------------------

def load_images(run, ds: DataSet, size: int, cache: Optional[Dict[str, pd.DataFrame]] = None) -> torch.Tensor:
    """Decode every image of `ds` (in row order) into a uint8 N x 3 x H x W tensor."""
    import pyarrow.parquet as pq

    from raybias.data.images import decode
    from raybias.data.schema import SchemaError

    cache = {} if cache is None else cache
    wanted = set(ds.meta["id"])
    found: Dict[str, bytes] = {}
    for f in ds.files:
        if f not in cache:
            t = pq.read_table(run.path(f), columns=["id", "image"], filesystem=run.fs)
            cache[f] = dict(zip(t.column("id").to_pylist(), t.column("image").to_pylist()))
        for i, b in cache[f].items():
            if i in wanted:
                found[i] = b
    missing = [i for i in ds.meta["id"] if i not in found]
    if missing:
        raise SchemaError(f"{len(missing)} example(s) have no image in {', '.join(ds.files[:3])}"
                          f"{'…' if len(ds.files) > 3 else ''} (e.g. id {missing[0]!r})")
    out = np.empty((len(ds.meta), 3, size, size), dtype=np.uint8)
    for r, i in enumerate(ds.meta["id"]):
        out[r] = decode(found[i], size, where=str(i)).transpose(2, 0, 1)
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Multiplicity:
    """An exact epoch: row i appears `counts[i]` times, in a seeded random order (JTT's
    upweighted set). A method returns `(Multiplicity(counts), counts.sum())` from
    `sample_weights` where others return (weights, epoch size) for a draw with replacement."""

    counts: np.ndarray

    @property
    def size(self) -> int:
        return int(np.asarray(self.counts, dtype=np.int64).sum())


def epoch_draw(n: int, weights, size: Optional[int], gen: torch.Generator) -> torch.Tensor:
    """The epoch's row indices: a permutation of n rows; `size` rows drawn with replacement
    with probability proportional to `weights`; or, when `weights` is a `Multiplicity`, every
    row exactly counts[i] times, shuffled."""
    if weights is None:
        return torch.randperm(n, generator=gen)
    if isinstance(weights, Multiplicity):
        counts = torch.as_tensor(np.asarray(weights.counts, dtype=np.int64))
        if len(counts) != n or bool((counts < 0).any()):
            raise ValueError(f"Multiplicity: {len(counts)} non-negative counts needed for {n} rows")
        rows = torch.repeat_interleave(torch.arange(n), counts)
        return rows[torch.randperm(len(rows), generator=gen)]
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    return torch.multinomial(w / w.sum(), int(size if size is not None else n), replacement=True, generator=gen)


@dataclass
class Batch:
    rows: torch.Tensor  # row indices into the data set
    images: torch.Tensor  # uint8 B x 3 x H x W


class InMemorySet:
    """A data set decoded once per worker."""

    def __init__(self, meta: pd.DataFrame, images: torch.Tensor):
        self.meta = meta
        self.images = images

    def __len__(self) -> int:
        return len(self.meta)

    def train_batches(self, order: torch.Tensor, batch_size: int, gen: torch.Generator,
                      rank: int, world: int) -> Iterator[Batch]:
        per_rank = len(order) // world
        mine = order[rank::world][:per_rank]  # equal length on every rank (DDP steps in lockstep)
        for i in range(0, per_rank, batch_size):
            idx = mine[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two examples
                break
            yield Batch(idx, self.images[idx])

    def eval_batches(self, batch_size: int, rank: int, world: int) -> Iterator[Batch]:
        rows = torch.arange(len(self.meta))[rank::world]
        for i in range(0, len(rows), batch_size):
            idx = rows[i:i + batch_size]
            yield Batch(idx, self.images[idx])


class ParquetRows:
    """Every row of a data set, read from its Parquet files in bounded batches and decoded
    in this process (evaluation and predictions; ranks divide the rows by row number).

    Read directly with pyarrow rather than through a second Ray Data execution: a worker
    that runs one while the trainer's split is streaming can wait forever for CPUs that the
    other execution holds on a small cluster.
    """

    def __init__(self, run_spec: str, ds: DataSet, size: int):
        self.run_spec = run_spec
        self.ds = ds
        self.size = size

    def batches(self, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from raybias.rundir import RunDir

        run = RunDir(self.run_spec)
        for f in self.ds.files:
            with run.fs.open_input_file(run.path(f)) as fh:
                pf = pq.ParquetFile(fh)
                cols = [c for c in ("id", "image", "split") if c in pf.schema_arrow.names]
                for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
                    out = _decode_rows(pa.Table.from_batches([rb]), self.ds.split, self.size)
                    if len(out["id"]):
                        yield out


class StreamSet:
    """A data set streamed from Parquet: training batches through Ray Data (`train_iter`,
    this worker's split of `ray.train.get_dataset_shard`), evaluation through `ParquetRows`."""

    READ_BATCH = 1024  # rows per hand-off from Ray Data: fewer, larger batches cost less per row

    def __init__(self, meta: pd.DataFrame, train_iter, rows: ParquetRows):
        self.meta = meta
        self.train_iter = train_iter
        self.rows = rows
        self.row_of = {i: r for r, i in enumerate(meta["id"])}

    def __len__(self) -> int:
        return len(self.meta)

    def _rows(self, ids) -> np.ndarray:
        get = self.row_of.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def train_batches(self, order: torch.Tensor, batch_size: int, gen: torch.Generator,
                      rank: int, world: int) -> Iterator[Batch]:
        counts = np.bincount(order.numpy(), minlength=len(self.meta))
        buffer_size = max(2048, 8 * batch_size)
        buf_rows: List[np.ndarray] = []
        buf_imgs: List[np.ndarray] = []
        held = 0

        def flush(final: bool):
            nonlocal buf_rows, buf_imgs, held
            rows = np.concatenate(buf_rows)
            imgs = np.concatenate(buf_imgs)
            perm = torch.randperm(len(rows), generator=gen).numpy()
            rows, imgs = rows[perm], imgs[perm]
            n_full = len(rows) // batch_size * batch_size
            end = len(rows) if final else n_full
            for i in range(0, end, batch_size):
                if end - i < 2:
                    break
                yield Batch(torch.from_numpy(rows[i:i + batch_size].copy()),
                            torch.from_numpy(imgs[i:i + batch_size].copy()))
            buf_rows, buf_imgs = ([rows[n_full:]], [imgs[n_full:]]) if not final else ([], [])
            held = len(rows) - n_full if not final else 0

        # each streamed row is repeated as often as the epoch's draw picked it
        for b in self.train_iter.iter_batches(batch_size=self.READ_BATCH, batch_format="numpy",
                                               prefetch_batches=2):
            rows = self._rows(b["id"])
            c = np.where(rows >= 0, counts[np.maximum(rows, 0)], 0)
            if not c.any():
                continue
            pick = np.repeat(np.arange(len(rows)), c)
            buf_rows.append(rows[pick])
            buf_imgs.append(b["image"][pick])
            held += len(pick)
            if held >= buffer_size:
                yield from flush(final=False)
        if held:
            yield from flush(final=True)

    def eval_batches(self, batch_size: int, rank: int, world: int) -> Iterator[Batch]:
        for b in self.rows.batches(batch_size):
            rows = self._rows(b["id"])
            keep = (rows >= 0) & (rows % world == rank)
            if keep.any():
                yield Batch(torch.from_numpy(rows[keep]), torch.from_numpy(np.ascontiguousarray(b["image"][keep])))


def augment(x: torch.Tensor, gen: torch.Generator, brightness: float = 0.1, pad_fraction: float = 1 / 16) -> torch.Tensor:
    """Random crop of the image zero-padded by size * pad_fraction (at least 1 px), then
    brightness scaled by U(1-b, 1+b).

    Both keep every pixel's hue, so the colour (the bias attribute) is untouched. `x` is
    float B x 3 x H x W in [0, 1]; the draws come from `gen` (CPU), so runs repeat exactly.
    """
    b, _, h, w = x.shape
    p = max(1, int(round(h * pad_fraction)))
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    factor = 1.0 + brightness * (2 * torch.rand(b, generator=gen) - 1)
    dev = x.device
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(dev)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(dev)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
    out = out.permute(0, 3, 1, 2) * factor.to(dev).view(b, 1, 1, 1)
    return out.clamp(0, 1).contiguous()
