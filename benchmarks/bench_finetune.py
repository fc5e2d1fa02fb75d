"""Fine-tuning speed: raybias's loop vs. a plain loop written the obvious way, in one process.

Both train the same UNet the same way (DDPM noise, epsilon MSE, AdamW); the plain loop
VAE-encodes the batch's images and runs the text encoder on its prompts at every step, as
the diffusers example scripts do; raybias's loop encodes every image and prompt once and
draws each step's latents from the cached latent distributions. Prints steps/s of a LoRA
and a DreamBooth step for both, their ratio, and the machine.

    python benchmarks/bench_finetune.py                       # small builtin arch on CPU
    python benchmarks/bench_finetune.py --device cuda --arch sd15 --batch 4 --dtype bf16
    python benchmarks/bench_finetune.py --overhead            # + Ray Train per-job overhead

On a GPU it also prints model-FLOP utilisation: 3 x (UNet forward FLOPs per image) x images
per second against the GPU's dense peak (989 TFLOP/s bf16 for an H100 SXM; SD-1.5's UNet is
about 677 GFLOP per image per step at 64x64 latents).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from machine import machine  # benchmarks/machine.py

SD15_UNET_GFLOP = 677.0
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}  # H100 SXM dense (fp32 via TF32)


def unet_gflop_per_image(pipe, device) -> float:
    """UNet forward FLOPs for one image, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    ctx = torch.randn(1, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.unet(x, torch.tensor([10], device=device), encoder_hidden_states=ctx)
    return counter.get_total_flops() / 1e9


class PlainLoop:
    """The obvious loop: encode images and prompts every step (diffusers example style)."""

    def __init__(self, pipe, kind: str, images: torch.Tensor, prompts, lr: float, rank: int, device, amp):
        from diffusers import DDPMScheduler

        self.pipe, self.images, self.prompts, self.device, self.amp = pipe, images, prompts, device, amp
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if kind == "lora":
            from peft import LoraConfig

            pipe.unet.requires_grad_(False)
            pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        else:
            pipe.unet.requires_grad_(True)
        self.params = [p for p in pipe.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def step(self, batch: int) -> float:
        pipe = self.pipe
        idx = torch.randint(0, len(self.images), (batch,))
        pixels = self.images[idx].to(self.device, pipe.vae.dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([self.prompts[int(i)] for i in idx], padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            context = pipe.text_encoder(ids.to(self.device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (batch,), device=self.device)
        noisy = self.sched.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            pred = pipe.unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach().item()


def timed(fn, steps: int, warmup: int, device) -> tuple:
    """(steps per wall second, steps per CPU second of this process).

    On a shared machine the wall figure is what other work leaves over; the CPU figure
    (with one torch thread) is much less sensitive to it.
    """
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), steps / max(1e-9, time.process_time() - cpu)


def bench_kind(kind: str, args, device, amp) -> dict:
    from raybias.diffusion.backbone import build_pipeline
    from raybias.config import config_from_dict
    from raybias.finetune.loop import FinetuneLoop
    from raybias.finetune.spec import FinetuneJob, finetune_spec, member_for
    from raybias.rundir import RunDir
    from raybias.diffusion.sampling import default_size

    def fresh():
        pipe = build_pipeline(args.arch, seed=0)
        return pipe.to(device)

    pipe = fresh()
    size = default_size(pipe)
    rng = np.random.default_rng(0)
    n = args.images
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    members = ["zero", "one", "two", "three", "four"]
    template = "a sks red {member}" if kind == "dreambooth" else "a red {member}"
    job = FinetuneJob(name="g0", generator=kind, kind=kind, group=0, cluster=None, prompt_template=template,
                      members=members, ids=[f"img-{i}" for i in range(n)], class_template="a red {member}")
    cfg = config_from_dict({"finetune": {
        "seed": 0, "batch_size": args.batch, "lr": 1e-4, "dreambooth_lr": 5e-6, "lora_rank": 4, "lora_alpha": 4.0,
        "prior_preservation": False, "prior_loss_weight": 1.0, "weight_decay": 1e-2, "max_grad_norm": 1.0,
        "mixed_precision": args.dtype if args.dtype != "fp32" else "no"}})
    with tempfile.TemporaryDirectory(prefix="raybias-bench-ft-") as tmp:  # the spec names a run directory
        ft = finetune_spec(cfg, RunDir(tmp), kind, base=(args.arch, None))
    gflop = unet_gflop_per_image(pipe, device)

    setup = time.perf_counter()
    ours = FinetuneLoop(pipe, job, ft, device=str(device), images=images)
    setup = time.perf_counter() - setup
    ours_sps, ours_cpu = timed(ours.step, args.steps, args.warmup, device)
    del ours, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    pipe = fresh()
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    prompts = [template.format(member=member_for(i, members, 0)) for i in job.ids]
    plain = PlainLoop(pipe, kind, pixels, prompts, ft.lr, 4, device, amp)
    plain_sps, plain_cpu = timed(lambda i: plain.step(args.batch), args.steps, args.warmup, device)
    del plain, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"kind": kind, "ours": ours_sps, "plain": plain_sps, "ours_cpu": ours_cpu, "plain_cpu": plain_cpu,
            "setup_s": setup, "gflop": gflop}


def overhead(args) -> None:
    """One Ray Train job per group on the small builtin backbone: job wall time vs. the loop's own time."""
    from raybias.config import config_from_dict
    from raybias.layout import finetune_key, training_json
    from raybias.ray_utils import init_ray
    from raybias.rundir import RunDir
    from raybias.stages.finetune import finetune_generator
    from raybias.stages.prepare import run_prepare

    from raybias.diffusion.backbone import build_pipeline, builtin_folder, is_pipeline_folder, save_pipeline

    root = tempfile.mkdtemp(prefix="raybias-bench-ft-")
    try:
        base = "builtin"
        if not is_pipeline_folder(builtin_folder()):  # not shipped yet: the same architecture, random weights
            base = save_pipeline(build_pipeline("small"), os.path.join(root, "base"))
        cfg = config_from_dict({
            "run_dir": os.path.join(root, "run"), "data": {"severity": 0.99}, "methods": ["lora"],
            "base": {"model": base},
            "finetune": {"steps": args.overhead_steps, "batch_size": 16, "checkpoint_every": args.overhead_steps,
                         "n_samples": 0, "num_cpus_per_job": args.cpus_per_job}})
        run = RunDir(cfg.run_dir)
        init_ray(cfg, quiet=True)
        run_prepare(cfg, run, verbose=False)
        start = time.perf_counter()
        finetune_generator(cfg, run, "lora", "fresh")
        total = time.perf_counter() - start
        print(f"\nRay Train, lora on the builtin backbone, 4 groups, {args.overhead_steps} steps, "
              f"{args.cpus_per_job} CPU per job: stage {total:.1f}s")
        walls = run.stage_record(finetune_key("lora"))["info"]["job_wall_seconds"]
        for g in range(4):
            rec = run.read_json(training_json("lora", f"g{g}"))
            rec["wall_seconds"] = walls[f"g{g}"]
            known = rec["startup_seconds"] + rec["setup_seconds"] + rec["train_seconds"] + rec["preview_seconds"]
            print(f"  g{g}: job wall {rec['wall_seconds']:.1f}s = Ray Train start-up {rec['startup_seconds']:.1f}s "
                  f"+ setup in worker (imports, load, encode) {rec['setup_seconds']:.1f}s "
                  f"+ training {rec['train_seconds']:.1f}s ({rec['seconds_per_step'] * 1000:.0f} ms/step) "
                  f"+ previews {rec['preview_seconds']:.1f}s + checkpoint/publish/shutdown "
                  f"{rec['wall_seconds'] - known:.1f}s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="small", choices=("tiny", "small", "sd15"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--images", type=int, default=64, help="training images (random) per job")
    p.add_argument("--kinds", default="lora,dreambooth")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--overhead", action="store_true", help="also time Ray Train jobs end to end")
    p.add_argument("--overhead-steps", type=int, default=50)
    p.add_argument("--cpus-per-job", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.arch == "sd15":
        print("--arch sd15 is for a GPU (--device cuda)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype) if device.type == "cuda" else None
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(machine(args.device))
    print(f"arch {args.arch}, batch {args.batch}, dtype {args.dtype}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, device {args.device}")
    print(f"{'method':<12}{'raybias steps/s':>17}{'plain steps/s':>15}{'ratio':>8}{'img/s (raybias)':>17}"
          f"{'UNet GFLOP/img':>16}{'achieved TFLOP/s':>18}{'MFU':>7}")
    for kind in args.kinds.split(","):
        r = bench_kind(kind.strip(), args, device, amp)
        img_s = r["ours"] * args.batch
        gflop = SD15_UNET_GFLOP if args.arch == "sd15" else r["gflop"]
        tflops = 3 * gflop * img_s / 1e3
        mfu = f"{tflops / PEAK_TFLOPS[args.dtype] * 100:.1f}%" if device.type == "cuda" else "-"
        print(f"{kind:<12}{r['ours']:>17.2f}{r['plain']:>15.2f}{r['ours'] / r['plain']:>7.2f}x{img_s:>17.1f}"
              f"{r['gflop']:>16.2f}{tflops:>18.3f}{mfu:>7}")
        if device.type == "cpu":
            print(f"{'':<12}per CPU-second: raybias {r['ours_cpu']:.2f} steps, plain {r['plain_cpu']:.2f} steps, "
                  f"ratio {r['ours_cpu'] / r['plain_cpu']:.2f}x ({1000 / r['ours_cpu']:.0f} vs "
                  f"{1000 / r['plain_cpu']:.0f} CPU-ms per step)")
        print(f"{'':<12}(raybias setup, encoding {args.images} images and prompts once: {r['setup_s']:.2f}s)")
    if args.overhead:
        overhead(args)
    print("\nnote: the machine may be shared with other work; figures can be noisy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
