"""Built-in embedder: throughput through the Ray Data actor pool vs. the bare loop, and quality.

    .venv/bin/python benchmarks/bench_embed.py [--n 50000] [--batch-size 256] [--skip-quality]

Speed: N colored-digit PNGs (16 x 16) are embedded (1) by the bare model loop in this process
(one thread, as one actor gets) and (2) by `raybias.embed.embed_dataset` on a local Ray with 1
actor and with one actor per core. The Ray figure includes reading the blocks, starting the
actors and collecting the vectors. Overhead = Ray time / bare time - 1 at 1 actor, end to end
and in steady state (throughput after the pool delivered its first batch, i.e. without the
one-off actor start).

Quality: for each group of colored_digits at severity 0.95 (train split), K-means(k=5) of the
built-in embeddings vs. the digit labels, adjusted Rand index (mean over 5 seeds), next to
the same for raw RGB pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import machine  # noqa: E402  (benchmarks/machine.py)
from raybias.embed import EmbedBatches  # noqa: E402


def make_images(n: int, size: int = 16, seed: int = 0):
    """n colored-digit PNGs: scikit-learn's digits in random palette colours."""
    from sklearn.datasets import load_digits

    from raybias.palette import COLOR_RGB
    from raybias.data.images import encode_png
    from raybias.data.sources.colored_digits import colorize

    digits = load_digits()
    rng = np.random.default_rng(seed)
    colours = list(COLOR_RGB.values())
    base = [[encode_png(colorize(digits.images[i], c, size)) for c in colours] for i in range(len(digits.images))]
    pick = rng.integers(0, len(digits.images), n)
    col = rng.integers(0, len(colours), n)
    return [base[i][c] for i, c in zip(pick, col)]


class TimedEmbedBatches(EmbedBatches):
    """EmbedBatches that also reports its process id and CPU time with every batch."""

    def __call__(self, batch):
        import pyarrow as pa

        out = super().__call__(batch)
        out = out.append_column("cpu_s", pa.array(np.full(out.num_rows, time.process_time())))
        return out.append_column("pid", pa.array(np.full(out.num_rows, os.getpid())))


def bench_speed(n: int, batch_size: int) -> None:
    import pyarrow as pa
    import ray
    from threadpoolctl import threadpool_limits

    from raybias.embed import embed_dataset, get_embedder

    images = make_images(n)
    print(f"\n== speed: {n} images of 16x16, batch {batch_size} ==")
    embedder = get_embedder(None)
    embedder.embed_images(images[:batch_size])  # warm caches

    def bare_loop():
        with threadpool_limits(1):
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(0, n, batch_size):
                embedder.embed_images(images[i:i + batch_size])
            return time.perf_counter() - start, time.process_time() - cpu

    bare, bare_cpu = bare_loop()
    print(f"bare loop, 1 process 1 thread : {bare:7.2f} s  {n / bare:9.0f} images/s   CPU {bare_cpu:6.2f} s")

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=1 << 30)
    from raybias.ray_utils import ray_data_quiet

    ray_data_quiet(False)
    table = pa.table({"id": [f"i{i:07d}" for i in range(n)], "group": np.zeros(n, np.int64),
                      "image": pa.array(images, pa.binary())})
    blocks = max(cores * 4, n // 4096)
    for actors in sorted({1, cores}):
        ds = ray.data.from_arrow(table).repartition(blocks).materialize()  # the input, already in Ray
        start = time.perf_counter()
        driver_cpu = time.process_time()
        out = embed_dataset(ds, {"embedder": "builtin", "batch_size": batch_size, "concurrency": actors,
                                 "num_gpus": 0.0}, actor_class=TimedEmbedBatches)
        rows, first, first_rows = 0, None, 0
        cpu_marks = {}  # actor pid -> (first, last) process CPU time seen in its batches
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += batch.num_rows
            if first is None:  # the pool is up and has delivered its first batch
                first, first_rows = time.perf_counter(), batch.num_rows
            pid, cpu = batch.column("pid")[0].as_py(), batch.column("cpu_s")[0].as_py()
            if pid not in cpu_marks:  # this actor's first batch: [cpu at its end, cpu now, rows since]
                cpu_marks[pid] = [cpu, cpu, 0]
            else:
                mark = cpu_marks[pid]
                mark[1], mark[2] = max(mark[1], cpu), mark[2] + batch.num_rows
        took = time.perf_counter() - start
        driver_cpu = time.process_time() - driver_cpu
        assert rows == n
        steady = (n - first_rows) / max(time.perf_counter() - first, 1e-9)
        actor_cpu = sum(m[1] for m in cpu_marks.values())  # whole actor processes, start-up included
        steady_rows = sum(m[2] for m in cpu_marks.values())
        steady_cpu = sum(m[1] - m[0] for m in cpu_marks.values()) / max(steady_rows, 1) * n
        extra = (f"overhead {100 * (took / bare - 1):+.1f} % end to end, "
                 f"{100 * ((n / bare) / steady - 1):+.1f} % once the actors are up" if actors == 1
                 else f"speed-up {bare / took:.2f}x end to end")
        print(f"Ray Data actor pool, {actors} actor(s): {took:7.2f} s  {n / took:9.0f} images/s, "
              f"{steady:9.0f} images/s after the first batch ({extra} vs bare loop)")
        print(f"    CPU: actors {actor_cpu:6.2f} s (start-up included) + driver {driver_cpu:5.2f} s = "
              f"{actor_cpu + driver_cpu:6.2f} s vs bare {bare_cpu:6.2f} s -> "
              f"{100 * ((actor_cpu + driver_cpu) / bare_cpu - 1):+.1f} % CPU overhead (load-independent); "
              f"actors after their first batch: {steady_cpu:6.2f} s per {n} images -> "
              f"{100 * (steady_cpu / bare_cpu - 1):+.1f} %")
    ray.shutdown()
    again, again_cpu = bare_loop()
    print(f"bare loop again (load drift check): {again:7.2f} s  {n / again:9.0f} images/s   CPU {again_cpu:6.2f} s")


def bench_quality(seeds: int = 5) -> None:
    from sklearn.metrics import adjusted_rand_score

    from raybias.clustering import assign, kmeans_dataset
    from raybias.config import config_from_dict
    from raybias.data.images import decode
    from raybias.data.severity import aligned_values, apply_severity
    from raybias.data.sources import load_source
    from raybias.embed import get_embedder

    cfg = config_from_dict({"data": {"severity": 0.95, "image_size": 16}})
    src = load_source(cfg.data)
    train = src.table[src.table["split"] == "train"]
    aligned = aligned_values(train, src.n_classes, src.n_bias, None, src.default_aligned)
    table = apply_severity(src.table, 0.95, aligned, cfg.data.seed)
    train = table[table["split"] == "train"]
    embedder = get_embedder(None)
    print(f"\n== quality: K-means(k=5) per group vs. digit labels, colored_digits severity 0.95, "
          f"adjusted Rand index, mean over {seeds} seeds (n_init=4) ==")
    print(f"{'group':<24}{'n':>6}{'built-in':>10}{'raw pixels':>12}")
    for g, rows in train.groupby("group"):
        if len(rows) < 25:
            print(f"{g:<3}{'(too few images: ' + str(len(rows)) + ')':<21}")
            continue
        images = rows["image"].tolist()
        feats = {"built-in": embedder.embed_images(images),
                 "raw pixels": np.stack([decode(b).reshape(-1) for b in images]).astype(np.float32) / 255}
        out = {}
        for name, x in feats.items():
            scores = []
            for seed in range(seeds):
                fit = kmeans_dataset(x, 5, seed=seed, n_init=4)
                scores.append(adjusted_rand_score(rows["digit"], assign(x, fit.centroids)))
            out[name] = np.mean(scores)
        name = f"{g} digit{'<' if g < src.n_bias else '>='}5/{src.bias_names[g % src.n_bias]}"
        print(f"{name:<24}{len(rows):>6}{out['built-in']:>10.3f}{out['raw pixels']:>12.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000, help="images for the speed test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args()
    print(machine(extra=("numpy", "sklearn")))
    print("(shared machine: figures may be noisy)")
    bench_speed(args.n, args.batch_size)
    if not args.skip_quality:
        bench_quality()


if __name__ == "__main__":
    main()
