"""Pretraining the builtin backbone on the font corpus, and judging it with the oracle.

Recipe (what `raybias base` runs for base.model=builtin):
1. VAE (AutoencoderKL): reconstruction (MSE) + a small KL term, cosine lr; then the latent
   scaling factor is set to 1/std of the corpus latents (SD's 0.18215 plays this role).
2. UNet (+ the text encoder, trained jointly): epsilon prediction under SD's DDPM noise
   schedule, captions dropped to "" with probability `cond_drop` (so classifier-free
   guidance works), AdamW, linear warmup then cosine lr, gradient clipping, EMA weights.
3. Quality: the oracle reads digit and colour of generations for every (colour, digit)
   prompt "a {colour} {digit}", for several guidance scales; the best one is recorded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raybias.diffusion.backbone import build_pipeline, save_pipeline
from raybias.diffusion.corpus import Corpus
from raybias.diffusion.tokenizer import DIGIT_WORDS

META_FILE = "raybias_backbone.json"  # beside model_index.json: how it was made, its quality


@dataclass
class PretrainSettings:
    """How the builtin backbone is pretrained. The recipe's values (and their defaults) are the
    `base:` config section's (raybias.config.BaseConfig; stages.base builds this from it); only
    the internals no config exposes have defaults here."""

    arch: str
    steps: int
    batch_size: int
    lr: float
    ema_decay: float
    vae_steps: int
    cond_drop: float
    train_text_encoder: bool
    seed: int
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    warmup: int = 100


@dataclass
class PretrainResult:
    pipe: object
    seconds: Dict[str, float] = field(default_factory=dict)
    losses: Dict[str, List[float]] = field(default_factory=dict)
    scaling_factor: float = 1.0
    vae_mse: float = float("nan")  # reconstruction MSE (on [-1, 1]) of the last corpus images


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1] (SD's VAE input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _iter(n: int, desc: str, progress: bool):
    if not progress:
        return range(n)
    from raybias.console import bar

    return bar(iterable=range(n), desc=desc, unit="step", mininterval=5)


def train_vae(vae, images: torch.Tensor, s: PretrainSettings, gen: torch.Generator, progress: bool) -> List[float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    losses = []
    vae.train()
    for step in _iter(s.vae_steps, "pretraining VAE", progress):
        for g in opt.param_groups:
            g["lr"] = s.vae_lr * _cosine(step, s.vae_steps, min(s.warmup, s.vae_steps // 10 + 1))
        x = images[torch.randint(0, len(images), (s.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + s.kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    vae.eval()
    return losses


@torch.no_grad()
def encode_corpus(vae, images: torch.Tensor, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for sh, p in zip(self.shadow, self.params):
            sh.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for sh, p in zip(self.shadow, self.params):
            p.copy_(sh)


def pretrain(corpus: Corpus, settings: PretrainSettings, image_size: Optional[int] = None,
             progress: bool = True, snapshot: Optional[Callable[[int, object], None]] = None,
             snapshot_every: int = 0) -> PretrainResult:
    """Train a fresh backbone of `settings.arch` on `corpus`; returns the EMA pipeline."""
    from diffusers import DDPMScheduler

    s = settings
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    size = int(image_size or corpus.images.shape[1])
    words = list(corpus.palette) + DIGIT_WORDS
    pipe = build_pipeline(s.arch, vocab_words=words, seed=s.seed, image_size=size)
    result = PretrainResult(pipe=pipe)
    images = images_to_tensor(corpus.images)

    t0 = time.time()
    result.losses["vae"] = train_vae(pipe.vae, images, s, gen, progress)
    result.seconds["vae"] = time.time() - t0

    with torch.no_grad():  # held-out-free sanity figure: reconstruction error of the last images
        probe = images[-256:]
        recon = pipe.vae.decode(pipe.vae.encode(probe).latent_dist.mean).sample.clamp(-1, 1)
        result.vae_mse = float(F.mse_loss(recon, probe))

    t0 = time.time()
    mean, std = encode_corpus(pipe.vae, images)
    scaling = float(1.0 / mean.flatten().std().clamp_min(1e-6))
    pipe.vae.register_to_config(scaling_factor=scaling)
    result.scaling_factor = scaling
    pipe.vae.requires_grad_(False)

    # Captions -> token ids once (a few hundred distinct captions).
    tok = pipe.tokenizer
    distinct = sorted(set(corpus.captions)) + [""]
    ids_table = tok(distinct, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    caption_index = {c: i for i, c in enumerate(distinct)}
    caption_ids = torch.tensor([caption_index[c] for c in corpus.captions])
    empty_id = caption_index[""]

    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_sched.alphas_cumprod
    params = list(unet.parameters())
    if s.train_text_encoder:
        params += list(text_encoder.parameters())
        text_encoder.train()
    else:
        text_encoder.requires_grad_(False)
        text_encoder.eval()
        with torch.no_grad():
            frozen_table = text_encoder(ids_table)[0]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    ema = EMA(params, s.ema_decay)
    unet.train()
    losses = []
    for step in _iter(s.steps, "pretraining UNet", progress):
        for g in opt.param_groups:
            g["lr"] = s.lr * _cosine(step, s.steps, min(s.warmup, s.steps // 10 + 1))
        idx = torch.randint(0, len(corpus), (s.batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (s.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cap = caption_ids[idx].clone()
        cap[torch.rand(s.batch_size, generator=gen) < s.cond_drop] = empty_id
        context = text_encoder(ids_table[cap])[0] if s.train_text_encoder else frozen_table[cap]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(float(loss))
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < s.steps:
            live = [p.detach().clone() for p in params]
            ema.copy_to()
            unet.eval(), text_encoder.eval()
            snapshot(step + 1, pipe)
            with torch.no_grad():
                for p, v in zip(params, live):
                    p.copy_(v)
            unet.train()
            if s.train_text_encoder:
                text_encoder.train()
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    result.losses["unet"] = losses
    result.seconds["unet"] = time.time() - t0
    return result


def check_prompts(colors: Sequence[str], per_pair: int, seed: int = 0):
    """(prompts, seeds, digit labels, colour names) for every (colour, digit) pair."""
    prompts, seeds, digits, color_names = [], [], [], []
    for ci, color in enumerate(colors):
        for d in range(10):
            for k in range(per_pair):
                prompts.append(f"a {color} {DIGIT_WORDS[d]}")
                seeds.append(seed * 1_000_003 + (ci * 10 + d) * 1000 + k)
                digits.append(d)
                color_names.append(color)
    return prompts, seeds, np.array(digits), color_names


def quality_check(pipe, colors: Sequence[str], per_pair: int = 8, guidances: Sequence[float] = (1.0,),
                  steps: int = 25, scheduler: str = "ddim", oracle=None, seed: int = 0,
                  batch_size: int = 128) -> Dict[str, object]:
    """Oracle recognition of generations, per guidance scale; the best scale by digit-and-colour."""
    from raybias.diffusion.oracle import load_oracle, recognition_rate
    from raybias.diffusion.sampling import sample

    oracle = oracle or load_oracle()
    unknown = [c for c in colors if c not in oracle.palette]
    if unknown:
        raise ValueError(f"colours {unknown} are not in the oracle's palette {oracle.palette}")
    prompts, seeds, digits, color_names = check_prompts(colors, per_pair, seed)
    color_idx = np.array([oracle.palette.index(c) for c in color_names])
    out: Dict[str, object] = {"colors": list(colors), "per_pair": per_pair, "steps": steps,
                              "scheduler": scheduler, "by_guidance": {}}
    best = None
    for g in guidances:
        t0 = time.time()
        images = np.stack(sample(pipe, prompts, seeds, scheduler=scheduler, steps=steps, guidance=float(g),
                                 batch_size=batch_size))
        rates = recognition_rate(images, digits, color_idx, oracle)
        from raybias.diffusion.oracle import predict

        d_probs, c_probs = predict(images, oracle)
        ok = (d_probs.argmax(1) == digits) & (c_probs.argmax(1) == color_idx)
        per_pair_rate = ok.reshape(len(colors), 10, per_pair).mean(2)
        rates["worst_pair"] = float(per_pair_rate.min())
        rates["seconds"] = time.time() - t0
        rates["images_per_s"] = len(prompts) / rates["seconds"]
        out["by_guidance"][f"{float(g):g}"] = rates
        if best is None or rates["both"] > out["by_guidance"][best]["both"]:
            best = f"{float(g):g}"
        out.setdefault("_images", {})[f"{float(g):g}"] = images
    out["best_guidance"] = float(best)
    out["best"] = out["by_guidance"][best]
    return out


def write_meta(folder: str, meta: Dict[str, object]) -> None:
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=float)


def read_meta(folder: str) -> Dict[str, object]:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def sample_grid(images: np.ndarray, rows: int, cols: int, row_labels=None, col_labels=None, title=None):
    """A matplotlib figure of images[rows*cols] (row-major)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.95 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        r, c = divmod(i, cols)
        if c == 0 and row_labels is not None:
            ax.set_ylabel(row_labels[r], fontsize=7)
        if r == 0 and col_labels is not None:
            ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_backbone(result: PretrainResult, folder: str, corpus: Corpus, settings: PretrainSettings,
                  quality: Optional[Dict] = None) -> str:
    save_pipeline(result.pipe, folder)
    meta = {"settings": settings.__dict__, "corpus_size": len(corpus), "palette": list(corpus.palette),
            "scaling_factor": result.scaling_factor, "vae_mse": result.vae_mse, "seconds": result.seconds,
            "final_loss": {k: float(np.mean(v[-50:])) if v else None for k, v in result.losses.items()}}
    if quality:
        meta["quality"] = {k: v for k, v in quality.items() if not k.startswith("_")}
        meta["guidance"] = quality.get("best_guidance", 1.0)
    write_meta(folder, meta)
    return folder

