"""Classifier training throughput: Parquet streamed through Ray Data vs. in-memory tensors.

Trains the same ERM classifier three times, one after the other in one process and one Ray
session, on colored_digits (severity `original`: every digit in every colour; its 2,514
training images repeated `--repeat` times under new ids, so that an epoch is long enough for
Ray Data's per-epoch start not to be the whole story): with `train.in_memory=true` (each
worker decodes the set into a tensor once), and streaming the Parquet shards through Ray Data
(`ray.train.get_dataset_shard`) — with the decoded set cached in the object store
(`train.stream_cache_mb`, the default for a set this small), and read and decoded in Ray Data
tasks every epoch (`train.stream_cache_mb=0`, what a set too large for the object store gets).
Prints images/s of the training loop (the time spent in the batch loop, which includes
waiting for data; epoch 1 left out as warm-up), the ratios to in-memory, what each data path
costs, and the per-run overhead of a Ray Train trainer (wall time of `fit()` minus the time
the worker spent training).

Run-to-run noise on a 2-core machine (about +-5 %) is as large as the effect measured, so the
paths run `--rounds` times, alternating, the order rotated each round; the cost reported is
the median of the rounds' ratios, each round's ratio printed beside it.

    .venv/bin/python benchmarks/bench_train_data.py [--epochs 8] [--size 16] [--repeat 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import machine  # noqa: E402  (benchmarks/machine.py)


def repeat_training_rows(run, repeat: int) -> None:
    """Rewrite data/real with every training row `repeat` times (ids "<id>~<copy>")."""
    import pandas as pd

    from raybias.data.io import read_table, write_table
    from raybias.layout import REAL

    table = read_table(run, REAL)
    train = table[table["split"] == "train"]
    copies = [train.assign(id=train["id"].astype(str) + f"~{r}") for r in range(1, repeat)]
    run.delete(REAL)
    write_table(run, REAL, pd.concat([table, *copies], ignore_index=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="image size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--repeat", type=int, default=8, help="copies of each training image (new ids)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each path, alternating")
    args = ap.parse_args()

    from raybias.classify.runner import train_classifier
    from raybias.config import config_from_dict
    from raybias.ray_utils import init_ray
    from raybias.rundir import RunDir
    from raybias.stages.prepare import run_prepare

    tmp = tempfile.mkdtemp(prefix="bench-train-data-")
    base = {"run_dir": f"{tmp}/run", "ray": {"num_cpus": args.cpus, "object_store_mb": 500},
            "data": {"severity": "original", "image_size": args.size},
            "train": {"method": "erm", "epochs": args.epochs, "batch_size": args.batch_size}}
    cfg = config_from_dict(base)
    init_ray(cfg, quiet=True)
    run = RunDir(cfg.run_dir)
    run_prepare(cfg, run, verbose=False)
    if args.repeat > 1:
        repeat_training_rows(run, args.repeat)

    paths = (("in-memory tensors", True, 0), ("Ray Data, decoded once", False, 1024),
             ("Ray Data, decode/epoch", False, 0))
    runs = {label: [] for label, _, _ in paths}
    for r in range(args.rounds):
        for label, in_memory, cache_mb in paths[r % len(paths):] + paths[:r % len(paths)]:
            c = config_from_dict({**base, "train": {**base["train"], "in_memory": in_memory,
                                                    "stream_cache_mb": cache_mb}})
            start = time.time()
            rec = train_classifier(c, run, "erm", 0, "fresh")
            wall = time.time() - start
            hist = rec["history"][1:]  # epoch 1: warm-up (streaming also starts its executor)
            images = sum(h["examples"] for h in hist)
            runs[label].append({"loop": images / sum(h["train_time"] for h in hist),
                                "epoch": images / sum(h["epoch_time"] for h in hist), "wall": wall,
                                "overhead": rec["seconds"] - rec["train_seconds"], "n": rec["n_train"],
                                "wga": rec["test"]["wga"]})
    print(machine())
    mem = runs["in-memory tensors"]
    print(f"colored_digits original ({mem[0]['n']} training images, {args.size}px), small_cnn, "
          f"batch {args.batch_size}, {args.epochs} epochs, 1 worker x 1 CPU, {args.rounds} round(s)")
    print(f"{'path (median of rounds)':<24}{'loop img/s':>11}{'epoch img/s':>13}{'fit() s':>9}{'overhead s':>12}"
          f"{'test WGA':>10}")
    for label, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("loop", "epoch", "wall", "overhead", "wga")}
        print(f"{label:<24}{med['loop']:>11.0f}{med['epoch']:>13.0f}{med['wall']:>9.1f}{med['overhead']:>12.1f}"
              f"{100 * med['wga']:>10.1f}")
    for label in ("Ray Data, decoded once", "Ray Data, decode/epoch"):
        loop = [st["loop"] / m["loop"] for st, m in zip(runs[label], mem)]
        epoch = [st["epoch"] / m["epoch"] for st, m in zip(runs[label], mem)]
        ratio = statistics.median(loop)
        print(f"{label} / in-memory: training loop {ratio:.3f} (rounds: {', '.join(f'{x:.3f}' for x in loop)}) "
              f"-> data path costs {100 * (1 - ratio):.1f} %; whole epoch incl. validation "
              f"{statistics.median(epoch):.3f}")
    print("note: the machine may be shared; figures are noisy under load")


if __name__ == "__main__":
    main()
