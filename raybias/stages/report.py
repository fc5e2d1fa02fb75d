"""Stage `report`: `report/report.md` with the results a user reads, and its figures.

For a run: the results table (per method WGA, AGA, accuracy as mean ± std over seeds),
per-group test accuracies, a bar chart of WGA per method, the stage 2 each two-stage
classifier kept (with stage2=auto: every candidate's validation WGA), the synthetic sets'
diagnostics per generator and group (raybias/generation/diagnostics.py: label fidelity,
diversity, KID; measured by `run_report` before it writes, a table and a plot), sample grids
of real and synthetic images per group (drawn from the id/group columns; only the drawn
images are read), stage timings (per stage its wall time; the run's wall clock from report/timings.json,
never a sum of stages that overlapped) and the machine and package versions. For a sweep
directory: the same table per severity and a WGA-vs-severity line plot per method.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from raybias.classify.metrics import collect_metrics, metrics_records, pct, summarize
from raybias.console import say
# choose_rows is the report's own draw too (tests call it as report.choose_rows)
from raybias.data.rows import choose_rows, read_rows, real_train_meta, synthetic_meta
from raybias.layout import (CLASSIFIERS_DIR, DIAGNOSTICS_PNG, INFO, REPORT_DIR, REPORT_MD, REPORT_SAMPLES_PNG,
                            RESULTS_BY_SEED_CSV, SWEEP_REPORT, SWEEP_RESULTS, SYNTHETIC_DIR, TIMINGS, WGA_PNG,
                            diagnostics_path, severity_png, stage_of, synthetic_samples)
from raybias.machine import machine_line
from raybias.rundir import RunDir


def _from_report(rel: str) -> str:
    """A run-relative path as report.md links it (relative to the report's folder)."""
    inside = f"{REPORT_DIR}/"
    return rel[len(inside):] if rel.startswith(inside) else f"../{rel}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- tables -------------------------------------------------------------------------------

def results_table(summary: pd.DataFrame, keys=("method",)) -> str:
    """Markdown table: keys | WGA | AGA | accuracy | seeds."""
    head = "| " + " | ".join(keys) + " | WGA | AGA | accuracy | seeds |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for _, r in summary.iterrows():
        lines.append("| " + " | ".join(str(r[k]) for k in keys) + f" | {pct(r.wga_mean, r.wga_std)} | "
                     f"{pct(r.aga_mean, r.aga_std)} | {pct(r.acc_mean, r.acc_std)} | {int(r.n_seeds)} |")
    return "\n".join(lines)


def results_text(summary: pd.DataFrame) -> str:
    """The same table as aligned plain text, for the terminal."""
    lines = [f"{'method':<24}{'WGA':>14}{'AGA':>14}{'accuracy':>14}{'seeds':>7}"]
    for _, r in summary.iterrows():
        lines.append(f"{r.method:<24}{pct(r.wga_mean, r.wga_std):>14}{pct(r.aga_mean, r.aga_std):>14}"
                     f"{pct(r.acc_mean, r.acc_std):>14}{int(r.n_seeds):>7}")
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------

def wga_bar_chart(summary: pd.DataFrame, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(summary) + 2), 3.6))
    x = np.arange(len(summary))
    ax.bar(x, 100 * summary["wga_mean"], yerr=100 * summary["wga_std"].fillna(0), capsize=3,
           color="#4c72b0", label="worst-group")
    ax.scatter(x, 100 * summary["aga_mean"], color="#dd8452", zorder=3, label="average-group")
    ax.set_xticks(x)
    ax.set_xticklabels(summary["method"], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def severity_plot(summary: pd.DataFrame, title: str):
    """WGA vs. severity, one line per method (summary keyed by severity, method)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, part in summary.groupby("method"):
        part = part.sort_values("severity_num")
        ax.errorbar(part["severity_num"], 100 * part["wga_mean"], yerr=100 * part["wga_std"].fillna(0),
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("bias severity (fraction of each class that is bias-aligned)")
    ax.set_ylabel("test worst-group accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


# --- sample grids: choose the columns and rows from metadata, then read only those images ---

REAL_SET = "real"


@dataclass
class GridPlan:
    """What the sample grid draws.

    columns: the image sets drawn, in order (column blocks); left_out: set -> why it is not in
    the grid; files: set -> its run-relative Parquet files; picks: set -> group -> the rows to
    draw (columns id, file: index into files[set], row: row number in that file), by id.
    """

    columns: List[str]
    left_out: Dict[str, str]
    files: Dict[str, List[str]]
    picks: Dict[str, Dict[int, pd.DataFrame]] = field(default_factory=dict)

    def n_drawn(self) -> int:
        return sum(len(df) for by_group in self.picks.values() for df in by_group.values())


def choose_columns(metas: Dict[str, pd.DataFrame], n_groups: int) -> Tuple[List[str], Dict[str, str]]:
    """(sets drawn, {set: why not}) from each set's metadata (a `group` column per image).

    The grid's rows are the dataset's groups, so a set with no image in any of them is left out
    rather than drawn as an empty column: DDB's bias-aligned set carries group -1 (its bias is
    never labelled), and a filter may have dropped everything.
    """
    drawn, left_out = [], {}
    for name, meta in metas.items():
        if len(meta) == 0:
            left_out[name] = "no images"
        elif not meta["group"].between(0, n_groups - 1).any():
            left_out[name] = "its images carry no group label (group -1)"
        else:
            drawn.append(name)
    return drawn, left_out


def plan_sample_grid(run: RunDir, n_groups: int, per_group: int = 6, seed: int = 0) -> GridPlan:
    """The grid's columns and rows, from the sets' id/group columns only (no image is read)."""
    from raybias.data.synthetic import finished_units

    files, metas = {}, {}
    files[REAL_SET], metas[REAL_SET] = real_train_meta(run)
    for gen in run.listdir(SYNTHETIC_DIR):
        if finished_units(run, gen):
            files[gen], metas[gen] = synthetic_meta(run, gen)
    columns, left_out = choose_columns(metas, n_groups)
    picks = {name: choose_rows(metas[name], n_groups, per_group, seed, name) for name in columns}
    return GridPlan(columns, left_out, {n: files[n] for n in columns}, picks)


def read_picks(run: RunDir, plan: GridPlan) -> Dict[str, Dict[int, List[bytes]]]:
    """set -> group -> the encoded images of the picked rows (read per file, only those rows)."""
    want: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}  # (set, file) -> [(group, row)]
    for name in plan.columns:
        for g, df in plan.picks[name].items():
            for f, r in zip(df["file"], df["row"]):
                want.setdefault((name, int(f)), []).append((g, int(r)))
    out: Dict[str, Dict[int, List[bytes]]] = {name: {} for name in plan.columns}
    found: Dict[Tuple[str, int, int], bytes] = {}
    for (name, f), items in want.items():
        values = read_rows(run, plan.files[name][f], [r for _, r in items])
        found.update({(name, f, r): v for (_, r), v in zip(items, values)})
    for name in plan.columns:
        for g, df in plan.picks[name].items():
            out[name][g] = [found[(name, int(f), int(r))] for f, r in zip(df["file"], df["row"])]
    return out


def _column_label(name: str) -> str:
    return "real (train)" if name == REAL_SET else name


def sample_grid(run: RunDir, per_group: int = 6, plan: Optional[GridPlan] = None):
    """Rows: groups; column blocks: real training images, then each generator's (filtered)
    synthetic set that has group labels (see choose_columns). Reads only the drawn images."""
    from raybias.data.images import decode
    from raybias.data.info import DatasetInfo

    info = DatasetInfo.load(run)
    plan = plan or plan_sample_grid(run, info.n_groups, per_group)
    images = read_picks(run, plan)
    plt = _plt()
    n_cols = per_group * max(1, len(plan.columns))
    fig, axes = plt.subplots(info.n_groups, n_cols, figsize=(0.55 * n_cols + 1.5, 0.6 * info.n_groups + 0.8),
                             squeeze=False)
    for g in range(info.n_groups):
        for j, name in enumerate(plan.columns):
            imgs = images[name].get(g, [])
            for i in range(per_group):
                ax = axes[g, j * per_group + i]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if i < len(imgs):
                    ax.imshow(decode(imgs[i]), interpolation="nearest")
                if g == 0 and i == 0:
                    ax.set_title(_column_label(name), fontsize=8, loc="left")
        axes[g, 0].set_ylabel(info.group_name(g), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("samples per group: real training images, then each generator's (filtered) synthetic set",
                 fontsize=9)
    return fig


def _left_out_note(run: RunDir, plan: GridPlan) -> List[str]:
    lines = []
    for name, why in plan.left_out.items():
        own = synthetic_samples(name)
        link = _from_report(own)
        see = f"; its own samples: [{link}]({link})" if run.exists(own) else ""
        lines.append(f"Not in the grid: {name}: {why}{see}.")
    return lines


# --- stage timings -------------------------------------------------------------------------

def stage_spans(stages: Dict[str, Dict]) -> List[Dict]:
    """Per stage, from the manifest's finished keys: wall (first started_at to last finished_at
    of its keys, None where no key has both), compute (the keys' seconds summed: keys that ran in
    parallel overlap, so this can exceed the wall time), keys; in order of first start."""
    out: Dict[str, Dict] = {}
    for key, rec in stages.items():
        if not rec.get("done"):
            continue
        s = out.setdefault(stage_of(key), {"stage": stage_of(key), "start": None, "end": None,
                                           "compute": 0.0, "keys": 0})
        s["compute"] += float(rec.get("seconds", 0.0))
        s["keys"] += 1
        t0, t1 = rec.get("started_at"), rec.get("finished_at")
        if t0 is not None and t1 is not None:
            s["start"] = t0 if s["start"] is None else min(s["start"], t0)
            s["end"] = t1 if s["end"] is None else max(s["end"], t1)
    for s in out.values():
        s["wall"] = None if s["start"] is None else s["end"] - s["start"]
    return sorted(out.values(), key=lambda s: (s["start"] is None, s["start"] or 0.0))


def union_seconds(spans: Sequence[Tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) spans (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for t0, t1 in sorted(spans):
        if cur_end is None or t0 > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = t0, t1
        else:
            cur_end = max(cur_end, t1)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def run_wall_clock(timings: Optional[Dict], stages: Dict[str, Dict], now: float) -> Optional[Tuple[float, str]]:
    """(seconds, what they are) for the run's wall-clock time, never a sum of stage times.

    From report/timings.json, written by `raybias run`: its start and end; only its start while
    the run is still going (the report is its last stage): start to `now`; an older file's
    `total`. Without that file (stages run one by one): the time some stage key was running.
    """
    timings = timings or {}
    t0, t1 = timings.get("started_at"), timings.get("finished_at")
    if t0 is not None and t1 is not None:
        return float(t1) - float(t0), "wall clock of `raybias run`, start to finish"
    if t0 is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t0)))
        return float(now) - float(t0), (f"wall clock of `raybias run` so far, from its start ({when}) to this "
                                        "report; it had not recorded its end (the report is its last stage)")
    if "total" in timings:
        return float(timings["total"]), "wall clock of `raybias run`"
    spans = [(r["started_at"], r["finished_at"]) for r in stages.values()
             if r.get("done") and r.get("started_at") is not None and r.get("finished_at") is not None]
    if not spans:
        return None
    return union_seconds(spans), "wall clock with some stage running (no `raybias run` timing recorded)"


def timings_table(stages: Dict[str, Dict], timings: Optional[Dict] = None, now: Optional[float] = None) -> str:
    """Markdown: per stage its wall time and summed compute seconds; the run's wall clock last."""
    spans = stage_spans(stages)
    if not spans:
        return "(no stage timings recorded)"
    lines = ["| stage | wall s | compute s (sum over keys) | keys |", "|---|---|---|---|"]
    for s in spans:
        wall = "–" if s["wall"] is None else f"{s['wall']:.1f}"
        lines.append(f"| {s['stage']} | {wall} | {s['compute']:.1f} | {s['keys']} |")
    total = run_wall_clock(timings, stages, time.time() if now is None else now)
    if total is not None:
        lines.append(f"| **run (wall clock)** | {total[0]:.1f} | | |")
    lines += ["", "wall s: first start to last finish of the stage's keys in manifest.json (e.g. every "
              "`train/…` key is the train stage); compute s: the keys' own seconds added up, which counts "
              "keys that ran in parallel once each, so it can exceed the wall time."]
    if total is not None:
        lines.append(f"run (wall clock): {total[1]}.")
    return "\n".join(lines)


def _timings_table(run: RunDir) -> str:
    timings = run.read_json(TIMINGS) if run.exists(TIMINGS) else None
    return timings_table(run.manifest()["stages"], timings)


# --- two-stage: which stage 2 --------------------------------------------------------------

def stage2_records(run: RunDir, methods: Optional[List[str]] = None) -> List[Dict]:
    """(method, seed, metrics.json's "stage2") of every two-stage classifier, by method and seed."""
    out = [{"method": method, "seed": seed, "stage2": rec["stage2"], "val_wga": rec["val"]["wga"],
            "test_wga": rec["test"]["wga"]}
           for method, seed, rec in metrics_records(run, methods) if rec.get("stage2")]
    rank = {m: i for i, m in enumerate(methods or [])}
    return sorted(out, key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r["seed"]))


def _rank_field(s2: Dict) -> Tuple[str, str]:
    """(the candidates' field that ranked them, in words) of an auto stage 2."""
    if s2.get("rank", "best") == "final":
        return "final_val_wga", "val WGA at the candidates' last epoch"
    return "val_wga", "val WGA at the candidates' best epoch"


def stage2_line(rec: Dict) -> str:
    """'stage 2: full+groupdro chosen, val WGA 96.8 (head+erm 62.0, ...)' for one classifier."""
    s2 = rec["stage2"]
    if s2.get("mode") != "auto":
        return f"stage 2: {s2['chosen']} (fixed), val WGA {pct(rec['val_wga'])}"
    key, words = _rank_field(s2)
    cands = s2.get("candidates", {})
    others = ", ".join(f"{c} {pct(cands[c][key])}" for c in s2["order"] if c in cands and c != s2["chosen"])
    return f"stage 2: {s2['chosen']} chosen, {words} {pct(cands[s2['chosen']][key])} ({others})"


def stage2_table(records: List[Dict]) -> str:
    """Markdown: per two-stage classifier, the stage 2 kept and every candidate's val (test) WGA."""
    order: List[str] = []
    for r in records:
        order += [c for c in r["stage2"].get("order", []) if c not in order]
    lines = ["| method | seed | stage 2 kept | " + " | ".join(order) + " |", "|---|---|---|" + "---|" * len(order)]
    for r in records:
        s2 = r["stage2"]
        cands = s2.get("candidates") or {s2["chosen"]: {"val_wga": r["val_wga"], "test_wga": r["test_wga"]}}
        cells = []
        for c in order:
            v = cands.get(c)
            final = "" if v is None or v.get("final_val_wga") is None else f" / {pct(v['final_val_wga'])}"
            cell = "–" if v is None else f"{pct(v['val_wga'])}{final} ({pct(v.get('test_wga'))})"
            cells.append(f"**{cell}**" if c == s2["chosen"] else cell)
        kept = f"{s2['chosen']} ({'auto' if s2.get('mode') == 'auto' else 'fixed'})"
        lines.append(f"| {r['method']} | {r['seed']} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage2_section(run: RunDir, methods: Optional[List[str]]) -> List[str]:
    records = stage2_records(run, methods)
    if not records:
        return []
    return ["## Two-stage: stage 2", "",
            "Per classifier, the stage 2 it kept and each candidate's validation WGA at its best epoch / at "
            "its last epoch (test WGA at its best epoch in brackets, for reading only: the choice sees "
            "validation alone; the kept one in bold; train.stage2_rank says which validation WGA ranked "
            "them). Every candidate starts from the same stage-1 model, and the kept model is the "
            "chosen candidate's best epoch.", "",
            stage2_table(records), "", *[f"- {r['method']} seed {r['seed']}: {stage2_line(r)}" for r in records], ""]


# --- synthetic data diagnostics ------------------------------------------------------------

def diagnostics_records(run: RunDir, methods: Optional[List[str]] = None) -> List[Dict]:
    """Every synthetic/<gen>/diagnostics.json, in `methods` order."""
    gens = [g for g in run.listdir(SYNTHETIC_DIR) if run.exists(diagnostics_path(g))]
    rank = {m: i for i, m in enumerate(methods or [])}
    return [run.read_json(diagnostics_path(g)) for g in sorted(gens, key=lambda g: (rank.get(g, len(rank)), g))]


def _num(v: Optional[float], scale: float = 1.0, digits: int = 3) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def diagnostics_table(records: List[Dict]) -> str:
    """Markdown: one row per (generator, group)."""
    lines = ["| generator | group | generated | sampled (real) | class % | bias % | both % | both, kept % | "
             "real both % | diversity (real) | KID ×10³ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for g in rec["groups"]:
            lines.append(f"| {rec['generator']} | {g['name']} | {g['n_generated']} | {g['n_sampled']} ({g['n_real']}) | "
                         f"{pct(g['class_fidelity'])} | {pct(g['bias_fidelity'])} | {pct(g['fidelity'])} | "
                         f"{pct(g['fidelity_kept'])} | {pct(g['real_fidelity'])} | "
                         f"{_num(g['diversity'])} ({_num(g['real_diversity'])}) | {_num(g['kid'], 1e3, 2)} |")
    return "\n".join(lines)


def diagnostics_summary(records: List[Dict]) -> pd.DataFrame:
    """Per generator, means over its groups: fidelity, diversity / real diversity, KID."""
    rows = []
    for rec in records:
        gs = rec["groups"]

        def mean(vals):
            vals = [v for v in vals if v is not None]
            return float(np.mean(vals)) if vals else None

        rows.append({"generator": rec["generator"], "fidelity": mean(g["fidelity"] for g in gs),
                     "worst_fidelity": min((g["fidelity"] for g in gs if g["fidelity"] is not None), default=None),
                     "diversity_ratio": mean(g["diversity"] / g["real_diversity"] for g in gs
                                             if g["diversity"] is not None and g["real_diversity"]),
                     "kid": mean(g["kid"] for g in gs)})
    return pd.DataFrame(rows)


def diagnostics_plot(records: List[Dict]):
    """Three panels, groups on x, one bar per generator: label fidelity (the reader on real
    images as a line), diversity (the real group's as a line), KID."""
    plt = _plt()
    names = [g["name"] for g in records[0]["groups"]]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(records))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("fidelity", "label fidelity (%)", 100, "real_fidelity"), ("diversity", "diversity (1 − cos)", 1,
                                                                          "real_diversity"), ("kid", "KID", 1, None)]
    for ax, (key, label, scale, real_key) in zip(axes, panels):
        for i, rec in enumerate(records):
            vals = [np.nan if g[key] is None else scale * g[key] for g in rec["groups"]]
            ax.bar(x + (i - (len(records) - 1) / 2) * width, vals, width, label=rec["generator"])
        if real_key is not None:
            real = [np.nan if g[real_key] is None else scale * g[real_key] for g in records[0]["groups"]]
            ax.scatter(x, real, color="k", marker="_", s=400, zorder=3, label="real group")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("synthetic sets per generator and group (sampled; embedder space)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def diagnostics_section(run: RunDir, methods: Optional[List[str]], problem: Optional[str] = None) -> List[str]:
    records = diagnostics_records(run, methods)
    if not records:
        return ["## Synthetic data diagnostics", "", f"(diagnostics unavailable: {problem})", ""] if problem else []
    run.write_figure(DIAGNOSTICS_PNG, diagnostics_plot(records))
    first = records[0]
    reader = {"oracle": "the builtin oracle (digit among the class's members, colour = the group's word)",
              "clip": "CLIP zero-shot (the group prompt nearest the image)",
              "none": "no reader for this data (fidelity not measured)"}[first["reader"]]
    summary = diagnostics_summary(records)
    lines = ["| generator | mean fidelity % | worst-group fidelity % | diversity / real | mean KID ×10³ |",
             "|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r.generator} | {pct(r.fidelity)} | {pct(r.worst_fidelity)} | {_num(r.diversity_ratio, 1, 2)} | "
                     f"{_num(r.kid, 1e3, 2)} |")
    out = ["## Synthetic data diagnostics", "",
           f"Per generator and group, on up to {first['sample_per_group']} generated images (all, before the filter) "
           f"and as many real training images of the group (seed {first['seed']}), in the {first['embedder']} "
           f"embedder's space. Label fidelity: the share in which {reader} reads the class and bias asked for "
           "('both, kept': among the filter's kept; 'real both': the reader on real images, its own ceiling). "
           "Diversity: mean pairwise 1 − cos, the real group's in brackets. KID: unbiased MMD² with the "
           "cubic polynomial kernel (Binkowski et al. 2018) to the real group; small real groups make it noisy.",
           "", diagnostics_table(records), "", *lines, "",
           f"![diagnostics per generator and group]({_from_report(DIAGNOSTICS_PNG)})", ""]
    if problem:
        out += [f"(not measured this time: {problem})", ""]
    return out


# --- the report ----------------------------------------------------------------------------

def _group_table(summary: pd.DataFrame, info) -> str:
    groups = list(range(info.n_groups))
    head = "| method | " + " | ".join(info.group_name(g) for g in groups) + " |"
    lines = [head, "|---|" + "---|" * len(groups)]
    for _, r in summary.iterrows():
        cells = []
        for g in groups:
            m = r.get(f"g{g}_mean")
            cells.append("–" if m is None or np.isnan(m) else pct(m, r.get(f"g{g}_std")))
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_run_report(run: RunDir, methods: Optional[List[str]] = None, title: Optional[str] = None,
                     diagnostics_problem: Optional[str] = None) -> str:
    from raybias.data.info import DatasetInfo

    info = DatasetInfo.load(run)
    df = collect_metrics(run, methods)
    summary = summarize(df, order=methods)
    sev = "original" if info.severity is None else f"{info.severity:g}"
    title = title or f"raybias report: {info.source}, severity {sev}"
    parts = [f"# {title}", "", f"Run directory: `{run.uri}`", ""]
    counts = info.counts.get("train", {})
    parts += ["## Data", "", info.protocol_line(), "", "Images per group and split, as prepared:", "",
              "| group | aligned | train | val | test |", "|---|---|---|---|---|"]
    for g in range(info.n_groups):
        parts.append(f"| {info.group_name(g)} | {'yes' if info.is_aligned(g) else 'no'} | {counts.get(str(g), 0)} | "
                     f"{info.counts.get('val', {}).get(str(g), 0)} | {info.counts.get('test', {}).get(str(g), 0)} |")
    parts.append("")
    if summary.empty:
        parts += ["## Results", "", "No classifier has finished in this run yet.", ""]
    else:
        run.write_figure(WGA_PNG, wga_bar_chart(summary, title))
        parts += ["## Results", "",
                  "Test accuracy in %, mean ± std over seeds; model selection by validation worst-group accuracy.",
                  "", results_table(summary), "", f"![WGA per method]({_from_report(WGA_PNG)})", "",
                  "## Per-group test accuracy", "", _group_table(summary, info), ""]
        parts += stage2_section(run, methods)
        run.write_text(RESULTS_BY_SEED_CSV, df.to_csv(index=False))
    try:
        plan = plan_sample_grid(run, info.n_groups)
        run.write_figure(REPORT_SAMPLES_PNG, sample_grid(run, plan=plan))
        parts += ["## Samples", "", f"![samples per group]({_from_report(REPORT_SAMPLES_PNG)})", ""]
        note = _left_out_note(run, plan)
        parts += [*note, ""] if note else []
    except Exception as exc:  # a report must not fail on a missing picture
        parts += ["## Samples", "", f"(sample grid unavailable: {exc})", ""]
    parts += diagnostics_section(run, methods, diagnostics_problem)
    parts += ["## Stage timings", "", _timings_table(run), ""]
    parts += ["## Machine", "", f"Report written on: {machine_line()}", ""]
    text = "\n".join(parts)
    run.write_text(REPORT_MD, text)
    _close_figures()
    return text


def _close_figures() -> None:
    _plt().close("all")


def run_report(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> str:
    # The report is cheap and reflects everything in the run: always rewritten. The synthetic
    # sets' diagnostics are measured first (skipped where finished with the same config).
    from raybias.generation.diagnostics import run_diagnostics

    problem = None
    try:
        run_diagnostics(cfg, run, mode, verbose)
    except Exception as exc:  # the report must still be written; it says what went wrong
        from raybias.errors import first_line

        problem = f"{type(exc).__name__}: {first_line(exc)}"
        if verbose:
            say(f"diagnostics not measured: {problem}")
    text = write_run_report(run, list(cfg.methods), diagnostics_problem=problem)
    if verbose:
        summary = summarize(collect_metrics(run, list(cfg.methods)), order=list(cfg.methods))
        if not summary.empty:
            say("\nResults (test accuracy %, mean ± std over seeds):")
            say(results_text(summary))
        say(f"\nreport: {run.path(REPORT_MD)}")
    return text


# --- sweeps --------------------------------------------------------------------------------

def write_sweep_report(sweep_dir: str) -> str:
    """report.md + WGA-vs-severity plot for a sweep directory holding results.csv."""
    run = RunDir(sweep_dir)
    if not run.exists(SWEEP_RESULTS):
        raise FileNotFoundError(f"{run.path(SWEEP_RESULTS)} does not exist (is this a sweep directory?)")
    df = pd.read_csv(io.StringIO(run.read_text(SWEEP_RESULTS)))
    df["severity_num"] = df["severity"].map(lambda s: 1.0 if str(s) == "original" else float(s))
    keys = ["severity_num", "synthetic_ratio", "method"]
    summary = summarize(df, keys=keys)
    summary["severity"] = summary["severity_num"]
    parts = [f"# raybias sweep: {os.path.basename(sweep_dir.rstrip('/'))}", "",
             "Test accuracy in %, mean ± std over seeds.", ""]
    for ratio, part in summary.groupby("synthetic_ratio"):
        name = severity_png(ratio)
        run.write_figure(name, severity_plot(part, f"worst-group accuracy vs. severity (synthetic_ratio {ratio:g})"))
        parts += [f"## synthetic_ratio = {ratio:g}", "", results_table(part, keys=("severity", "method")), "",
                  f"![WGA vs severity]({name})", ""]
    text = "\n".join(parts)
    run.write_text(SWEEP_REPORT, text)
    _close_figures()
    return text


def report_directory(path: str) -> str:
    """`raybias report DIR`: a run directory or a sweep directory."""
    if os.path.exists(os.path.join(path, SWEEP_RESULTS)):
        text = write_sweep_report(path)
        say(f"report: {os.path.join(path, SWEEP_REPORT)}")
        return text
    run = RunDir(path)
    if not run.exists(INFO):
        raise FileNotFoundError(f"{path} is neither a run directory (no {INFO}) nor a sweep directory "
                                f"(no {SWEEP_RESULTS})")
    methods = run.listdir(CLASSIFIERS_DIR) or None
    text = write_run_report(run, methods)
    summary = summarize(collect_metrics(run, methods), order=methods)
    if not summary.empty:
        say(results_text(summary))
    say(f"report: {run.path(REPORT_MD)}")
    return text
