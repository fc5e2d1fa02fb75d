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
