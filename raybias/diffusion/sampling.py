"""The sampling core: text -> images with any StableDiffusionPipeline, deterministic per image.

`sample` runs its own denoising loop over the pipeline's components with the diffusers
scheduler API, so that:
- image i depends only on (prompt_i, seed_i, negative_i, settings): its initial latents and
  any scheduler noise come from its own `torch.Generator(seed_i)` (diffusers draws per-sample
  noise from a list of generators), never from a batch-wide stream;
- guidance <= 1 runs the UNet once per step (no unconditional pass, half the cost);
  guidance > 1 is classifier-free guidance against the negative prompt (or "");
- prompt embeddings are computed once per distinct prompt in a batch.
"""

from __future__ import annotations

import inspect
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from raybias.errors import ResourceError  # not ray_utils: this module imports without Ray

log = logging.getLogger("raybias")

SCHEDULERS = ("ddim", "dpm_solver", "ddpm", "euler")


def make_scheduler(pipe, name: str):
    """A fresh scheduler of kind `name` configured like the pipeline's own (same noise schedule)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler,
               "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        from raybias.config import ConfigError

        raise ConfigError(f"generate.scheduler={name!r}: allowed {', '.join(SCHEDULERS)}")
    return classes[name].from_config(pipe.scheduler.config)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or kernels built for another torch
        return False
    return True


def check_attention(mode: str, on_cuda: bool, check_installed: bool = True) -> None:
    """Can `set_attention(pipe, mode)` select `mode` for a model on CUDA (`on_cuda`) or not?

    ConfigError for an unknown mode; ResourceError for xformers without xformers installed
    (`check_installed`: this process's environment is the workers') or off CUDA. Needs no
    Ray and no model: `raybias.stages.preflight` calls it before a run starts.
    """
    if mode not in ("auto", "sdpa", "xformers"):
        from raybias.config import ConfigError

        raise ConfigError(f"generate.attention={mode!r}: allowed auto, sdpa, xformers")
    if mode == "xformers" and check_installed and not xformers_available():
        raise ResourceError("generate.attention=xformers but xformers is not installed (or its kernels do "
                            "not load with this torch); install raybias[xformers] or use attention=sdpa/auto")
    if mode == "xformers" and not on_cuda:
        raise ResourceError("generate.attention=xformers needs the model on a CUDA GPU; use attention=sdpa "
                            "or auto on CPU")


def set_attention(pipe, mode: str = "auto") -> str:
    """Select the attention kernel of the UNet and VAE; returns what is in use ("xformers"/"sdpa").

    "auto": xFormers when it imports AND the pipeline is on CUDA, else PyTorch SDPA.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    on_cuda = pipe.unet.device.type == "cuda"
    check_attention(mode, on_cuda)
    use_xformers = mode == "xformers" or (mode == "auto" and on_cuda and xformers_available())
    if use_xformers:
        try:
            pipe.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:  # kernels present but unusable for this GPU/dtype
            if mode == "xformers":
                raise ResourceError(f"generate.attention=xformers: xformers failed to start ({exc})") from exc
            log.warning("xformers failed to start (%s); using PyTorch SDPA", exc)
    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states (N x L x D), padded to the tokenizer's max length like SD."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)


def _embeddings_for(pipe, texts: Sequence[str]) -> torch.Tensor:
    distinct = list(dict.fromkeys(texts))
    table = encode_prompts(pipe, distinct)
    index = {t: i for i, t in enumerate(distinct)}
    return table[torch.tensor([index[t] for t in texts], device=table.device)]


def default_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * vae_scale_factor(pipe)


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """VAE decode -> uint8 N x H x W x 3."""
    scale = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    x = pipe.vae.decode((latents / scale + shift).to(pipe.vae.dtype)).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def _sample_batch(pipe, prompts, seeds, negatives, scheduler_name, steps, guidance, size) -> List[np.ndarray]:
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scheduler = make_scheduler(pipe, scheduler_name)
    scheduler.set_timesteps(steps, device=device)
    latent_size = size // vae_scale_factor(pipe)
    shape = (1, pipe.unet.config.in_channels, latent_size, latent_size)
    # One CPU generator per image: the same numbers whatever the batch and device.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    latents = (latents * scheduler.init_noise_sigma).to(device=device, dtype=dtype)

    cond = _embeddings_for(pipe, prompts)
    guided = guidance > 1.0
    if guided:
        uncond = _embeddings_for(pipe, [n or "" for n in negatives])
        context = torch.cat([uncond, cond])
    else:
        context = cond
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = pipe.unet(model_in, t, encoder_hidden_states=context).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    images = decode_latents(pipe, latents)
    return [img for img in images]


def sample(pipe, prompts: List[str], seeds: List[int], negative_prompts: Optional[List[Optional[str]]] = None,
           scheduler: str = "ddim", steps: int = 25, guidance: float = 1.0, batch_size: int = 64,
           size: Optional[int] = None, progress: bool = False) -> List[np.ndarray]:
    """Images (uint8 H x W x 3), one per (prompt, seed); negatives only matter with guidance > 1."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    if negative_prompts is None:
        negative_prompts = [None] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    if steps < 1 or batch_size < 1:
        raise ValueError("sample: steps and batch_size must be >= 1")
    size = int(size or default_size(pipe))
    if size % vae_scale_factor(pipe):
        raise ValueError(f"sample: size {size} is not a multiple of the VAE's factor {vae_scale_factor(pipe)}")
    out: List[np.ndarray] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from raybias.console import bar

        starts = bar(iterable=starts, desc="sampling", unit="batch")
    for i in starts:
        j = i + batch_size
        out.extend(_sample_batch(pipe, prompts[i:j], seeds[i:j], negative_prompts[i:j], scheduler, steps,
                                 guidance, size))
    return out


def sampling_settings(gen_cfg) -> Dict[str, object]:
    """The keyword arguments of `sample` from a `generate` config section."""
    return dict(scheduler=gen_cfg.scheduler, steps=int(gen_cfg.steps), guidance=float(gen_cfg.guidance),
                batch_size=int(gen_cfg.batch_size))
