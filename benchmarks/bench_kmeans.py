"""Distributed K-means (raybias.clustering) vs. scikit-learn's KMeans on one machine.

    .venv/bin/python benchmarks/bench_kmeans.py [--n 1000000] [--dim 512] [--k 8] [--iters 20]

N x dim float32 vectors are generated inside Ray (ray.data.range + map_batches, one seeded
generator per block), so the driver never holds them, and loaded once into the object store
(`VectorBlocks.from_dataset`). raybias runs `iters` Lloyd iterations from k given rows
(tol = 0); then the same vectors are gathered into one array and scikit-learn's KMeans
(algorithm="lloyd", n_init=1, the same initial centroids, max_iter=iters, tol=0) runs on it
in this process. Printed: times, their ratio, inertias, iterations, and the driver's peak RSS
after raybias ran on --rss-n rows and on N rows (before the array for scikit-learn exists).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import machine  # noqa: E402  (benchmarks/machine.py)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def vectors_dataset(n: int, dim: int, block_rows: int, seed: int):
    import ray

    def generate(batch):
        first = int(batch["id"][0])
        rng = np.random.default_rng([seed, first])
        return {"vector": rng.standard_normal((len(batch["id"]), dim), dtype=np.float32)}

    blocks = max(1, -(-n // block_rows))
    return ray.data.range(n, override_num_blocks=blocks).map_batches(generate, batch_format="numpy", batch_size=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--rss-n", type=int, default=250_000, help="a smaller N whose driver peak RSS is compared")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--block-rows", type=int, default=32768)
    p.add_argument("--object-store-gb", type=float, default=0.0, help="0: 2.5 x the data size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()

    import ray

    from raybias.clustering.kmeans import VectorBlocks, kmeans_dataset
    from raybias.ray_utils import ray_data_quiet

    print(machine(extra=("numpy", "sklearn")))
    print("(shared machine: figures may be noisy)")
    data_gb = args.n * args.dim * 4 / 2**30
    store = args.object_store_gb or max(1.0, 2.5 * data_gb)
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, object_store_memory=int(store * 2**30), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    ray_data_quiet(False)
    print(f"data: N={args.n:,} x {args.dim} float32 ({data_gb:.2f} GiB), k={args.k}, {args.iters} iterations, "
          f"tol=0, blocks of {args.block_rows:,} rows, object store {store:.1f} GiB, {cores} CPUs for Ray")
    print(f"driver RSS after ray.init: {current_rss_mb():.0f} MB (peak so far {peak_rss_mb():.0f} MB)")

    results = {}
    peaks = {}
    sizes = sorted({min(args.rss_n, args.n), args.n})
    for n in sizes:
        start = time.perf_counter()
        blocks = VectorBlocks.from_dataset(vectors_dataset(n, args.dim, args.block_rows, args.seed))
        load = time.perf_counter() - start
        init = blocks.take(np.random.default_rng(args.seed + 1).choice(n, args.k, replace=False))
        start = time.perf_counter()
        res = kmeans_dataset(blocks, args.k, init_centroids=init, max_iter=args.iters, tol=0.0)
        fit = time.perf_counter() - start
        results[n] = (blocks, init, res, fit)
        peaks[n] = peak_rss_mb()
        print(f"raybias N={n:>9,}: generate+load into object store {load:6.2f} s, k-means {fit:7.2f} s "
              f"({fit / max(res.n_iter + 1, 1):.3f} s per pass, {res.n_iter} iterations + final assignment), "
              f"inertia {res.inertia:.6e}; driver peak RSS so far {peak_rss_mb():.0f} MB")
        if n != args.n:
            del blocks
            results[n] = (None, init, res, fit)
    print("driver peak RSS (ru_maxrss) after the raybias run on " + ", ".join(
        f"N={n:,}: {peaks[n]:.0f} MB" for n in sizes) + f" (data {', '.join(f'{n * args.dim * 4 / 2**20:.0f}' for n in sizes)} MB)")

    if args.skip_sklearn:
        return
    from sklearn import __version__ as skv
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    blocks, init, res, fit = results[args.n]
    x = np.concatenate(ray.get(blocks.refs))  # the same vectors, now one array in this process
    del blocks
    threads = max((i.get("num_threads", 1) for i in threadpool_info()), default=1)
    start = time.perf_counter()
    sk = KMeans(args.k, init=init, n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd").fit(x)
    sk_time = time.perf_counter() - start
    print(f"scikit-learn {skv} KMeans(lloyd, n_init=1, tol=0, {threads} threads): {sk_time:7.2f} s, "
          f"{sk.n_iter_} iterations, inertia {sk.inertia_:.6e}")
    rel = abs(res.inertia - sk.inertia_) / sk.inertia_
    print(f"\nRESULT N={args.n:,}: raybias {fit:.2f} s vs scikit-learn {sk_time:.2f} s -> ratio {fit / sk_time:.2f}x "
          f"(goal <= 1.5x); inertia relative difference {rel:.2e}; iterations {res.n_iter} vs {sk.n_iter_}")
    ray.shutdown()


if __name__ == "__main__":
    main()
