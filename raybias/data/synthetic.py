"""How a generator's synthetic set is read (where it lives: `raybias.layout`).

synthetic/<generator>/plan.json              the generation plan (counts, models, unit table)
synthetic/<generator>/shards/unit-NNNNN.parquet   one finished work unit each (schema + seed,
                                             prompt, cluster, generator); written under a
                                             temporary name and renamed when whole
synthetic/<generator>/scores.parquet         filter output: id, score, keep
"""

from __future__ import annotations

from typing import List

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raybias.data.io import TableMissing
from raybias.layout import scores_path, shard_path, shards_dir, unit_of
from raybias.rundir import RunDir


def finished_units(run: RunDir, generator: str) -> List[int]:
    """Units whose shard was renamed into place (temporary names never count)."""
    units = (unit_of(name) for name in run.listdir(shards_dir(generator)))
    return sorted(u for u in units if u is not None)


def read_synthetic(run: RunDir, generator: str, filtered: bool = True, columns=None) -> pd.DataFrame:
    """All finished units of `generator`; with `filtered`, only rows the filter kept (if it ran)."""
    units = finished_units(run, generator)
    if not units:
        raise TableMissing(f"{run.path(shards_dir(generator))} has no synthetic shards "
                           f"(run `raybias generate` for generator {generator!r} first)")
    parts = [pq.read_table(run.path(shard_path(generator, u)), columns=columns, filesystem=run.fs)
             for u in units]
    df = pa.concat_tables(parts).to_pandas()
    scores = scores_path(generator)
    if filtered and run.exists(scores):
        s = pq.read_table(run.path(scores), filesystem=run.fs).to_pandas()
        df = df.merge(s[["id", "score", "keep"]], on="id", how="inner")
        df = df[df["keep"]].drop(columns=["keep"])
    return df.sort_values("id", kind="stable").reset_index(drop=True)
