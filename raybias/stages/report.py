"""Stage `report`: `report/report.md` with the results a user reads, and its figures.

For a run: the results table (per method WGA, AGA, accuracy as mean ± std over seeds),
per-group test accuracies, a bar chart of WGA per method, sample grids of real and
synthetic images per group, and stage timings. For a sweep directory: the same table per
severity and a WGA-vs-severity line plot per method.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from raybias.classify.metrics import collect_metrics, pct, summarize
from raybias.rundir import RunDir

REPORT = "report"


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


def sample_grid(run: RunDir, per_group: int = 6):
    """Rows: groups; column blocks: real training images, then each generator's synthetic set."""
    from raybias.data.images import decode
    from raybias.data.info import REAL, DatasetInfo
    from raybias.data.io import read_table
    from raybias.data.synthetic import finished_units, read_synthetic

    info = DatasetInfo.load(run)
    sets = {"real": read_table(run, REAL, columns=["id", "image", "group", "split"], split="train")}
    for gen in run.listdir("synthetic"):
        if finished_units(run, gen):
            sets[gen] = read_synthetic(run, gen, filtered=True, columns=["id", "image", "group"])
    plt = _plt()
    n_cols = per_group * len(sets)
    fig, axes = plt.subplots(info.n_groups, n_cols, figsize=(0.55 * n_cols + 1.5, 0.6 * info.n_groups + 0.8),
                             squeeze=False)
    rng = np.random.default_rng(0)
    for g in range(info.n_groups):
        for j, (name, df) in enumerate(sets.items()):
            imgs = df[df["group"] == g]["image"].tolist()
            pick = rng.choice(len(imgs), size=min(per_group, len(imgs)), replace=False) if imgs else []
            for i in range(per_group):
                ax = axes[g, j * per_group + i]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if i < len(pick):
                    ax.imshow(decode(imgs[pick[i]]), interpolation="nearest")
                if g == 0 and i == 0:
                    ax.set_title(name, fontsize=8, loc="left")
            if j == 0:
                axes[g, 0].set_ylabel(info.group_name(g), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("samples per group: real training images, then each generator's (filtered) synthetic set",
                 fontsize=9)
    return fig


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


def _timings_table(run: RunDir) -> str:
    secs = run.stage_seconds()
    if not secs:
        return "(no stage timings recorded)"
    lines = ["| stage | seconds |", "|---|---|"]
    for k, v in secs.items():
        lines.append(f"| {k} | {v:.1f} |")
    lines.append(f"| **all stages** | {sum(secs.values()):.1f} |")
    return "\n".join(lines)


def write_run_report(run: RunDir, methods: Optional[List[str]] = None, title: Optional[str] = None) -> str:
    from raybias.data.info import DatasetInfo

    info = DatasetInfo.load(run)
    df = collect_metrics(run, methods)
    summary = summarize(df, order=methods)
    sev = "original" if info.severity is None else f"{info.severity:g}"
    title = title or f"raybias report: {info.source}, severity {sev}"
    parts = [f"# {title}", "", f"Run directory: `{run.uri}`", ""]
    counts = info.counts.get("train", {})
    parts += ["## Data", "", "Training images per group (after severity); val/test untouched:", "",
              "| group | aligned | train | val | test |", "|---|---|---|---|---|"]
    for g in range(info.n_groups):
        parts.append(f"| {info.group_name(g)} | {'yes' if info.is_aligned(g) else 'no'} | {counts.get(str(g), 0)} | "
                     f"{info.counts.get('val', {}).get(str(g), 0)} | {info.counts.get('test', {}).get(str(g), 0)} |")
    parts.append("")
    if summary.empty:
        parts += ["## Results", "", "No classifier has finished in this run yet.", ""]
    else:
        run.write_figure(f"{REPORT}/wga_by_method.png", wga_bar_chart(summary, title))
        parts += ["## Results", "",
                  "Test accuracy in %, mean ± std over seeds; model selection by validation worst-group accuracy.",
                  "", results_table(summary), "", "![WGA per method](wga_by_method.png)", "",
                  "## Per-group test accuracy", "", _group_table(summary, info), ""]
        df.to_csv(run.path(REPORT, "results_by_seed.csv"), index=False) if run.is_local else \
            run.write_text(f"{REPORT}/results_by_seed.csv", df.to_csv(index=False))
    try:
        run.write_figure(f"{REPORT}/samples.png", sample_grid(run))
        parts += ["## Samples", "", "![samples per group](samples.png)", ""]
    except Exception as exc:  # a report must not fail on a missing picture
        parts += ["## Samples", "", f"(sample grid unavailable: {exc})", ""]
    parts += ["## Stage timings", "", _timings_table(run), ""]
    text = "\n".join(parts)
    run.write_text(f"{REPORT}/report.md", text)
    _close_figures()
    return text


def _close_figures() -> None:
    _plt().close("all")


def run_report(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> str:
    # The report is cheap and reflects everything in the run: always rewritten.
    text = write_run_report(run, list(cfg.methods))
    if verbose:
        summary = summarize(collect_metrics(run, list(cfg.methods)), order=list(cfg.methods))
        if not summary.empty:
            print("\nResults (test accuracy %, mean ± std over seeds):")
            print(results_text(summary))
        print(f"\nreport: {run.path(REPORT, 'report.md')}")
    return text


# --- sweeps --------------------------------------------------------------------------------

def write_sweep_report(sweep_dir: str) -> str:
    """report.md + WGA-vs-severity plot for a sweep directory holding results.csv."""
    run = RunDir(sweep_dir)
    if not run.exists("results.csv"):
        raise FileNotFoundError(f"{run.path('results.csv')} does not exist (is this a sweep directory?)")
    df = pd.read_csv(run.path("results.csv")) if run.is_local else pd.read_csv(
        __import__("io").StringIO(run.read_text("results.csv")))
    df["severity_num"] = df["severity"].map(lambda s: 1.0 if str(s) == "original" else float(s))
    keys = ["severity_num", "synthetic_ratio", "method"]
    summary = summarize(df, keys=keys)
    summary["severity"] = summary["severity_num"]
    parts = [f"# raybias sweep: {os.path.basename(sweep_dir.rstrip('/'))}", "",
             "Test accuracy in %, mean ± std over seeds.", ""]
    for ratio, part in summary.groupby("synthetic_ratio"):
        name = f"wga_vs_severity_r{ratio:g}.png"
        run.write_figure(name, severity_plot(part, f"worst-group accuracy vs. severity (synthetic_ratio {ratio:g})"))
        parts += [f"## synthetic_ratio = {ratio:g}", "", results_table(part, keys=("severity", "method")), "",
                  f"![WGA vs severity]({name})", ""]
    text = "\n".join(parts)
    run.write_text("report.md", text)
    _close_figures()
    return text


def report_directory(path: str) -> str:
    """`raybias report DIR`: a run directory or a sweep directory."""
    if os.path.exists(os.path.join(path, "results.csv")):
        text = write_sweep_report(path)
        print(f"report: {os.path.join(path, 'report.md')}")
        return text
    run = RunDir(path)
    if not run.exists("data/info.json"):
        raise FileNotFoundError(f"{path} is neither a run directory (no data/info.json) nor a sweep directory "
                                "(no results.csv)")
    methods = run.listdir("classifiers") or None
    text = write_run_report(run, methods)
    summary = summarize(collect_metrics(run, methods), order=methods)
    if not summary.empty:
        print(results_text(summary))
    print(f"report: {run.path(REPORT, 'report.md')}")
    return text
