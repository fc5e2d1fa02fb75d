"""Where a generator's synthetic set lives in the run directory, and how it is read.

synthetic/<generator>/plan.json              the generation plan (units, counts, prompts)
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
from raybias.rundir import RunDir


def synthetic_dir(generator: str) -> str:
    return f"synthetic/{generator}"


def shards_dir(generator: str) -> str:
    return f"synthetic/{generator}/shards"


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}.parquet"


def finished_units(run: RunDir, generator: str) -> List[int]:
    """Units whose shard was renamed into place (temporary names never count)."""
    out = []
    for name in run.listdir(shards_dir(generator)):
        if name.startswith("unit-") and name.endswith(".parquet"):
            out.append(int(name[5:-8]))
    return sorted(out)


def read_synthetic(run: RunDir, generator: str, filtered: bool = True, columns=None) -> pd.DataFrame:
    """All finished units of `generator`; with `filtered`, only rows the filter kept (if it ran)."""
    units = finished_units(run, generator)
    if not units:
        raise TableMissing(f"{run.path(shards_dir(generator))} has no synthetic shards "
                           f"(run `raybias generate` for generator {generator!r} first)")
    parts = [pq.read_table(run.path(shards_dir(generator), unit_name(u)), columns=columns, filesystem=run.fs)
             for u in units]
    df = pa.concat_tables(parts).to_pandas()
    scores = f"{synthetic_dir(generator)}/scores.parquet"
    if filtered and run.exists(scores):
        s = pq.read_table(run.path(scores), filesystem=run.fs).to_pandas()
        df = df.merge(s[["id", "score", "keep"]], on="id", how="inner")
        df = df[df["keep"]].drop(columns=["keep"])
    return df.sort_values("id", kind="stable").reset_index(drop=True)
