"""Loading real-format image files for `prepare`: raybias's loader against the plain way.

Writes N CelebA-like JPEGs (178x218, quality 90) to a temporary folder, then loads them
to `--size` px PNG bytes two ways in one process:
- baseline: one file after another, full-size decode, resize (what a simple loop does);
- raybias: `raybias.data.images.load_files` (JPEG draft downscaling + centre crop, on a
  thread pool of `--workers` threads, 0 = the default), storing PNG, and storing JPEG.
Prints images/s for each, the ratio, and the machine. Usage:
    python benchmarks/bench_image_loading.py [--n 2000] [--size 64] [--workers 0]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from machine import machine  # benchmarks/machine.py


def write_files(folder: str, n: int) -> list:
    rng = np.random.default_rng(0)
    # A smooth picture plus noise compresses like a photo (not like pure noise).
    yy, xx = np.mgrid[0:218, 0:178]
    base = np.stack([(xx * 1.3) % 255, (yy * 1.1) % 255, ((xx + yy) * 0.7) % 255], -1)
    paths = []
    for i in range(n):
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        p = os.path.join(folder, f"{i:06d}.jpg")
        with open(p, "wb") as f:
            f.write(buf.getvalue())
        paths.append(p)
    return paths


def baseline_load(paths, size):
    out = []
    for p in paths:
        with open(p, "rb") as f:
            img = Image.open(io.BytesIO(f.read()))
            img.load()
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    from raybias.data.images import default_workers, load_files

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = write_files(tmp, args.n)
        print(f"wrote {args.n} JPEGs (178x218) in {time.perf_counter() - t:.1f}s")
        baseline_load(paths[:50], args.size)  # warm the page cache and Pillow
        t = time.perf_counter()
        base = baseline_load(paths, args.size)
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        ours = load_files(paths, args.size, center_crop=True, workers=args.workers)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ours1 = load_files(paths, args.size, center_crop=True, workers=1)
        t_ours1 = time.perf_counter() - t
        t = time.perf_counter()
        load_files(paths, args.size, center_crop=True, workers=args.workers, image_format="jpeg")
        t_jpeg = time.perf_counter() - t
    assert len(base) == len(ours) == len(ours1) == args.n
    workers = args.workers or default_workers()
    print(machine(extra=("PIL",)))
    print(f"{args.n} files -> {args.size}px PNG")
    print(f"  baseline (sequential, full decode):   {t_base:7.2f}s  {args.n / t_base:8.0f} img/s")
    print(f"  raybias load_files, 1 thread:         {t_ours1:7.2f}s  {args.n / t_ours1:8.0f} img/s")
    print(f"  raybias load_files, {workers:2d} threads:       {t_ours:7.2f}s  {args.n / t_ours:8.0f} img/s")
    print(f"  raybias load_files, {workers:2d} threads, jpeg: {t_jpeg:7.2f}s  {args.n / t_jpeg:8.0f} img/s"
          "  (data.image_format=jpeg)")
    print(f"  speed-up over baseline: {t_base / t_ours:.2f}x (draft decode alone: {t_base / t_ours1:.2f}x)")
    print(f"  at this rate CelebA's 202,599 files take {202599 / (args.n / t_ours) / 60:.1f} min")


if __name__ == "__main__":
    main()
