"""Fail before the work, not after it: the checks a run can make from its config alone.

`check_run(cfg, stages)` runs, before Ray starts and before anything is written, every
check that needs only the config and what is known of the data source and this machine,
for each stage that will run (the names of `raybias.stages.plan_stages`):

    prepare   data.root is an existing folder (sources that read files)
    base      base.model, when a local folder, exists and holds a diffusers pipeline
    embed     embed.model (embedder clip), when a local folder, exists; GPUs (embed.num_gpus)
    finetune  base.model as above; GPUs (finetune.num_gpus_per_job)
    generate  base.model as above; GPUs (generate.num_gpus); generate.attention=xformers
              needs a GPU and xformers
    filter    a class-prompt scorer for filter.alpha > 0 (CLIP, or the oracle on
              colored_digits); the oracle's digit words (data.class_words) and its folder
              (filter.oracle); the filter embedder's model; GPUs (embed.num_gpus)
    ddb       base.model; GPUs (finetune.num_gpus_per_job, generate.num_gpus, train.use_gpu);
              attention; the amplifier's train.pretrained weights
    train     for every `methods:` entry: train.pretrained weights in the local cache; GPUs
              (train.use_gpu: one per Ray Train worker)

Each check is the function the stage itself calls at the point it would fail (one
definition: `generation.scoring.prompt_term_kind`, `diffusion.backbone.check_base_model`,
...), so the message is the same, only hours earlier. GPU requests are compared with the
GPUs the Ray will have when that is known: a local Ray (ray.num_gpus, else the GPUs Ray
finds on this machine), or the cluster this process is already connected to. A hub id
(base.model, embed.model) cannot be checked offline and is left to the stage.

Every refusal is a `ConfigError` whose message names the key and its value.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from raybias.config import ConfigError
from raybias.methods import generators_needed
from raybias.registry import GENERATORS


# --------------------------------------------------------------------------- where Ray runs


def ray_address(cfg) -> Optional[str]:
    """The address `init_ray` will join (ray.address, else RAY_ADDRESS); None or "local":
    it starts a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def local_ray(cfg) -> bool:
    """Will `init_ray` start a Ray on this machine (so its workers share this environment)?"""
    return ray_address(cfg) in (None, "local")


def paths_are_workers_paths(cfg) -> bool:
    """Do local paths mean the same here as on the workers? Yes on this machine or on a
    cluster node; not through Ray Client (ray://), whose driver is elsewhere."""
    address = ray_address(cfg)
    return not (address and str(address).startswith("ray://"))


def _detected_gpus() -> Optional[float]:
    """GPUs a local Ray finds on this machine (as Ray counts them), or None if unknown."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        n = int(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            n = min(n, len(visible))
        return float(n)
    except Exception:  # another Ray layout: leave the count to the stage's require_gpus
        return None


def _known(cfg, resource: str) -> Optional[Tuple[float, str]]:
    """(`resource` the Ray this process is connected to has, how that is known), None when no
    Ray is running here and the run's is not a local one (an autoscaling cluster may grow: its
    stage asks the live cluster); "unknown" when it is to be decided from the config."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        have = float(ray.cluster_resources().get(resource, 0.0))
        return have, f"the Ray cluster this process is connected to has {have:g}"
    return None if not local_ray(cfg) else (-1.0, "unknown")


def known_gpus(cfg) -> Optional[Tuple[float, str]]:
    """(GPUs the run's Ray will have, how that is known), or None when it is not known yet."""
    known = _known(cfg, "GPU")
    if known is None or known[1] != "unknown":
        return known
    if cfg.ray.num_gpus is not None:
        return float(cfg.ray.num_gpus), f"the local Ray is started with ray.num_gpus={cfg.ray.num_gpus}"
    found = _detected_gpus()
    if found is None:
        return None
    return found, f"the local Ray will have the {found:g} GPU(s) found on this machine (ray.num_gpus is unset)"


def check_gpus(cfg, key: str, value, per_task: float, what: str, fix: str) -> None:
    """ConfigError if `key`=`value` asks for more GPUs per task than the run's Ray will have.

    The stage's own `ray_utils.require_gpus` asks the live cluster; this asks the config,
    before the cluster exists (a local Ray) and before earlier stages spend their time.
    """
    if not per_task or float(per_task) <= 0:
        return
    known = known_gpus(cfg)
    if known is None:
        return
    have, where = known
    if have + 1e-9 < float(per_task):
        raise ConfigError(f"config key '{key}' has value {value!r}, which asks for {float(per_task):g} GPU(s) "
                          f"{what}, but {where}; set {fix} to run on CPU, or give Ray more GPUs (ray.num_gpus)")


def known_cpus(cfg) -> Optional[Tuple[float, str]]:
    """(CPUs the run's Ray will have, how that is known), or None when it is not known yet."""
    known = _known(cfg, "CPU")
    if known is None or known[1] != "unknown":
        return known
    if cfg.ray.num_cpus:
        return float(cfg.ray.num_cpus), f"the local Ray is started with ray.num_cpus={cfg.ray.num_cpus}"
    n = float(os.cpu_count() or 1)
    return n, f"the local Ray will have this machine's {n:g} CPUs (ray.num_cpus is unset)"


def check_pool(cfg, what: str, concurrency_key: str, concurrency: int, cpus_per_actor: float,
               per_actor_key: str, reads: bool) -> None:
    """ConfigError if an actor pool of `concurrency` actors (plus one CPU for Ray Data's read
    tasks, when the pool's input is read from Parquet) cannot all be placed at once: Ray Data
    would wait for them, or the reads would wait behind them, for ever."""
    known = known_cpus(cfg)
    if known is None:
        return
    have, where = known
    need = int(concurrency) * float(cpus_per_actor) + (1.0 if reads else 0.0)
    if have + 1e-9 < need:
        parts = f"{concurrency_key}={concurrency} actor(s) x {float(cpus_per_actor):g} CPU ({per_actor_key})"
        parts += " + 1 CPU for Ray Data's read tasks" if reads else ""
        raise ConfigError(f"{what} needs {need:g} CPUs at once ({parts}), but {where}; lower {concurrency_key}, "
                          "or give Ray more CPUs (ray.num_cpus)")


# --------------------------------------------------------------------------- shared checks


def _base_model(cfg) -> None:
    """base.model, when it names a local folder: it exists and holds a pipeline."""
    if cfg.base.model == "builtin" or not paths_are_workers_paths(cfg):
        return
    from raybias.diffusion.backbone import check_base_model

    check_base_model(str(cfg.base.model))


def _embedder_model(cfg, embedder: str) -> None:
    if embedder == "clip" and paths_are_workers_paths(cfg):
        from raybias.embed.clip import check_clip_model

        check_clip_model(cfg.embed.model)


def _attention(cfg) -> None:
    g = cfg.generate
    if g.attention in ("auto", "sdpa"):
        return  # always possible (and no torch import for it)
    from raybias.diffusion.sampling import check_attention

    check_attention(str(g.attention), on_cuda=float(g.num_gpus) > 0, check_installed=local_ray(cfg))


def _classifier(cfg, t, what: str) -> None:
    """A classifier trainer's config `t` (a method's train section)."""
    if t.pretrained:
        from raybias.classify.models import check_pretrained

        check_pretrained(str(t.model), str(t.pretrained))
    if t.use_gpu:
        n = int(t.num_workers)
        check_gpus(cfg, "train.use_gpu", True, n, f"for {what} ({n} Ray Train worker(s), train.num_workers, "
                   "one GPU each)", "train.use_gpu=false")


def _diffusion_generators(methods: Sequence[str]) -> List[str]:
    return [g for g in generators_needed(list(methods)) if g in GENERATORS]


# --------------------------------------------------------------------------- per stage


def check_prepare(cfg, methods: Sequence[str]) -> None:
    if cfg.data.source != "colored_digits":
        from raybias.data.sources import dataset_root

        dataset_root(cfg.data)


def check_base(cfg, methods: Sequence[str]) -> None:
    _base_model(cfg)


def check_embed(cfg, methods: Sequence[str]) -> None:
    _embedder_model(cfg, cfg.embed.embedder)
    check_gpus(cfg, "embed.num_gpus", cfg.embed.num_gpus, cfg.embed.num_gpus, "per embed actor",
               "embed.num_gpus=0")
    e = cfg.embed
    check_pool(cfg, "embed", "embed.concurrency", e.concurrency, 0.0 if e.num_gpus > 0 else 1.0,
               "embed.num_gpus=0: one CPU each", reads=True)


def check_cluster(cfg, methods: Sequence[str]) -> None:
    """Nothing to check from the config: k-means runs on the driver's CPUs over embed/vectors."""


def check_finetune(cfg, methods: Sequence[str]) -> None:
    if not any(GENERATORS[g].finetuned for g in _diffusion_generators(methods)):
        return  # `raybias finetune` has nothing to do
    _base_model(cfg)
    ft = cfg.finetune
    check_gpus(cfg, "finetune.num_gpus_per_job", ft.num_gpus_per_job, ft.num_gpus_per_job,
               "per fine-tuning job", "finetune.num_gpus_per_job=0")


def check_generate(cfg, methods: Sequence[str]) -> None:
    if not _diffusion_generators(methods):
        return
    _base_model(cfg)
    g = cfg.generate
    check_gpus(cfg, "generate.num_gpus", g.num_gpus, g.num_gpus, "per sampler actor", "generate.num_gpus=0")
    check_pool(cfg, "generate", "generate.concurrency", g.concurrency, 0.0 if g.num_gpus > 0 else g.num_cpus,
               "generate.num_cpus", reads=False)
    _attention(cfg)


def check_filter(cfg, methods: Sequence[str]) -> None:
    f = cfg.filter
    if not _diffusion_generators(methods) or not f.enabled:
        return
    from raybias.generation.scoring import member_digits, prompt_term_kind
    from raybias.stages.filter import filter_embed_options

    opts = filter_embed_options(cfg)
    embedder = opts["embedder"]
    term = prompt_term_kind(embedder, float(f.alpha), cfg.data.source)
    if term == "oracle":
        if cfg.data.class_words is not None:  # else colored_digits' own digit words
            words = [list(w) for w in cfg.data.class_words]
            member_digits(words, [f"y={y}" for y in range(len(words))])
        if paths_are_workers_paths(cfg):
            from raybias.diffusion.oracle import check_oracle_folder

            check_oracle_folder(f.oracle, key="filter.oracle" if f.oracle else None)
    if float(f.alpha) < 1 or term == "clip":  # the scorer embeds the images
        _embedder_model(cfg, embedder)
    num_gpus = float(opts.get("num_gpus") or 0)
    check_gpus(cfg, "embed.num_gpus", cfg.embed.num_gpus, num_gpus, "per filter actor (the filter embeds "
               "with the embed section's settings)", "embed.num_gpus=0")
    check_pool(cfg, "filter", "embed.concurrency", int(opts.get("concurrency") or 1), 0.0 if num_gpus > 0 else 1.0,
               "embed.num_gpus=0: one CPU each", reads=False)


def check_ddb(cfg, methods: Sequence[str]) -> None:
    """`raybias ddb`: the class-conditional model (finetune resources), its generation
    (generate resources) and the amplifier (a classifier of train.model)."""
    _base_model(cfg)
    ft, g = cfg.finetune, cfg.generate
    check_gpus(cfg, "finetune.num_gpus_per_job", ft.num_gpus_per_job, ft.num_gpus_per_job,
               "for the DDB diffusion model's training job", "finetune.num_gpus_per_job=0")
    check_gpus(cfg, "generate.num_gpus", g.num_gpus, g.num_gpus, "per DDB sampler actor", "generate.num_gpus=0")
    check_pool(cfg, "ddb generation", "generate.concurrency", g.concurrency, 0.0 if g.num_gpus > 0 else g.num_cpus,
               "generate.num_cpus", reads=False)
    _attention(cfg)
    _classifier(cfg, cfg.train, "the DDB bias amplifier")


def check_train(cfg, methods: Sequence[str]) -> None:
    """Every `methods:` entry is trained (not only train.method), each with its own train section."""
    from raybias.methods import method_config

    for method in dict.fromkeys(methods):
        _classifier(cfg, method_config(cfg, method).train, f"method {method!r}")


def check_report(cfg, methods: Sequence[str]) -> None:
    """Nothing to check: the report reads what the run wrote."""


STAGE_CHECKS: Dict[str, Callable] = {
    "prepare": check_prepare, "base": check_base, "embed": check_embed, "cluster": check_cluster,
    "finetune": check_finetune, "generate": check_generate, "filter": check_filter, "ddb": check_ddb,
    "train": check_train, "report": check_report,
}


def check_run(cfg, stages: Sequence[str], methods: Optional[Sequence[str]] = None) -> None:
    """Refuse at once (ConfigError) a config that a stage in `stages` would refuse later.

    `methods`: the `methods:` entries the stages work for (default cfg.methods; `raybias
    train` trains `train.method` alone and may pass that). Needs no Ray and no run directory.
    """
    from raybias.data.sources import DataError
    from raybias.ray_utils import ResourceError

    methods = list(cfg.methods if methods is None else methods)
    unknown = [s for s in stages if s not in STAGE_CHECKS]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}: stages are {', '.join(STAGE_CHECKS)}")
    for stage in stages:
        try:
            STAGE_CHECKS[stage](cfg, methods)
        except (DataError, ResourceError) as exc:  # the stage's own check, raised under its own class
            raise ConfigError(str(exc)) from exc


def check_sweep(cfg) -> None:
    """`raybias sweep`: sweep.gpus_per_trial, then every stage the sweep's methods need
    (the shared stages once per severity, the classifiers in trials)."""
    from raybias.stages import plan_stages

    sw = cfg.sweep
    check_gpus(cfg, "sweep.gpus_per_trial", sw.gpus_per_trial, sw.gpus_per_trial, "per sweep trial",
               "sweep.gpus_per_trial=0")
    sub = cfg.copy()
    sub.methods = list(sw.methods or cfg.methods)
    check_run(sub, plan_stages(sub))
