"""Execution settings never change the table: the quickstart twice, under other settings.

    python benchmarks/bench_settings.py [--keep DIR] [key=value ...]

Runs `raybias run configs/quickstart.yaml` (every method, seed 0) twice in fresh run
directories, in subprocesses as a user would: once as configured, once with every execution
setting that keeps each worker's thread count changed — one sampler actor instead of two,
one fine-tuning job per trainer instead of packs of seven, two classifiers at once instead
of four, another embedding batch size, one embedding actor. docs/results.md claims those
settings decide how the work runs, never what it makes: the two tables must be equal to
the digit. Prints both tables, the rows that differ (none, if the claim holds), each run's
wall time and the machine; exits 1 on a difference.

Thread counts are not among the settings changed: `train.cpus_per_worker`,
`finetune.num_cpus_per_job` and `generate.num_cpus` of 2 or more give torch more intra-op
threads, and a multi-threaded reduction adds in another order (float differences, which the
filter's top-fraction cut and model selection can turn into a different digit). The docs
say so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from bench_quickstart import run_quickstart
from check_results import compare, run_table
from machine import machine

OTHER = ["generate.concurrency=1", "finetune.jobs_per_trainer=1", "train.max_concurrent=2",
         "embed.batch_size=100", "embed.concurrency=1", "finetune.max_concurrent_jobs=2"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", default=None, help="keep the two run directories under this folder")
    ap.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = ap.parse_args()
    print(machine("cpu"))
    root = args.keep or tempfile.mkdtemp(prefix="raybias-bench-settings-")
    os.makedirs(root, exist_ok=True)
    try:
        as_configured = run_quickstart(os.path.join(root, "as-configured"), args.overrides)
        other = run_quickstart(os.path.join(root, "other-settings"), [*args.overrides, *OTHER])
        a, b = run_table(os.path.join(root, "as-configured")), run_table(os.path.join(root, "other-settings"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\nas configured:\n" + as_configured["table"])
    print("\nwith " + " ".join(OTHER) + ":\n" + other["table"])
    diffs = compare(a, b)
    print(f"\nwall: {as_configured['wall']:.0f} s as configured, {other['wall']:.0f} s with the other settings "
          f"({other['wall'] / as_configured['wall']:.2f} x)")
    if diffs:
        print(f"{len(diffs)} of {len(a)} rows differ (as configured vs other settings):")
        for line in diffs:
            print("  " + line.replace(" docs ", " as-configured ").replace(" run ", " other "))
        return 1
    print(f"equal: all {len(a)} rows, to the digit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
