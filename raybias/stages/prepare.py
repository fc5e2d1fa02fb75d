"""Stage `prepare`: read a data source, apply bias severity, write `data/real/` shards."""

from __future__ import annotations

from raybias.config import severity_value
from raybias.data.info import INFO, REAL, DatasetInfo
from raybias.data.io import write_table
from raybias.data.severity import aligned_values, apply_severity, group_counts
from raybias.data.sources import load_source
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


def run_prepare(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> DatasetInfo:
    with run.stage("prepare", cfg, SECTIONS, mode) as st:
        if st.skip:
            info = DatasetInfo.load(run)
        else:
            init_ray(cfg)
            src = load_source(cfg.data)
            severity = severity_value(cfg.data.severity)
            table = src.table
            train = table[table["split"] == "train"]
            aligned = aligned_values(train, src.n_classes, src.n_bias, cfg.data.aligned, src.default_aligned)
            table = apply_severity(table, severity, aligned, cfg.data.seed)
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
            )
            run.delete(INFO)
            write_table(run, REAL, table, cfg.data.shard_rows)
            info.save(run)
    if verbose:
        sev = "original" if info.severity is None else f"{info.severity:g}"
        print(f"prepared {info.source} (severity {sev}) in {run.path(REAL)}")
        print(format_counts(info))
        if info.empty_train_groups:
            print("warning: groups with no training images: "
                  + ", ".join(info.group_name(g) for g in info.empty_train_groups))
    return info
