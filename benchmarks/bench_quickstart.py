"""The quickstart end to end (`make run`): wall time against its 10-minute budget, per stage.

Runs `raybias run configs/quickstart.yaml` (every method, the config's seeds) in a fresh run
directory in a subprocess, exactly as a user would, then reads the run's own stage timings
(report/timings.json) and prints them beside the budget. The baseline here is the budget the
project set for a 2-core machine without a GPU (600 s), so the ratio printed is time / budget;
a second, baselines-only run (erm, reweight, groupdro, jtt) shows what the generative methods
add on top of what any user of Group-DRO already pays.

    python benchmarks/bench_quickstart.py [--skip-baselines] [--keep DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from machine import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 600.0
BASELINES = "methods=[erm,reweight,groupdro,jtt]"


def run_quickstart(run_dir: str, overrides: list) -> dict:
    """One `raybias run` in a subprocess; returns wall time and the run's own stage timings."""
    cmd = [sys.executable, "-m", "raybias", "run", os.path.join(REPO, "configs", "quickstart.yaml"), *overrides,
           "--run-dir", run_dir]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise SystemExit(f"raybias run exited {proc.returncode}")
    with open(os.path.join(run_dir, "report", "timings.json")) as f:
        timings = json.load(f)
    table = proc.stdout[proc.stdout.find("Results ("):proc.stdout.find("report:")].strip()
    return {"wall": wall, "timings": timings, "table": table}


def stage_seconds(timings: dict) -> dict:
    """{stage: seconds} from report/timings.json (the pipeline writes the stage -> seconds map)."""
    order = ["prepare", "base", "embed", "cluster", "finetune", "generate", "filter", "ddb", "train", "report"]
    return {k: float(timings[k]) for k in order if k in timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-baselines", action="store_true", help="only the full quickstart")
    ap.add_argument("--keep", default=None, help="keep the run directories under this folder")
    ap.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. seeds=[0,1,2]")
    args = ap.parse_args()

    print(machine("cpu"))
    root = args.keep or tempfile.mkdtemp(prefix="raybias-bench-quickstart-")
    os.makedirs(root, exist_ok=True)
    try:
        full = run_quickstart(os.path.join(root, "full"), args.overrides)
        base = None if args.skip_baselines else run_quickstart(os.path.join(root, "baselines"),
                                                                [BASELINES, *args.overrides])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(full["table"])
    print(f"\n{'stage':<12}{'quickstart s':>14}" + ("" if base is None else f"{'baselines only s':>18}"))
    full_st = stage_seconds(full["timings"])
    base_st = {} if base is None else stage_seconds(base["timings"])
    for stage, sec in full_st.items():
        extra = "" if base is None else f"{base_st.get(stage, 0.0):>18.0f}"
        print(f"{stage:<12}{sec:>14.0f}{extra}")
    print(f"\nquickstart (every method): {full['wall']:.0f} s wall = {full['wall'] / BUDGET_S:.2f} x the "
          f"{BUDGET_S:.0f} s budget ({'within' if full['wall'] <= BUDGET_S else 'OVER'} budget)")
    if base is not None:
        print(f"baselines only: {base['wall']:.0f} s; the generative methods and DDB add "
              f"{full['wall'] - base['wall']:.0f} s ({full['wall'] / base['wall']:.2f} x)")


if __name__ == "__main__":
    main()
