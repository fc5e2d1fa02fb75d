"""Shown at scale: a million images through `raybias generate`, killed half-way and resumed.

Generation half (`generation_half`; the fine-tuning half, a thousand tiny LoRA jobs, is
benchmarks/bench_scale_finetune.py):

  `raybias prepare` and then `raybias generate` run as a user runs them (the CLI, in its
  own process group, with its own local Ray): --images images of the built-in
  colored_digits data (a quarter per group, `generate.balance: per_group`), the built-in
  backbone, 1 DDIM step, 16 px, two sampler actors (both cores). Near half-way (when half
  the units' shards are in place) the whole process group gets a real SIGKILL; then
  `raybias generate --resume` finishes the set. Checked: exactly the planned number of
  images, every planned id once (no duplicates, none missing), no temporary files left,
  the stage recorded done. Sampled every --interval s over the CLI's process tree (psutil):
  the driver's RSS and each sampler actor's RSS, and the images in place; plotted over
  time (PNG) next to the JSON results in --out. Prints images/s of both runs, peaks, the
  machine.

    python benchmarks/bench_scale.py --images 20000          # a few minutes
    nice -n 10 python benchmarks/bench_scale.py              # 1,000,000 images (~15 min of 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from machine import machine  # noqa: E402  (benchmarks/machine.py)

MIB = 2 ** 20


# --------------------------------------------------------------------------- watching a CLI process tree

class TreeWatcher(threading.Thread):
    """Samples the RSS of a process (the CLI's driver) and of its sampler actors, and the
    images in place (shards under their final name x their unit's size), every `interval` s."""

    def __init__(self, pid: int, phase: str, count_images, interval: float, t0: float):
        super().__init__(daemon=True)
        self.pid, self.phase, self.count_images, self.interval, self.t0 = pid, phase, count_images, interval, t0
        self.samples: List[Dict[str, Any]] = []
        self.seen: set = set()  # every pid of the tree, to wait for the killed run's leftovers
        self.stop = threading.Event()

    def sample(self) -> Optional[Dict[str, Any]]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            driver = root.memory_info().rss
            procs = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        actors: Dict[int, int] = {}
        ray_total = 0
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.seen.add(p.pid)
            ray_total += rss
            if "SamplerActor" in cmd:
                actors[p.pid] = rss
        return {"t": time.time() - self.t0, "phase": self.phase, "driver": driver, "actors": actors,
                "tree": driver + ray_total, "images": self.count_images()}

    def run(self) -> None:
        while not self.stop.is_set():
            s = self.sample()
            if s is not None:
                self.samples.append(s)
            self.stop.wait(self.interval)


def start_cli(args_list: List[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(log_path, "ab")
    # its own session: the kill below reaches the driver and everything in its process group
    return subprocess.Popen([sys.executable, "-m", "raybias", *args_list], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_gone(pids, timeout: float = 120.0) -> float:
    """Seconds until every pid in `pids` has exited (the killed run's Ray processes)."""
    import psutil

    started = time.time()
    while time.time() - started < timeout:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return time.time() - started
        time.sleep(0.5)
    raise SystemExit(f"{len(alive)} process(es) of the killed run still alive after {timeout:.0f} s: {alive[:5]}")


# --------------------------------------------------------------------------- the generation half

def write_config(path: str, run_dir: str, images: int, unit_size: int, batch_size: int, actors: int) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create({
        "run_dir": run_dir, "methods": ["vanilla"], "seeds": [0],
        "data": {"source": "colored_digits", "image_size": 16, "severity": 0.99},
        "base": {"model": "builtin"},
        "ray": {"num_cpus": 2, "object_store_mb": 768},
        "generate": {"balance": "per_group", "per_group": images // 4, "steps": 1, "guidance": 1.0,
                     "unit_size": unit_size, "batch_size": batch_size, "concurrency": actors, "num_cpus": 1},
    }), path)


def check_set(run_dir: str) -> Dict[str, Any]:
    """Count, duplicates, planned ids, temporaries and the stage record of the finished set."""
    import pyarrow.parquet as pq

    from raybias.generation.plan import PlanUnits, load_plan
    from raybias.layout import shards_dir
    from raybias.rundir import RunDir

    run = RunDir(run_dir)
    plan = load_plan(run, "vanilla")
    folder = run.path(shards_dir("vanilla"))
    names = sorted(os.listdir(folder))
    shards = [n for n in names if n.startswith("unit-")]
    ids: List[str] = []
    for n in shards:
        ids += pq.read_table(os.path.join(folder, n), columns=["id"]).column("id").to_pylist()
    units = PlanUnits(plan)
    planned = set()
    for u in range(len(units)):
        planned.update(units.ids(u))
    temporaries = [os.path.join(root, f) for root, _, files in os.walk(run.path()) for f in files
                   if ".tmp-" in f]
    rec = run.stage_record("generate/vanilla") or {}
    unique = set(ids)
    return {"planned_images": plan["n_images"], "units": plan["n_units"], "shards": len(shards), "images": len(ids),
            "duplicates": len(ids) - len(unique), "missing": len(planned - unique), "unplanned": len(unique - planned),
            "temporaries": temporaries, "done": bool(rec.get("done")), "record": rec.get("info", {})}


def generation_half(args, out: str) -> Dict[str, Any]:
    from raybias.layout import shards_dir, unit_of

    run_dir = os.path.join(out, "run")
    config = os.path.join(out, "generate.yaml")
    log_path = os.path.join(out, "cli.log")
    images = 4 * (args.images // 4)
    write_config(config, run_dir, images, args.unit_size, args.batch_size, args.actors)
    n_units = sum(-(-(images // 4) // args.unit_size) for _ in range(4))
    shards = os.path.join(run_dir, shards_dir("vanilla"))
    last_unit_size = (images // 4) % args.unit_size or args.unit_size
    per_group_units = n_units // 4

    def images_in_place() -> int:
        try:
            names = os.listdir(shards)
        except FileNotFoundError:
            return 0
        units = [u for u in (unit_of(n) for n in names) if u is not None]
        # the last unit of each group holds the rest
        return sum(last_unit_size if (u + 1) % per_group_units == 0 else args.unit_size for u in units)

    print(f"\ngeneration: {images:,} images ({n_units:,} units of {args.unit_size}), builtin backbone, 1 step, "
          f"16 px, {args.actors} sampler actors; run directory {run_dir}")
    t = time.time()
    prep = start_cli(["prepare", config, "--run-dir", run_dir], log_path)
    if prep.wait() != 0:
        raise SystemExit(f"raybias prepare failed; see {log_path}")
    print(f"prepare: {time.time() - t:.1f} s")

    t0 = time.time()
    first = start_cli(["generate", config, "--run-dir", run_dir], log_path)
    watch = TreeWatcher(first.pid, "first run", images_in_place, args.interval, t0)
    watch.start()
    kill_at = n_units // 2
    killed: Dict[str, Any] = {}
    while first.poll() is None:
        if len([n for n in os.listdir(shards) if n.startswith("unit-")] if os.path.isdir(shards) else []) >= kill_at:
            killed["t"] = time.time() - t0
            os.killpg(first.pid, signal.SIGKILL)  # the real thing: driver, its Ray, its actors
            break
        time.sleep(0.05)
    rc = first.wait()
    watch.stop.set()
    watch.join()
    if not killed:
        raise SystemExit(f"generate finished (rc {rc}) before it could be killed; see {log_path}")
    names = os.listdir(shards)
    killed.update(units=sum(1 for n in names if n.startswith("unit-")), images=images_in_place(),
                  temporaries=sum(1 for n in names if n.startswith(".tmp-")), rc=rc)
    # Ray starts each worker in a process group of its own: those outlive the signal until
    # the local Ray's sentinel stops them, the driver gone: a unit they were finishing may land
    killed["leftovers_gone_s"] = wait_gone(watch.seen)
    killed["units_when_gone"] = sum(1 for n in os.listdir(shards) if n.startswith("unit-"))
    print(f"killed at {killed['t']:.1f} s: {killed['units']} of {n_units} units in place, "
          f"{killed['temporaries']} temporary file(s) left by the kill; its Ray processes gone "
          f"{killed['leftovers_gone_s']:.1f} s later, with {killed['units_when_gone']} units in place")

    t1 = time.time()
    second = start_cli(["generate", config, "--run-dir", run_dir, "--resume"], log_path)
    watch2 = TreeWatcher(second.pid, "resume", images_in_place, args.interval, t0)
    watch2.start()
    rc2 = second.wait()
    watch2.stop.set()
    watch2.join()
    resume_s = time.time() - t1
    if rc2 != 0:
        raise SystemExit(f"generate --resume failed (rc {rc2}); see {log_path}")
    checks = check_set(run_dir)
    samples = watch.samples + watch2.samples
    first_made = [s for s in watch.samples if s["images"] > 0]
    first_rate = ((first_made[-1]["images"] - first_made[0]["images"]) / (first_made[-1]["t"] - first_made[0]["t"])
                  if len(first_made) > 1 and first_made[-1]["t"] > first_made[0]["t"] else float("nan"))
    made_now = checks["record"].get("made_now", images - killed["images"])
    result = {
        "images": images, "unit_size": args.unit_size, "batch_size": args.batch_size, "actors": args.actors,
        "killed": killed, "resume_seconds": resume_s, "checks": checks,
        "first_run_images_per_s": first_rate, "resume_images_per_s": checks["record"].get("images_per_s"),
        "resume_made_now": made_now, "samples": samples,
        "peaks": {phase: {"driver": max((s["driver"] for s in samples if s["phase"] == phase), default=0),
                          "actor": max((max(s["actors"].values(), default=0) for s in samples
                                        if s["phase"] == phase), default=0)}
                  for phase in ("first run", "resume")},
    }
    return result


def flatness(samples, key: str) -> str:
    """RSS at a quarter, half and three quarters of a phase's samples (flat: no growth)."""
    vals = [s[key] if key == "driver" else max(s["actors"].values(), default=0) for s in samples]
    vals = [v for v in vals if v]
    if len(vals) < 4:
        return "-"
    return " / ".join(f"{vals[int(len(vals) * q)] / MIB:.0f}" for q in (0.25, 0.5, 0.75)) + f" / {vals[-1] / MIB:.0f}"


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for phase, style in (("first run", "-"), ("resume", "-")):
        ss = [s for s in samples if s["phase"] == phase]
        if not ss:
            continue
        top.plot([s["t"] for s in ss], [s["driver"] / MIB for s in ss], style, color="tab:blue",
                 label="driver (raybias generate)" if phase == "first run" else None)
        pids = sorted({p for s in ss for p in s["actors"]})
        for i, pid in enumerate(pids):
            pts = [(s["t"], s["actors"][pid] / MIB) for s in ss if pid in s["actors"]]
            top.plot([p[0] for p in pts], [p[1] for p in pts], style, color="tab:orange", alpha=0.8,
                     label="sampler actors" if phase == "first run" and i == 0 else None)
        bottom.plot([s["t"] for s in ss], [s["images"] for s in ss], color="tab:green",
                    label="images in place" if phase == "first run" else None)
    k = result["killed"]["t"]
    for ax in (top, bottom):
        ax.axvline(k, color="tab:red", linestyle="--", linewidth=1)
    top.text(k, top.get_ylim()[1] * 0.97, " SIGKILL", color="tab:red", va="top", fontsize=8)
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("images")
    bottom.set_xlabel("seconds since the first `raybias generate`")
    bottom.legend(loc="lower right", fontsize=8)
    top.set_title(f"raybias generate: {result['images']:,} images, killed at "
                  f"{100 * result['killed']['images'] / result['images']:.0f} % and resumed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_generation(result: Dict[str, Any]) -> None:
    c = result["checks"]
    ok = (c["images"] == c["planned_images"] == result["images"] and not c["duplicates"] and not c["missing"]
          and not c["unplanned"] and not c["temporaries"] and c["done"])
    print(f"resume: {result['resume_seconds']:.1f} s, made {result['resume_made_now']:,} images at "
          f"{result['resume_images_per_s']} images/s (the stage's record); first run "
          f"{result['first_run_images_per_s']:.0f} images/s (images in place over time)")
    print(f"set: {c['images']:,} images of {c['planned_images']:,} planned in {c['shards']:,} shards; duplicates "
          f"{c['duplicates']}, missing {c['missing']}, unplanned {c['unplanned']}, temporaries left "
          f"{len(c['temporaries'])}, stage done {c['done']} -> {'OK' if ok else 'FAILED'}")
    for phase in ("first run", "resume"):
        ss = [s for s in result["samples"] if s["phase"] == phase]
        p = result["peaks"][phase]
        print(f"{phase:<10} peak RSS: driver {p['driver'] / MIB:,.0f} MiB, sampler actor {p['actor'] / MIB:,.0f} MiB;"
              f" at 1/4, 1/2, 3/4 of the phase and its end: driver {flatness(ss, 'driver')}, "
              f"actor {flatness(ss, 'actor')} MiB")
    if not ok:
        raise SystemExit("the resumed set is not exactly the planned one")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--unit-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--out", default=None, help="folder for results.json, the plot and the run "
                                                "(default: a temporary folder, kept)")
    args = ap.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-scale-"))
    os.makedirs(out, exist_ok=True)
    print(machine())
    print("note: other jobs may share this machine; images/s are this run's, under its load")
    result = generation_half(args, out)
    result["machine"] = machine()
    png = os.path.join(out, "generate_memory.png")
    plot(result, png)
    with open(os.path.join(out, "generate_results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    report_generation(result)
    print(f"plot: {png}\nresults: {os.path.join(out, 'generate_results.json')}")


if __name__ == "__main__":
    main()
