"""The text-to-image backbone: Stable Diffusion's diffusers classes, built from config or loaded.

- `build_pipeline(arch)`: a `StableDiffusionPipeline` with random weights from config.
  "tiny" (tests), "small" (the builtin backbone's architecture), "sd15" (SD-1.5-sized,
  for GPU benchmarks only: do not instantiate it in CPU tests).
- `save_pipeline` / `load_pipeline`: `save_pretrained` (safetensors) and
  `StableDiffusionPipeline.from_pretrained` of "builtin" (the backbone shipped in
  raybias/assets/backbone/), a local folder or a hub id. No safety checker, never remote
  code, safetensors only (pickled weights only with `allow_pickle`, i.e. base.allow_pickle).
- `resolve_base_model(cfg, run)`: which folder `base.model` means for a run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import resources
from typing import Dict, Optional, Sequence

import torch

from raybias.config import ConfigError
from raybias.diffusion.tokenizer import build_tokenizer
from raybias.layout import BASE_KEY, BASE_MODEL_DIR

log = logging.getLogger("raybias")

ARCHS = ("tiny", "small", "sd15")
MODEL_INDEX = "model_index.json"

# Latents of a 16 px image are 8x8x4 for tiny/small (one VAE downsampling).
ARCH_CONFIGS: Dict[str, Dict[str, dict]] = {
    "tiny": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                     attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, projection_dim=32),
        "max_length": 16,
    },
    "small": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=64,
                     attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, projection_dim=64),
        "max_length": 16,
    },
    # Stable Diffusion 1.5's published component configs (UNet 860M, VAE 84M, CLIP ViT-L/14 text).
    "sd15": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                     cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")),
        "vae": dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=768, vocab_size=49408),
        "max_length": 77,
    },
}

# Stable Diffusion's training noise schedule (DDPM, 1000 steps, scaled-linear betas).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon")


def noise_schedule_config() -> dict:
    return dict(SCHEDULE)


def build_pipeline(arch: str = "tiny", vocab_words: Optional[Sequence[str]] = None, seed: int = 0,
                   image_size: Optional[int] = None):
    """A `StableDiffusionPipeline` with random weights (deterministic given `seed`).

    `vocab_words`: extra words the tokenizer makes single tokens (on top of the builtin
    vocabulary of digit words, colours, identifiers and common prompt words).
    `image_size`: the pixel size it is meant for (default: 16 for tiny/small, 512 for sd15).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ARCH_CONFIGS:
        raise ConfigError(f"unknown backbone architecture {arch!r}: allowed {', '.join(ARCHS)}")
    spec = ARCH_CONFIGS[arch]
    tokenizer = build_tokenizer(vocab_words, model_max_length=spec["max_length"])
    text_kwargs = dict(spec["text"])
    vocab_size = max(text_kwargs.pop("vocab_size", 0), len(tokenizer))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=spec["max_length"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text_kwargs)
    text_encoder = CLIPTextModel(text_config)
    vae_kwargs, unet_kwargs = dict(spec["vae"]), dict(spec["unet"])
    if image_size is not None:
        factor = 2 ** (len(vae_kwargs["block_out_channels"]) - 1)
        if image_size % factor:
            raise ConfigError(f"image size {image_size} is not a multiple of the VAE's factor {factor}")
        vae_kwargs["sample_size"] = int(image_size)
        unet_kwargs["sample_size"] = int(image_size) // factor
    vae = AutoencoderKL(**vae_kwargs)
    unet = UNet2DConditionModel(**unet_kwargs)
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str) -> str:
    """`save_pretrained` with safetensors; the tokenizer also as CLIP's vocab.json + merges.txt."""
    os.makedirs(folder, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    tok_dir = os.path.join(folder, "tokenizer")
    tok_json = os.path.join(tok_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        # Older transformers read the slow-tokenizer files; write them from the fast one.
        with open(tok_json, encoding="utf-8") as f:
            model = json.load(f)["model"]
        with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for pair in model["merges"]:
                f.write((pair if isinstance(pair, str) else " ".join(pair)) + "\n")
    return folder


def builtin_folder() -> str:
    """raybias/assets/backbone inside the installed package."""
    return str(resources.files("raybias") / "assets" / "backbone")


def is_pipeline_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MODEL_INDEX))


def _looks_local(model: str) -> bool:
    return (os.path.isabs(model) or model.startswith(("./", "../", "~")) or os.path.exists(model)
            or model.count("/") != 1)


def check_base_model(model: str) -> str:
    """What `load_pipeline` loads for `model` ("builtin", a local folder or a hub id).

    A local folder must exist and hold a diffusers pipeline (ConfigError naming base.model);
    a hub id is returned as given (it cannot be checked without fetching it). Needs no Ray
    and no run directory: `raybias.stages.preflight` calls it before a run starts.
    """
    if model == "builtin":
        folder = builtin_folder()
        if not is_pipeline_folder(folder):
            raise ConfigError(f"base.model=builtin: the shipped backbone is missing from {folder} "
                              "(rebuild it with `raybias base CONFIG base.model=builtin`)")
        return folder
    if _looks_local(model):
        model = os.path.expanduser(model)
        if not os.path.isdir(model):
            raise ConfigError(f"base.model={model!r}: folder not found (give a local Stable Diffusion "
                              "folder, a hub id such as runwayml/stable-diffusion-v1-5, or builtin)")
        if not is_pipeline_folder(model):
            raise ConfigError(f"base.model={model!r}: no {MODEL_INDEX} in this folder; it is not a "
                              "diffusers StableDiffusionPipeline folder")
    return model


def load_pipeline(model: str = "builtin", revision: Optional[str] = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """Load a Stable Diffusion pipeline: "builtin", a local folder, or a hub id.

    Only safetensors weights load. A model that has only pickled weights (`.bin`/`.ckpt`:
    loading them can run code, CVE-2025-32434 before torch 2.6) is refused unless
    `allow_pickle` (config `base.allow_pickle`, default false) opts in for a model whose
    source you trust. Errors name `base.model`: a missing folder, a folder that is not a
    diffusers pipeline, a hub id that cannot be fetched (e.g. no network and not in the
    local cache), weights that are not safetensors.
    """
    from diffusers import StableDiffusionPipeline

    _quiet_loading()
    model = check_base_model(model)  # a missing or non-pipeline local folder (raybias.stages.preflight too)
    # dtype is applied after loading: the keyword's name differs across diffusers releases
    kwargs = dict(revision=revision, safety_checker=None, requires_safety_checker=False)
    try:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True, **kwargs)
        except EnvironmentError as exc:
            if "safetensors" not in str(exc).lower():
                raise
            if not allow_pickle:
                raise ConfigError(
                    f"base.model={model!r}" + (f" (revision {revision})" if revision else "")
                    + " has no safetensors weights, only pickled ones (.bin/.ckpt), which can run code "
                    f"when loaded ({exc}). Convert the model to safetensors, or, if you trust where it "
                    "comes from, set base.allow_pickle=true") from exc
            log.warning("%s has no safetensors weights; loading its pickled weights (base.allow_pickle=true)",
                        model)
            # None: each component's safetensors if it has them, its pickled weights otherwise
            pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=None, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base.model={model!r}" + (f" (revision {revision})" if revision else "")
                          + f" could not be loaded as a StableDiffusionPipeline: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    if all(p.dtype == dtype for p in pipe.unet.parameters()):
        # already in that dtype: no cast (diffusers warns on every `.to(dtype=...)` of a model)
        return pipe.to(device)
    return pipe.to(device=device, dtype=dtype)


def _quiet_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" bar per worker: a run loads the
    base model in every trainer and sampler actor, and raybias shows its own progress."""
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def count_parameters(pipe) -> Dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder")}


def resolve_base_model(cfg, run=None) -> str:
    """What `base.model` names, as something `load_pipeline` takes.

    For "builtin": a rebuilt copy in `base.cache_dir` if one is there, else the copy
    `raybias base` wrote into this run directory (base/model/) if that stage finished,
    else the backbone shipped in the package. Anything else is returned as given.
    """
    model = cfg.base.model
    if model != "builtin":
        return model
    if cfg.base.cache_dir and is_pipeline_folder(os.path.expanduser(cfg.base.cache_dir)):
        return os.path.expanduser(cfg.base.cache_dir)
    if run is not None and run.is_done(BASE_KEY) and run.exists(BASE_MODEL_DIR, MODEL_INDEX):
        if run.is_local:
            return run.local_path(BASE_MODEL_DIR)
        return fetch_to_local(run, BASE_MODEL_DIR)
    return "builtin"


CACHE_ENV = "RAYBIAS_CACHE_DIR"  # overrides $XDG_CACHE_HOME/raybias (e.g. for a node's local disk)
FETCH_MANIFEST = ".raybias-fetch.json"


def private_cache_dir() -> str:
    """This user's raybias cache folder, made private: $RAYBIAS_CACHE_DIR, else
    $XDG_CACHE_HOME/raybias, else ~/.cache/raybias; created with mode 0700 and refused
    unless it is a real folder (not a symlink) owned by this user that nobody else can
    write to (0700 is then restored). Nothing another local user planted is ever used."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"),
                            "raybias")
    base = os.path.abspath(base)
    os.makedirs(os.path.dirname(base), mode=0o700, exist_ok=True)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    check_private_dir(base)
    return base


def check_private_dir(path: str) -> None:
    """Refuse a folder that is a symlink, is not owned by this user, or that others can
    write to; then make it 0700."""
    import stat

    st = os.lstat(path)
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a folder"
    elif hasattr(os, "getuid") and st.st_uid != os.getuid():
        why = f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    elif st.st_mode & 0o022:
        why = f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise ConfigError(f"the raybias cache folder {path} {why}; it must be this user's own private folder. "
                          f"Remove it (it is recreated with mode 0700) or set {CACHE_ENV} to another folder")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(folder: str, listing) -> bool:
    """True when `folder` holds exactly what its fetch manifest says, with the same hashes,
    and the manifest was made from the source listing `listing`."""
    try:
        with open(os.path.join(folder, FETCH_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("listing") != listing:
        return False
    found = set()
    for d, _, names in os.walk(folder):
        for n in names:
            found.add(os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/"))
    hashes = manifest.get("sha256", {})
    if found != set(hashes) | {FETCH_MANIFEST}:
        return False
    return all(_sha256(os.path.join(folder, rel)) == digest for rel, digest in hashes.items())


def remote_listing(run, rel_dir: str):
    """[path, size, mtime_ns] of every file under a run's folder, sorted: what a local copy is
    keyed and checked by. ConfigError for an entry that could escape the copy's folder."""
    import pyarrow.fs as pafs

    src = run.path(rel_dir)
    listing = []
    for info in run.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            listing.append([os.path.relpath(info.path, src).replace(os.sep, "/"), int(info.size or 0),
                            info.mtime_ns])
    listing.sort()
    for rel, _, _ in listing:
        if ".." in rel.split("/") or rel == FETCH_MANIFEST or os.path.isabs(rel):
            raise ConfigError(f"{src}: unexpected file {rel!r} in the model folder")
    return listing


def download_folder(run, rel_dir: str, listing, dest: str) -> None:
    """Copy the files of `listing` from the run's `rel_dir` into the (new, private) folder
    `dest`, then write its fetch manifest (each file's sha256), last: a folder with a
    manifest is a whole copy (`_verified` checks it)."""
    import hashlib

    src = run.path(rel_dir)
    hashes = {}
    for rel, _, _ in listing:
        target = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        h = hashlib.sha256()
        with run.fs.open_input_stream(f"{src.rstrip('/')}/{rel}") as f_in, open(target, "wb") as f_out:
            while True:
                block = f_in.read(1 << 20)
                if not block:
                    break
                h.update(block)
                f_out.write(block)
        hashes[rel] = h.hexdigest()
    with open(os.path.join(dest, FETCH_MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"source": src, "listing": listing, "sha256": hashes}, f)


def fetch_to_local(run, rel_dir: str) -> str:
    """Copy a folder of a remote run directory into this user's private cache (once per
    version of the source), verified.

    The copy is `private_cache_dir()/model-<source>-<version>`, where <version> hashes the
    source's listing (each file's path, size and modification time): a rebuilt model is a
    new version and is fetched again. Each copy ends with a manifest of its files'
    sha256, written after the download; a copy is reused only if the manifest matches the
    source listing and every file its hash. A copy that fails the check is fetched again.
    """
    import hashlib

    src = run.path(rel_dir)
    listing = remote_listing(run, rel_dir)
    if not any(rel == MODEL_INDEX for rel, _, _ in listing):
        raise ConfigError(f"{run.path(rel_dir)} holds no {MODEL_INDEX}: not a pipeline folder")
    source_key = hashlib.sha256(src.encode()).hexdigest()[:16]
    version = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    cache = private_cache_dir()
    target = os.path.join(cache, f"model-{source_key}-{version}")
    if os.path.isdir(target) and not os.path.islink(target) and _verified(target, listing):
        return target
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f".fetch-{source_key}-", dir=cache)  # mode 0700, a fresh name
    try:
        download_folder(run, rel_dir, listing, tmp)
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target) and _verified(target, listing):
                return target  # another process finished the same copy first
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.isdir(target) and _verified(target, listing):
                return target  # lost a race to an identical copy
            raise
        tmp = None
        return target
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
