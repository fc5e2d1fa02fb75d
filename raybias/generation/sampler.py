"""The sampler actor: one per Ray Data actor-pool slot, one base pipeline each.

`SamplerActor` is the class-based UDF of `map_batches`: its constructor loads the base
pipeline once (on the actor, never on the driver), and each call gets one work unit (its
number; the plan's unit table gives its ids, prompts and seeds), puts that unit's model
into the pipeline, samples the unit's prompts with their seeds, encodes the images
(generate.image_format: png, jpeg or webp) and writes the unit's shard itself. It returns
one small row per unit (counts, seconds, attention backend) for the driver's progress bar.

Host work is off the sampling path: two calls run in an actor at once (two threads), and
only sampling holds the pipeline's lock, so while unit k+1 samples, unit k is encoded (on
as many threads as the actor has CPUs, at least two: zlib, libjpeg and libwebp release
the GIL), turned into a table and streamed to its shard. At most two units are in an
actor at a time, so memory stays flat; a failure raises in the call of the unit it
belongs to.

Model switching (`ModelSwitcher`): LoRA adapters are loaded into the base UNet under
their own adapter names and switched with `set_adapters`; DreamBooth models swap the
pipeline's UNet (and text encoder / tokenizer when the folder has its own). The last
`generate.model_cache` models of each kind stay loaded, so a pool that sees the same few
models over and over loads each once. With a remote run directory the model folders come
through the node's shared disk cache (`raybias.generation.model_cache`), held in use while
loaded.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from raybias.config import GenerateConfig
from raybias.data.images import JPEG_QUALITY, encode
from raybias.generation.model_cache import CachedModel, ModelCache
from raybias.generation.shards import unit_table, write_shard
from raybias.rundir import RunDir, StageFailed

log = logging.getLogger("raybias.generation")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Threads per actor that encode images: the actor's CPUs (generate.num_cpus), at least
# ENCODE_THREADS, at most MAX_ENCODE_THREADS. PNG of a 512-px photo takes ~38 ms on one
# core, two threads are ~2x one; a GPU takes ~100 ms per SD-1.5 image, so two threads
# keep up with one GPU, and an actor given more CPUs encodes on all of them.
ENCODE_THREADS = 2
MAX_ENCODE_THREADS = 8
DEFAULT_MODEL_CACHE_GB = GenerateConfig.model_cache_gb


def resolve_device(num_gpus: float) -> str:
    import torch

    if num_gpus and num_gpus > 0:
        if not torch.cuda.is_available():
            raise StageFailed("generate.num_gpus > 0 but this Ray worker sees no CUDA device")
        return "cuda"
    return "cpu"


def resolve_dtype(name: str, device: str):
    """The torch dtype to sample in: fp16/bf16 only on GPU (CPU half kernels are slow or absent)."""
    import torch

    if device == "cpu":
        return torch.float32
    return getattr(torch, DTYPES[name])


def adapter_name(model_name: str) -> str:
    return "m_" + re.sub(r"[^0-9A-Za-z_]", "_", model_name)


CALLS_PER_ACTOR = 2  # units an actor works on at once: one samples while the other is encoded

class ModelSwitcher:
    """Puts a plan model (kind base | lora | dreambooth) into the pipeline; caches recent ones.

    Caches are keyed by the model's folder, so a borrowed model (another group's weights
    with other prompts) reuses what its source loaded.
    """

    def __init__(self, pipe, run: RunDir, cache_size: int, prepare, disk_cache: Optional[ModelCache] = None):
        self.pipe = pipe
        self.run = run
        self.cache_size = max(1, int(cache_size))
        self.prepare = prepare  # called on (pipe) after a component swap: device, dtype, attention
        # a remote run's model folders come through the node's disk cache, held while loaded
        if disk_cache is None and not run.is_local:
            disk_cache = ModelCache(run, DEFAULT_MODEL_CACHE_GB)
        self.disk_cache = disk_cache
        self.folders: Dict[str, CachedModel] = {}  # run-relative folder -> its local copy, while loaded
        self.base = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
        self.classes = {k: type(v) for k, v in self.base.items()}
        self.dreambooth: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()  # folder -> components
        self.adapters: "OrderedDict[str, str]" = OrderedDict()  # folder -> adapter name
        self.active: Optional[tuple] = None
        self.loads = 0  # models loaded from disk (cache misses)

    def _open(self, key: str) -> str:
        """A local folder holding the run-relative model folder `key`, kept until `_close`."""
        if self.disk_cache is None:
            return self.run.path(key)
        held = self.folders.get(key)
        if held is None:
            held = self.folders[key] = self.disk_cache.acquire(key)
        return held.path

    def _close(self, key: str) -> None:
        """The model of folder `key` left memory: its disk copy may be evicted now."""
        held = self.folders.pop(key, None)
        if held is not None:
            held.release()

    def _use_components(self, comps: Dict[str, Any]) -> None:
        changed = False
        for key, module in comps.items():
            if getattr(self.pipe, key) is not module:
                setattr(self.pipe, key, module)
                changed = True
        if changed:
            self.prepare(self.pipe)

    def activate(self, spec: Dict[str, Any]) -> None:
        kind, folder = spec["kind"], spec.get("folder")
        if self.active == (kind, folder):
            return
        if kind == "base":
            self._use_components(self.base)
            if self.adapters:
                self.pipe.disable_lora()
        elif kind == "lora":
            self._use_components(self.base)
            self._activate_lora(spec)
        elif kind == "dreambooth":
            self._use_components(self._dreambooth_components(spec))
        else:
            raise StageFailed(f"model {spec['name']!r} has kind {kind!r}, which the sampler cannot load")
        self.active = (kind, folder)

    def _activate_lora(self, spec: Dict[str, Any]) -> None:
        key = spec["folder"]
        if key in self.adapters:
            self.adapters.move_to_end(key)
        else:
            while len(self.adapters) >= self.cache_size:
                old_key, old = self.adapters.popitem(last=False)
                self.pipe.delete_adapters(old)
                self._close(old_key)
            folder = self._open(key)
            name = adapter_name(key)
            try:
                # safetensors only: without it diffusers falls back to a pickled .bin
                self.pipe.load_lora_weights(folder, adapter_name=name, use_safetensors=True)
            except Exception as exc:
                self._close(key)
                raise StageFailed(f"cannot load LoRA weights of model {spec['name']!r} from {folder}: {exc}") from exc
            self.adapters[key] = name
            self.loads += 1
            self.prepare(self.pipe)
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.adapters[key]])

    def _same_as_base_text_encoder(self, folder: str) -> bool:
        """True when the folder's text encoder holds exactly the base weights (the usual case:
        DreamBooth tunes the UNet only), so the base module is kept instead of a copy."""
        import torch
        from safetensors.torch import load_file

        sub = os.path.join(folder, "text_encoder")
        files = [f for f in os.listdir(sub) if f.endswith(".safetensors")] if os.path.isdir(sub) else []
        if not files:
            return not os.path.isdir(sub)
        base = self.base["text_encoder"].state_dict()
        for name in files:
            for key, tensor in load_file(os.path.join(sub, name)).items():
                mine = base.get(key)
                if (mine is None or mine.shape != tensor.shape
                        or not torch.equal(mine.detach().cpu(), tensor.to(mine.dtype))):
                    return False
        return True

    def _dreambooth_components(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        key = spec["folder"]
        if key in self.dreambooth:
            self.dreambooth.move_to_end(key)
            return self.dreambooth[key]
        while len(self.dreambooth) >= self.cache_size:
            old_key, _ = self.dreambooth.popitem(last=False)
            self._close(old_key)
        folder = self._open(key)
        comps: Dict[str, Any] = {"text_encoder": self.base["text_encoder"], "tokenizer": self.base["tokenizer"]}
        try:
            # safetensors only (what fine-tuning writes): never unpickle a model folder
            comps["unet"] = self.classes["unet"].from_pretrained(folder, subfolder="unet", use_safetensors=True)
            if not self._same_as_base_text_encoder(folder):
                comps["text_encoder"] = self.classes["text_encoder"].from_pretrained(
                    folder, subfolder="text_encoder", use_safetensors=True)
                if os.path.isdir(os.path.join(folder, "tokenizer")):
                    comps["tokenizer"] = self.classes["tokenizer"].from_pretrained(folder, subfolder="tokenizer")
        except Exception as exc:
            self._close(key)
            raise StageFailed(f"cannot load DreamBooth model {spec['name']!r} from {folder}: {exc}") from exc
        for module in (comps["unet"], comps["text_encoder"]):
            module.eval().requires_grad_(False)
        self.dreambooth[key] = comps
        self.loads += 1
        return comps


class SamplerActor:
    """Ray Data UDF: work units in, shards written, one summary row per unit out."""

    def __init__(self, run_spec: str, generator: str, base_model: str, base_revision: Optional[str],
                 plan: Dict[str, Any], sampling: Dict[str, Any]):
        import torch

        from raybias.diffusion.backbone import load_pipeline
        from raybias.generation.plan import PlanUnits

        self.run = RunDir(run_spec)
        self.generator = generator
        self.units = PlanUnits(plan)  # a unit's ids, seeds and prompts, from its number
        self.models = plan["models"]
        self.sampling = dict(sampling)
        threads = int(self.sampling.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = resolve_device(float(self.sampling.get("num_gpus", 0.0)))
        self.dtype = resolve_dtype(self.sampling.get("dtype", "fp32"), self.device)
        started = time.perf_counter()
        self.pipe = load_pipeline(base_model, revision=base_revision, device=self.device, dtype=self.dtype,
                                  allow_pickle=bool(self.sampling.get("allow_pickle", False)))
        self.pipe.set_progress_bar_config(disable=True)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.eval().requires_grad_(False)
        self.attention = "sdpa"
        self._prepare(self.pipe)
        self.load_seconds = time.perf_counter() - started
        # Host work off the sampling path (see make_unit): one lock around the pipeline, a few
        # threads that encode a unit's images while the next unit samples.
        self._sampling = threading.Lock()
        self.image_format = str(self.sampling.get("image_format", "png"))
        self.image_quality = int(self.sampling.get("image_quality", JPEG_QUALITY))
        self.encode_threads = min(MAX_ENCODE_THREADS, max(ENCODE_THREADS, threads))
        self._encoder = ThreadPoolExecutor(max_workers=self.encode_threads, thread_name_prefix="raybias-encode")
        self._stats_lock = threading.Lock()
        self.stats: Dict[str, float] = {k: 0.0 for k in ("units", "images", "wait_s", "sample_s", "encode_s",
                                                          "write_s")}
        # model folders of a remote run directory: fetched once per node, into its capped cache
        disk_cache = None if self.run.is_local else ModelCache(
            self.run, float(self.sampling.get("model_cache_gb", DEFAULT_MODEL_CACHE_GB)))
        # an actor works on CALLS_PER_ACTOR units at once, possibly of as many models (two blocks):
        # keeping fewer would load them in turn at every unit
        keep = max(int(self.sampling.get("model_cache", 2)), CALLS_PER_ACTOR)
        self.switcher = ModelSwitcher(self.pipe, self.run, keep, self._prepare,
                                      disk_cache)

    def _prepare(self, pipe) -> None:
        """Device, dtype, memory format, attention and compilation for whatever the pipeline holds."""
        import torch

        from raybias.diffusion.sampling import set_attention

        for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # only what a swap or adapter brought in moves
            if any(p.dtype != self.dtype or p.device.type != self.device for p in module.parameters()):
                module.to(self.device, self.dtype)
        if self.sampling.get("channels_last") and self.device == "cuda":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self.attention = set_attention(pipe, self.sampling.get("attention", "auto"))
        if self.sampling.get("compile") and not getattr(pipe.unet, "_raybias_compiled", False):
            pipe.unet.compile()  # in place: the module keeps its type, so adapters still load
            pipe.unet._raybias_compiled = True

    def sample_images(self, unit: Dict[str, Any]) -> List[np.ndarray]:
        """The unit's images (uint8 H x W x 3) from its model: the GPU's part of a unit.
        One caller at a time (the pipeline is shared): hold `self._sampling`."""
        from raybias.diffusion.sampling import sample

        self.switcher.activate(self.models[unit["model"]])
        n = len(unit["ids"])
        negative = [unit["negative_prompt"]] * n if unit.get("negative_prompt") else None
        s = self.sampling
        return sample(self.pipe, list(unit["prompts"]), [int(x) for x in unit["seeds"]],
                      negative_prompts=negative, scheduler=s["scheduler"], steps=int(s["steps"]),
                      guidance=float(s["guidance"]), batch_size=int(s["batch_size"]), size=s.get("size"))

    def encode_images(self, images: Sequence[np.ndarray]) -> List[bytes]:
        """Encoded in generate.image_format on the encoder threads (zlib, libjpeg and libwebp
        release the GIL), in order; the first failure is raised."""
        return list(self._encoder.map(self._encode_one, images))

    def _encode_one(self, image: np.ndarray) -> bytes:
        return encode(np.asarray(image), self.image_format, self.image_quality)

    def sample_unit(self, unit: Dict[str, Any]) -> List[bytes]:
        """Sample and encode one unit (what a shard's `image` column holds)."""
        with self._sampling:
            images = self.sample_images(unit)
        return self.encode_images(images)

    def make_unit(self, unit: Dict[str, Any]) -> int:
        """Sample, encode and write one unit's shard; returns its image count.

        Only sampling holds `self._sampling`: encoding, building the table and writing the
        shard run outside it, so in the actor's second call slot the next unit samples
        meanwhile (runner.run_units runs two calls per actor at once). A failure in any
        step raises here, in the call of the unit it belongs to; its shard is then never
        under its final name (`write_shard` is atomic).
        """
        waited = time.perf_counter()
        with self._sampling:
            started = time.perf_counter()
            images = self.sample_images(unit)
            sampled = time.perf_counter()
        blobs = self.encode_images(images)
        del images  # the raw pixels (3 bytes a pixel) go before the table is built
        encoded = time.perf_counter()
        write_shard(self.run, self.generator, unit["unit"], unit_table(self.generator, unit, blobs))
        with self._stats_lock:
            for key, value in (("units", 1), ("images", len(blobs)), ("wait_s", started - waited),
                               ("sample_s", sampled - started), ("encode_s", encoded - sampled),
                               ("write_s", time.perf_counter() - encoded)):
                self.stats[key] += value
        return len(blobs)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        out: Dict[str, list] = {"unit": [], "n_images": [], "seconds": [], "finished_at": [], "pid": [], "attention": [],
                                "device": [], "dtype": [], "model_loads": []}
        for number in batch["unit"]:
            unit = self.units.expand(int(number))
            started = time.perf_counter()
            n_images = self.make_unit(unit)
            out["unit"].append(int(unit["unit"]))
            out["n_images"].append(n_images)
            out["seconds"].append(time.perf_counter() - started)
            out["finished_at"].append(time.time())  # wall clock: results reach the driver in bursts
            out["pid"].append(os.getpid())
            out["attention"].append(self.attention)
            out["device"].append(self.device)
            out["dtype"].append(str(self.dtype).replace("torch.", ""))
            out["model_loads"].append(self.switcher.loads)
        return out
