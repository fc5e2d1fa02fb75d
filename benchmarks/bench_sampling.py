"""Sampling throughput: raybias `sample` (batched, own loop) vs. stock StableDiffusionPipeline.__call__.

Both run the same backbone (the builtin one by default), DDIM, the same steps and guidance,
in one process. The stock pipeline is called once per image (batch 1, a generator per
image: what per-image determinism costs with it); `sample` batches images while keeping
each image determined by its own seed. Also times one UNet training step (what
fine-tuning and pretraining pay per step).

    python benchmarks/bench_sampling.py [--model builtin] [--images 64] [--steps 25]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from machine import machine  # benchmarks/machine.py


def main() -> None:
    from raybias.diffusion.backbone import builtin_folder, count_parameters, load_pipeline
    from raybias.diffusion.pretrain import read_meta
    from raybias.diffusion.sampling import sample, set_attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--stock-images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, device=device)
    attention = set_attention(pipe, "auto")
    colors, digits = ["red", "green", "blue", "yellow"], ["zero", "three", "five", "seven"]
    prompts = [f"a {colors[i % 4]} {digits[(i // 4) % 4]}" for i in range(args.images)]
    seeds = list(range(args.images))

    print(machine(device))
    print("(shared with other work: figures are noisy)")
    print(f"device {device}, attention {attention}")
    params = count_parameters(pipe)
    print(f"backbone {args.model}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items())
          + f"; DDIM {args.steps} steps, guidance {args.guidance:g}")

    sample(pipe, prompts[:2], seeds[:2], steps=2)  # warm-up
    t0 = time.perf_counter()
    ours = sample(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t0
    n1 = min(args.stock_images, args.images)
    t0 = time.perf_counter()
    sample(pipe, prompts[:n1], seeds[:n1], steps=args.steps, guidance=args.guidance, batch_size=1)
    t_ours1 = time.perf_counter() - t0

    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    for i in range(n1):
        pipe(prompt=prompts[i], num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
             generator=torch.Generator("cpu").manual_seed(seeds[i]))
    t_stock = time.perf_counter() - t0

    ips_ours, ips_ours1, ips_stock = args.images / t_ours, n1 / t_ours1, n1 / t_stock
    print(f"sample, batch {args.batch_size}:  {ips_ours:8.1f} images/s ({args.images} images in {t_ours:.2f}s)")
    print(f"sample, batch 1:   {ips_ours1:8.1f} images/s ({n1} images in {t_ours1:.2f}s)")
    print(f"stock __call__, batch 1: {ips_stock:8.1f} images/s ({n1} images in {t_stock:.2f}s)")
    print(f"ratio sample(batch {args.batch_size}) / stock(batch 1): {ips_ours / ips_stock:.1f}x; "
          f"sample(batch 1) / stock(batch 1): {ips_ours1 / ips_stock:.2f}x")
    assert len(ours) == args.images

    # One UNet training step (epsilon loss, batch 64) on this backbone.
    unet, text = pipe.unet, pipe.text_encoder
    unet.train()
    unet.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    size = unet.config.sample_size
    x = torch.randn(64, unet.config.in_channels, size, size, device=device)
    train_prompts = [prompts[i % len(prompts)] for i in range(64)]
    ids = pipe.tokenizer(train_prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        ctx = text(ids)[0]
    t = torch.randint(0, 1000, (x.shape[0],), device=device)
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(f"UNet training step, batch 64: {np.median(times[1:]):.3f}s")
    meta = read_meta(builtin_folder()) if args.model == "builtin" else {}
    if meta.get("seconds"):
        s = meta["seconds"]
        print(f"pretraining of the shipped backbone (recorded): VAE {s.get('vae', 0):.0f}s + UNet {s.get('unet', 0):.0f}s "
              f"({meta['settings']['steps']} steps, batch {meta['settings']['batch_size']})")


if __name__ == "__main__":
    main()
