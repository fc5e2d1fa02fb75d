"""The one data schema shared by every dataset, real or synthetic.

| column | meaning |
| id     | stable string id, unique in the run |
| image  | encoded image bytes (PNG/JPEG) |
| y      | target class, int |
| a      | bias attribute, int |
| group  | y * n_a + a |
| split  | train / val / test |
| source | "real", or the generator that made it |
Optional columns: cluster, seed, prompt, score, path, generator.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import pyarrow as pa

REQUIRED = ("id", "image", "y", "a", "group", "split", "source")
SPLITS = ("train", "val", "test")

ARROW_TYPES = {
    "id": pa.string(),
    "image": pa.binary(),
    "y": pa.int64(),
    "a": pa.int64(),
    "group": pa.int64(),
    "split": pa.string(),
    "source": pa.string(),
    "cluster": pa.int64(),
    "seed": pa.int64(),
    "prompt": pa.string(),
    "score": pa.float64(),
    "path": pa.string(),
    "generator": pa.string(),
}


class SchemaError(ValueError):
    """A table does not follow the raybias schema."""


def group_of(y, a, n_a: int):
    return y * n_a + a


def check_table(df: pd.DataFrame, where: str) -> None:
    """Raise SchemaError naming `where` and the column if `df` breaks the schema."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {', '.join(missing)}; the schema needs {', '.join(REQUIRED)}")
    bad = set(df["split"].unique()) - set(SPLITS)
    if bad:
        raise SchemaError(f"{where}: column 'split' has values {sorted(bad)}; allowed {', '.join(SPLITS)}")
    if df["id"].duplicated().any():
        dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
        raise SchemaError(f"{where}: column 'id' is not unique (e.g. {dup!r})")


def to_arrow(df: pd.DataFrame) -> pa.Table:
    fields = []
    for c in df.columns:
        fields.append(pa.field(c, ARROW_TYPES.get(c) or pa.array(df[c].iloc[:1]).type))
    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)


def order_columns(cols: Iterable[str]):
    cols = list(cols)
    return [c for c in REQUIRED if c in cols] + [c for c in cols if c not in REQUIRED]
