"""Typed configuration: omegaconf structured configs, validated at load.

A config is a YAML file merged over these dataclasses, then command-line overrides
(`key=value`, omegaconf dotlist syntax). Unknown keys and wrong types are refused by
omegaconf; ranges and allowed names are checked by `validate`. Every error raised here
is a `ConfigError` whose message names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raybias.palette import COLOR_RGB, CORPUS_RGB
# Names that stand for code (data sources, embedders, generators, classifier recipes and the
# `methods:` entries they make) are the ones raybias/registry.py registers, each once.
from raybias.registry import EMBEDDERS, GENERATORS, SOURCES, method_names, recipe_names

BALANCE = ("max_group", "per_group", "ffr")
SCHEDULERS = ("ddim", "dpm_solver", "ddpm", "euler")
ATTENTION = ("auto", "sdpa", "xformers")
IMAGE_FORMATS = ("png", "jpeg", "webp")  # generate.image_format (raybias.data.images.encode)
PRECISION = ("no", "fp16", "bf16")
MODELS = ("small_cnn", "resnet18", "resnet50")
STAGE2 = ("head", "full", "auto")  # train.stage2; auto: chosen per run by validation WGA
STAGE2_MODES = ("head", "full")
STAGE2_LOSS = ("erm", "reweight", "groupdro")
# train.stage2_candidates: what `auto` chooses among ("<mode>+<loss>"), in tie-break order
STAGE2_CANDIDATES = tuple(f"{m}+{l}" for m in STAGE2_MODES for l in STAGE2_LOSS)
STAGE2_RANKS = ("final", "best")  # train.stage2_rank: which validation WGA of a candidate ranks it
PROJECTIONS = ("mlp", "linear", "none")  # train.stage1.projection (SupCon's projection head)
SUPCON_ANCHORS = ("all", "with_positive")  # train.stage1.supcon_anchors
VAL_PROTOCOLS = ("untouched", "biased")  # data.val_protocol (raybias/data/severity.py)
JTT_DRAWS = ("exact", "replacement")  # train.jtt_draw (raybias/classify/recipes.py, JTT)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else start a local Ray bound to 127.0.0.1.
    # "auto" or "ray://host:10001": connect to an existing cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_mb: int = 768


def check_ray(r: DictConfig, cfg: DictConfig) -> None:
    """ray.*: the ranges and names types alone cannot express."""
    if r.num_cpus is not None:
        _at_least("ray.num_cpus", r.num_cpus, 1)
    if r.num_gpus is not None:
        _at_least("ray.num_gpus", r.num_gpus, 0)
    _at_least("ray.object_store_mb", r.object_store_mb, 75)


@dataclass
class DataConfig:
    source: str = "colored_digits"
    root: Optional[str] = None  # dataset folder (not used by colored_digits)
    severity: Any = 0.99  # fraction of each class that is bias-aligned in train, or "original"
    # The validation split under a severity (raybias/data/severity.py):
    #   untouched: as the source ships it (colored_digits: colour-balanced); today's default
    #              and the built-in benchmark's;
    #   biased:    FFR's protocol (datasets/dataset.py make_harder with keep_min): the same
    #              rule as train, keeping at least 10 bias-conflicting images per class, so
    #              model selection sees the training distribution. The real-data configs use it.
    # Test is never subsampled.
    val_protocol: str = "untouched"
    seed: int = 0
    # aligned[y] = bias value that is aligned with class y; None: the class's majority in train
    aligned: Optional[List[int]] = None
    image_size: int = 16  # images are resized to this square size when prepared
    shard_rows: int = 2048  # rows per Parquet shard
    # Sources that read image files: crop the centred square before resizing (else stretch),
    # how the prepared images are stored (png: lossless; jpeg: quality 95, ~5x smaller for
    # photos at 224 px), and threads loading them (0: 2 per CPU core, at most 32).
    center_crop: bool = True
    image_format: str = "png"
    load_workers: int = 0
    # colored_digits
    colors: List[str] = field(default_factory=lambda: ["red", "green"])
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # celeba
    target_attr: str = "Blond_Hair"
    bias_attr: str = "Male"
    # utkface: bias a=0 for ages in young_ages, a=1 for ages in old_ages; other ages dropped
    young_ages: List[int] = field(default_factory=lambda: [0, 5])
    old_ages: List[int] = field(default_factory=lambda: [20, 50])
    # csv: a CSV inside `root` with columns path, y, a, split
    csv_file: str = "metadata.csv"
    # Words used in prompts; None: the source's defaults.
    # class_words[y] = members of class y (one is drawn per prompt, as FFR draws a breed).
    class_words: Optional[List[List[str]]] = None
    bias_words: Optional[List[str]] = None
    prompt_template: Optional[str] = None  # e.g. "a photo of a {bias} {member}"


def check_data(d: DictConfig) -> None:
    """The data section's checks (validate's first part), the sources' own fields included."""
    _choice("data.source", d.source, SOURCES)
    severity_value(d.severity)
    _choice("data.val_protocol", d.val_protocol, VAL_PROTOCOLS)
    _at_least("data.image_size", d.image_size, 8)
    _at_least("data.shard_rows", d.shard_rows, 1)
    if len(d.colors) < 2:
        _fail("data.colors", list(d.colors), "a list of at least 2 colour names")
    for c in d.colors:
        if c not in COLOR_RGB:
            _fail("data.colors", c, "colour names among " + ", ".join(COLOR_RGB))
    _between("data.val_fraction", d.val_fraction, 0, 0.5, low_open=True)
    _between("data.test_fraction", d.test_fraction, 0, 0.5, low_open=True)
    if SOURCES[d.source].reads_files and not d.root:
        _fail("data.root", d.root, f"the dataset folder (required for data.source={d.source})")
    if d.aligned is not None:
        for v in d.aligned:
            _at_least("data.aligned", v, 0)
    for key in ("young_ages", "old_ages"):
        rng = d[key]
        if len(rng) != 2 or rng[0] > rng[1] or rng[0] < 0:
            _fail(f"data.{key}", list(rng), "[min_age, max_age] with 0 <= min <= max")
    if d.young_ages[1] >= d.old_ages[0]:
        _fail("data.old_ages", list(d.old_ages),
              f"an age range above data.young_ages {list(d.young_ages)} (the bins may not overlap)")
    _choice("data.image_format", d.image_format, ("png", "jpeg"))
    _at_least("data.load_workers", d.load_workers, 0)
    if d.source == "celeba" and d.target_attr == d.bias_attr:
        _fail("data.bias_attr", d.bias_attr, f"a CelebA attribute other than data.target_attr ({d.target_attr})")
    if not str(d.csv_file).strip():
        _fail("data.csv_file", d.csv_file, "the CSV file name (inside data.root, or an absolute path)")
    if d.class_words is not None:
        for y, members in enumerate(d.class_words):
            if not members:
                _fail(f"data.class_words[{y}]", list(members), "a non-empty list of words for the class")
    if d.prompt_template is not None:
        try:
            d.prompt_template.format(member="x", bias="y")
        except (KeyError, IndexError, ValueError) as exc:
            _fail("data.prompt_template", d.prompt_template,
                  f"text with the fields {{member}} and {{bias}} only (it failed on {exc})")


@dataclass
class BaseConfig:
    # "builtin": the small font-pretrained backbone shipped with / cached by raybias.
    # Anything else: a diffusers hub id or local folder (StableDiffusionPipeline layout).
    model: str = "builtin"
    revision: Optional[str] = None
    # Load a base model that has only pickled weights (.bin/.ckpt: loading them can run code).
    # Off: only safetensors load. Turn on only for a model whose source you trust.
    allow_pickle: bool = False
    # Pretraining of the builtin backbone (`raybias base`).
    # Defaults: the recipe that made the shipped backbone (raybias/assets/backbone).
    corpus_size: int = 12000
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    seed: int = 0
    cache_dir: Optional[str] = None  # where a rebuilt builtin backbone is kept
    arch: str = "small"  # builtin architecture: small (shipped) or tiny (tests)
    vae_steps: int = 1000  # VAE reconstruction steps before the UNet (colour is learned late)
    train_text_encoder: bool = True  # False: keep the random text encoder frozen
    cond_drop: float = 0.1  # caption dropout, so classifier-free guidance works
    oracle_epochs: int = 3
    # Quality check printed by `raybias base`: oracle recognition of generations.
    check_per_pair: int = 8  # images per (colour, digit) prompt
    check_colors: List[str] = field(default_factory=lambda: ["red", "green"])
    check_guidance: List[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    check_steps: int = 25


def check_base(b: DictConfig, cfg: DictConfig) -> None:
    """base.*: the ranges and names types alone cannot express."""
    for key in ("corpus_size", "steps", "batch_size"):
        _at_least(f"base.{key}", b[key], 1)
    _between("base.lr", b.lr, 0, 1, low_open=True)
    _between("base.ema_decay", b.ema_decay, 0, 1)
    _choice("base.arch", b.arch, ("tiny", "small"))
    for key in ("vae_steps", "oracle_epochs", "check_per_pair", "check_steps"):
        _at_least(f"base.{key}", b[key], 1)
    _between("base.cond_drop", b.cond_drop, 0, 1)
    if not b.check_colors:
        _fail("base.check_colors", [], "a non-empty list of colour names")
    for c_ in b.check_colors:
        if c_ not in CORPUS_RGB:
            _fail("base.check_colors", c_, "colour names among " + ", ".join(CORPUS_RGB))
    if not b.check_guidance:
        _fail("base.check_guidance", [], "a non-empty list of guidance scales >= 0")
    for g_ in b.check_guidance:
        _at_least("base.check_guidance", g_, 0)
    if not b.model or not str(b.model).strip():
        _fail("base.model", b.model, "builtin, a local Stable Diffusion folder or a hub id")


@dataclass
class EmbedConfig:
    embedder: str = "builtin"
    model: Optional[str] = None  # CLIP hub id or local folder for embedder=clip
    batch_size: int = 256
    concurrency: int = 1  # actors in the pool
    num_gpus: float = 0.0  # per actor


def check_embed(e: DictConfig, cfg: DictConfig) -> None:
    """embed.*: the ranges and names types alone cannot express."""
    _choice("embed.embedder", e.embedder, EMBEDDERS)
    if e.embedder == "clip" and not e.model:
        _fail("embed.model", e.model, "a CLIP hub id or local folder when embed.embedder=clip")
    _at_least("embed.batch_size", e.batch_size, 1)
    _at_least("embed.concurrency", e.concurrency, 1)
    _at_least("embed.num_gpus", e.num_gpus, 0)


@dataclass
class ClusterConfig:
    k: Any = "auto"  # an int >= 1, or "auto"
    k_min: int = 2
    k_max: int = 6
    min_group_size: int = 20  # smaller groups get k = 1
    max_iter: int = 50
    tol: float = 1e-4
    sample_size: int = 10000  # for k-means++ init and silhouette
    n_init: int = 4  # k-means++ seedings tried on the sample; the best seeds the full run
    seed: int = 0


def check_cluster(c: DictConfig, cfg: DictConfig) -> None:
    """cluster.*: the ranges and names types alone cannot express."""
    if isinstance(c.k, str):
        if c.k != "auto":
            try:
                c.k = int(c.k)
            except ValueError:
                _fail("cluster.k", c.k, "an integer >= 1 or 'auto'")
    if not isinstance(c.k, str):
        if isinstance(c.k, bool) or not isinstance(c.k, int) or c.k < 1:
            _fail("cluster.k", c.k, "an integer >= 1 or 'auto'")
    _at_least("cluster.k_min", c.k_min, 1)
    if c.k_max < c.k_min:
        _fail("cluster.k_max", c.k_max, f"an integer >= cluster.k_min ({c.k_min})")
    for key in ("min_group_size", "max_iter", "sample_size", "n_init"):
        _at_least(f"cluster.{key}", c[key], 1)
    _at_least("cluster.tol", c.tol, 0)


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4  # LoRA
    dreambooth_lr: float = 5e-5
    lora_rank: int = 4
    lora_alpha: float = 4.0
    identifier: str = "sks"
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    min_images: int = 3  # a group with fewer real training images is not trained
    checkpoint_every: int = 100
    mixed_precision: str = "no"  # on GPU: fp16 / bf16
    num_gpus_per_job: float = 0.0
    num_cpus_per_job: float = 1.0
    max_concurrent_jobs: int = 0  # trainers running at once; 0: as many as the cluster holds
    # Jobs one Ray Train trainer trains in turn. 1: a trainer per job (a GPU cluster runs them
    # side by side); more: Ray Train's start-up, the imports and the base model's loading are
    # paid once per pack, which is most of a small job's time on CPU (the quickstart).
    jobs_per_trainer: int = 1
    max_failures: int = 2
    seed: int = 0
    weight_decay: float = 1e-2  # AdamW
    max_grad_norm: float = 1.0  # 0: no clipping
    # Sampling of prior-preservation class images and of the preview grid (DDIM).
    sample_steps: int = 25
    sample_guidance: float = 1.0
    n_samples: int = 4  # preview images per trained model in generators/<gen>/samples.png
    progress_every: int = 10  # steps between progress updates sent to the driver


def check_finetune(f: DictConfig, cfg: DictConfig) -> None:
    """finetune.*: the ranges and names types alone cannot express."""
    # YAML 1.1 reads a bare `no` as false, which the str field then holds as "False";
    # `mixed_precision: no` is how accelerate's own configs spell it, so take it as meant.
    if str(f.mixed_precision).lower() == "false":
        f.mixed_precision = "no"
    for key in ("steps", "batch_size", "lora_rank", "checkpoint_every", "num_class_images"):
        _at_least(f"finetune.{key}", f[key], 1)
    for key in ("lr", "dreambooth_lr"):
        _between(f"finetune.{key}", f[key], 0, 1, low_open=True)
    _at_least("finetune.lora_alpha", f.lora_alpha, 0)
    _at_least("finetune.prior_loss_weight", f.prior_loss_weight, 0)
    _at_least("finetune.min_images", f.min_images, 0)
    _choice("finetune.mixed_precision", f.mixed_precision, PRECISION)
    _at_least("finetune.num_gpus_per_job", f.num_gpus_per_job, 0)
    _at_least("finetune.num_cpus_per_job", f.num_cpus_per_job, 0)
    _at_least("finetune.max_failures", f.max_failures, 0)
    if not f.identifier.strip() or " " in f.identifier:
        _fail("finetune.identifier", f.identifier, "one word (e.g. sks)")
    _at_least("finetune.max_concurrent_jobs", f.max_concurrent_jobs, 0)
    _at_least("finetune.jobs_per_trainer", f.jobs_per_trainer, 1)
    for key in ("sample_steps", "progress_every"):
        _at_least(f"finetune.{key}", f[key], 1)
    _at_least("finetune.n_samples", f.n_samples, 0)
    for key in ("weight_decay", "max_grad_norm", "sample_guidance"):
        _at_least(f"finetune.{key}", f[key], 0)
    if f.num_cpus_per_job <= 0 and f.num_gpus_per_job <= 0:
        _fail("finetune.num_cpus_per_job", f.num_cpus_per_job,
              "a number > 0 when finetune.num_gpus_per_job is 0 (a job needs some resource)")


@dataclass
class GenerateConfig:
    balance: str = "ffr"  # group-balanced, as stage 1 trains on the synthetic set alone
    per_group: int = 500  # for balance=per_group
    scheduler: str = "ddim"
    steps: int = 25
    guidance: float = 1.0
    unit_size: int = 512  # images per work unit (= one Parquet shard)
    batch_size: int = 64
    attention: str = "auto"
    dtype: str = "fp32"  # on GPU: fp16 / bf16
    channels_last: bool = False
    compile: bool = False
    concurrency: int = 1  # sampler actors in the pool
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 1.0  # per actor (also its torch threads)
    model_cache: int = 2  # LoRA adapters / DreamBooth UNets kept loaded per actor
    # A remote (s3://, gs://) run's model folders are fetched once per node into a shared disk
    # cache ($RAYBIAS_CACHE_DIR or ~/.cache/raybias, private) holding at most this many GB;
    # the least recently used models no actor has loaded are deleted to stay under it.
    model_cache_gb: float = 50.0
    image_format: str = "png"  # how each image is stored in the shards: png (lossless), jpeg or webp
    image_quality: int = 95  # of jpeg and webp, 1..100 (png is lossless: not used)
    size: Optional[int] = None  # image size to sample at; None: the model's own
    negative_prompt: bool = True
    seed: int = 0


def check_generate(g: DictConfig, cfg: DictConfig) -> None:
    """generate.*: the ranges and names types alone cannot express."""
    _choice("generate.balance", g.balance, BALANCE)
    _at_least("generate.per_group", g.per_group, 1)
    _choice("generate.scheduler", g.scheduler, SCHEDULERS)
    for key in ("steps", "unit_size", "batch_size", "concurrency"):
        _at_least(f"generate.{key}", g[key], 1)
    _at_least("generate.guidance", g.guidance, 0)
    _choice("generate.attention", g.attention, ATTENTION)
    _choice("generate.dtype", g.dtype, ("fp32", "fp16", "bf16"))
    _at_least("generate.num_gpus", g.num_gpus, 0)
    _at_least("generate.num_cpus", g.num_cpus, 0)
    _at_least("generate.model_cache", g.model_cache, 1)
    _between("generate.model_cache_gb", g.model_cache_gb, 0, 1e9, low_open=True)
    _choice("generate.image_format", g.image_format, IMAGE_FORMATS)
    if not isinstance(g.image_quality, int) or not 1 <= g.image_quality <= 100:
        _fail("generate.image_quality", g.image_quality, "a whole number in [1, 100]")
    if g.size is not None and (g.size < 8 or g.size % 8):
        _fail("generate.size", g.size, "a multiple of 8, at least 8 (or null for the model's own size)")


@dataclass
class FilterConfig:
    enabled: bool = True
    alpha: float = 0.5
    keep_fraction: float = 0.75
    embedder: Optional[str] = None  # None: embed.embedder
    # Oracle folder for the class-prompt term with the builtin embedder; None: the shipped one.
    oracle: Optional[str] = None


def check_filter(fl: DictConfig, cfg: DictConfig) -> None:
    """filter.*: ranges; a CLIP filter needs embed.model."""
    _between("filter.alpha", fl.alpha, 0, 1)
    _between("filter.keep_fraction", fl.keep_fraction, 0, 1, low_open=True)
    if fl.embedder is not None:
        _choice("filter.embedder", fl.embedder, EMBEDDERS)
        if fl.embedder == "clip" and not cfg.embed.model:
            _fail("embed.model", cfg.embed.model, "a CLIP hub id or local folder when filter.embedder=clip")


@dataclass
class Stage1Config:
    epochs: int = 10
    lr: float = 1e-3
    beta: float = 0.5  # loss = beta * CE + (1 - beta) * SupCon
    temperature: float = 0.1
    # SupCon as HobbitLong/SupContrast computes it (docs/design.md, Methods): the loss reads an
    # L2-normalised projection of the encoder's features, mlp = Linear(d, hidden) -> ReLU ->
    # Linear(hidden, projection_dim) with hidden = d unless projection_hidden is set (linear:
    # Linear(d, projection_dim); none: the encoder's post-ReLU features, raybias before);
    # the head is used by SupCon only, never by the classifier's logits.
    projection: str = "mlp"
    projection_dim: int = 128
    projection_hidden: Optional[int] = None
    # all: the mean over every anchor of the batch (one without a positive adds 0), as
    # SupConLoss does; with_positive: over the anchors with a positive only (raybias before).
    supcon_anchors: str = "all"
    # SupConLoss scales the loss by temperature / base_temperature, base 0.07 by default;
    # null: no scaling (the paper's formula; raybias before).
    base_temperature: Optional[float] = 0.07


@dataclass
class TrainConfig:
    method: str = "erm"
    model: str = "small_cnn"
    pretrained: Optional[str] = None  # "imagenet" for torchvision weights
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    schedule: str = "cosine"
    augment: bool = True
    # Group-DRO step size: 0.1 is BalancingGroups' value (the built-in benchmark's default);
    # Sagawa et al.'s code and FFR use 0.01 (the real-data configs). docs/design.md, Methods.
    groupdro_eta: float = 0.1
    groupdro_c: float = 0.0
    # JTT: T = jtt_epochs of ERM find the error set, which the final model sees jtt_lambda
    # times per epoch. Defaults: the built-in benchmark's; the JTT paper's per-dataset values
    # are in the real-data configs (Waterbirds T 60, lambda 100; CelebA T 1, lambda 50).
    jtt_epochs: int = 2
    jtt_lambda: float = 20.0
    # exact: each epoch holds every error row exactly jtt_lambda times and every other row
    # once, shuffled (the upweighted set; BalancingGroups); replacement: as many draws with
    # replacement, error rows jtt_lambda times as likely (raybias before; ~37 % of rows unseen
    # per epoch). exact needs an integer jtt_lambda.
    jtt_draw: str = "exact"
    # JTT's own optimizer, lr and weight decay for both its phases (the JTT paper: SGD,
    # lr 1e-5, weight decay 1.0 Waterbirds / 0.1 CelebA); null: train.optimizer/lr/weight_decay.
    jtt_optimizer: Optional[str] = None
    jtt_lr: Optional[float] = None
    jtt_weight_decay: Optional[float] = None
    # two_stage
    generator: str = "vanilla"
    synthetic_ratio: float = 0.0  # fraction of stage-1 data that is real
    stage1: Stage1Config = field(default_factory=Stage1Config)
    # stage 2: head (linear head on the frozen stage-1 encoder, Basu et al.), full (the whole
    # network, FFR), each with stage2_method as its loss; or auto: every stage2_candidates
    # entry ("<head|full>+<erm|reweight|groupdro>") is trained from the one stage-1 model and
    # the one with the best validation WGA (ties: AGA, then the list's order) is kept, at its
    # best epoch.
    stage2: str = "head"
    stage2_method: str = "groupdro"
    stage2_candidates: List[str] = field(default_factory=lambda: list(STAGE2_CANDIDATES))
    # What ranks the candidates: final = each one's validation WGA at its last epoch (the model
    # it converged to: a candidate whose validation WGA peaks for an epoch and falls, as the
    # full network does at high severity, is not taken for its peak); best = at its best epoch.
    stage2_rank: str = "final"
    # ddb
    ddb_select_with_bias_labels: bool = True
    num_workers: int = 1  # Ray Train workers per classifier (DDP when > 1)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # also each worker's torch threads
    in_memory: bool = True  # decode the (small) dataset into memory instead of streaming
    # Streaming (in_memory=false): a training set whose decoded images take at most this many
    # MB is read and decoded once, into Ray's object store, and every epoch streams the decoded
    # blocks (no Parquet read or image decode per epoch); a larger one is read and decoded each
    # epoch. 0: always decode per epoch.
    stream_cache_mb: int = 1024
    max_failures: int = 1  # Ray Train restarts a failed worker group from its last checkpoint
    # classifiers trained at once by `train_methods`; None: as many as the cluster's CPUs/GPUs fit
    max_concurrent: Optional[int] = None


def check_train(t: DictConfig, cfg: DictConfig) -> None:
    """train.*: names, ranges, and what a recipe needs of them (DDB Recipe II and DDP)."""
    _choice("train.method", t.method, recipe_names())
    _choice("train.model", t.model, MODELS)
    if t.pretrained is not None:
        _choice("train.pretrained", t.pretrained, ("imagenet",))
    for key in ("epochs", "batch_size", "num_workers"):
        _at_least(f"train.{key}", t[key], 1)
    _between("train.lr", t.lr, 0, 10, low_open=True)
    _at_least("train.weight_decay", t.weight_decay, 0)
    _choice("train.optimizer", t.optimizer, ("adam", "adamw", "sgd"))
    _choice("train.schedule", t.schedule, ("cosine", "constant"))
    _at_least("train.groupdro_eta", t.groupdro_eta, 0)
    _at_least("train.groupdro_c", t.groupdro_c, 0)
    _at_least("train.jtt_epochs", t.jtt_epochs, 1)
    _at_least("train.jtt_lambda", t.jtt_lambda, 1)
    _choice("train.jtt_draw", t.jtt_draw, JTT_DRAWS)
    if t.jtt_draw == "exact" and not float(t.jtt_lambda).is_integer():
        _fail("train.jtt_lambda", t.jtt_lambda, "an integer >= 1 with train.jtt_draw=exact "
              "(each error row appears jtt_lambda times per epoch), or train.jtt_draw=replacement")
    if t.jtt_optimizer is not None:
        _choice("train.jtt_optimizer", t.jtt_optimizer, ("adam", "adamw", "sgd"))
    if t.jtt_lr is not None:
        _between("train.jtt_lr", t.jtt_lr, 0, 10, low_open=True)
    if t.jtt_weight_decay is not None:
        _at_least("train.jtt_weight_decay", t.jtt_weight_decay, 0)
    _at_least("train.stream_cache_mb", t.stream_cache_mb, 0)
    _choice("train.generator", t.generator, GENERATORS)
    _between("train.synthetic_ratio", t.synthetic_ratio, 0, 1)
    _at_least("train.stage1.epochs", t.stage1.epochs, 1)
    _between("train.stage1.lr", t.stage1.lr, 0, 10, low_open=True)
    _between("train.stage1.beta", t.stage1.beta, 0, 1)
    _between("train.stage1.temperature", t.stage1.temperature, 0, 10, low_open=True)
    _choice("train.stage1.projection", t.stage1.projection, PROJECTIONS)
    _at_least("train.stage1.projection_dim", t.stage1.projection_dim, 1)
    if t.stage1.projection_hidden is not None:
        _at_least("train.stage1.projection_hidden", t.stage1.projection_hidden, 1)
        if t.stage1.projection != "mlp":
            _fail("train.stage1.projection_hidden", t.stage1.projection_hidden,
                  f"null unless train.stage1.projection=mlp (a {t.stage1.projection} head has no hidden layer)")
    _choice("train.stage1.supcon_anchors", t.stage1.supcon_anchors, SUPCON_ANCHORS)
    if t.stage1.base_temperature is not None:
        _between("train.stage1.base_temperature", t.stage1.base_temperature, 0, 10, low_open=True)
    _choice("train.stage2", t.stage2, STAGE2)
    _choice("train.stage2_method", t.stage2_method, STAGE2_LOSS)
    if not t.stage2_candidates:
        _fail("train.stage2_candidates", [], "a non-empty list of " + ", ".join(STAGE2_CANDIDATES))
    for c_ in t.stage2_candidates:
        _choice("train.stage2_candidates", c_, STAGE2_CANDIDATES)
    if len(set(t.stage2_candidates)) != len(t.stage2_candidates):
        _fail("train.stage2_candidates", list(t.stage2_candidates), "a list without repeats")
    _choice("train.stage2_rank", t.stage2_rank, STAGE2_RANKS)
    if t.pretrained is not None and t.model == "small_cnn":
        _fail("train.pretrained", t.pretrained, "null for train.model=small_cnn (imagenet weights exist for resnet18/resnet50)")
    _between("train.cpus_per_worker", t.cpus_per_worker, 0, 1024, low_open=not t.use_gpu)
    _at_least("train.max_failures", t.max_failures, 0)
    recipe2 = [where for where, names in (("methods", cfg.methods), ("train.method", [t.method]),
                                          ("sweep.methods", cfg.sweep.methods or []))
               if "ddb_recipe2" in names]
    if recipe2:
        check_recipe2_workers(t.num_workers, recipe2[0])
    if t.max_concurrent is not None:
        _at_least("train.max_concurrent", t.max_concurrent, 1)


@dataclass
class DDBConfig:
    # class-conditional diffusion model (the finetune loop, full UNet, class-only prompts)
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    cond_drop: float = 0.1  # probability of an empty prompt per training example (CFG)
    guidance: float = 1.0  # CFG weight when sampling the bias-aligned set
    per_class: int = 32  # bias-aligned images generated per class
    sample_steps: int = 10  # denoising steps per generated image
    amplifier_epochs: int = 10
    seed: int = 0  # of the diffusion model, the generated set and the amplifier
    lff_q: float = 0.7
    lff_ema: float = 0.7
    # Recipe II: least LfF weight of a training image. The amplifier is fixed and very sure of
    # the real bias-aligned images (CE ~1e-5), so W = L_B/(L_B+L_D) is ~0 on all of them and
    # the debiased model would fit the few pseudo-conflicting images alone (the reversed
    # shortcut). 0 = plain LfF.
    lff_min_weight: float = 0.01


def check_ddb(dd: DictConfig, cfg: DictConfig) -> None:
    """ddb.*: the ranges and names types alone cannot express."""
    for key in ("steps", "batch_size", "per_class", "sample_steps", "amplifier_epochs"):
        _at_least(f"ddb.{key}", dd[key], 1)
    _between("ddb.lr", dd.lr, 0, 1, low_open=True)
    _at_least("ddb.seed", dd.seed, 0)
    _between("ddb.cond_drop", dd.cond_drop, 0, 1)
    _at_least("ddb.guidance", dd.guidance, 0)
    _between("ddb.lff_q", dd.lff_q, 0, 1, low_open=True)
    _between("ddb.lff_ema", dd.lff_ema, 0, 1)
    _between("ddb.lff_min_weight", dd.lff_min_weight, 0, 1)


@dataclass
class DiagnosticsConfig:
    # Per generator and group of its synthetic set (raybias/generation/diagnostics.py, written
    # by the report): label fidelity (the oracle, or CLIP zero-shot with embed.embedder=clip),
    # diversity and KID to the real group in the embedder's space.
    enabled: bool = True
    # at most this many generated images, and as many real training images, per group (drawn
    # with `seed`): what bounds the work, whatever the set's size
    sample_per_group: int = 256
    seed: int = 0


def check_diagnostics(d: DictConfig, cfg: DictConfig) -> None:
    """diagnostics.*: the ranges and names types alone cannot express."""
    _at_least("diagnostics.sample_per_group", d.sample_per_group, 2)
    _at_least("diagnostics.seed", d.seed, 0)


@dataclass
class SweepConfig:
    name: str = "sweep"
    severities: List[Any] = field(default_factory=lambda: [0.95, 0.99])
    synthetic_ratios: List[float] = field(default_factory=lambda: [0.0])
    methods: Optional[List[str]] = None  # None: top-level methods
    seeds: Optional[List[int]] = None  # None: top-level seeds
    max_concurrent: int = 2
    asha: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


def check_sweep(sw: DictConfig, cfg: DictConfig) -> None:
    """sweep.*: the ranges and names types alone cannot express."""
    if not sw.severities:
        _fail("sweep.severities", [], "a non-empty list of severities")
    for s in sw.severities:
        severity_value(s)
    for r_ in sw.synthetic_ratios:
        _between("sweep.synthetic_ratios", r_, 0, 1)
    for m in sw.methods or []:
        _choice("sweep.methods", m, method_names())
    for s in sw.seeds or []:
        _at_least("sweep.seeds", s, 0)
    _at_least("sweep.max_concurrent", sw.max_concurrent, 1)
    _at_least("sweep.cpus_per_trial", sw.cpus_per_trial, 0)
    _at_least("sweep.gpus_per_trial", sw.gpus_per_trial, 0)


@dataclass
class RaybiasConfig:
    run_dir: str = "runs/default"
    methods: List[str] = field(default_factory=lambda: ["erm"])
    seeds: List[int] = field(default_factory=lambda: [0])
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ddb: DDBConfig = field(default_factory=DDBConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


Config = DictConfig  # a validated, typed OmegaConf view of RaybiasConfig


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load YAML `path` over the defaults, apply `key=value` overrides, validate."""
    schema = OmegaConf.structured(RaybiasConfig)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml syntax errors, unreadable or binary files
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from exc
        _check_shape(loaded, str(path))
        layers.append(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, path)) from exc
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as exc:
            raise ConfigError(_explain(exc, "the command-line overrides")) from exc
        _check_shape(dotlist, "the command-line overrides")
        try:
            cfg = OmegaConf.merge(cfg, dotlist)
        except OmegaConfBaseException as exc:
            raise ConfigError(_explain(exc, "the command-line overrides")) from exc
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _check_shape(loaded: Any, where: str) -> None:
    """A config file is a mapping, and each section in it a mapping too (`data: 5` or a YAML
    list would otherwise fail deep inside the merge with a message that names neither)."""
    if loaded is None:
        return
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {where} holds a YAML {type(OmegaConf.to_container(loaded)).__name__}; "
                          "a config is a mapping of keys such as run_dir:, data:, train:")
    schema = OmegaConf.structured(RaybiasConfig)
    for key in loaded.keys():
        if key in schema and isinstance(schema[key], DictConfig):
            value = loaded._get_node(key)._value()
            if value is not None and not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"config key '{key}' in {where} is {value!r}; it is a section: a mapping of "
                                  f"keys such as {', '.join(list(schema[key].keys())[:3])}")


def config_from_dict(values: Dict[str, Any]) -> DictConfig:
    """Build a validated config from a nested dict (tests, Tune trials, job entrypoints)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RaybiasConfig), OmegaConf.create(values))
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, None)) from exc
    validate(cfg)
    return cfg


def with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A copy of `cfg` with `key=value` overrides applied and validated."""
    try:
        new = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, None)) from exc
    validate(new)
    return new


def _explain(exc: OmegaConfBaseException, path) -> str:
    where = f" in {path}" if path else ""
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'{where}{_did_you_mean(str(key))}"
    if key:
        return f"bad value for config key '{key}'{where}: {msg}"
    return f"invalid config{where}: {msg}"


def _known_keys() -> list:
    out = []

    def walk(prefix: str, node: Any) -> None:
        for k, v in node.items():
            name = f"{prefix}.{k}" if prefix else k
            out.append(name)
            if isinstance(v, DictConfig):
                walk(name, v)

    walk("", OmegaConf.structured(RaybiasConfig))
    return out


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, _known_keys(), n=3, cutoff=0.6)
    if close:
        return ": did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    section = key.rsplit(".", 1)[0] if "." in key else ""
    keys = [k.rsplit(".", 1)[-1] for k in _known_keys() if k.startswith(section + ".") and k.count(".") == key.count(".")] if section else []
    return f": known keys{' in ' + section if section else ''} are {', '.join(keys)}" if keys else \
        ": check the spelling (see configs/quickstart.yaml)"


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key '{key}' has bad value {value!r}: allowed {allowed}")


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(key, value, "one of " + ", ".join(allowed))


def _at_least(key: str, value: Any, low: float) -> None:
    if value is None or value < low:
        _fail(key, value, f"a number >= {low}")


def _between(key: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = value is not None and (value > low if low_open else value >= low) and value <= high
    if not ok:
        _fail(key, value, f"a number in {'(' if low_open else '['}{low}, {high}]")


def severity_value(severity: Any) -> Optional[float]:
    """None for 'original', else the float severity (validated)."""
    if isinstance(severity, str):
        if severity == "original":
            return None
        try:
            severity = float(severity)
        except ValueError:
            _fail("data.severity", severity, "a number in (0, 1] or 'original'")
    if isinstance(severity, bool) or not isinstance(severity, (int, float)):
        _fail("data.severity", severity, "a number in (0, 1] or 'original'")
    if not 0 < float(severity) <= 1:
        _fail("data.severity", severity, "a number in (0, 1] or 'original'")
    return float(severity)


def check_recipe2_workers(num_workers: int, where: str = "train.method") -> None:
    """Refuse ddb_recipe2 under DDP: LfF's per-row loss EMA lives in each Ray Train worker and
    holds only the rows that worker saw, and only rank 0's is checkpointed, so with more than
    one worker the weights would come from partial EMAs and a resume would lose the others."""
    if int(num_workers) > 1:
        raise ConfigError(
            f"config key 'train.num_workers' has bad value {int(num_workers)} for ddb_recipe2 (in {where}): "
            "Recipe II keeps LfF's per-row loss EMA in each Ray Train worker and checkpoints rank 0's only, "
            "so it needs train.num_workers=1 (drop ddb_recipe2 from the methods to train the others with DDP)")


def validate(cfg: DictConfig) -> None:
    """Range and name checks that types alone cannot express: each section's own, beside its
    fields (`check_<section>`, in SECTION_CHECKS), and those of the top-level lists; the first
    problem found is the one reported (data first, then methods and seeds, then the sections)."""
    check_data(cfg.data)
    if not cfg.methods:
        _fail("methods", [], "a non-empty list of " + ", ".join(method_names()))
    for m in cfg.methods:
        _choice("methods", m, method_names())
    if not cfg.seeds:
        _fail("seeds", [], "a non-empty list of integers")
    for s in cfg.seeds:
        _at_least("seeds", s, 0)
    for name, check in SECTION_CHECKS.items():
        check(cfg[name], cfg)


# section -> its checks (defined beside its dataclass above), in the order they run
SECTION_CHECKS = {"ray": check_ray, "base": check_base, "embed": check_embed, "cluster": check_cluster,
                  "finetune": check_finetune, "generate": check_generate, "filter": check_filter,
                  "train": check_train, "ddb": check_ddb, "diagnostics": check_diagnostics, "sweep": check_sweep}


# Keys that decide how work runs (resources, concurrency, retries, progress), not what it makes:
# changing one does not make a finished stage's output stale (see RunDir.matches).
EXECUTION_KEYS = frozenset({
    "finetune.num_cpus_per_job", "finetune.max_concurrent_jobs", "finetune.max_failures",
    "finetune.progress_every", "finetune.jobs_per_trainer",
    "generate.concurrency", "generate.num_cpus", "generate.model_cache", "generate.model_cache_gb",
    "embed.concurrency", "embed.batch_size",
    "train.max_concurrent", "train.max_failures", "train.cpus_per_worker",
    "base.allow_pickle",  # whether a pickled model may load, not what is made from it
})


def config_hash(cfg: DictConfig, sections: Sequence[str]) -> str:
    """Stable hash of the named config sections (e.g. ("data", "train"))."""
    parts = {s: OmegaConf.to_container(OmegaConf.select(cfg, s), resolve=True) for s in sections}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def section_values(cfg: DictConfig, sections: Sequence[str]) -> Dict[str, Any]:
    """The named sections as plain, flattened `key: value` pairs (for diff messages)."""
    out: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    for s in sections:
        walk(s, OmegaConf.to_container(OmegaConf.select(cfg, s), resolve=True))
    return out


def same_values(old: Dict[str, Any], new: Dict[str, Any], exclude: Sequence[str] = ()) -> bool:
    """Do two `section_values` maps describe the same work, ignoring EXECUTION_KEYS and `exclude`?"""
    skip = EXECUTION_KEYS.union(exclude)
    keys = (set(old) | set(new)) - skip
    return all(k in old and k in new and old[k] == new[k] for k in keys)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
