"""Publishing files in a run directory: a temporary name + rename, against one direct write.

raybias never lets a reader see half a file. On a local disk that takes a temporary name
and an atomic rename. On S3 a rename is a server-side copy plus a delete (three requests
and the bytes copied once more), while one PUT is already all-or-nothing: the object appears
only when the upload completes. This measures both protocols on both stores, in one process:
- local: a temporary folder on this machine's disk;
- s3: an S3-compatible server on 127.0.0.1 (moto's, Python: far slower per request than AWS,
  so read the ratio more than the absolute figures).
Files: many small JSON documents (the manifest is rewritten after every work unit) and a few
large Parquet-sized shards. `RunDir.write_bytes` uses the rename everywhere: with a single
PUT, whether a write that failed halfway stays invisible would rest on how the S3 stream
closes after an error, and the rename's price is small next to the GPU minutes of a unit.
Usage:
    python benchmarks/bench_run_storage.py [--small 200] [--large 8] [--large-mb 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
import uuid

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pyarrow.fs as pafs  # noqa: E402

from machine import machine  # noqa: E402  (benchmarks/machine.py)


def write_renamed(fs, target: str, data: bytes) -> None:
    parent, name = target.rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, target)


def write_direct(fs, target: str, data: bytes) -> None:
    with fs.open_output_stream(target) as f:
        f.write(data)


def timed(fn, fs, root: str, blobs) -> float:
    start = time.perf_counter()
    for i, data in enumerate(blobs):
        fn(fs, f"{root}/f{i:05d}", data)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=200, help="small JSON files")
    ap.add_argument("--large", type=int, default=8, help="large shards")
    ap.add_argument("--large-mb", type=float, default=8.0)
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench-runs")
    s3, s3_root = pafs.FileSystem.from_uri(f"s3://bench-runs/run?endpoint_override=127.0.0.1:{port}&scheme=http")
    tmp = tempfile.mkdtemp(prefix="bench-run-")
    stores = {"local": (pafs.LocalFileSystem(), tmp), "s3": (s3, s3_root)}

    rng = __import__("numpy").random.default_rng(0)
    small = [(b'{"stages": {"generate/lora": {"units": [' + b'"unit-00001", ' * 120 + b'""]}}}')] * args.small
    large = [rng.integers(0, 256, int(args.large_mb * 2**20), dtype="uint8").tobytes() for _ in range(args.large)]

    print(machine(extra=("pyarrow",)))
    print("(shared machine: other work may be running, figures can be noisy)\n")
    print(f"{'store':<6} {'files':<22} {'rename: s':>10} {'direct: s':>10} {'per file (ms)':>20} {'rename/direct':>14}")
    for store, (fs, root) in stores.items():
        for label, blobs in ((f"{len(small)} x {len(small[0]) / 1024:.1f} KB json", small),
                             (f"{len(large)} x {args.large_mb:g} MB shard", large)):
            fs.create_dir(f"{root}/{label[:2]}r", recursive=True)
            fs.create_dir(f"{root}/{label[:2]}d", recursive=True)
            t_direct = timed(write_direct, fs, f"{root}/{label[:2]}d", blobs)
            t_rename = timed(write_renamed, fs, f"{root}/{label[:2]}r", blobs)
            n = len(blobs)
            print(f"{store:<6} {label:<22} {t_rename:>10.2f} {t_direct:>10.2f} "
                  f"{1000 * t_rename / n:>9.1f} / {1000 * t_direct / n:>7.1f} {t_rename / t_direct:>13.2f}x")
    server.stop()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
