"""Run directories on S3-compatible storage: a real S3 server (moto's) on 127.0.0.1, reached
through pyarrow's S3 filesystem by the driver and by Ray workers."""

from __future__ import annotations

import os
import pickle
import socket

import pytest

# Set while pytest collects, before the session's Ray starts, so that Ray workers inherit them
# exactly as cluster pods inherit their credentials. Dummy values: the server is local.
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_key, _value)

BUCKET = "raybias-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server with one bucket; yields the endpoint host:port."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def _uri(endpoint: str, name: str, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/{name}?endpoint_override={endpoint}&scheme=http"


def _keys(endpoint: str, prefix: str):
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def prepared_s3(s3_server, ray_session):
    """`raybias prepare` into an S3 run directory, through the CLI."""
    from raybias.cli import main

    uri = _uri(s3_server, "prepared")
    rc = main(["prepare", "configs/quickstart.yaml", "data.severity=0.95", "--run-dir", uri])
    assert rc == 0
    return uri


def test_prepare_writes_the_run_to_s3(prepared_s3, s3_server):
    from raybias.data.info import DatasetInfo
    from raybias.data.io import read_table
    from raybias.layout import REAL
    from raybias.rundir import RunDir

    keys = _keys(s3_server, "prepared/")
    names = [k[len("prepared/"):] for k in keys]
    assert "manifest.json" in names and "data/info.json" in names and "data/real/_SUCCESS" in names
    assert any(n.startswith("data/real/") and n.endswith(".parquet") for n in names)
    # Nothing temporary is left behind once the stage is done.
    assert not [n for n in names if ".tmp-" in n], names

    run = RunDir(prepared_s3)
    assert run.uri == f"s3://{BUCKET}/prepared" and not run.is_local
    assert run.is_done("prepare")
    info = DatasetInfo.load(run)
    table = read_table(run, REAL)
    assert set(table.columns) >= {"id", "image", "y", "a", "group", "split", "source"}
    for split in ("train", "val", "test"):
        got = table[table["split"] == split]["group"].value_counts().to_dict()
        want = {int(g): n for g, n in info.counts[split].items() if n}
        assert got == want
    assert table["id"].is_unique


def test_resume_on_s3_skips_finished_work_and_refuses_a_changed_config(prepared_s3, capsys):
    from raybias.cli import main
    from raybias.rundir import RunDir

    before = RunDir(prepared_s3).stage_record("prepare")
    assert main(["prepare", "configs/quickstart.yaml", "data.severity=0.95", "--run-dir", prepared_s3,
                 "--resume"]) == 0
    after = RunDir(prepared_s3).stage_record("prepare")
    assert after["finished_at"] == before["finished_at"]  # skipped, not redone

    capsys.readouterr()
    rc = main(["prepare", "configs/quickstart.yaml", "data.severity=0.9", "--run-dir", prepared_s3, "--resume"])
    assert rc == 2
    assert "data.severity: 0.95 -> 0.9" in capsys.readouterr().err


def test_work_units_resume_from_another_process_view(s3_server):
    """What a killed stage left (finished units) is seen by a new RunDir built from spec()."""
    from raybias.config import config_from_dict
    from raybias.rundir import RunDir

    cfg = config_from_dict({})
    run = RunDir(_uri(s3_server, "units"))
    st = run.begin_stage("generate/lora", cfg, ("data", "generate"), mode="resume")
    assert not st.skip and st.done_units == []
    run.write_bytes("synthetic/lora/shards/unit-00000.parquet", b"shard 0")
    run.mark_units("generate/lora", ["unit-00000"])

    again = RunDir(run.spec())  # e.g. the resumed driver, or an actor
    st2 = again.begin_stage("generate/lora", cfg, ("data", "generate"), mode="resume")
    assert st2.done_units == ["unit-00000"] and not st2.skip
    assert again.read_bytes("synthetic/lora/shards/unit-00000.parquet") == b"shard 0"
    again.finish_stage("generate/lora")
    assert RunDir(run.spec()).begin_stage("generate/lora", cfg, ("data", "generate"), mode="resume").skip

    # A sub-run (a sweep's severity folder) keeps the endpoint options.
    child = RunDir(run.child_spec("sweeps", "s", "severity-0.95"))
    child.write_text("hello.txt", "hi")
    assert child.uri == f"{run.uri}/sweeps/s/severity-0.95"
    assert run.read_text("sweeps/s/severity-0.95/hello.txt") == "hi"


def test_a_table_without_its_marker_is_refused(s3_server, ray_session):
    import pandas as pd

    from raybias.data.io import MARKER, TableMissing, read_table, write_table
    from raybias.data.images import encode_png
    from raybias.rundir import RunDir

    import numpy as np

    run = RunDir(_uri(s3_server, "partial"))
    img = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    df = pd.DataFrame({"id": [f"r{i}" for i in range(6)], "image": [img] * 6, "y": [0, 1] * 3, "a": [0] * 6,
                       "group": [0, 2] * 3, "split": ["train"] * 6, "source": ["real"] * 6})
    write_table(run, "data/real", df, shard_rows=2)
    assert len(read_table(run, "data/real")) == 6
    run.delete("data/real", MARKER)  # as if the writer died before its last step
    with pytest.raises(TableMissing, match="incomplete"):
        read_table(run, "data/real")


def test_the_filesystem_travels_to_ray_workers(prepared_s3, ray_session):
    """Workers get the endpoint through the pickled filesystem, credentials from their env."""
    import ray

    from raybias.layout import REAL
    from raybias.data.io import read_dataset, read_table
    from raybias.rundir import RunDir

    run = RunDir(prepared_s3)
    clone = pickle.loads(pickle.dumps(run.fs))
    with clone.open_input_stream(run.path("manifest.json")) as f:
        assert f.read() == run.read_bytes("manifest.json")

    @ray.remote
    def read_in_worker(fs, path):
        with fs.open_input_stream(path) as f:
            return os.getpid(), f.read()

    pid, data = ray.get(read_in_worker.remote(run.fs, run.path("data/info.json")))
    assert pid != os.getpid() and data == run.read_bytes("data/info.json")

    # Ray Data reads the shards in its workers (its writes from workers made data/real in prepare).
    ids = sorted(row["id"] for row in read_dataset(run, REAL, columns=["id"]).take_all())
    assert ids == sorted(read_table(run, REAL, columns=["id"])["id"])


def test_a_missing_bucket_is_a_clear_error(s3_server, capsys):
    from raybias.cli import main
    from raybias.rundir import RunDir, StageFailed

    uri = _uri(s3_server, "run", bucket="no-such-bucket")
    with pytest.raises(StageFailed, match="no-such-bucket"):
        RunDir(uri)
    assert main(["prepare", "configs/quickstart.yaml", "--run-dir", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raybias: error:") and "s3://no-such-bucket/run" in err
