"""Does docs/results.md's quickstart table say what a run printed?

    python benchmarks/check_results.py RUN_DIR [--strict]

Reads the test WGA / AGA / accuracy of every classifier in RUN_DIR (a finished quickstart:
`make run` leaves it in runs/quickstart), formats them as the docs do (percent, one
decimal, seed 0 alone when the docs table is one seed), and compares them row by row with
the table under "## The quickstart, one seed" in docs/results.md. Prints every row that
differs and the machine the run was made on (the docs name theirs): the pipeline is
deterministic on one machine and one set of library versions, not across CPUs (see
docs/results.md, "Across machines"). CI runs it after `make run` and prints the
comparison; --strict makes a difference an error (exit 1), for a machine that is known to
match the docs'.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "results.md")
SECTION = "## The quickstart, one seed"

Row = Tuple[str, str, str]  # WGA, AGA, accuracy as printed ("73.0")


def docs_table(path: str = DOCS) -> Dict[str, Row]:
    """{method: (wga, aga, acc)} from the first markdown table after SECTION."""
    text = open(path, encoding="utf-8").read()
    start = text.index(SECTION)
    rows: Dict[str, Row] = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        m = re.match(r"^\|\s*([a-z0-9_]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
        elif rows and not line.startswith("|"):
            break
    return rows


def run_table(run_dir: str, seed: int = 0) -> Dict[str, Row]:
    """{method: (wga, aga, acc)} of the run's classifiers of `seed`, formatted as the docs."""
    from raybias.classify.metrics import collect_metrics
    from raybias.registry import method_names
    from raybias.rundir import RunDir

    # methods only (DDB's amplifier is a classifier too, but not a row of the table)
    df = collect_metrics(RunDir(run_dir), methods=method_names(), seeds=[seed])
    return {r["method"]: tuple(f"{100 * r[k]:.1f}" for k in ("wga", "aga", "acc")) for _, r in df.iterrows()}


def compare(docs: Dict[str, Row], run: Dict[str, Row]) -> list:
    """Lines naming each method whose row differs, or is in only one of the two."""
    out = []
    for method in list(docs) + [m for m in run if m not in docs]:
        d, r = docs.get(method), run.get(method)
        if d != r:
            out.append(f"{method:<22} docs {'/'.join(d) if d else '(none)':<18} run {'/'.join(r) if r else '(none)'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a row differs")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine

    docs, run = docs_table(), run_table(args.run_dir)
    diffs = compare(docs, run)
    print(f"docs/results.md quickstart table vs {args.run_dir} ({machine('cpu')}):")
    if not diffs:
        print(f"  equal: all {len(docs)} rows (WGA / AGA / accuracy)")
        return 0
    print(f"  {len(diffs)} of {len(set(docs) | set(run))} rows differ (WGA/AGA/accuracy):")
    for line in diffs:
        print("  " + line)
    return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
