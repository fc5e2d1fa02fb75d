"""Faults on a real multi-node Ray: a worker node is killed while it generates.

The scenario runs in its own Python process (`NODE_KILL` below), so the session's local Ray of
the other tests is never touched: it starts a `ray.cluster_utils.Cluster` on this machine, all
bound to 127.0.0.1 (`loopback_only`), with a head of 0 CPUs (so the sampler actor can only live
on a worker node) and one worker node of 1 CPU. It makes the vanilla set through the project's
own `generate_set` (in a thread), and as soon as the first shard is in place SIGKILLs every
process of the worker node (`remove_node(allow_graceful=False)`, then the node's workers, the
sampler actor among them, as when the machine is gone) and adds a replacement node, as an
autoscaler would. Ray Data restarts the actor there and retries the lost unit. The stage must
end with exactly the planned images: every planned unit's shard reads whole with its planned ids
and seeds, no id twice, nothing else under a shard's name. Should Ray give up on the lost node
instead, the stage must fail saying `--resume`, and the resume must complete the set exactly.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf
from PIL import Image

from raybias.data.synthetic import finished_units
from raybias.layout import shards_dir, unit_name
from raybias.rundir import RunDir
from test_generate import _check_set, _info, expanded, gen_config

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

NODE_KILL = r"""
import json, sys, threading, time

import psutil
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from raybias.config import load_config
from raybias.data.synthetic import finished_units
from raybias.ray_utils import loopback_only, ray_data_quiet
from raybias.rundir import RunDir, StageFailed
from raybias.stages.generate import generate_set

config_file, out_file = sys.argv[1], sys.argv[2]
cfg = load_config(config_file)
run = RunDir(cfg.run_dir)
GEN = "vanilla"
NODE = dict(node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)
facts = {"outcome": None, "resumed": False}
started = time.time()

def node_workers(node):
    # the worker processes a node's raylet started: {pid: process title}
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    out = {}
    for p in raylet.children(recursive=True):
        try:
            out[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    return out

def listening():
    # (process, address) of every listening socket of this driver and of the nodes it started
    me = psutil.Process()
    out = []
    for p in [me] + me.children(recursive=True):
        try:
            out += [[p.name(), c.laddr.ip] for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out

def running(p):
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

with loopback_only():  # every node of the cluster, the driver and the replacement keep to 127.0.0.1
    # The GCS declares a silent node dead after 3 failed health checks 1 s apart (Ray's default
    # is 5 at 3 s): only how soon the loss is noticed changes, not what happens then.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False,
        _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}, **NODE))
    worker = cluster.add_node(num_cpus=1, **NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    ray_data_quiet(False)
    facts["nodes_at_start"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])

    # Ray starts nodes from the main thread only: generation runs in a thread, the fault here.
    result = {}

    def generate():
        try:
            result["summary"] = generate_set(cfg, run, GEN, "fresh", verbose=False)
            facts["outcome"] = "finished"
        except StageFailed as exc:  # the node kill may legitimately fail the run
            facts["outcome"] = "failed"
            facts["error"] = str(exc)[:2000]
        except BaseException as exc:
            facts["outcome"] = "error"
            facts["error"] = repr(exc)[:2000]

    generation = threading.Thread(target=generate, daemon=True)
    generation.start()
    while generation.is_alive() and not finished_units(run, GEN):
        time.sleep(0.01)
    if generation.is_alive():
        facts["units_before_kill"] = len(finished_units(run, GEN))
        workers = node_workers(worker)
        facts["sampler_actors_on_killed_node"] = sum("SamplerActor" in t for t in workers.values())
        # The machine is gone: SIGKILL the node's raylet, object store and agents, and its
        # worker processes too (left alone they would notice the dead raylet and exit later).
        procs = []
        for pid in workers:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        cluster.remove_node(worker, allow_graceful=False)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        facts["killed_at_s"] = round(time.time() - started, 2)
        facts["units_at_kill"] = len(finished_units(run, GEN))
        _, alive = psutil.wait_procs(procs, timeout=10)
        facts["victims_alive"] = [p.pid for p in alive if running(p)]
        cluster.add_node(num_cpus=1, **NODE)  # the replacement (what an autoscaler would add)
        facts["replaced_at_s"] = round(time.time() - started, 2)
        facts["listening"] = listening()
        killed = worker.node_id
        while generation.is_alive() and any(n["NodeID"] == killed and n["Alive"] for n in ray.nodes()):
            time.sleep(0.2)
        facts["seen_dead_at_s"] = round(time.time() - started, 2)
        while generation.is_alive() and len(finished_units(run, GEN)) <= facts["units_at_kill"]:
            time.sleep(0.05)
        facts["next_unit_at_s"] = round(time.time() - started, 2)
    generation.join()
    summary = result.get("summary")
    if facts["outcome"] == "failed":  # then --resume must finish the set exactly
        summary = generate_set(cfg, run, GEN, "resume", verbose=False)
        facts["resumed"] = True
    facts["n_images"] = summary["n_images"] if summary else None
    facts["done"] = run.is_done("generate/" + GEN)
    facts["made_now"] = (run.stage_record("generate/" + GEN) or {}).get("info", {}).get("made_now")
    facts["seconds"] = round(time.time() - started, 2)
    ray.shutdown()
    cluster.shutdown()
with open(out_file, "w") as f:
    json.dump(facts, f)
"""


def test_generation_survives_losing_its_worker_node_midway(tiny_base_folder, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    _info().save(run)  # vanilla needs only the dataset info: classes, bias words, prompt template
    per_group, n_groups = 4, 4
    cfg = gen_config(run, tiny_base_folder, balance="per_group", per_group=per_group, unit_size=1,
                     batch_size=1, steps=8)
    config_file, out_file = tmp_path / "gen.yaml", tmp_path / "facts.json"
    OmegaConf.save(cfg, config_file)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    log_file = tmp_path / "scenario.log"
    started = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", NODE_KILL, str(config_file), str(out_file)], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:  # hung: the driver and every node it started go together
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
    wall = time.time() - started
    assert rc == 0 and out_file.exists(), log_file.read_text()[-6000:]
    facts = json.loads(out_file.read_text())
    print(f"node-kill scenario: {wall:.1f} s wall; {facts}")
    n_units = per_group * n_groups

    # the fault happened where it should: a sampler actor lived on the node, it died with it,
    # after the first unit was finished and before the last
    assert "units_before_kill" in facts, f"generation ended before the node could be killed: {facts}"
    assert facts["nodes_at_start"] == ["127.0.0.1", "127.0.0.1"]
    assert facts["listening"] and not [x for x in facts["listening"] if x[1] not in LOOPBACK], facts["listening"]
    assert facts["sampler_actors_on_killed_node"] >= 1 and facts["victims_alive"] == []
    assert 1 <= facts["units_before_kill"] <= facts["units_at_kill"] < n_units, facts
    assert facts["killed_at_s"] <= facts["seen_dead_at_s"] <= facts["next_unit_at_s"], facts
    # the stage finished (by itself, or by --resume when Ray gave up on the lost node)
    if facts["outcome"] == "failed":
        assert facts["resumed"] and "--resume" in facts["error"], facts
    else:
        assert facts["outcome"] == "finished" and not facts["resumed"], facts
    assert facts["done"] and facts["n_images"] == n_units

    # exactly the planned images, each once, in shards that read whole
    df, plan = _check_set(run, "vanilla", {g: per_group for g in range(n_groups)})
    assert len(df) == n_units and plan["n_units"] == n_units
    assert finished_units(run, "vanilla") == list(range(plan["n_units"]))
    for unit in expanded(plan):
        table = pq.read_table(run.path(shards_dir("vanilla"), unit_name(unit["unit"])))
        assert table.column("id").to_pylist() == unit["ids"]
        assert table.column("seed").to_pylist() == unit["seeds"]
        for png in table.column("image").to_pylist():
            assert Image.open(io.BytesIO(png)).convert("RGB").size == (16, 16)
    rec = run.stage_record("generate/vanilla")
    assert rec["done"] and sorted(rec["units"]) == [f"unit-{u:05d}" for u in range(n_units)]
