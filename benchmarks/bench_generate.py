"""Generation at scale: the Ray Data actor pool vs. the bare sampler loop, and memory vs. set size.

CPU (default), all in one run:
  1. speed: the same work units (sample, PNG-encode, write the shard) made by the
     `SamplerActor` called in a plain loop in one process (no Ray; the thread settings Ray
     gives an actor), then through the Ray Data pipeline (`raybias.generation.runner.run_units`,
     one actor) — images/s of each and the Ray overhead, steady state (after the first unit)
     and end to end (with actor start); rounds alternate and the best of each is kept, as
     the machine may be shared;
  2. memory: `generate` of each size in --n (fresh process each, its own local Ray),
     tracking the driver's peak RSS and the sampler actors' peak RSS — flat when streaming.

GPU (--device cuda, for a machine with one): raybias's sampler (batched, own loop, PNG
encode included) vs. the stock StableDiffusionPipeline at batch 1, both in --dtype, with
images/s and model-FLOP utilisation (SD-1.5 at 512 px, 25 steps, CFG: about 36 TFLOP per
image, against --peak-tflops, 989 for an H100's dense fp16/bf16):

    python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --n 1000,20000
    python benchmarks/bench_generate.py --device cuda --arch sd15 --size 512 --steps 25 \\
        --guidance 7.5 --dtype fp16 --attention sdpa --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from child import result_line, run_child  # noqa: E402  (benchmarks/child.py)
from machine import machine  # noqa: E402  (benchmarks/machine.py)

# SD-1.5 compute (REFERENCES.md, measured with torch's flop counter): UNet per step per image at
# 64x64 latents, VAE decode per 512 px image.
UNET_GFLOP_512 = 677.0
VAE_TFLOP_512 = 2.48


def sd15_tflop_per_image(steps: int, guidance: float, size: int) -> float:
    scale = (size / 512) ** 2
    unet_calls = steps * (2 if guidance > 1 else 1)
    return (unet_calls * UNET_GFLOP_512 / 1000 + VAE_TFLOP_512) * scale


# --------------------------------------------------------------------------- a run to generate into

def make_run(root: str, per_group: int):
    """A run directory with only data/info.json (colored_digits words): all generation needs."""
    from raybias.data.info import DatasetInfo
    from raybias.rundir import RunDir

    run = RunDir(root)
    DatasetInfo(source="colored_digits", n_classes=2, n_bias=2, class_names=["digit<5", "digit>=5"],
                bias_names=["red", "green"],
                class_words=[["zero", "one", "two", "three", "four"], ["five", "six", "seven", "eight", "nine"]],
                bias_words=["red", "green"], prompt_template="a {bias} {member}", aligned=[0, 1], image_size=16,
                severity=0.99, counts={"train": {"0": per_group, "1": 0, "2": 0, "3": per_group}}).save(run)
    return run


def bench_config(run, base: str, n_images: int, steps: int, unit_size: int, batch_size: int, threads: int):
    from raybias.config import config_from_dict

    return config_from_dict({
        "run_dir": run.uri, "methods": ["vanilla"], "base": {"model": base},
        "ray": {"num_cpus": max(2, threads), "object_store_mb": 300},
        "generate": {"balance": "per_group", "per_group": max(1, n_images // 4), "steps": steps,
                     "unit_size": unit_size, "batch_size": batch_size, "num_cpus": threads}})


def build_base(arch: str, folder: str) -> str:
    from raybias.diffusion.backbone import build_pipeline, save_pipeline

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        save_pipeline(build_pipeline(arch, seed=0), folder)
    return folder


def plan_for(cfg, run):
    from raybias.data.info import DatasetInfo
    from raybias.generation.plan import build_plan, save_plan, vanilla_models
    from raybias.generation.runner import sampling_settings

    info = DatasetInfo.load(run)
    g = cfg.generate
    plan = build_plan("vanilla", info, vanilla_models(info), balance=g.balance, per_group=g.per_group,
                      unit_size=g.unit_size, seed=g.seed, sampling=sampling_settings(g), base_model=cfg.base.model)
    save_plan(run, plan)
    return plan


# --------------------------------------------------------------------------- 1. speed

def rates(stamps, sizes, started):
    """(end-to-end images/s from `started`, steady images/s after the first unit)."""
    total = sum(sizes)
    end_to_end = total / (stamps[-1] - started)
    steady = (sum(sizes[1:]) / (stamps[-1] - stamps[0])) if len(stamps) > 1 else float("nan")
    return end_to_end, steady


def bare_child(args) -> None:
    """The bare loop, in a fresh process with the thread settings Ray gives an actor: the
    `SamplerActor` code called unit after unit, no Ray. Prints a RESULT line."""
    from raybias.generation.sampler import SamplerActor

    run = make_run(os.path.join(args.tmp, f"bare-{args.bare_child}"), args.speed_images // 4)
    cfg = bench_config(run, args.base, args.speed_images, args.speed_steps, args.unit_size, args.batch_size,
                       args.threads)
    plan = plan_for(cfg, run)
    started = time.time()  # imports done; model load and first-unit warm-up included from here
    actor = SamplerActor(run.spec(), "vanilla", args.base, None, plan, plan["sampling"])
    stamps, sizes = [], []
    for n in range(plan["n_units"]):
        out = actor({"unit": np.array([n])})
        stamps.append(time.time())
        sizes.append(int(out["n_images"][0]))
    print(result_line({"started": started, "stamps": stamps, "sizes": sizes, "end": time.time()}), flush=True)


def run_bare(args, base: str, tmp: str, round_: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--bare-child", str(round_), "--base", base, "--tmp", tmp,
           "--speed-images", str(args.speed_images), "--speed-steps", str(args.speed_steps),
           "--unit-size", str(args.unit_size), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    r = run_child(cmd, "bare loop", env=env)
    return r["started"], r["stamps"], r["sizes"], r["end"]


def run_ray(args, base: str, tmp: str, round_: int):
    from raybias.generation.runner import run_units
    from raybias.ray_utils import init_ray

    run = make_run(os.path.join(tmp, f"ray-{round_}"), args.speed_images // 4)
    cfg = bench_config(run, base, args.speed_images, args.speed_steps, args.unit_size, args.batch_size, args.threads)
    plan = plan_for(cfg, run)
    init_ray(cfg, quiet=True)
    stamps, sizes, busy = [], [], []

    def on_unit(row):
        # when the actor finished the unit: rows reach the driver in bursts, so the driver's
        # own arrival times would overstate the steady rate
        stamps.append(float(row["finished_at"]))
        sizes.append(int(row["n_images"]))
        busy.append(float(row["seconds"]))

    started = time.time()
    run_units(run, plan, range(plan["n_units"]), base_model=base, base_revision=None, concurrency=1, num_gpus=0,
              num_cpus=args.threads, on_unit=on_unit, progress=False)
    order = np.argsort(stamps)
    stamps, sizes, busy = ([x[i] for i in order] for x in (stamps, sizes, busy))
    # share of the steady span the actor spent inside units (1.0: Ray left it no idle gaps)
    busy_share = sum(busy[1:]) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return (started, stamps, sizes, time.time()), busy_share


def rates(started, stamps, sizes, end):
    """(end-to-end images/s: start to all results in hand; steady images/s: after the first unit)."""
    steady = sum(sizes[1:]) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return sum(sizes) / (end - started), steady


def speed(args, base: str, tmp: str) -> None:
    print(f"\n1. speed: {args.speed_images} images, {args.speed_arch} backbone (random weights), {args.speed_steps} "
          f"DDIM steps, units of {args.unit_size}, batches of {args.batch_size}, {args.threads} torch thread(s) "
          f"each side; {args.rounds} round(s) alternating, best of each kept")
    results = {"bare": [], "ray": []}
    busy = []
    for r in range(args.rounds):
        results["bare"].append(rates(*run_bare(args, base, tmp, r)))
        timing, share = run_ray(args, base, tmp, r)
        results["ray"].append(rates(*timing))
        busy.append(share)
    print(f"{'':<34}{'end to end':>12}{'steady':>10}   (images/s; per round: steady)")
    best = {}
    for key, label in (("bare", "bare SamplerActor loop"), ("ray", "Ray Data actor pool (1 actor)")):
        best[key] = (max(x[0] for x in results[key]), max(x[1] for x in results[key]))
        rounds = ", ".join(f"{x[1]:.1f}" for x in results[key])
        print(f"{label:<34}{best[key][0]:>12.2f}{best[key][1]:>10.2f}   ({rounds})")
    steady = best["ray"][1] / best["bare"][1]
    print(f"ratio Ray / bare: steady {steady:.3f} (Ray overhead {100 * (1 - steady):+.1f} %), end to end "
          f"{best['ray'][0] / best['bare'][0]:.3f} (actor start, model load and first-unit warm-up included)")
    print(f"sampler actor busy inside units between the first and last unit: "
          + ", ".join(f"{100 * b:.1f} %" for b in busy) + " per round (the rest: Ray's gaps between units)")


# --------------------------------------------------------------------------- 2. memory

class PeakRSS(threading.Thread):
    """Polls the RSS of this process and of its Ray worker processes; keeps the peaks."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.driver = 0
        self.actor = 0
        self.workers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            actors, total = 0, 0
            # this driver's own local Ray: its raylet and workers are our descendants
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if cmd.startswith("ray::"):
                    total += rss
                    if "SamplerActor" in cmd:
                        actors = max(actors, rss)
            self.actor = max(self.actor, actors)
            self.workers = max(self.workers, total)
            self.stop.wait(self.interval)


def memory_child(args) -> None:
    """One `generate` of args.memory_child images in this (fresh) process; prints a JSON line."""
    import resource

    from raybias.stages.generate import generate_set

    n = args.memory_child
    run = make_run(os.path.join(args.tmp, f"mem-{n}"), n // 4)
    cfg = bench_config(run, args.base, n, args.mem_steps, args.unit_size, args.batch_size, args.threads)
    watcher = PeakRSS()
    watcher.start()
    started = time.perf_counter()
    summary = generate_set(cfg, run, "vanilla", "fresh", verbose=False)
    seconds = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(result_line({"n": summary["n_images"], "seconds": seconds, "driver_peak": max(peak, watcher.driver),
                                  "actor_peak": watcher.actor, "workers_peak": watcher.workers}), flush=True)


def memory(args, base: str, tmp: str) -> None:
    sizes = [int(x) for x in args.n.split(",")]
    print(f"\n2. memory: generate {', '.join(map(str, sizes))} images ({args.mem_arch} backbone, {args.mem_steps} step(s), "
          f"units of {args.unit_size}); a fresh process with its own local Ray per size")
    results = []
    for n in sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--base", base, "--tmp", tmp,
               "--mem-steps", str(args.mem_steps), "--unit-size", str(args.unit_size),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        results.append(run_child(cmd, f"memory run of {n} images"))
    mib = 2 ** 20
    print(f"{'images':>8}{'seconds':>9}{'images/s':>10}{'driver peak':>13}{'actor peak':>12}{'all workers':>13}  (MiB)")
    for r in results:
        print(f"{r['n']:>8}{r['seconds']:>9.1f}{r['n'] / r['seconds']:>10.1f}{r['driver_peak'] / mib:>13.0f}"
              f"{r['actor_peak'] / mib:>12.0f}{r['workers_peak'] / mib:>13.0f}")
    first, last = results[0], results[-1]
    print(f"peak RSS ratio {last['n']} vs {first['n']} images: driver {last['driver_peak'] / first['driver_peak']:.2f}, "
          f"sampler actor {last['actor_peak'] / max(first['actor_peak'], 1):.2f} "
          f"({last['n'] / first['n']:.0f}x the images)")


# --------------------------------------------------------------------------- GPU

def gpu(args) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from raybias.data.images import encode_png
    from raybias.diffusion.backbone import build_pipeline, load_pipeline
    from raybias.diffusion.sampling import sample, set_attention

    dev = args.compare_on  # "cuda"; "cpu" only to smoke-test this comparison on a machine without a GPU
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.model:
        pipe = load_pipeline(args.model, device=dev, dtype=dtype)
        what = args.model
    else:
        pipe = build_pipeline(args.arch, seed=0).to(dev, dtype)
        what = f"{args.arch} (random weights)"
    pipe.set_progress_bar_config(disable=True)
    flop = sd15_tflop_per_image(args.steps, args.guidance, args.size) * 1e12
    prompts = [f"a photo of a {w} bird" for w in ("red", "green", "blue", "yellow")]

    def stock(n: int) -> float:
        # stock diffusers at batch 1, fp16 (its default SDPA attention), one generator per image
        stock_pipe = StableDiffusionPipeline(**{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer",
                                                                              "unet")},
                                             scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
        stock_pipe.set_progress_bar_config(disable=True)
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size)
        stock_pipe(prompts[0], generator=torch.Generator(dev).manual_seed(0), **call)
        sync()
        t = time.perf_counter()
        for i in range(n):
            stock_pipe(prompts[i % 4], generator=torch.Generator(dev).manual_seed(i), **call)
        sync()
        return n / (time.perf_counter() - t)

    def ours(n: int) -> tuple:
        backend = set_attention(pipe, args.attention)
        if args.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if args.compile:
            pipe.unet.compile()
        settings = dict(steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, size=args.size)
        sample(pipe, prompts[:1] * args.batch_size, list(range(args.batch_size)), **settings)  # warm-up
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        images = sample(pipe, [prompts[i % 4] for i in range(n)], list(range(n)), **settings)
        pngs = [encode_png(im) for im in images]
        sync()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else float("nan")
        return n / (time.perf_counter() - t), backend, peak, len(pngs)

    print(machine(dev))
    print(f"model {what}, {args.size} px, {args.steps} DDIM steps, guidance {args.guidance}, {args.dtype}; "
          f"{flop / 1e12:.1f} TFLOP per image (SD-1.5 count), peak {args.peak_tflops:g} TFLOP/s")
    base_rate = stock(args.stock_images)
    rate, backend, mem, _ = ours(args.images)
    for name, r in ((f"stock StableDiffusionPipeline, batch 1, {args.dtype}", base_rate),
                    (f"raybias sampler, batch {args.batch_size}, {args.dtype}, {backend}"
                     + (", channels_last" if args.channels_last else "") + (", compiled" if args.compile else ""), rate)):
        print(f"{name:<64}{r:>8.2f} images/s   MFU {100 * r * flop / (args.peak_tflops * 1e12):5.1f} %")
    print(f"ratio raybias / stock: {rate / base_rate:.2f}; peak GPU memory {mem:.1f} GiB (raybias sampler, PNGs included)")


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--n", default="500,2000", help="memory part: comma-separated set sizes (e.g. 1000,20000)")
    ap.add_argument("--speed-images", type=int, default=384)
    ap.add_argument("--speed-arch", default="small", choices=("tiny", "small"))
    ap.add_argument("--speed-steps", type=int, default=5)
    ap.add_argument("--mem-arch", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--mem-steps", type=int, default=1)
    ap.add_argument("--unit-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop and of the actor")
    ap.add_argument("--skip", default="", help="comma list of parts to skip on CPU: speed, memory")
    # GPU
    ap.add_argument("--model", default=None, help="GPU: a diffusers folder / hub id instead of random weights")
    ap.add_argument("--arch", default="sd15", choices=("tiny", "small", "sd15"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--attention", default="sdpa", choices=("auto", "sdpa", "xformers"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--images", type=int, default=64, help="GPU: images for the raybias sampler")
    ap.add_argument("--stock-images", type=int, default=16, help="GPU: images for the stock pipeline")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    # internal: one memory measurement in a fresh process
    ap.add_argument("--compare-on", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke-test the GPU comparison
    ap.add_argument("--rounds", type=int, default=3, help="speed: alternating bare/Ray rounds (best kept)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if args.memory_child is not None:
        memory_child(args)
        return
    if args.bare_child is not None:
        bare_child(args)
        return
    if args.device == "cuda" or args.compare_on == "cpu":
        gpu(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    print(machine())
    print("note: other jobs may share this machine; figures can be noisy")
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        if "speed" not in skip:
            speed(args, build_base(args.speed_arch, os.path.join(tmp, f"base-{args.speed_arch}")), tmp)
        if "memory" not in skip:
            memory(args, build_base(args.mem_arch, os.path.join(tmp, f"base-{args.mem_arch}")), tmp)


if __name__ == "__main__":
    main()
