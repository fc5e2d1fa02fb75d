"""A few rows of the run's tables, drawn and read without loading the rest: what the report's
sample grids and the synthetic-set diagnostics look at.

Rows are drawn from the id/group columns alone (`choose_rows`: seeded, by id, the same
whatever the shard order), and then only the drawn rows' values are read (`read_rows`:
the row groups holding them, a batch at a time), so the cost is the sample's, not the set's.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from raybias.layout import REAL, scores_path, shard_path
from raybias.rundir import RunDir


def choose_rows(meta: pd.DataFrame, n_groups: int, per_group: int, seed: int = 0,
                name: str = "") -> Dict[int, pd.DataFrame]:
    """group -> up to `per_group` rows of `meta`, drawn without replacement, ordered by id.

    Deterministic: the draw for (set `name`, group) depends on the seed, the name, the group
    and that group's ids only, not on the other sets or on shard order.
    """
    out = {}
    for g in range(n_groups):
        rows = meta[meta["group"] == g].sort_values("id", kind="stable")
        if rows.empty:
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), g])
        idx = np.sort(rng.choice(len(rows), size=min(per_group, len(rows)), replace=False))
        out[g] = rows.iloc[idx][["id", "file", "row"]].reset_index(drop=True)
    return out


def shard_meta(run: RunDir, files: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """`columns` of every file (no images), plus `file` (index into `files`) and `row` (row number)."""
    parts = []
    for i, rel in enumerate(files):
        df = pq.read_table(run.path(rel), columns=list(columns), filesystem=run.fs).to_pandas()
        df["file"] = i
        df["row"] = np.arange(len(df))
        parts.append(df)
    if not parts:
        return pd.DataFrame({c: [] for c in [*columns, "file", "row"]})
    return pd.concat(parts, ignore_index=True)


def real_train_meta(run: RunDir) -> Tuple[List[str], pd.DataFrame]:
    """(files, metadata) of the real training images (data/real, split train)."""
    from raybias.data.io import require_table

    require_table(run, REAL, "prepare")
    files = [f"{REAL}/{n}" for n in run.listdir(REAL) if n.endswith(".parquet")]
    meta = shard_meta(run, files, ["id", "group", "split"])
    return files, meta[meta["split"] == "train"].drop(columns=["split"]).reset_index(drop=True)


def synthetic_meta(run: RunDir, generator: str) -> Tuple[List[str], pd.DataFrame]:
    """(files, metadata) of a generator's finished shards, only the rows the filter kept (if it ran)."""
    from raybias.data.synthetic import finished_units

    files = [shard_path(generator, u) for u in finished_units(run, generator)]
    meta = shard_meta(run, files, ["id", "group"])
    scores = scores_path(generator)
    if run.exists(scores):
        s = pq.read_table(run.path(scores), columns=["id", "keep"], filesystem=run.fs).to_pandas()
        meta = meta.merge(s[s["keep"]][["id"]], on="id", how="inner")
    return files, meta


def read_rows(run: RunDir, rel: str, rows: Sequence[int], column: str = "image", batch_size: int = 32) -> list:
    """The values of `column` at row numbers `rows` of one Parquet file, in the order of `rows`.

    Only the row groups holding a wanted row are read, streamed `batch_size` rows at a time
    through a small buffer (not whole column chunks), and a row group is left as soon as its
    last wanted row is read: memory stays at a batch, however large the file.
    """
    wanted = sorted({int(r) for r in rows})
    got: Dict[int, object] = {}
    with run.fs.open_input_file(run.path(rel)) as f:
        pf = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        start = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            mine = [r for r in wanted if start <= r < start + n]
            offset = start
            if mine:
                for batch in pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=[column]):
                    hit = [r - offset for r in mine if offset <= r < offset + batch.num_rows]
                    if hit:
                        got.update(zip((h + offset for h in hit), batch.column(0).take(hit).to_pylist()))
                    offset += batch.num_rows
                    if offset > mine[-1]:
                        break
            start += n
    missing = [r for r in wanted if r not in got]
    if missing:
        raise IndexError(f"{run.path(rel)} has no row {missing[0]}")
    return [got[int(r)] for r in rows]
