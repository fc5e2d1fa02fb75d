"""The one fine-tuning loop: LoRA, DreamBooth and Clustered DreamBooth are small differences of it.

A *job* fine-tunes the base text-to-image model on the real training images of one group
(or one (group, cluster)). Everything a job needs travels typed and picklable
(`raybias.finetune.spec`: the `FinetuneJob`, its generator's `FinetuneSpec`, in a
`TrainerWork`) so that it can run in a Ray Train worker anywhere:

    setup      load the base pipeline (inside the worker, never on the driver), read the
               job's images from the run directory, VAE-encode them ONCE (mean and std of
               the latent distribution; a fresh latent is drawn from it each step), encode
               the prompts ONCE (the text encoder is frozen), and for DreamBooth with prior
               preservation generate the class images with the base model (cached in the
               run directory, so a restarted worker does not sample them again)
    tuner      by the model kind: `lora`: a peft LoRA adapter on the UNet attention projections,
               only it trains; `dreambooth`: the whole UNet trains, prompts carry the identifier
    step       DDPM noise at a uniform timestep, UNet prediction (epsilon or v), MSE
               (+ prior_loss_weight x the same loss on class images)
    checkpoint every `checkpoint_every` steps: trainable weights + optimizer state
               (safetensors) + step and loss history (JSON), reported to Ray Train
    publish    the model folder, in stock diffusers layout, renamed into place when whole

Every random draw of step i comes from a generator seeded by (seed, i), so a job resumed
from a checkpoint continues exactly where the killed one would have gone.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from raybias.faults import strike
from raybias.finetune.spec import (FinetuneJob, FinetuneSpec, TrainerWork, WorkItem, member_for, preview_prompts,
                                   training_prompts)
from raybias.layout import PREVIEWS_JSON, TRAINING_JSON, class_images_path, model_dir, preview_name, training_json

log = logging.getLogger("raybias")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- tuners


class Tuner(ABC):
    """What distinguishes one kind of model (raybias.registry.MODEL_KINDS) inside the one loop:
    which weights train and how the model folder is written (its learning rate is the spec's `lr`)."""

    kind = ""

    def __init__(self, spec: FinetuneSpec):
        self.spec = spec

    @abstractmethod
    def prepare(self, unet) -> List[torch.nn.Parameter]:
        """Make the UNet trainable the tuner's way; return the parameters to optimise."""

    def uses_prior(self) -> bool:
        return False

    @abstractmethod
    def save(self, pipe, folder: str, base_folder: Optional[str], link: bool) -> None:
        """Write the model folder in stock diffusers layout."""


class LoraTuner(Tuner):
    """peft LoRA on the UNet attention projections; the base weights stay frozen."""

    kind = "lora"

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.lora_alpha,
                          init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))

    def prepare(self, unet) -> List[torch.nn.Parameter]:
        unet.requires_grad_(False)
        # The adapter's gaussian init draws from torch's RNG: seed it, so a job is reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            unet.add_adapter(self.lora_config())
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # adapters train in fp32 even when the base runs in half precision
            p.data = p.data.float()
        return params

    def save(self, pipe, folder: str, base_folder: Optional[str], link: bool) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        # The adapter's config travels in the file's metadata, so a loader that is not raybias
        # rebuilds the same rank and alpha (alpha != rank would otherwise load rescaled).
        cfg = self.lora_config().to_dict()
        meta = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "target_modules": sorted(LORA_TARGETS),
                "init_lora_weights": cfg["init_lora_weights"], "lora_dropout": 0.0, "use_dora": False}
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                                  safe_serialization=True, unet_lora_adapter_metadata=meta)


class DreamBoothTuner(Tuner):
    """The whole UNet trains on prompts that carry the identifier, optionally with a prior."""

    kind = "dreambooth"

    def prepare(self, unet) -> List[torch.nn.Parameter]:
        unet.requires_grad_(True)
        unet.float()
        return list(unet.parameters())

    def uses_prior(self) -> bool:
        return self.spec.prior_preservation

    def save(self, pipe, folder: str, base_folder: Optional[str], link: bool) -> None:
        os.makedirs(folder, exist_ok=True)
        if base_folder is None:
            pipe.save_pretrained(folder, safe_serialization=True)
            return
        # Only the UNet changed: save it, and hard-link (or copy) every other component of the
        # base folder, so N models cost N UNets and the folder still loads with from_pretrained.
        pipe.unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
        for entry in os.listdir(base_folder):
            if entry == "unet" or entry.startswith("."):
                continue
            src = os.path.join(base_folder, entry)
            dst = os.path.join(folder, entry)
            if os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_link_or_copy if link else shutil.copy2)
            else:
                (_link_or_copy if link else shutil.copy2)(src, dst)


TUNERS = {"lora": LoraTuner, "dreambooth": DreamBoothTuner}


def make_tuner(kind: str, spec: FinetuneSpec) -> Tuner:
    return TUNERS[kind](spec)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


# --------------------------------------------------------------------------- data


def read_images(run, ids: Sequence[str]) -> List[bytes]:
    """Encoded images of the real table's rows `ids`, in that order (reads only those rows)."""
    import pyarrow.dataset as pads

    from raybias.data.io import shard_paths
    from raybias.layout import REAL

    ds = pads.dataset(shard_paths(run, REAL, "prepare"), filesystem=run.fs, format="parquet")
    table = ds.to_table(columns=["id", "image"], filter=pads.field("id").isin(list(ids)))
    by_id = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    missing = [i for i in ids if i not in by_id]
    if missing:
        from raybias.data.sources import DataError

        raise DataError(f"{run.path(REAL)}: {len(missing)} training image(s) of the job are missing "
                        f"(e.g. id {missing[0]!r}); was the data prepared again after clustering?")
    return [by_id[i] for i in ids]


def to_model_range(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def decode_images(blobs: Sequence[bytes], size: int) -> List[np.ndarray]:
    from raybias.data.images import decode

    return [decode(b, size, where=f"training image {i}") for i, b in enumerate(blobs)]


# --------------------------------------------------------------------------- checkpoint


def save_training_state(folder: str, trainable: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        state: Dict[str, Any], scaler=None) -> None:
    """Trainable weights and optimizer state as safetensors, counters as JSON (no pickles)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
              os.path.join(folder, "trainable.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in opt["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars)}
    if scaler is not None:
        meta["grad_scaler"] = json.dumps({k: (v.item() if torch.is_tensor(v) else v)
                                          for k, v in scaler.state_dict().items()})
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"), metadata=meta)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)


def load_training_state(folder: str, module: torch.nn.Module, trainable_names: Sequence[str],
                        optimizer: torch.optim.Optimizer, scaler=None) -> Dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "trainable.safetensors"))
    if set(weights) != set(trainable_names):
        raise RuntimeError(f"checkpoint {folder} does not match the model being trained "
                           f"({len(weights)} tensors saved, {len(trainable_names)} expected)")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    path = os.path.join(folder, "optimizer.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(json.loads(meta["scalars"]).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the loop


class FinetuneLoop:
    """Holds the pipeline, the cached latents and text embeddings, and runs training steps."""

    def __init__(self, pipe, job: FinetuneJob, spec: FinetuneSpec, device: str = "cpu",
                 class_images: Optional[List[np.ndarray]] = None, images: Optional[List[np.ndarray]] = None):
        from diffusers import DDPMScheduler

        from raybias.diffusion.sampling import default_size

        self.pipe, self.job, self.spec = pipe, job, spec
        self.device = torch.device(device)
        self.tuner = make_tuner(job.kind, spec)
        self.seed = spec.seed
        self.batch_size = spec.batch_size
        self.size = default_size(pipe)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
        self.shift = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        precision = spec.mixed_precision
        self.amp_dtype = PRECISION_DTYPES.get(precision) if self.device.type == "cuda" else None
        if precision != "no" and self.amp_dtype is None:
            log.info("finetune.mixed_precision=%s is for GPUs; training in fp32 on %s", precision, self.device)

        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        if images is None:
            images = decode_images(read_images_for(job, spec), self.size)
        self.n_images = len(images)
        self.lat_mean, self.lat_std = self._encode(images)
        prompts = training_prompts(job, self.seed)
        self.emb_table, self.emb_index = self._embed(prompts)
        # classifier-free guidance training: the condition is dropped (empty prompt) with
        # probability cond_drop, so the model also learns the unconditional score
        self.cond_drop = spec.cond_drop
        self.null_emb = self._embed([""])[0][0] if self.cond_drop > 0 else None
        self.prior = self.tuner.uses_prior() and class_images is not None and len(class_images) > 0
        if self.prior:
            self.cls_mean, self.cls_std = self._encode(class_images)
            cls_prompts = [job.class_template.format(member=member_for(f"class-{i}", job.members, self.seed))
                           for i in range(len(class_images))]
            self.cls_table, self.cls_index = self._embed(cls_prompts)
        self.trainable = self.tuner.prepare(pipe.unet)
        self.trainable_names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
        pipe.unet.to(self.device)
        self.optimizer = make_optimizer(self.trainable, spec.lr, spec.weight_decay)
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None)

    # one-off encodings ---------------------------------------------------
    @torch.no_grad()
    def _encode(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        means, stds = [], []
        chunk = max(1, min(256, (1 << 20) // (self.size * self.size)))  # bounded activation memory
        for i in range(0, len(images), chunk):
            x = to_model_range(images[i:i + chunk]).to(vae.device, vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        from raybias.diffusion.sampling import encode_prompts

        distinct = list(dict.fromkeys(prompts))
        table = encode_prompts(self.pipe, distinct).float().to(self.device)
        pos = {p: i for i, p in enumerate(distinct)}
        return table, torch.tensor([pos[p] for p in prompts])

    # a step ----------------------------------------------------------------
    def _draw(self, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor,
              table: torch.Tensor, n: int):
        pick = torch.randint(0, len(mean), (n,), generator=gen)
        eps = torch.randn(mean[pick].shape, generator=gen)
        latents = ((mean[pick] + std[pick] * eps) - self.shift) * self.scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=gen)
        return latents, noise, t, table[index[pick].to(table.device)]

    def step(self, i: int) -> float:
        """Training step number `i` (0-based); its randomness depends only on (seed, i)."""
        gen = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + i)
        n = self.batch_size
        latents, noise, t, context = self._draw(gen, self.lat_mean, self.lat_std, self.emb_index,
                                                self.emb_table, n)
        if self.cond_drop > 0:  # drawn only when enabled: the other models' draws stay as they were
            drop = torch.rand(n, generator=gen) < self.cond_drop
            context = torch.where(drop.to(context.device)[:, None, None], self.null_emb.to(context.dtype), context)
        if self.prior:
            c_lat, c_noise, c_t, c_ctx = self._draw(gen, self.cls_mean, self.cls_std, self.cls_index,
                                                    self.cls_table, n)
            latents, noise = torch.cat([latents, c_lat]), torch.cat([noise, c_noise])
            t, context = torch.cat([t, c_t]), torch.cat([context, c_ctx])
        latents, noise, t = latents.to(self.device), noise.to(self.device), t.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} of the base scheduler")
        unet = self.pipe.unet
        unet.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = unet(noisy, t, encoder_hidden_states=context).sample
        pred = pred.float()
        if self.prior:
            p_inst, p_cls = pred.chunk(2)
            t_inst, t_cls = target.chunk(2)
            loss = (torch.nn.functional.mse_loss(p_inst, t_inst)
                    + self.spec.prior_loss_weight * torch.nn.functional.mse_loss(p_cls, t_cls))
        else:
            loss = torch.nn.functional.mse_loss(pred, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = self.spec.max_grad_norm
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # state -------------------------------------------------------------------
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        params = dict(self.pipe.unet.named_parameters())
        return {n: params[n] for n in self.trainable_names}

    def save(self, folder: str, state: Dict[str, Any]) -> None:
        save_training_state(folder, self.trainable_state(), self.optimizer, state, self.scaler)

    def load(self, folder: str) -> Dict[str, Any]:
        return load_training_state(folder, self.pipe.unet, self.trainable_names, self.optimizer, self.scaler)


def make_optimizer(params: List[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel over all parameters where torch supports it (CPU and CUDA)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def read_images_for(job: FinetuneJob, spec: FinetuneSpec) -> List[bytes]:
    from raybias.rundir import RunDir

    return read_images(RunDir(spec.run_spec), job.ids)


# --------------------------------------------------------------------------- class images


def class_images(pipe, job: FinetuneJob, spec: FinetuneSpec, run=None) -> List[np.ndarray]:
    """Prior-preservation images: the base model's own samples for the prompt without identifier.

    Cached in the run directory under a key of everything that decides them, so restarted
    workers and the other clusters of the same group reuse them.
    """
    from raybias.diffusion.sampling import sample

    n = spec.num_class_images
    prompts = [job.class_template.format(member=member_for(f"class-{i}", job.members, spec.seed))
               for i in range(n)]
    seeds = [spec.seed * 100_003 + i for i in range(n)]
    settings = dict(steps=spec.sample_steps, guidance=spec.sample_guidance)
    key = zlib.crc32(json.dumps([spec.base, prompts, seeds, settings]).encode())
    rel = class_images_path(job.generator, job.group, key)
    if run is not None and run.exists(rel):
        with np.load(io.BytesIO(run.read_bytes(rel)), allow_pickle=False) as z:
            return list(z["images"])
    images = sample(pipe, prompts, seeds, scheduler="ddim", batch_size=16, **settings)
    if run is not None:
        buf = io.BytesIO()
        np.savez(buf, images=np.stack(images))
        run.write_bytes(rel, buf.getvalue())
    return images


# --------------------------------------------------------------------------- previews


def _preview_row(pipe, prompts: List[str], negatives: Optional[List[Optional[str]]], spec: FinetuneSpec,
                 guidance: Optional[float] = None) -> np.ndarray:
    from raybias.diffusion.sampling import sample

    seeds = [spec.seed * 7919 + i for i in range(len(prompts))]
    # A negative prompt only acts through classifier-free guidance (> 1).
    g = spec.sample_guidance if guidance is None else guidance
    images = sample(pipe, prompts, seeds, negative_prompts=negatives, scheduler="ddim",
                    steps=spec.sample_steps, guidance=g)
    return np.concatenate(images, axis=1)


def _encode_png(arr: np.ndarray) -> bytes:
    from raybias.data.images import encode_png

    return encode_png(arr)


# --------------------------------------------------------------------------- Ray Train worker


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Ray Train entry point (1 worker): the `TrainerWork` in `config["work"]`, one job or a pack
    of jobs trained in turn (finetune.jobs_per_trainer > 1) so that Ray Train's start-up, the
    imports and the base model's loading are paid once per pack rather than once per job.

    Per job: setup, resume, train, checkpoint, publish. In a pack, a job whose model is already
    published is skipped (a restarted worker, or `--resume`), and the trainer's checkpoint is
    used only by the job it names.
    """
    import ray.train

    from raybias.ray_utils import quiet_train_worker

    quiet_train_worker()  # no log line per checkpoint reported
    work: TrainerWork = config["work"]
    items = list(work.items)
    ckpt = ray.train.get_checkpoint()
    ckpt_job = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                ckpt_job = json.load(f).get("job")
    if work.packed:  # a restarted pack: what it already published is done
        from raybias.rundir import RunDir

        items = [item for item in items
                 if not RunDir(item.spec.run_spec).exists(training_json(item.job.generator, item.job.name))]
    bases: Dict[Tuple[str, Optional[str]], Tuple[Any, Any]] = {}
    started = time.time()
    launched = work.launched_at  # the driver's fit(): start-up is the first job's
    device = "cuda" if work.use_gpu and torch.cuda.is_available() else "cpu"
    for i, item in enumerate(items):
        # a single job's checkpoint is its own (checkpoints older than `job` in state.json too)
        mine = ckpt if ckpt is not None and (not work.packed or ckpt_job == item.job.key) else None
        keep = any(_base_key(later.spec) == _base_key(item.spec) for later in items[i + 1:])
        pipe = _base_pipeline(bases, item.spec, device, keep)
        _train_job(work, item, mine, pipe, device, started, launched)
        started = launched = time.time()


def _base_key(spec: FinetuneSpec) -> Tuple[str, Optional[str]]:
    return spec.base, spec.revision


def _base_pipeline(bases, spec: FinetuneSpec, device: str, keep: bool):
    """The base pipeline for one job, whose UNet that job trains. With `keep` (later jobs of the
    pack start from the same base) an untouched copy of the base UNet stays on the CPU; the
    last job takes that copy itself, and a lone job's pipeline is loaded with no copy at all."""
    import copy

    from raybias.diffusion.backbone import load_pipeline

    key = _base_key(spec)
    if key in bases:
        pipe, pristine = bases.pop(key)
        pipe.unet = (copy.deepcopy(pristine) if keep else pristine).to(device)
    else:
        pipe = load_pipeline(spec.base, revision=spec.revision, device=device, allow_pickle=spec.allow_pickle)
        pipe.set_progress_bar_config(disable=True)
        pristine = copy.deepcopy(pipe.unet).cpu() if keep else None
    if keep:
        bases[key] = (pipe, pristine)
    return pipe


def _train_job(work: TrainerWork, item: WorkItem, ckpt, pipe, device: str, started: float,
               launched: float) -> None:
    import ray.train
    from ray.train import Checkpoint

    from raybias.rundir import RunDir

    job, spec = item.job, item.spec
    threads = max(1, work.threads)
    torch.set_num_threads(threads)
    run = RunDir(spec.run_spec)
    board = work.board

    steps = spec.steps
    previews: List[Tuple[str, np.ndarray]] = []
    n_prev = spec.n_samples
    base_prompt = prompt_template_without_identifier(job)
    if n_prev:  # what the base model makes of the group's prompt, before any training
        previews.append(("base", _preview_row(pipe, preview_prompts(base_prompt, job.members, n_prev), None, spec)))
    cls_images = class_images(pipe, job, spec, run) if (job.kind == "dreambooth" and spec.prior_preservation
                                                        and job.class_template) else None
    loop = FinetuneLoop(pipe, job, spec, device=device, class_images=cls_images)
    setup_s = time.time() - started

    state = {"job": job.key, "step": 0, "losses": [], "attempts": 0, "resumed_from": [], "train_seconds": 0.0}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = loop.load(d)
        state["resumed_from"].append(state["step"])
    state["attempts"] += 1
    if board is not None:
        board.update.remote(job.generator, job.name, state["step"], steps,
                            state["losses"][-1] if state["losses"] else None, "training")
    every = spec.checkpoint_every
    progress_every = spec.progress_every
    t0 = time.time()
    for i in range(state["step"], steps):
        loss = loop.step(i)
        state["losses"].append(loss)
        state["step"] = i + 1
        done = state["step"]
        if board is not None and (done % progress_every == 0 or done == steps):
            board.update.remote(job.generator, job.name, done, steps, loss, "training")
        if done % every == 0 or done == steps:
            state["train_seconds"] += time.time() - t0
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix="raybias-ckpt-") as tmp:
                loop.save(tmp, state)
                ray.train.report({"step": done, "loss": float(np.mean(state["losses"][-every:]))},
                                 checkpoint=Checkpoint.from_directory(tmp),
                                 # in a pack, names must not repeat across its jobs
                                 checkpoint_dir_name=(f"{job.generator}-{job.name}-" if work.packed else "")
                                 + f"step-{done:06d}")
        strike(item.fault, done)  # raybias.faults: None outside the test suite
    state["train_seconds"] += time.time() - t0

    # Only the rank-0 worker publishes (a job has one worker; kept right if that changes).
    if ray.train.get_context().get_world_rank() != 0:
        return
    if board is not None:
        board.update.remote(job.generator, job.name, steps, steps, state["losses"][-1], "saving")
    pipe.unet.eval()
    preview_start = time.time()
    if n_prev:
        previews.append(("fine-tuned", _preview_row(pipe, preview_prompts(job.prompt_template, job.members,
                                                                          n_prev), None, spec)))
        for b in job.borrower_previews:
            prompts = preview_prompts(b["prompt_template"], job.members, n_prev)
            negs = [b.get("negative_prompt")] * n_prev
            previews.append((b["name"], _preview_row(pipe, prompts, negs, spec, guidance=b.get("guidance"))))
    record = {
        "name": job.name, "generator": job.generator, "kind": job.kind, "group": job.group,
        "cluster": job.cluster, "steps": state["step"], "final_loss": state["losses"][-1],
        "losses": state["losses"], "attempts": state["attempts"], "resumed_from": state["resumed_from"],
        "n_images": loop.n_images, "n_class_images": len(cls_images) if loop.prior else 0,
        "train_seconds": round(state["train_seconds"], 3), "setup_seconds": round(setup_s, 3),
        # from the driver's fit() call to this function: Ray Train controller, worker process, placement
        "startup_seconds": round(started - launched, 3),
        "preview_seconds": round(time.time() - preview_start, 3),
        "seconds_per_step": round(state["train_seconds"] / max(1, steps - (state["resumed_from"] or [0])[-1]), 5),
        "device": device, "threads": threads,
        "precision": "fp32" if loop.amp_dtype is None else str(loop.amp_dtype).replace("torch.", ""),
        "prompt_template": job.prompt_template, "trainable_parameters": int(sum(p.numel() for p in loop.trainable)),
    }
    publish_model(run, loop.tuner, pipe, model_dir(job.generator, job.name), record, previews, spec.base_folder)
    if board is not None:
        board.update.remote(job.generator, job.name, steps, steps, state["losses"][-1], "done")


def prompt_template_without_identifier(job: FinetuneJob) -> str:
    return job.class_template or job.prompt_template


def publish_model(run, tuner: Tuner, pipe, rel: str, record: Dict[str, Any],
                  previews: List[Tuple[str, np.ndarray]], base_folder: Optional[str]) -> None:
    """Write the model folder under a temporary name and rename it into place when whole."""
    def fill(folder: str, link: bool) -> None:
        tuner.save(pipe, folder, base_folder if base_folder and os.path.isdir(base_folder) else None, link)
        labels = []
        for k, (label, row) in enumerate(previews):
            with open(os.path.join(folder, preview_name(k)), "wb") as f:
                f.write(_encode_png(row))
            labels.append(label)
        with open(os.path.join(folder, PREVIEWS_JSON), "w") as f:
            json.dump(labels, f)
        with open(os.path.join(folder, TRAINING_JSON), "w") as f:  # written last: marks the folder whole
            json.dump(record, f, indent=1)

    with run.publishing(rel, last=TRAINING_JSON) as folder:
        fill(folder, link=run.is_local)
