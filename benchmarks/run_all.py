"""Run every benchmark in this folder, one after another, at its default (CPU-sized) settings."""

import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
failed = []
for path in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    print(f"\n===== {os.path.basename(path)} =====", flush=True)
    rc = subprocess.call([sys.executable, path])
    if rc != 0:
        failed.append(os.path.basename(path))
print("\nfailed: " + ", ".join(failed) if failed else "\nall benchmarks finished")
sys.exit(1 if failed else 0)
