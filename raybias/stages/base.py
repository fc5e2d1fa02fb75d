"""Stage `base`: build the embedded backbone, or check that a diffusers model loads.

base.model=builtin: render the font corpus, train the oracle on it, pretrain the backbone
(VAE, then UNet + text encoder) and run the quality check (the oracle reads digit and
colour of generations for every check colour x digit, per guidance scale). The work runs
in one Ray task (on a GPU node when the cluster has one). Writes:

    base/model/             the rebuilt StableDiffusionPipeline (or into base.cache_dir)
    base/oracle/            the oracle trained on the same corpus
    base/quality.json       recognition rates per guidance, the best guidance, timings
    base/samples.png        one generation per (colour, digit) at the best guidance
    base/guidance.png       recognition vs guidance scale
    base/corpus.png         a sample of the rendered corpus
    base/loss.png           VAE and UNet training losses

Later stages of the run use the rebuilt copy (see `resolve_base_model`). The shipped
backbone in raybias/assets/ was made by this stage with the default settings.

Any other base.model (hub id or folder): load it in a Ray task and record its components
in base/model_info.json, so a wrong id fails here and not in the middle of fine-tuning.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict

import numpy as np

from raybias.console import say
from raybias.layout import (BASE_CORPUS_PNG, BASE_DIR, BASE_GUIDANCE_PNG, BASE_KEY, BASE_LOSS_PNG, BASE_MODEL_DIR,
                            BASE_MODEL_INFO, BASE_ORACLE_DIR, BASE_QUALITY, BASE_SAMPLES_PNG)
from raybias.methods import BASE
from raybias.ray_utils import cluster_gpus, cpus_available, init_ray
from raybias.rundir import RunDir, StageFailed

BUILTIN_SIZE = 16  # the builtin backbone's native image size
QUALITY_BAR = 0.90


def _settings(cfg):
    from raybias.diffusion.pretrain import PretrainSettings

    b = cfg.base
    return PretrainSettings(arch=b.arch, steps=int(b.steps), batch_size=int(b.batch_size), lr=float(b.lr),
                            ema_decay=float(b.ema_decay), vae_steps=int(b.vae_steps),
                            cond_drop=float(b.cond_drop), train_text_encoder=bool(b.train_text_encoder),
                            seed=int(b.seed))


def build_builtin(base_cfg: Dict[str, Any], run_spec: str, progress: bool = True) -> Dict[str, Any]:
    """The whole builtin recipe; runs inside a Ray task. Returns the quality summary."""
    import torch

    from raybias.config import config_from_dict
    from raybias.diffusion.corpus import render_corpus
    from raybias.diffusion.oracle import save_oracle, train_oracle
    from raybias.diffusion.backbone import MODEL_INDEX
    from raybias.diffusion.pretrain import pretrain, quality_check, save_backbone

    cfg = config_from_dict({"base": base_cfg})
    b = cfg.base
    run = RunDir(run_spec)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    timings: Dict[str, float] = {}
    t0 = time.time()
    corpus = render_corpus(int(b.corpus_size), BUILTIN_SIZE, seed=int(b.seed), progress=progress)
    timings["render"] = time.time() - t0
    t0 = time.time()
    oracle, oracle_metrics = train_oracle(corpus, epochs=int(b.oracle_epochs), seed=int(b.seed),
                                          progress=progress)
    timings["oracle"] = time.time() - t0
    settings = _settings(cfg)
    result = pretrain(corpus, settings, image_size=BUILTIN_SIZE, progress=progress)
    timings.update({f"pretrain_{k}": v for k, v in result.seconds.items()})
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result.pipe.to(device)
    quality = quality_check(result.pipe, list(b.check_colors), per_pair=int(b.check_per_pair),
                            guidances=[float(g) for g in b.check_guidance], steps=int(b.check_steps),
                            oracle=oracle, seed=int(b.seed))
    result.pipe.to("cpu")
    timings["quality_check"] = time.time() - t0
    if b.cache_dir:  # a folder of the user's outside the run: staged beside it, renamed into place
        target = os.path.expanduser(b.cache_dir)
        staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        save_backbone(result, staging, corpus, settings, quality)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        model_where = target
    else:
        with run.publishing(BASE_MODEL_DIR, last=MODEL_INDEX) as folder:
            save_backbone(result, folder, corpus, settings, quality)
        model_where = run.path(BASE_MODEL_DIR)
    with run.publishing(BASE_ORACLE_DIR) as folder:
        save_oracle(oracle, folder, oracle_metrics)
    best = f"{quality['best_guidance']:g}"
    return {
        "model": model_where,
        "quality": {k: v for k, v in quality.items() if not k.startswith("_")},
        "best_images": quality["_images"][best],
        "corpus_images": corpus.images[:48],
        "corpus_captions": corpus.captions[:48],
        "losses": result.losses,
        "oracle": oracle_metrics,
        "timings": timings,
        "scaling_factor": result.scaling_factor,
        "device": device,
    }


def check_external(model: str, revision, run_spec: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """Load a hub id / folder as a StableDiffusionPipeline; runs inside a Ray task."""
    from raybias.diffusion.backbone import count_parameters, load_pipeline
    from raybias.diffusion.sampling import default_size

    t0 = time.time()
    pipe = load_pipeline(model, revision=revision, allow_pickle=allow_pickle)
    info = {
        "model": model, "revision": revision, "load_seconds": time.time() - t0,
        "components": {name: type(getattr(pipe, name)).__name__
                       for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
        "parameters": count_parameters(pipe), "image_size": default_size(pipe),
        "tokenizer_max_length": int(pipe.tokenizer.model_max_length),
    }
    RunDir(run_spec).write_json(BASE_MODEL_INFO, info)
    return info


def _remote(fn, cfg):
    """Run `fn` as one Ray task sized to a GPU if the cluster has one, else the CPUs."""
    import ray

    gpus = 1 if cluster_gpus() >= 1 else 0
    cpus = max(1, int(min(cpus_available(), 8))) if not gpus else 1
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(fn)


def format_quality(quality: Dict[str, Any]) -> str:
    lines = [f"{'guidance':>9}{'digit':>8}{'colour':>8}{'both':>8}{'worst pair':>12}{'img/s':>8}"]
    for g, r in quality["by_guidance"].items():
        lines.append(f"{g:>9}{r['digit']:>8.1%}{r['color']:>8.1%}{r['both']:>8.1%}{r['worst_pair']:>12.1%}"
                     f"{r['images_per_s']:>8.1f}")
    best = quality["best"]
    verdict = "PASS" if best["both"] >= QUALITY_BAR else "FAIL"
    lines.append(f"best guidance {quality['best_guidance']:g}: digit and colour read right in "
                 f"{best['both']:.1%} of {best['n']} generations ({', '.join(quality['colors'])} x 10 digits, "
                 f"{quality['per_pair']} each) -> {verdict} (bar {QUALITY_BAR:.0%})")
    return "\n".join(lines)


def _plots(run: RunDir, out: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raybias.diffusion.pretrain import sample_grid
    from raybias.diffusion.tokenizer import DIGIT_WORDS

    q = out["quality"]
    per_pair = q["per_pair"]
    images = out["best_images"]
    firsts = images[::per_pair]
    fig = sample_grid(firsts, len(q["colors"]), 10, row_labels=q["colors"], col_labels=DIGIT_WORDS,
                      title=f"builtin backbone, guidance {q['best_guidance']:g}, {q['steps']} {q['scheduler']} steps")
    run.write_figure(BASE_SAMPLES_PNG, fig)
    plt.close(fig)
    fig = sample_grid(out["corpus_images"], 4, 12, title="rendered font corpus (sample)")
    run.write_figure(BASE_CORPUS_PNG, fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    gs = [float(g) for g in q["by_guidance"]]
    for key in ("digit", "color", "both"):
        ax.plot(gs, [q["by_guidance"][f"{g:g}"][key] for g in gs], marker="o", label=key)
    ax.axhline(QUALITY_BAR, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("oracle recognition")
    ax.set_ylim(0, 1.02)
    ax.legend()
    run.write_figure(BASE_GUIDANCE_PNG, fig)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("vae", "unet")):
        curve = np.asarray(out["losses"].get(key, []), dtype=float)
        if len(curve):
            k = max(1, len(curve) // 100)
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax.plot(smooth)
            ax.set_yscale("log")
        ax.set_title(f"{key} loss")
        ax.set_xlabel("step")
    run.write_figure(BASE_LOSS_PNG, fig)
    plt.close(fig)


def run_base(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Any]:
    """`raybias base`: returns the stage summary (also stored in the manifest)."""
    from omegaconf import OmegaConf

    builtin = cfg.base.model == "builtin"
    st = run.stage(BASE_KEY, cfg, BASE, mode, owns=(BASE_DIR,),
                   outputs=(BASE_MODEL_DIR, BASE_ORACLE_DIR, BASE_QUALITY) if builtin and not cfg.base.cache_dir
                   else (BASE_ORACLE_DIR, BASE_QUALITY) if builtin else (BASE_MODEL_INFO,))
    if st.skip:
        summary = st.record_info
        if verbose:
            say(f"base: already built in {run.uri} (--resume)")
        return summary
    import ray

    init_ray(cfg)
    if builtin:
        task = _remote(build_builtin, cfg)
        try:
            out = ray.get(task.remote(OmegaConf.to_container(cfg.base, resolve=True), run.spec(),
                                      progress=verbose))
        except ray.exceptions.RayTaskError as exc:
            raise StageFailed(f"base: building the builtin backbone failed: {exc.cause!r}") from exc
        quality = out["quality"]
        run.write_json(BASE_QUALITY, {"quality": quality, "oracle": out["oracle"], "timings": out["timings"],
                                 "model": out["model"], "scaling_factor": out["scaling_factor"],
                                 "device": out["device"]})
        _plots(run, out)
        summary = {"model": out["model"], "best_guidance": quality["best_guidance"],
                   "recognition": quality["best"]["both"], "timings": out["timings"]}
        if verbose:
            t = out["timings"]
            say(f"rendered {cfg.base.corpus_size} corpus images in {t['render']:.1f}s; oracle held-out "
                f"digit {out['oracle']['heldout_digit_acc']:.1%}, colour {out['oracle']['heldout_color_acc']:.1%}")
            say(f"pretrained VAE {t['pretrain_vae']:.0f}s + UNet {t['pretrain_unet']:.0f}s on {out['device']}")
            say(format_quality(quality))
            say(f"backbone written to {out['model']}; later stages of this run use it "
                f"(plots in {run.path(BASE_DIR)})")
    else:
        task = _remote(check_external, cfg)
        try:
            info = ray.get(task.remote(cfg.base.model, cfg.base.revision, run.spec(), bool(cfg.base.allow_pickle)))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            from raybias.config import ConfigError

            if isinstance(cause, ConfigError):
                raise ConfigError(str(cause)) from exc
            raise StageFailed(f"base: loading base.model={cfg.base.model!r} failed: {cause!r}") from exc
        summary = {"model": cfg.base.model, "parameters": info["parameters"]}
        if verbose:
            params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in info["parameters"].items())
            say(f"base.model={cfg.base.model} loads as a StableDiffusionPipeline ({params}; "
                f"{info['image_size']} px) in {info['load_seconds']:.1f}s")
    st.finish(summary)
    return summary
