"""What a Ray Train report costs: raybias's local Ray (controllers polling every 0.2 s) against
Ray's default (every 2 s), in one process.

`ray.train.report` hands the result to the trainer's controller, which takes reports every
`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`; each report waits for that poll. raybias's classifiers
report every epoch (78 times for a two-stage classifier with `train.stage2: auto`) and packed
fine-tuning jobs once each, so on small work the wait is most of the time. raybias sets the
interval for the Ray it starts (`raybias.ray_utils.pinned_env`); this runs the same trainer
(one CPU worker, --reports reports each with a small checkpoint) on a local Ray started as
raybias starts it, once with raybias's interval and once with Ray's default, and prints both
start-up, the time per report and their ratio.

    python benchmarks/bench_train_reports.py              # 20 reports
    python benchmarks/bench_train_reports.py --reports 50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from machine import machine  # noqa: E402  (benchmarks/machine.py)

RAY_DEFAULT_S = "2"


def _loop(config):
    import ray.train

    for i in range(int(config["reports"])):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.bin"), "wb") as f:
                f.write(os.urandom(64 * 1024))
            ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(d))


def one_run(interval: str, reports: int, storage: str) -> float:
    """Seconds for one trainer of `reports` reports, on a local Ray whose controllers poll
    every `interval` seconds (set the way raybias sets it: the caller's environment)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raybias import ray_utils
    from raybias.config import load_config

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    cfg = load_config(os.path.join(os.path.dirname(HERE), "configs", "quickstart.yaml"),
                      ["ray.num_cpus=2", "ray.object_store_mb=200"])
    ray_utils.init_ray(cfg, quiet=True)
    try:
        start = time.perf_counter()
        TorchTrainer(_loop, train_loop_config={"reports": reports}, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=storage, name=f"reports-{interval}")).fit()
        return time.perf_counter() - start
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=20)
    args = ap.parse_args()
    from raybias.ray_utils import TRAIN_POLL_S

    print(machine())
    n = max(2, args.reports)
    runs = {}
    with tempfile.TemporaryDirectory() as storage:
        for interval in (TRAIN_POLL_S, RAY_DEFAULT_S):
            # one report measures the start-up (workers, placement group); n reports add n - 1
            runs[interval] = (one_run(interval, 1, storage), one_run(interval, n, storage))
    print(f"one CPU worker, a 64 KiB checkpoint per report; start-up = the 1-report run, per report = "
          f"(the {n}-report run - the 1-report run) / {n - 1}:")
    per = {}
    for interval, name in ((TRAIN_POLL_S, "raybias's interval"), (RAY_DEFAULT_S, "Ray's default     ")):
        one, many = runs[interval]
        per[interval] = (many - one) / (n - 1)
        print(f"  {name} {interval:>3} s: {n} reports {many:6.2f} s, start-up {one:6.2f} s, "
              f"{per[interval]:.3f} s a report")
    print(f"  ratio per report (default / raybias): {per[RAY_DEFAULT_S] / max(per[TRAIN_POLL_S], 1e-9):.2f}x")

if __name__ == "__main__":
    main()
