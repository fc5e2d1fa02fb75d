"""Shared fixtures: one real local Ray per test session, and a prepared colored_digits run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, small object store), started once for the whole session."""
    import ray

    from raybias.config import config_from_dict
    from raybias.ray_utils import init_ray

    init_ray(config_from_dict({"ray": {"num_cpus": 2, "object_store_mb": 400}}), quiet=True)
    yield ray
    ray.shutdown()


def small_config(tmp_path, **sections):
    """A validated config for the built-in data with a run_dir under tmp_path."""
    from raybias.config import config_from_dict

    values = {"run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2, "object_store_mb": 400}}
    for k, v in sections.items():
        values[k] = v
    return config_from_dict(values)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, ray_session):
    """colored_digits at severity 0.95, prepared once: (cfg, run, info)."""
    from raybias.rundir import RunDir
    from raybias.stages.prepare import run_prepare

    tmp = tmp_path_factory.mktemp("prepared")
    cfg = small_config(tmp, data={"severity": 0.95, "image_size": 16})
    run = RunDir(cfg.run_dir)
    info = run_prepare(cfg, run, verbose=False)
    return cfg, run, info


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory, prepared_run):
    """A copy of prepared_run with the embed stage done (built-in embedder): (cfg, run, info).

    A copy, so that stages run on it never change the shared prepared run.
    """
    import shutil

    from raybias.rundir import RunDir
    from raybias.stages.embed import run_embed

    _, source, info = prepared_run
    tmp = tmp_path_factory.mktemp("embedded")
    shutil.copytree(source.root, tmp / "run")
    cfg = small_config(tmp, data={"severity": 0.95, "image_size": 16})
    run = RunDir(cfg.run_dir)
    run_embed(cfg, run, verbose=False)
    return cfg, run, info


@pytest.fixture(scope="session")
def tiny_base_folder(tmp_path_factory):
    """A tiny random-weight Stable Diffusion pipeline saved with save_pretrained (the base model)."""
    from raybias.diffusion.backbone import build_pipeline, save_pipeline

    folder = str(tmp_path_factory.mktemp("tiny_base") / "pipe")
    save_pipeline(build_pipeline("tiny", seed=0), folder)
    return folder


def save_tiny_clip(folder) -> str:
    """A tiny random CLIP (model, offline tokenizer, image processor) saved to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from raybias.diffusion.tokenizer import build_tokenizer

    tok = build_tokenizer(model_max_length=16)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")
