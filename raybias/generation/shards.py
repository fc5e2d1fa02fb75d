"""One Parquet shard per work unit: written whole or not at all, checked on resume.

A shard is streamed through `RunDir.open_atomic` to a temporary `.tmp-…` name and
renamed to `unit-NNNNN.parquet` (copy+delete on object stores). So the final name only
ever holds a whole file; a crash leaves at most a temporary file, which is deleted and
never read. A shard under the final name that still fails to read, or whose ids are not
the unit's planned ids (disk trouble, a stale run), is deleted and its unit redone.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from raybias.layout import shard_path, shards_dir, unit_name, unit_of
from raybias.rundir import RunDir

log = logging.getLogger("raybias.generation")

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("y", pa.int64()),
    ("a", pa.int64()),
    ("group", pa.int64()),
    ("split", pa.string()),
    ("source", pa.string()),
    ("seed", pa.int64()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("cluster", pa.int64()),
    ("generator", pa.string()),
])


def unit_table(generator: str, unit: Dict[str, Any], images_png: Sequence[bytes]) -> pa.Table:
    """The unit's rows in the synthetic schema (split=train, source=generator)."""
    n = len(unit["ids"])
    if len(images_png) != n:
        raise ValueError(f"unit {unit['unit']}: {len(images_png)} images for {n} planned ids")
    return pa.table({
        "id": unit["ids"],
        "image": list(images_png),
        "y": [unit["y"]] * n,
        "a": [unit["a"]] * n,
        "group": [unit["group"]] * n,
        "split": ["train"] * n,
        "source": [generator] * n,
        "seed": unit["seeds"],
        "prompt": unit["prompts"],
        "negative_prompt": [unit["negative_prompt"]] * n,
        "cluster": [unit["cluster"]] * n,
        "generator": [generator] * n,
    }, schema=SHARD_SCHEMA)


def write_shard(run: RunDir, generator: str, unit: int, table: pa.Table) -> str:
    """Write atomically, streamed to the filesystem (no serialised copy in memory: that
    was +1.5 GB per 512-px unit); returns the final path."""
    rel = shard_path(generator, unit)
    with run.open_atomic(rel) as f:
        pq.write_table(table, f, compression="zstd")
    return run.path(rel)


def shard_is_whole(run: RunDir, generator: str, unit: int, planned_ids: Sequence[str]) -> bool:
    """True when the unit's shard reads and holds exactly the planned ids, in order."""
    try:
        with run.fs.open_input_file(run.path(shard_path(generator, unit))) as f:
            shard = pq.ParquetFile(f)
            if shard.metadata.num_rows != len(planned_ids):  # the footer alone settles most mismatches
                return False
            ids = shard.read(columns=["id"]).column("id").to_pylist()
    except Exception:  # any read failure (truncated footer, bad pages) means: redo it
        return False
    return ids == list(planned_ids)


def remove_temporaries(run: RunDir, generator: str, names: Optional[Sequence[str]] = None) -> List[str]:
    """Delete `.tmp-*` files a crashed writer left in the shards folder (`names`: its listing)."""
    removed = []
    for name in run.listdir(shards_dir(generator)) if names is None else names:
        if name.startswith(".tmp-"):
            run.delete(shards_dir(generator), name)
            removed.append(name)
    return removed


def sort_out_shards(run: RunDir, generator: str, plan: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    """(units whose shard is whole, units whose shard was there but broken and is now deleted).

    One listing of the shards folder; then each shard's footer and id column, read in
    parallel threads (on an object store each is a few requests of latency), against the
    ids the plan derives for that unit. Shards of units the plan does not have are deleted
    too, and so are temporary files.
    """
    from raybias.generation.plan import PlanUnits

    units = PlanUnits(plan)
    names = run.listdir(shards_dir(generator))  # the one listing
    remove_temporaries(run, generator, names)
    found = sorted(u for u in (unit_of(n) for n in names) if u is not None)

    def check(number: int) -> bool:
        return number < len(units) and shard_is_whole(run, generator, number, units.ids(number))

    whole, broken = [], []
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="raybias-shards") as pool:
        ok = list(pool.map(check, found))
    for number, is_whole in zip(found, ok):
        if is_whole:
            whole.append(number)
            continue
        run.delete(shard_path(generator, number))
        if number < len(units):
            broken.append(number)
            log.warning("shard %s of %s is unreadable or incomplete; redoing unit %d",
                        unit_name(number), generator, number)
    return whole, broken
