"""A thousand models: `raybias finetune` with --jobs tiny DreamBooth jobs packed on the local Ray.

clustered_dreambooth trains one model per (group, cluster). This makes a run of the built-in
colored_digits at severity "original" (about 314 training images per group), writes
embed/clusters.parquet by hand with ceil(jobs / 4) clusters per group (round-robin by id),
so the stage plans exactly --jobs jobs, and runs `python -m raybias finetune` in a fresh
process (its own local Ray, both cores) with a tiny random-weight backbone built from config,
1 step per job, batch 1, no prior preservation and no preview samples, and
finetune.jobs_per_trainer = ceil(jobs / 2): two trainers, one per core. It samples the
driver's RSS every second and the number of published models, and prints:

  total wall time, time per job (total / jobs, the median of the jobs' own seconds, and the
  interval between published models early vs. late in the stage), the seconds from the last
  published model to the end of the stage, the driver's RSS and CPU time over time (a line
  every --every seconds), the largest trainer worker's RSS, and the manifest's size.

First, in-process and alternating (so the ratio holds on a shared machine), the driver's
per-job work at --jobs jobs the old way and the new: recording the jobs in manifest.json
(a rewrite per job vs. one per finished pack) and one progress poll (the whole board vs.
what changed since the last poll). --health-check-s sets how often Ray Train's controller
takes a worker's report (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s): a report
waits until the previous one was taken, so each packed job after the first waits for it.

    python benchmarks/bench_scale_finetune.py --jobs 100
    nice python benchmarks/bench_scale_finetune.py --jobs 1000 --json /tmp/ft1000.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from machine import machine  # noqa: E402  (benchmarks/machine.py)

GEN = "clustered_dreambooth"


def write_config(path: str, run_dir: str, base: str, jobs: int) -> None:
    import yaml

    cfg = {
        "run_dir": run_dir,
        "methods": [GEN],
        "data": {"source": "colored_digits", "severity": "original", "image_size": 16},
        "base": {"model": base},
        "ray": {"num_cpus": 2, "object_store_mb": 400},
        "finetune": {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "prior_preservation": False,
                     "n_samples": 0, "min_images": 1, "num_cpus_per_job": 1, "max_failures": 0,
                     "jobs_per_trainer": max(1, math.ceil(jobs / 2)), "progress_every": 1},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def write_clusters(run_dir: str, jobs: int) -> int:
    """embed/clusters.parquet: ceil(jobs / 4) clusters per group, the last group trimmed so
    that the plan has exactly `jobs` jobs. Returns the number of jobs planned."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybias.data.io import read_table
    from raybias.rundir import RunDir

    run = RunDir(run_dir)
    real = read_table(run, "data/real", columns=["id", "group", "split"], split="train")
    groups = sorted(real["group"].unique())
    per = math.ceil(jobs / len(groups))
    rows, planned = [], 0
    for g in groups:
        k = min(per, jobs - planned)
        ids = sorted(real.loc[real["group"] == g, "id"])
        if k > len(ids):
            raise SystemExit(f"group {g} has {len(ids)} training images, fewer than {k} clusters")
        rows += [{"id": i, "group": int(g), "cluster": n % k} for n, i in enumerate(ids)]
        planned += k
    run.makedirs("embed")
    pq.write_table(pa.Table.from_pylist(rows), run.local_path("embed/clusters.parquet"))
    return planned


def _trainer_workers(driver) -> list:
    """The driver's Ray Train worker processes (its local Ray's processes are its descendants;
    other users' Ray on the same machine are not)."""
    import psutil

    out = []
    for proc in driver.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def sample_driver(proc, run_dir: str, out: list, stop: threading.Event, period: float = 1.0) -> None:
    """Every `period` s: (t, driver RSS, driver CPU seconds, published models, largest trainer
    worker RSS)."""
    import psutil

    p = psutil.Process(proc.pid)
    models = os.path.join(run_dir, "generators", GEN)
    t0 = time.time()
    workers, last_scan = [], -1e9
    while not stop.is_set() and proc.poll() is None:
        try:
            rss = p.memory_info().rss
            cpu = sum(p.cpu_times()[:2])
        except psutil.Error:
            break
        if rss == 0:  # exited, not yet reaped
            break
        try:
            done = sum(1 for n in os.listdir(models) if n.startswith("g") and "-c" in n)
        except OSError:
            done = 0
        if time.time() - last_scan > 10:  # trainer workers come and go: look for them now and then
            workers, last_scan = _trainer_workers(p), time.time()
        worker_rss = 0
        for w in workers:
            try:
                worker_rss = max(worker_rss, w.memory_info().rss)
            except psutil.Error:
                pass
        out.append((time.time() - t0, rss, cpu, done, worker_rss))
        stop.wait(period)


def job_trend(run_dir: str) -> dict:
    """Per-job seconds early vs. late in the stage (from the published models' records and
    their times): does a job cost more once many are done?"""
    import glob

    recs = []
    for path in glob.glob(os.path.join(run_dir, "generators", GEN, "g*", "training.json")):
        with open(path) as f:
            r = json.load(f)
        recs.append((os.path.getmtime(path), r))
    recs.sort(key=lambda x: x[0])
    tenth = max(1, len(recs) // 10)
    gaps = [b[0] - a[0] for a, b in zip(recs, recs[1:])]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"first_tenth_gap_s": mean(gaps[:tenth]), "last_tenth_gap_s": mean(gaps[-tenth:]),
            "first_tenth_setup_s": mean([r["setup_seconds"] for _, r in recs[:tenth]]),
            "last_tenth_setup_s": mean([r["setup_seconds"] for _, r in recs[-tenth:]]),
            "first_tenth_train_s": mean([r["train_seconds"] for _, r in recs[:tenth]]),
            "last_tenth_train_s": mean([r["train_seconds"] for _, r in recs[-tenth:]]),
            "last_published": recs[-1][0] if recs else None}


def driver_micro(jobs: int, repeats: int = 5) -> dict:
    """In-process A/B of the driver's per-job work at `jobs` jobs (old way vs. new, alternating):

    - bookkeeping: recording every job of two packs in manifest.json, one `mark_units` (a
      manifest rewrite) per job as before vs. one per finished pack now;
    - progress: one poll of the progress board holding `jobs` finished jobs and one training
      job, the whole board as before vs. only the entries changed since the last poll now.
    """
    import ray

    from raybias.config import config_from_dict
    from raybias.ray_utils import init_ray
    from raybias.rundir import RunDir
    from raybias.finetune.runner import progress_board_class

    cfg = config_from_dict({"ray": {"num_cpus": 2, "object_store_mb": 400}})
    names = [f"g{i % 4}-c{i // 4}" for i in range(jobs)]
    key = f"finetune/{GEN}"
    out = {"mark_per_job_s": [], "mark_per_pack_s": []}
    with tempfile.TemporaryDirectory(prefix="raybias-ft-micro-") as tmp:
        for r in range(2):
            for arm in ("mark_per_job_s", "mark_per_pack_s"):
                run = RunDir(os.path.join(tmp, f"{arm}-{r}"))
                run.begin_stage(key, cfg, ("data", "base", "embed", "cluster", "finetune"), "fresh")
                t0 = time.perf_counter()
                if arm == "mark_per_job_s":
                    for n in names:
                        run.mark_units(key, [n])
                else:
                    for pack in (names[0::2], names[1::2]):
                        run.mark_units(key, pack)
                out[arm].append(time.perf_counter() - t0)
    init_ray(cfg, quiet=True)
    board = progress_board_class().remote()
    for n in names:
        board.update.remote(GEN, n, 1, 1, 0.5, "done")
    ray.get(board.update.remote(GEN, "g9-c0", 0, 1, None, "training"))
    version, _ = ray.get(board.snapshot.remote(0))
    out.update(poll_all_s=[], poll_changed_s=[])
    for _ in range(repeats):
        for arm, since in (("poll_all_s", 0), ("poll_changed_s", version)):
            t0 = time.perf_counter()
            _, changed = ray.get(board.snapshot.remote(since))
            for key_, state in sorted(changed.items()):  # what the monitor then walks
                _ = state["step"]
            out[arm].append(time.perf_counter() - t0)
    ray.kill(board)
    ray.shutdown()
    return {k: min(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between printed RSS lines")
    ap.add_argument("--json", help="write the figures (and the RSS series) here")
    ap.add_argument("--keep", help="make the run here and keep it (default: a temporary folder)")
    ap.add_argument("--health-check-s", type=float,
                    help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the run (Ray's default: 2 s): how often "
                         "the trainer's controller takes a report, which a packed job's report waits for")
    ap.add_argument("--no-micro", action="store_true", help="skip the in-process driver A/B")
    args = ap.parse_args()
    print(machine(), flush=True)
    os.environ["RAY_ADDRESS"] = "local"  # see the subprocess's env below
    micro = {}
    if not args.no_micro:
        micro = driver_micro(args.jobs)
        print(f"driver, {args.jobs} jobs in 2 packs (in-process, best of alternating rounds): recording them "
              f"{micro['mark_per_job_s']:.2f} s with a manifest write per job -> {micro['mark_per_pack_s']:.3f} s "
              f"with one per pack; a progress poll {1000 * micro['poll_all_s']:.1f} ms reading the whole board -> "
              f"{1000 * micro['poll_changed_s']:.1f} ms reading what changed", flush=True)

    from raybias.diffusion.backbone import build_pipeline, save_pipeline

    tmp = args.keep or tempfile.mkdtemp(prefix="raybias-ft-scale-")
    run_dir, base = os.path.join(tmp, "run"), os.path.join(tmp, "base")
    save_pipeline(build_pipeline("tiny", seed=0), base)
    cfg_path = os.path.join(tmp, "ft.yaml")
    write_config(cfg_path, run_dir, base, args.jobs)
    # RAY_ADDRESS=local: a local Ray of its own, even while another one (`ray start`) runs on
    # this machine, which ray.init() without an address would join
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), RAY_ADDRESS="local")
    if args.health_check_s is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_s)
    cli = [sys.executable, "-m", "raybias"]
    subprocess.run(cli + ["prepare", cfg_path, "--run-dir", run_dir], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    planned = write_clusters(run_dir, args.jobs)
    print(f"{planned} jobs planned ({GEN}, {math.ceil(planned / 4)} clusters per group), 2 trainers", flush=True)

    log_path = os.path.join(tmp, "finetune.log")
    series: list = []
    stop = threading.Event()
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cli + ["finetune", cfg_path, "--run-dir", run_dir], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample_driver, args=(proc, run_dir, series, stop), daemon=True)
        sampler.start()
        rc = proc.wait()
        stop.set()
        sampler.join()
    total = time.time() - started
    if rc != 0:
        with open(log_path) as f:
            print(f.read()[-3000:])
        raise SystemExit(f"raybias finetune failed (rc {rc}); log: {log_path}")

    from raybias.rundir import RunDir

    run = RunDir(run_dir)
    rec = run.stage_record(f"finetune/{GEN}")
    manifest = run.read_json(f"generators/{GEN}/manifest.json")
    walls = [w for w in (rec.get("info", {}).get("job_wall_seconds") or {}).values() if w is not None]
    trend = job_trend(run_dir)
    mb = 1 / 2 ** 20
    during = [x for x in series if x[3] > 0]  # once the first model is published
    first_model_t = during[0][0] if during else float("nan")
    tail_s = (started + total) - trend["last_published"] if trend["last_published"] else float("nan")
    print(f"\n{planned} jobs: stage done {rec['done']}, {len(manifest['models'])} models in the manifest")
    print(f"total {total:.0f} s (the raybias finetune process, Ray start included); {total / planned:.2f} s per "
          f"job; first model after {first_model_t:.0f} s; median job's own seconds {statistics.median(walls):.2f} "
          f"(setup + 1 step + checkpoint + publish)")
    print(f"per job, first vs last tenth of the stage: interval between published models "
          f"{trend['first_tenth_gap_s']:.2f} -> {trend['last_tenth_gap_s']:.2f} s (2 trainers), setup "
          f"{trend['first_tenth_setup_s']:.2f} -> {trend['last_tenth_setup_s']:.2f} s, step + checkpoint "
          f"{trend['first_tenth_train_s']:.2f} -> {trend['last_tenth_train_s']:.2f} s")
    print(f"after the last model was published: {tail_s:.1f} s until the stage was finished and the process ended")
    if during:
        print(f"driver RSS: at the first model {during[0][1] * mb:.0f} MiB, peak {max(x[1] for x in series) * mb:.0f} "
              f"MiB, at the last sample {series[-1][1] * mb:.0f} MiB; driver CPU {series[-1][2]:.1f} s in all, "
              f"{series[-1][2] - during[0][2]:.1f} s from the first model on")
        print(f"largest trainer worker RSS: {max(x[4] for x in during) * mb:.0f} MiB")
    print(f"manifest.json: {os.path.getsize(run.path('manifest.json')) / 1024:.1f} KiB")
    print(f"{'t (s)':>8}{'driver RSS MiB':>16}{'driver CPU s':>14}{'models':>8}{'worker RSS MiB':>16}")
    last = -1e9
    for i, (t, r, c, done, w) in enumerate(series):
        if t - last >= args.every or i == len(series) - 1:
            print(f"{t:>8.0f}{r * mb:>16.0f}{c:>14.1f}{done:>8}{w * mb:>16.0f}")
            last = t
    figures = {"jobs": planned, "total_s": total, "per_job_s": total / planned, "first_model_s": first_model_t,
               "median_job_s": statistics.median(walls), "tail_s": tail_s, **trend,
               "rss_first_model_mib": during[0][1] * mb if during else None,
               "rss_peak_mib": max(x[1] for x in series) * mb, "rss_end_mib": series[-1][1] * mb,
               "driver_cpu_s": series[-1][2], "worker_rss_peak_mib": max(x[4] for x in series) * mb,
               "manifest_kib": os.path.getsize(run.path("manifest.json")) / 1024, "micro": micro,
               "health_check_s": args.health_check_s,
               "series": [(round(t, 1), round(r * mb, 1), round(c, 2), d, round(w * mb, 1))
                          for t, r, c, d, w in series], "machine": machine()}
    print("RESULT " + json.dumps({k: v for k, v in figures.items() if k != "series"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f)


if __name__ == "__main__":
    main()
