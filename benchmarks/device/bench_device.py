#!/usr/bin/env python3
"""One command measures a GPU: sampling, fine-tuning steps and a correctness smoke, in one run.

On SD-1.5-sized models built from config with random weights (`raybias.diffusion.backbone.
build_pipeline("sd15")`: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder), within a time budget:

  matmul            the chip's dense matrix ceiling as found (bf16 8192^3 on CUDA), for scale
  smoke             no NaN/inf in any UNet or VAE output (each dtype), images not constant and
                    different per seed, the stock pipeline's images finite; a peft LoRA (rank 4,
                    non-zero B) changes the output for the same seeds, is saved by raybias's
                    `LoraTuner.save` (safetensors) and, loaded back through the sampler's own
                    `ModelSwitcher`, reproduces the in-memory LoRA's images
  sample-raybias    `raybias.diffusion.sampling.sample` with the sampler actor's own `_prepare`
                    (dtype, attention, channels_last, torch.compile): images/s per batch size
  sample-stock      diffusers `StableDiffusionPipeline.__call__`, same components, DDIM, steps and
                    guidance, output_type="np", one device generator per image
  train-lora /      one step of raybias's `FinetuneLoop` (the loop Ray Train runs) on a fp32
  train-dreambooth  pipeline under autocast (finetune.mixed_precision), defaults of
                    `FinetuneConfig` (DreamBooth with prior preservation: 2x the batch)

Every measurement is guarded (an error is recorded and the run goes on), skipped with the
reason when the remaining budget cannot hold it, and written at once to results.json and
results.md in --out. Timed regions are bracketed by torch.cuda.synchronize(); warm-up calls
are not timed; torch.compile's first call is reported as compile time.

FLOPs. Sampling, sd15: `benchmarks/bench_generate.py`'s `sd15_tflop_per_image` (UNet 677
GFLOP per image per step at 64x64 latents, x2 with classifier-free guidance, + VAE decode
2.48 TFLOP, scaled by (size/512)^2); other archs: torch's flop counter on the UNet and VAE
decoder at batch 1 (the text encoder, <0.2 %, is left out in both). Training: 3 x the UNet's
forward FLOPs per image x images per step (forward + backward as 2x forward; for LoRA the
base weights get no gradient, so the real work is nearer 2x and this MFU is an upper-bound
convention, as in benchmarks/bench_finetune.py). MFU = achieved / --peak-tflops.

    python benchmarks/device/bench_device.py --device cuda --arch sd15 --budget-s 540 --out device-out
    python benchmarks/device/bench_device.py --device cpu --arch tiny --budget-s 60 --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for _p in (BENCH, ROOT):  # benchmarks/ (bench_generate, machine) and the repository (raybias)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

# NVIDIA H200 SXM, dense FP16/BF16 Tensor Core rate: the datasheet ("NVIDIA H200 Tensor Core
# GPU", nvidia.com/en-us/data-center/h200/) gives 1,979 TFLOPS with 2:4 sparsity, i.e. 989.5
# dense (the H100 SXM's figure). This workplace measured an 8192^3 bf16 matmul at ~790 TFLOP/s
# on random data (.library/device/KINDS.md); the `matmul` row re-measures it in each run.
H200_PEAK_TFLOPS = 989.5
PEAK_SOURCE = "NVIDIA H200 SXM datasheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity = 989.5 dense"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPTS = ["a red two", "a green seven", "a blue zero", "a yellow five"]
SCHEMA = 1


class BudgetTimeout(Exception):
    """A measurement ran past its share of the budget (SIGALRM)."""


def _alarm(signum, frame):
    raise BudgetTimeout("ran past the time left in the budget")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise BudgetTimeout in this (main) thread after `seconds` (where SIGALRM exists)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _err(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}{where}"


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.rows: List[Dict[str, Any]] = []
        self.smoke: Dict[str, Any] = {"passed": None, "checks": {}}
        self.meta: Dict[str, Any] = {}
        self.master = None
        self.plain: Dict[str, Any] = {}
        self.flop: Dict[str, Any] = {}
        self.seen: Dict[str, float] = {}  # kind -> seconds per image seen so far (for estimates)
        os.makedirs(args.out, exist_ok=True)
        self.margin = 3.0 if args.quick else 10.0  # kept for writing the results

    # ------------------------------------------------------------------ budget
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def repeat(self, fn: Callable[[int], Any], min_time: Optional[float] = None,
               max_reps: Optional[int] = None) -> List[float]:
        """Seconds of each timed call of fn(i) (after the caller's warm-up), synchronised."""
        min_time = self.args.min_time if min_time is None else min_time
        max_reps = self.args.max_reps if max_reps is None else max_reps
        times: List[float] = []
        while True:
            self.sync()
            t = time.perf_counter()
            fn(len(times))
            self.sync()
            times.append(time.perf_counter() - t)
            if len(times) >= max_reps or (sum(times) >= min_time and len(times) >= self.args.min_reps):
                return times
            if self.left() < self.margin + 2 * times[-1]:
                return times

    # ------------------------------------------------------------------ output
    def write(self) -> None:
        self.meta["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        doc = {"schema": SCHEMA, "meta": self.meta, "flop": self.flop, "smoke": self.smoke, "rows": self.rows}
        for name, text in (("results.json", json.dumps(doc, indent=2, default=str)), ("results.md", self.markdown())):
            path = os.path.join(self.args.out, name)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def markdown(self) -> str:
        m = self.meta
        peak = m.get("peak_tflops")
        lines = [f"# Device benchmark: {m.get('gpu') or m.get('device')}, arch {m.get('arch')}", ""]
        lines.append(f"- {m.get('machine', '')}")
        lines.append(f"- torch {m.get('torch')}, diffusers {m.get('diffusers')}, peft {m.get('peft')}, "
                     f"transformers {m.get('transformers')}, xformers {m.get('xformers')}")
        lines.append(f"- sampling: {m.get('size')} px, {m.get('steps')} DDIM steps, guidance {m.get('guidance')}; "
                     f"{_fmt(self.flop.get('sample_tflop_per_image'))} TFLOP per image ({self.flop.get('source')}); "
                     f"training: 3 x {_fmt(self.flop.get('unet_gflop_per_image'))} GFLOP per image")
        lines.append((f"- MFU against {peak} TFLOP/s ({m.get('peak_source')})" if peak else
                      "- MFU: no peak given (--peak-tflops)") + f"; budget {m.get('budget_s')} s, "
                     f"used {m.get('elapsed_s')} s")
        smoke = self.smoke.get("passed")
        lines.append(f"- smoke: {'passed' if smoke else 'FAILED' if smoke is False else 'not run'}"
                     + ("" if smoke is None else "; " + ", ".join(
                         f"{k} {'ok' if v else 'FAIL'}" for k, v in self.smoke["checks"].items()
                         if isinstance(v, bool))))
        lines += ["", "| # | what | dtype | attention | compile | channels_last | batch | rate | unit | "
                  "TFLOP/s | MFU | status | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(self.rows, 1):
            mfu = r.get("mfu")
            cells = [str(i), r["what"], r.get("dtype") or "-", r.get("attention") or "-",
                     {True: "on", False: "off"}.get(r.get("compile"), "-"),
                     {True: "on", False: "off"}.get(r.get("channels_last"), "-"),
                     str(r.get("batch") or "-"), _fmt(r.get("rate")), r.get("unit") or "-",
                     _fmt(r.get("achieved_tflops")), f"{100 * mfu:.1f} %" if mfu else "-", r["status"],
                     (r.get("note") or r.get("error") or "").replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += self.summary()
        return "\n".join(lines)

    def summary(self) -> List[str]:
        """raybias vs stock per dtype: at the same batch where both ran, and each one's best row."""
        ok = [r for r in self.rows if r["status"] == "ok" and r.get("rate")]
        out = []
        for d in self.args.dtypes:
            ours = [r for r in ok if r["what"] == "sample-raybias" and r.get("dtype") == d]
            stock = [r for r in ok if r["what"] == "sample-stock" and r.get("dtype") == d]
            if not ours or not stock:
                continue
            for s in stock:
                same = [r for r in ours if r["batch"] == s["batch"] and r.get("attention") == s.get("attention")
                        and not r.get("compile") and not r.get("channels_last")]
                if same:
                    out.append(f"- {d}, batch {s['batch']}, {s.get('attention')}: raybias {same[0]['rate']:.3g} vs "
                               f"stock {s['rate']:.3g} images/s ({same[0]['rate'] / s['rate']:.2f}x)")
            bo, bs = max(ours, key=lambda r: r["rate"]), max(stock, key=lambda r: r["rate"])
            out.append(f"- {d}, best of each: raybias {bo['rate']:.3g} images/s ({bo['id']}) vs stock "
                       f"{bs['rate']:.3g} ({bs['id']}): {bo['rate'] / bs['rate']:.2f}x")
        if out:
            out = ["## raybias sampler vs stock StableDiffusionPipeline", ""] + out + [""]
        out.append("Random weights from config: speed and numerics, not image quality.")
        out.append("")
        return out

    # ------------------------------------------------------------------ one guarded measurement
    def measure(self, row: Dict[str, Any], fn: Callable[[], Dict[str, Any]], est_s: float,
                cap_s: Optional[float] = None) -> Dict[str, Any]:
        row = dict(row, status="ok")
        left = self.left() - self.margin
        row["est_s"] = round(est_s, 1)
        if est_s > left:
            row.update(status="skipped", note=f"budget: needs ~{est_s:.0f} s, {max(0.0, left):.0f} s left")
        else:
            started = time.perf_counter()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                with time_limit(min(left, cap_s) if cap_s else left):
                    row.update(fn() or {})
            except BudgetTimeout as exc:
                row.update(status="error", error=f"timed out after {time.perf_counter() - started:.0f} s: {exc}")
            except Exception as exc:  # noqa: BLE001 - each measurement stands alone
                row.update(status="error", error=_err(exc))
                if self.args.verbose:
                    traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - started, 2)
            gc.collect()
            if self.cuda:
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        if row.get("achieved_tflops") and self.meta.get("peak_tflops"):
            row["mfu"] = row["achieved_tflops"] / self.meta["peak_tflops"]
        self.rows.append(row)
        note = row.get("note") or row.get("error") or ""
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {row['id']:<44} {row['status']:<8} "
              f"{_fmt(row.get('rate')):>9} {row.get('unit') or '':<9} {_fmt(row.get('achieved_tflops')):>8} TFLOP/s"
              f"  {note}", flush=True)
        self.write()
        return row

    def done(self, row: Dict[str, Any]) -> bool:
        """Whether a row of this id is already in (the plan names some settings twice)."""
        return any(r["id"] == row["id"] for r in self.rows)

    def skip(self, row: Dict[str, Any], why: str) -> None:
        row = dict(row, status="skipped", note=why)
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {row['id']:<44} skipped   {why}", flush=True)
        self.write()

    # ------------------------------------------------------------------ models
    def build(self) -> None:
        from raybias.diffusion.backbone import build_pipeline, count_parameters

        a = self.args
        started = time.perf_counter()
        how = "cpu"
        pipe = None
        if self.cuda:
            try:  # initialise the random weights on the GPU (seconds instead of a minute of CPU init)
                with torch.device(self.device):
                    pipe = build_pipeline(a.arch, seed=0, image_size=a.size)
                pipe = pipe.to(self.device)
                off = [n for m in ("unet", "vae", "text_encoder") for n, t in
                       list(getattr(pipe, m).named_parameters()) + list(getattr(pipe, m).named_buffers())
                       if t.device.type != "cuda"]
                if off:
                    raise RuntimeError(f"{len(off)} tensors not on the GPU, e.g. {off[0]}")
                how = "on device"
            except Exception as exc:  # noqa: BLE001
                print(f"building on the device failed ({_err(exc)}); building on the CPU", flush=True)
                pipe = None
        if pipe is None:
            pipe = build_pipeline(a.arch, seed=0, image_size=a.size).to(self.device)
        # the scheduler's own tables on the CPU, as build_pipeline makes them outside a device context
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.eval().requires_grad_(False)
        self.sync()
        self.master = pipe
        self.meta["build_s"] = round(time.perf_counter() - started, 2)
        self.meta["build"] = how
        self.meta["parameters"] = count_parameters(pipe)

    def copy_pipe(self, dtype):
        from diffusers import StableDiffusionPipeline

        m = self.master
        comps = {k: copy.deepcopy(getattr(m, k)).to(self.device, dtype) for k in ("unet", "vae", "text_encoder")}
        for module in comps.values():
            module.eval().requires_grad_(False)
        pipe = StableDiffusionPipeline(**comps, tokenizer=m.tokenizer, scheduler=copy.deepcopy(m.scheduler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def plain_pipe(self, name: str):
        if name not in self.plain:
            self.plain[name] = self.copy_pipe(DTYPES[name])
        return self.plain[name]

    def drop_plain(self, keep: Optional[str] = None) -> None:
        for k in list(self.plain):
            if k != keep:
                del self.plain[k]
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def prepare(self, pipe, dtype_name: str, attention: str, channels_last: bool, compile_: bool):
        """The sampler actor's own `_prepare` (raybias.generation.sampler.SamplerActor): dtype,
        channels_last (CUDA), attention, torch.compile of the UNet. Returns what it selected."""
        from raybias.generation.sampler import SamplerActor

        shim = types.SimpleNamespace(dtype=DTYPES[dtype_name], device=self.device.type, attention=None,
                                     sampling={"attention": attention, "channels_last": channels_last,
                                               "compile": compile_})
        SamplerActor._prepare(shim, pipe)
        forced = False
        if channels_last and not self.cuda:  # the actor applies it on CUDA only; run the path anyway
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            forced = True
        return shim.attention, forced

    # ------------------------------------------------------------------ FLOPs
    def count_flops(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        from raybias.diffusion.sampling import default_size, vae_scale_factor

        a, pipe = self.args, self.master
        size = a.size or default_size(pipe)
        a.size = size
        lat = size // vae_scale_factor(pipe)
        cfg = pipe.unet.config
        x = torch.randn(1, cfg.in_channels, lat, lat, device=self.device)
        ctx = torch.randn(1, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, device=self.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pipe.unet(x, torch.tensor([10], device=self.device), encoder_hidden_states=ctx)
        unet = counter.get_total_flops()
        z = torch.randn(1, pipe.vae.config.latent_channels, lat, lat, device=self.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pipe.vae.decode(z)
        vae = counter.get_total_flops()
        calls = a.steps * (2 if a.guidance > 1 else 1)
        counted = calls * unet + vae
        self.flop.update(unet_gflop_per_image_counted=unet / 1e9, vae_decode_gflop_counted=vae / 1e9,
                         sample_tflop_per_image_counted=counted / 1e12)
        per_image, unet_img, source = counted, unet, "torch.utils.flop_counter at batch 1"
        if a.arch == "sd15":
            try:
                from bench_generate import UNET_GFLOP_512, sd15_tflop_per_image

                per_image = sd15_tflop_per_image(a.steps, a.guidance, size) * 1e12
                unet_img = UNET_GFLOP_512 * 1e9 * (size / 512) ** 2
                source = "bench_generate.sd15_tflop_per_image (SD-1.5 count)"
            except Exception as exc:  # noqa: BLE001 - fall back on the counted figure
                source += f" (bench_generate not importable: {_err(exc)})"
        self.flop.update(sample_tflop_per_image=per_image / 1e12, unet_gflop_per_image=unet_img / 1e9,
                         train_flop_factor=3, source=source)

    # ------------------------------------------------------------------ estimates
    def est_sample(self, kind: str, batch: int, compile_: bool = False) -> float:
        per_image = self.seen.get(kind)
        if per_image is None:  # from FLOPs at a modest share of the peak, with a per-step floor
            rate = (self.meta.get("peak_tflops") or 1.0) * (0.25 if kind == "raybias" else 0.1) * 1e12
            per_image = self.flop["sample_tflop_per_image"] * 1e12 / rate
            per_image = max(per_image, self.args.steps * (0.01 if self.cuda else 0.002))
        rep = per_image * batch
        est = (1 + self.args.warmup) * rep + max(self.args.min_time, rep * self.args.min_reps)
        if compile_:
            est += self.args.compile_est_s
        return est

    def est_train(self, batch: int) -> float:
        step = self.seen.get("train")
        if step is None:
            rate = (self.meta.get("peak_tflops") or 1.0) * 0.2 * 1e12
            step = 3 * self.flop["unet_gflop_per_image"] * 1e9 * 2 * batch / rate
            step = max(step, 0.05 if self.cuda else 0.02)
        else:
            step *= batch
        return 5.0 + (2 + self.args.warmup) * step + max(self.args.min_time, step * self.args.min_reps)

    # ------------------------------------------------------------------ measurements
    def m_matmul(self) -> Dict[str, Any]:
        n = self.args.matmul_n
        dt = torch.bfloat16 if self.cuda else torch.float32
        g = torch.Generator(self.device).manual_seed(0)
        a = torch.randn(n, n, device=self.device, dtype=dt, generator=g)
        b = torch.randn(n, n, device=self.device, dtype=dt, generator=g)
        for _ in range(3):
            a @ b
        times = self.repeat(lambda i: a @ b, min_time=self.args.min_time / 2, max_reps=20)
        sec = statistics.median(times)
        return dict(rate=1 / sec, unit="matmul/s", achieved_tflops=2 * n ** 3 / sec / 1e12,
                    dtype="bf16" if self.cuda else "fp32", reps=len(times), median_s=sec, min_s=min(times),
                    max_s=max(times), note=f"{n}^3, random data, median of {len(times)}")

    def m_smoke(self) -> Dict[str, Any]:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from raybias.config import config_from_dict
        from raybias.finetune.loop import LORA_WEIGHTS, LoraTuner
        from raybias.finetune.spec import finetune_spec
        from raybias.diffusion.sampling import sample, set_attention
        from raybias.generation.sampler import ModelSwitcher
        from raybias.layout import model_dir
        from raybias.rundir import RunDir

        a = self.args
        checks: Dict[str, Any] = {}
        self.smoke["checks"] = checks
        n = a.smoke_images
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        seeds = list(range(100, 100 + n))
        settings = dict(steps=a.steps, guidance=a.guidance, batch_size=n, size=a.size)

        def finite_run(pipe, tag: str):
            stats = {"unet": [True, 0.0], "vae": [True, 0.0]}

            def hook(key):
                def fn(module, inputs, output):
                    out = output.sample if hasattr(output, "sample") else output
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    stats[key][0] &= bool(torch.isfinite(out).all())
                    stats[key][1] = max(stats[key][1], float(out.detach().float().abs().max()))
                return fn

            handles = [pipe.unet.register_forward_hook(hook("unet")),
                       pipe.vae.decoder.register_forward_hook(hook("vae"))]
            try:
                images = sample(pipe, prompts, seeds, **settings)
            finally:
                for h in handles:
                    h.remove()
            arr = np.stack(images).astype(np.float32)
            checks[f"{tag}_unet_finite"] = stats["unet"][0]
            checks[f"{tag}_vae_finite"] = stats["vae"][0]
            checks[f"{tag}_unet_max_abs"] = stats["unet"][1]
            checks[f"{tag}_vae_max_abs"] = stats["vae"][1]
            checks[f"{tag}_images_not_constant"] = bool(all(im.std() > 0 for im in arr))
            if n > 1:
                checks[f"{tag}_images_differ_by_seed"] = bool(np.abs(arr[0] - arr[1]).mean() > 0)
            return arr

        main = a.dtypes[0]
        base = None
        for name in a.dtypes:
            pipe = self.plain_pipe(name)
            set_attention(pipe, "sdpa")
            arr = finite_run(pipe, f"raybias_{name}")
            if name == main:
                base = arr

        # the stock pipeline's own images (float, output_type="np") are finite and not constant
        pipe = self.plain_pipe(main)
        stock = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        stock.set_progress_bar_config(disable=True)
        out = stock(prompts, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                    generator=[torch.Generator(self.device).manual_seed(s) for s in seeds], output_type="np").images
        out = np.asarray(out, dtype=np.float32)
        checks["stock_images_finite"] = bool(np.isfinite(out).all())
        checks["stock_images_not_constant"] = bool(all(im.std() > 0 for im in out))

        # LoRA: peft adapter (raybias's LoraTuner), non-zero B, changes the output for the same seeds
        dt = DTYPES[main]
        tmp = tempfile.mkdtemp(prefix="bench-device-lora-")
        run = RunDir(tmp)
        cfg = config_from_dict({"finetune": {"lr": 1e-4, "lora_rank": 4, "lora_alpha": 4.0, "seed": 0}})
        tuner = LoraTuner(finetune_spec(cfg, run, "lora", base=("smoke", None)))
        lpipe = self.copy_pipe(dt)
        tuner.prepare(lpipe.unet)
        checks["lora_layers"] = perturb_lora(lpipe.unet, a.lora_rel)
        lpipe.unet.requires_grad_(False)
        lpipe.unet.to(self.device, dt)  # as the sampler's _prepare casts a loaded adapter
        set_attention(lpipe, "sdpa")
        lora = finite_run(lpipe, "lora")
        change = float(np.abs(lora - base).mean())
        checks["lora_mean_abs_change"] = change
        checks["lora_changes_output"] = bool(change > 0.5)

        rel = model_dir("lora", "smoke")
        tuner.save(lpipe, run.path(rel), None, False)
        weights = os.path.join(run.path(rel), LORA_WEIGHTS)
        checks["lora_saved_safetensors"] = bool(os.path.isfile(weights) and os.path.getsize(weights) > 0)
        del lpipe
        rpipe = self.copy_pipe(dt)
        switcher = ModelSwitcher(rpipe, run, 2, lambda p: self.prepare(p, main, "sdpa", False, False))
        switcher.activate({"kind": "lora", "folder": rel, "name": "smoke"})
        loaded = np.stack(sample(rpipe, prompts, seeds, **settings)).astype(np.float32)
        vs_mem = float(np.abs(loaded - lora).mean())
        checks["lora_loaded_mean_abs_vs_in_memory"] = vs_mem
        checks["lora_loaded_max_abs_vs_in_memory"] = float(np.abs(loaded - lora).max())
        checks["lora_loads_back"] = bool(vs_mem <= max(0.05, 0.1 * change))
        checks["lora_loaded_changes_output"] = bool(float(np.abs(loaded - base).mean()) > 0.5)
        del rpipe
        passed = all(v for v in checks.values() if isinstance(v, bool))
        self.smoke["passed"] = passed
        failed = [k for k, v in checks.items() if v is False]
        return dict(dtype=",".join(a.dtypes), batch=n, status="ok" if passed else "failed",
                    note=("all checks passed" if passed else "failed: " + ", ".join(failed))
                    + f"; LoRA changed the images by {change:.1f} levels, loaded copy within {vs_mem:.3f}")

    def m_sample_raybias(self, dtype: str, attention: str, compile_: bool, channels_last: bool, batch: int):
        from raybias.diffusion.sampling import sample

        a = self.args
        fresh = compile_ or channels_last  # these change the modules in place: a copy of its own
        pipe = self.copy_pipe(DTYPES[dtype]) if fresh else self.plain_pipe(dtype)
        used, forced = self.prepare(pipe, dtype, attention, channels_last, compile_)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        settings = dict(steps=a.steps, guidance=a.guidance, batch_size=batch, size=a.size)

        def call(i):
            sample(pipe, prompts, [1000 * i + k for k in range(batch)], **settings)

        self.sync()
        t = time.perf_counter()
        call(-1)
        self.sync()
        first = time.perf_counter() - t
        for w in range(a.warmup - 1):
            call(-2 - w)
        times = self.repeat(call)
        sec = statistics.median(times)
        out = self._rate_row(batch / sec, "images/s", self.flop["sample_tflop_per_image"], times)
        out["attention"] = used
        if compile_:
            out["compile_s"] = round(first - sec, 2)
            out["note"] = f"compile {first - sec:.1f} s (first call {first:.1f} s); " + out["note"]
        if forced:
            out["note"] = "channels_last set by the benchmark (the actor sets it on CUDA only); " + out["note"]
        self.seen["raybias"] = min(self.seen.get("raybias", float("inf")), sec / batch)
        if not fresh and attention == "xformers":
            self.prepare(pipe, dtype, "sdpa", False, False)  # back to SDPA for the rows after
        return out

    def m_sample_stock(self, dtype: str, attention: str, batch: int):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from raybias.diffusion.sampling import set_attention

        a = self.args
        pipe = self.plain_pipe(dtype)
        set_attention(pipe, "sdpa")  # AttnProcessor2_0: diffusers' own default where SDPA exists
        stock = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        stock.set_progress_bar_config(disable=True)
        used = "sdpa"
        try:
            if attention == "xformers":
                stock.enable_xformers_memory_efficient_attention()
                used = "xformers"
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

            def call(i):
                stock(prompts, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                      generator=[torch.Generator(self.device).manual_seed(1000 * i + k) for k in range(batch)],
                      output_type="np")

            for w in range(a.warmup):
                call(-1 - w)
            times = self.repeat(call)
        finally:
            set_attention(pipe, "sdpa")
        sec = statistics.median(times)
        out = self._rate_row(batch / sec, "images/s", self.flop["sample_tflop_per_image"], times)
        out["attention"] = used
        self.seen["stock"] = min(self.seen.get("stock", float("inf")), sec / batch)
        return out

    def m_train(self, kind: str, dtype: str, batch: int):
        from raybias.config import config_from_dict
        from raybias.finetune.loop import FinetuneLoop
        from raybias.finetune.spec import FinetuneJob, finetune_spec
        from raybias.rundir import RunDir

        a = self.args
        self.drop_plain()  # a full fp32 UNet, its gradients and AdamW state come next
        pipe = self.copy_pipe(torch.float32)  # the trainer's base pipeline is fp32 (autocast on top)
        size = a.size
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(a.train_images)]
        members = ["zero", "one", "two", "three", "four"]
        template = "a sks red {member}" if kind == "dreambooth" else "a red {member}"
        job = FinetuneJob(name="g0", generator=kind, kind=kind, group=0, cluster=None, prompt_template=template,
                          members=members, ids=[f"img-{i}" for i in range(len(images))],
                          class_template="a red {member}")
        cfg = config_from_dict({"finetune": {"batch_size": batch, "seed": 0,
                                             "mixed_precision": dtype if dtype in ("fp16", "bf16") else "no"}})
        with tempfile.TemporaryDirectory(prefix="bench-device-train-") as tmp:  # the spec names a run directory
            ft = finetune_spec(cfg, RunDir(tmp), kind, base=("bench", None))
        cls = None
        if kind == "dreambooth" and ft.prior_preservation:
            cls = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(a.train_images)]
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        setup = time.perf_counter()
        loop = FinetuneLoop(pipe, job, ft, device=str(self.device), images=images, class_images=cls)
        self.sync()
        setup = time.perf_counter() - setup
        losses = []
        for i in range(2 + a.warmup - 1):  # optimizer state and kernels are set up in the first steps
            losses.append(loop.step(i))
        times = self.repeat(lambda i: losses.append(loop.step(100 + i)))
        sec = statistics.median(times)
        per_step = batch * (2 if loop.prior else 1)
        out = self._rate_row(1 / sec, "steps/s", 3 * self.flop["unet_gflop_per_image"] / 1e3 * per_step, times)
        amp = str(loop.amp_dtype).replace("torch.", "") if loop.amp_dtype is not None else "fp32"
        out.update(dtype={"bfloat16": "bf16", "float16": "fp16"}.get(amp, amp), attention="sdpa",
                   images_per_step=per_step, setup_s=round(setup, 2),
                   loss_finite=bool(all(math.isfinite(x) for x in losses)))
        out["note"] = (f"{per_step} images/step{' (prior preservation)' if loop.prior else ''}, "
                       f"{len(loop.trainable)} trainable tensors; " + out["note"]
                       + ("" if out["loss_finite"] else "; NON-FINITE LOSS"))
        self.seen["train"] = min(self.seen.get("train", float("inf")), sec / per_step)
        return out

    def _rate_row(self, rate: float, unit: str, tflop_per_item: float, times: List[float]) -> Dict[str, Any]:
        out = dict(rate=rate, unit=unit, tflop_per_item=tflop_per_item, achieved_tflops=rate * tflop_per_item,
                   reps=len(times), median_s=statistics.median(times), min_s=min(times), max_s=max(times))
        if unit == "images/s":
            out["images_per_s"] = rate
        note = f"median of {len(times)} ({min(times):.3g}-{max(times):.3g} s)"
        if self.cuda:
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            note += f", peak {out['peak_mem_gib']:.1f} GiB"
        out["note"] = note
        return out

    # ------------------------------------------------------------------ the plan
    def run(self) -> None:
        a = self.args
        self.describe()
        self.write()
        print(f"budget {a.budget_s:.0f} s; building {a.arch} (random weights from config) on {a.device}", flush=True)
        self.build()
        self.count_flops()
        self.meta.update(size=a.size, steps=a.steps, guidance=a.guidance)
        print(f"built in {self.meta['build_s']} s ({self.meta['build']}); {self.meta['parameters']}; "
              f"{self.flop['sample_tflop_per_image']:.4g} TFLOP per image, UNet "
              f"{self.flop['unet_gflop_per_image']:.4g} GFLOP per image-step ({self.flop['source']})", flush=True)
        self.write()

        xf_ok, xf_why = xformers_state(self.cuda)
        self.meta["xformers_usable"], self.meta["xformers_why"] = xf_ok, xf_why
        compile_on = a.compile == "on" or (a.compile == "auto" and self.cuda)
        d0, rest = a.dtypes[0], a.dtypes[1:]
        bs = a.batches
        bmid = bs[min(1, len(bs) - 1)]
        tdt = ([d for d in ("bf16", "fp16") if d in a.dtypes] or [d0]) if self.cuda else ["fp32"]

        def rid(*parts):
            return "/".join(str(p) for p in parts)

        def ours(d, attn="sdpa", comp=False, cl=False, b=bmid):
            row = dict(id=rid("sample-raybias", d, attn, "compile" if comp else "eager", "cl" if cl else "nchw",
                              f"b{b}"), what="sample-raybias", dtype=d, attention=attn, compile=comp,
                       channels_last=cl, batch=b)
            if self.done(row):
                return None
            if attn == "xformers" and not xf_ok:
                return self.skip(row, f"xformers: {xf_why}")
            if comp and not compile_on:
                return self.skip(row, "torch.compile off on CPU by default (--compile on to force)")
            self.measure(row, lambda: self.m_sample_raybias(d, attn, comp, cl, b), self.est_sample("raybias", b, comp),
                         cap_s=(a.compile_est_s * 2 + 60) if comp else None)

        def stock(d, attn="sdpa", b=1):
            row = dict(id=rid("sample-stock", d, attn, f"b{b}"), what="sample-stock", dtype=d, attention=attn,
                       compile=False, channels_last=False, batch=b)
            if self.done(row):
                return None
            if attn == "xformers" and not xf_ok:
                return self.skip(row, f"xformers: {xf_why}")
            self.measure(row, lambda: self.m_sample_stock(d, attn, b), self.est_sample("stock", b))

        def train(kind, d, b=a.train_batch):
            row = dict(id=rid(f"train-{kind}", d, f"b{b}"), what=f"train-{kind}", dtype=d, attention="sdpa",
                       compile=False, channels_last=False, batch=b)
            if self.done(row):
                return None
            self.measure(row, lambda: self.m_train(kind, d, b), self.est_train(b))

        self.measure(dict(id="matmul", what="matmul"), self.m_matmul, 5.0)
        if not a.no_smoke:
            est = 4 * (self.est_sample("raybias", a.smoke_images) + self.est_sample("stock", a.smoke_images))
            self.measure(dict(id="smoke", what="smoke"), self.m_smoke, est)
            if self.rows[-1]["status"] == "error":
                self.smoke["passed"] = False
        # the headline pair first, then batch sizes, the second dtype, training, attention kernels,
        # memory format, the second dtype's other batches and compilation, while the budget lasts
        ours(d0)
        stock(d0)
        for b in bs:
            if b != bmid:
                ours(d0, b=b)
        if bmid != 1:
            stock(d0, b=bmid)
        for d in rest:
            ours(d)
            stock(d)
        self.drop_plain()
        for kind in ("lora", "dreambooth"):
            train(kind, tdt[0])
        ours(d0, attn="xformers")
        stock(d0, attn="xformers")
        ours(d0, cl=True)
        for d in rest:
            ours(d, attn="xformers")
        for d in tdt[1:]:
            self.drop_plain()
            for kind in ("lora", "dreambooth"):
                train(kind, d)
        for d in rest:  # the other batch sizes of the second dtype
            for b in bs:
                ours(d, b=b)
            stock(d, b=bmid)
        # torch.compile last: each costs a compilation (minutes for SD-1.5's UNet), timed on its own
        ours(d0, comp=True)
        ours(d0, comp=True, cl=True)
        ours(d0, comp=True, cl=True, b=bs[-1])
        self.drop_plain()
        self.meta["finished"] = True
        self.write()

    def describe(self) -> None:
        a = self.args
        from raybias.machine import version

        try:
            from machine import machine  # benchmarks/machine.py

            line = machine(a.device, extra=("peft", "transformers", "xformers"))
        except Exception as exc:  # noqa: BLE001
            line = f"machine: {platform.platform()} ({_err(exc)})"
        self.meta.update(
            machine=line, device=a.device, arch=a.arch, budget_s=a.budget_s, quick=a.quick, python=platform.python_version(),
            torch=torch.__version__, cuda=torch.version.cuda, diffusers=version("diffusers"), peft=version("peft"),
            transformers=version("transformers"), xformers=version("xformers"), ray=version("ray"),
            peak_tflops=a.peak_tflops, peak_source=a.peak_source, dtypes=a.dtypes, batches=a.batches,
            args={k: v for k, v in vars(a).items()}, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            cudnn_benchmark=torch.backends.cudnn.benchmark, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            self.meta.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1),
                             capability=f"{p.major}.{p.minor}")


def perturb_lora(unet, rel: float) -> int:
    """Give every peft LoRA layer a non-zero B (peft starts B at zero: no change at all), scaled
    so that the layer's weight delta B A x scaling has `rel` times the std of its base weight."""
    g = torch.Generator("cpu").manual_seed(1)
    n = 0
    with torch.no_grad():
        for module in unet.modules():
            la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            base = getattr(module, "base_layer", None)
            if not la or not lb or base is None or "default" not in la:
                continue
            A, B = la["default"].weight, lb["default"].weight
            scaling = float(getattr(module, "scaling", {}).get("default", 1.0))
            b0 = torch.randn(B.shape, generator=g).to(B.device, torch.float32)
            delta = (b0 @ A.float()) * scaling
            factor = rel * float(base.weight.float().std()) / max(float(delta.std()), 1e-12)
            B.copy_((b0 * factor).to(B.dtype))
            n += 1
    if n == 0:
        raise RuntimeError("no peft LoRA layer found in the UNet after add_adapter")
    return n


def xformers_state(cuda: bool):
    """(usable, why not): xformers imports and its kernels run here."""
    if not cuda:
        return False, "needs a CUDA device (raybias.diffusion.sampling.check_attention)"
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001
        return False, f"does not import ({_err(exc)})"
    try:
        q = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        return False, f"imports but its attention kernel fails ({_err(exc)})"
    return True, ""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--arch", choices=("tiny", "small", "sd15"), default="sd15")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    p.add_argument("--out", default="device-out")
    p.add_argument("--quick", action="store_true", help="few steps and reps (the CPU test)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak for MFU (default on CUDA: {H200_PEAK_TFLOPS}, H200 SXM dense bf16/fp16; none on CPU)")
    p.add_argument("--dtypes", default=None, help="comma list, first is the main one (default: fp16,bf16 on "
                                                  "CUDA, fp32,bf16 on CPU)")
    p.add_argument("--batches", default=None, help="sampling batch sizes (default 1,8,32; --quick 1,2)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the arch's, 512 for sd15)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25; --quick 2)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA only")
    p.add_argument("--compile-est-s", type=float, default=None, help="budget kept for one torch.compile")
    p.add_argument("--train-batch", type=int, default=None, help="fine-tuning batch (default 4; --quick 2)")
    p.add_argument("--train-images", type=int, default=8)
    p.add_argument("--smoke-images", type=int, default=2)
    p.add_argument("--lora-rel", type=float, default=0.25,
                   help="the smoke LoRA's weight change, relative to each base weight's std")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per row (GPU 3, quick 0.05)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each timed region (>= 1)")
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-smoke", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.dtypes = [d.strip() for d in (a.dtypes or ("fp16,bf16" if cuda else "fp32,bf16")).split(",") if d.strip()]
    for d in a.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    a.batches = [int(b) for b in (a.batches or ("1,2" if a.quick else "1,8,32")).split(",")]
    a.steps = a.steps or (2 if a.quick else 25)
    a.train_batch = a.train_batch or (2 if a.quick else 4)
    a.min_time = a.min_time if a.min_time is not None else (0.05 if a.quick else (3.0 if cuda else 1.0))
    a.min_reps = a.min_reps or (1 if a.quick else 3)
    a.max_reps = a.max_reps or (2 if a.quick else 20)
    a.warmup = max(1, a.warmup)
    a.matmul_n = a.matmul_n or (8192 if cuda else (256 if a.quick else 1024))
    a.compile_est_s = a.compile_est_s if a.compile_est_s is not None else (150.0 if cuda else 90.0)
    if a.peak_tflops is None and cuda:
        a.peak_tflops = H200_PEAK_TFLOPS
    a.peak_source = PEAK_SOURCE if (cuda and a.peak_tflops == H200_PEAK_TFLOPS) else ("--peak-tflops" if a.peak_tflops else None)
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if not cuda and a.arch == "sd15":
        p.error("--arch sd15 is for a GPU (--device cuda); use --arch tiny on the CPU")
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights from config: nothing to fetch
    with contextlib.suppress(Exception):  # no "modules that should be kept in float32" per cast
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    bench = Bench(args)
    try:
        bench.run()
    except Exception as exc:  # noqa: BLE001 - the build or the FLOP count failed: say so in the files
        bench.meta["fatal"] = _err(exc)
        traceback.print_exc()
        bench.write()
        print(bench.markdown())
        return 1
    print()
    print(bench.markdown())
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
