"""Reading and writing schema tables as Parquet shards in a run directory, through Ray Data.

A table is a folder of shards plus a `_SUCCESS` marker written last. On a local disk the
shards are written to a temporary sibling folder and renamed into place, so a crash never
leaves a half-written table under the final name; on object stores the marker decides.
The marker lists every shard with its size in bytes (RunDir.write_marker), and readers
check the folder against it: a table without its marker, with a shard missing or of
another size (truncated, rewritten) is refused, naming the shard, so a damaged table is
never read as a smaller whole one.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raybias.data.schema import check_table, order_columns, to_arrow
from raybias.errors import first_line
from raybias.rundir import RunDir

MARKER = "_SUCCESS"


class TableMissing(FileNotFoundError):
    """A stage's input table is absent or was never finished."""


def write_table(run: RunDir, rel_dir: str, df: pd.DataFrame, shard_rows: int = 2048,
                check: bool = True) -> List[str]:
    """Write `df` as Parquet shards under `rel_dir` via Ray Data; returns shard file names."""
    import ray

    if check:
        check_table(df, rel_dir)
    df = df[order_columns(df.columns)].reset_index(drop=True)
    table = to_arrow(df)
    n_shards = max(1, math.ceil(len(df) / max(1, shard_rows)))
    staged = run.staging(rel_dir)
    ds = ray.data.from_arrow(table)
    if n_shards > 1:
        ds = ds.repartition(n_shards)
    ds.write_parquet(run.path(staged), filesystem=run.fs)
    return run.publish_table(staged, rel_dir)


def write_table_batches(run: RunDir, rel_dir: str, batches: Iterable[pd.DataFrame]) -> List[str]:
    """Write each DataFrame of `batches` as one Parquet shard, with write_table's protocol
    (temporary folder, rename, `_SUCCESS` last). Memory stays at one batch however large
    the table: `prepare` streams real datasets through it while it loads their images.
    If the iterator raises, the partial shards are deleted and the error propagates."""
    staged = run.staging(rel_dir)
    tmp = run.makedirs(staged)
    try:
        for i, df in enumerate(batches):
            check_table(df, rel_dir)
            df = df[order_columns(df.columns)].reset_index(drop=True)
            pq.write_table(to_arrow(df), f"{tmp}/part-{i:05d}.parquet", filesystem=run.fs)
    except BaseException:
        run.delete(staged)
        raise
    return run.publish_table(staged, rel_dir)


def require_table(run: RunDir, rel_dir: str, what: Optional[str] = None) -> None:
    """TableMissing, naming the folder or the shard, unless the table in `rel_dir` is whole."""
    problem = run.table_problem(rel_dir)
    if problem:
        hint = f" (run `raybias {what}` first)" if what else ""
        raise TableMissing(f"{run.path(rel_dir)} {problem}{hint}")


def shard_paths(run: RunDir, rel_dir: str, stage: Optional[str] = None) -> List[str]:
    """The shards of a whole table (checked against its marker: see require_table)."""
    require_table(run, rel_dir, stage)
    return [run.path(rel_dir, n) for n in run.listdir(rel_dir) if n.endswith(".parquet")]


def read_dataset(run: RunDir, rel_dir: str, columns: Optional[List[str]] = None, stage: Optional[str] = None):
    """The table as a (streaming) Ray Dataset."""
    import ray

    return ray.data.read_parquet(shard_paths(run, rel_dir, stage), filesystem=run.fs, columns=columns)


def read_table(run: RunDir, rel_dir: str, columns: Optional[List[str]] = None,
               stage: Optional[str] = None, split: Optional[str] = None) -> pd.DataFrame:
    """The whole table in memory (small data), shards read in a stable order."""
    parts = []
    for p in shard_paths(run, rel_dir, stage):
        try:
            parts.append(pq.read_table(p, columns=columns, filesystem=run.fs))
        except (pa.ArrowInvalid, OSError) as exc:  # a damaged shard the marker did not catch
            hint = f"; rerun `raybias {stage}`" if stage else ""
            raise TableMissing(f"shard {p} cannot be read ({first_line(exc)}){hint}") from exc
    table = pa.concat_tables(parts) if parts else pa.table({})
    df = table.to_pandas()
    if split is not None:
        df = df[df["split"] == split]
    if "id" in df.columns:
        df = df.sort_values("id", kind="stable")
    return df.reset_index(drop=True)
