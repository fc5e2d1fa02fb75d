"""Stage `prepare`: read a data source, apply bias severity, write `data/real/` shards.

Severity follows FFR's rule (raybias/data/severity.py); `data.val_protocol` says whether the
validation split is left as shipped or subsampled like train (FFR). `data/info.json` records
both, and its counts are those of the written table.

Sources that read image files hand over metadata only (`FILE_COLUMN`); severity is
applied to it first, and then only the kept rows' images are loaded — in parallel, one
shard at a time, each shard written as soon as it is whole — so memory stays at one
shard however large the dataset (CelebA: ~200k files). A bad file stops the stage with
one ImageError naming it; nothing is marked done and no `_SUCCESS` is written.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List

import pandas as pd

from raybias.config import severity_value
from raybias.console import bar as progress_bar, say
from raybias.data.images import default_workers, load_files
from raybias.data.info import DatasetInfo
from raybias.data.io import write_table, write_table_batches
from raybias.data.schema import SchemaError
from raybias.data.severity import aligned_values, apply_severity, group_counts
from raybias.data.sources import FILE_COLUMN, DataError, load_source
from raybias.layout import INFO, PREPARE_KEY, REAL
from raybias.ray_utils import init_ray
from raybias.rundir import RunDir

SECTIONS = ("data",)


def format_counts(info: DatasetInfo) -> str:
    """A plain-text table of group counts per split, zero groups marked."""
    lines = [f"{'group':<28}{'aligned':>8}{'train':>9}{'val':>8}{'test':>8}"]
    for g in range(info.n_groups):
        row = [info.counts.get(s, {}).get(str(g), 0) for s in ("train", "val", "test")]
        mark = "  <- empty in train" if row[0] == 0 else ""
        lines.append(f"{f'{g} ' + info.group_name(g):<28}{'yes' if info.is_aligned(g) else 'no':>8}"
                     f"{row[0]:>9}{row[1]:>8}{row[2]:>8}{mark}")
    totals = [sum(info.counts.get(s, {}).values()) for s in ("train", "val", "test")]
    lines.append(f"{'total':<28}{'':>8}{totals[0]:>9}{totals[1]:>8}{totals[2]:>8}")
    return "\n".join(lines)


def empty_group_warnings(info: DatasetInfo) -> List[str]:
    """One line per split that has groups without images (reported, never hidden)."""
    out = []
    for split, consequence in (("train", "no model sees them in training"),
                               ("val", "their accuracy cannot steer model selection"),
                               ("test", "their accuracy cannot be measured")):
        empty = [g for g in range(info.n_groups) if int(info.counts.get(split, {}).get(str(g), 0)) == 0]
        if empty:
            out.append(f"groups with no {split} images: "
                       + ", ".join(f"{g} {info.group_name(g)}" for g in empty) + f" ({consequence})")
    return out


def _check_source_table(table: pd.DataFrame, n_classes: int, n_bias: int, source: str) -> None:
    bad_y = ~table["y"].between(0, n_classes - 1)
    bad_a = ~table["a"].between(0, n_bias - 1)
    if bad_y.any() or bad_a.any():  # a source bug, not a user error; still say where
        raise SchemaError(f"data.source={source}: labels out of range (y in 0..{n_classes - 1}, a in 0..{n_bias - 1})")
    if table["id"].duplicated().any():
        raise SchemaError(f"data.source={source}: id {table.loc[table['id'].duplicated(), 'id'].iloc[0]!r} is not unique")
    train_classes = set(int(v) for v in table.loc[table["split"] == "train", "y"].unique())
    missing = [y for y in range(n_classes) if y not in train_classes]
    if missing:
        raise DataError(f"data.source={source}: class(es) y={', '.join(map(str, missing))} have no "
                        "training images; every class needs some")


def _image_batches(table: pd.DataFrame, data_cfg) -> Iterator[pd.DataFrame]:
    """`table` in shards of data.shard_rows, each with its images loaded (thread pool)."""
    rows = max(1, int(data_cfg.shard_rows))
    workers = int(data_cfg.load_workers) or default_workers()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raybias-load") as pool, \
            progress_bar(total=len(table), desc="loading images", unit="img", mininterval=1.0) as bar:
        for start in range(0, len(table), rows):
            part = table.iloc[start:start + rows]
            images = load_files(part[FILE_COLUMN].tolist(), data_cfg.image_size,
                                center_crop=data_cfg.center_crop, image_format=data_cfg.image_format,
                                progress=bar, pool=pool)
            yield part.drop(columns=[FILE_COLUMN]).assign(image=images)


def run_prepare(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> DatasetInfo:
    notes: List[str] = []
    # One table written in one go (not partial): an earlier prepare's table and info are
    # removed before the work, so a failure below can never leave them looking finished.
    with run.stage(PREPARE_KEY, cfg, SECTIONS, mode, outputs=(REAL, INFO), owns=(INFO, REAL)) as st:
        if st.skip:
            info = DatasetInfo.load(run)
        else:
            init_ray(cfg)
            src = load_source(cfg.data)
            notes.extend(src.extra.get("warnings", []))
            severity = severity_value(cfg.data.severity)
            table = src.table
            _check_source_table(table, src.n_classes, src.n_bias, cfg.data.source)
            train = table[table["split"] == "train"]
            aligned = aligned_values(train, src.n_classes, src.n_bias, cfg.data.aligned, src.default_aligned)
            table = apply_severity(table, severity, aligned, cfg.data.seed, warnings=notes,
                                   val_protocol=str(cfg.data.val_protocol))
            n_groups = src.n_classes * src.n_bias
            counts = group_counts(table, n_groups)
            info = DatasetInfo(
                source=cfg.data.source, n_classes=src.n_classes, n_bias=src.n_bias,
                class_names=src.class_names, bias_names=src.bias_names,
                class_words=src.class_words, bias_words=src.bias_words,
                prompt_template=src.prompt_template, aligned=aligned,
                image_size=cfg.data.image_size, severity=severity,
                counts={s: {str(g): int(counts.loc[g, s]) for g in range(n_groups)} for s in counts.columns},
                empty_train_groups=[g for g in range(n_groups) if counts.loc[g, "train"] == 0],
                val_protocol=str(cfg.data.val_protocol),
            )
            if FILE_COLUMN in table.columns:
                write_table_batches(run, REAL, _image_batches(table, cfg.data))
            else:
                write_table(run, REAL, table, cfg.data.shard_rows)
            info.save(run)
    if verbose:
        sev = "original" if info.severity is None else f"{info.severity:g}"
        say(f"prepared {info.source} (severity {sev}) in {run.path(REAL)}")
        say(info.protocol_line())
        say(format_counts(info))
        for line in notes + empty_group_warnings(info):
            say(f"warning: {line}")
    return info
