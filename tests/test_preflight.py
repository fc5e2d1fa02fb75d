"""Fail before the work, not after it: `raybias.stages.preflight.check_run` refuses at once what a
stage would refuse later, with the stage's own message (one ConfigError naming the key)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_config
from raybias.config import ConfigError
from raybias.stages.preflight import check_run, check_sweep

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
GEN_METHODS = ["erm", "vanilla", "lora"]


@pytest.fixture(autouse=True)
def no_live_ray(monkeypatch):
    """GPU counts come from the config (a local Ray to be started), never from a Ray that
    another test of the session left running, nor from RAY_ADDRESS."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def cfg_of(tmp_path, **sections):
    return small_config(tmp_path, **sections)


def refuses(cfg, stages, match):
    with pytest.raises(ConfigError, match=match):
        check_run(cfg, stages)


def refuses_sweep(cfg, match):
    with pytest.raises(ConfigError, match=match):
        check_sweep(cfg)


# --------------------------------------------------------------------------- the example


def test_cli_run_refuses_a_filter_without_class_prompt_scorer_before_any_work(tmp_path):
    from fixtures_data import make_csv

    exe = Path(sys.executable).with_name("raybias")
    if not exe.exists():
        pytest.skip(f"no raybias console script next to {sys.executable}")
    fx = make_csv(tmp_path / "data")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    proc = subprocess.run([str(exe), "run", QUICKSTART, "data.source=csv", f"data.root={fx.root}",
                           "methods=[erm,groupdro,vanilla,lora]", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    took = time.time() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert lines and lines[-1].startswith("raybias: error:"), proc.stderr
    last = lines[-1]
    assert "filter.alpha=0.5" in last and "'builtin'" in last and "data.source='csv'" in last, last
    assert "filter.embedder=clip" in last  # what to change
    assert took < 20, f"took {took:.1f}s"
    for rel in ("data/real", "embed", "generators", "synthetic", "classifiers"):
        assert not (run_dir / rel).exists(), f"{rel} was written"


# --------------------------------------------------------------------------- filter


def test_filter_needs_a_class_prompt_scorer(tmp_path):
    csv = {"source": "csv", "root": str(tmp_path)}
    refuses(cfg_of(tmp_path, data=csv, methods=GEN_METHODS), ["filter"], r"filter\.alpha=0\.5 .*data\.source='csv'")
    # alpha 0, a disabled filter, CLIP, the oracle on colored_digits, or no generator: nothing to refuse
    check_run(cfg_of(tmp_path, data=csv, methods=GEN_METHODS, filter={"alpha": 0.0}), ["filter"])
    check_run(cfg_of(tmp_path, data=csv, methods=GEN_METHODS, filter={"enabled": False}), ["filter"])
    check_run(cfg_of(tmp_path, data=csv, methods=GEN_METHODS, filter={"embedder": "clip"},
                     embed={"model": str(tmp_path)}), ["filter"])
    check_run(cfg_of(tmp_path, methods=GEN_METHODS), ["filter"])
    check_run(cfg_of(tmp_path, data=csv, methods=["erm", "groupdro"]), ["filter"])
    assert not os.path.exists(tmp_path / "run")  # no run directory, no Ray


def test_filter_oracle_reads_digit_words_only(tmp_path):
    words = [["cat", "zero"], ["five"]]
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, data={"class_words": words}), ["filter"],
            r"\['cat'\] \(data\.class_words\[0\]\) that are not digit words")
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, data={"class_words": [["one", "two"], ["nine"]]}), ["filter"])


def test_filter_oracle_folder_must_hold_an_oracle(tmp_path):
    empty = tmp_path / "no-oracle"
    empty.mkdir()
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, filter={"oracle": str(empty)}), ["filter"],
            r"config key 'filter\.oracle' has value .*no-oracle.*oracle weights missing")
    # Ray Client: the folder is the workers' and is not looked for here
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, filter={"oracle": str(empty)},
                     ray={"address": "ray://head:10001"}), ["filter"])


# --------------------------------------------------------------------------- local model folders


def test_base_model_folder_must_exist_and_hold_a_pipeline(tmp_path):
    missing = str(tmp_path / "missing")
    for stages in (["base"], ["finetune"], ["generate"], ["ddb"]):
        refuses(cfg_of(tmp_path, methods=GEN_METHODS, base={"model": missing}), stages,
                r"base\.model=.*missing.*folder not found")
    not_a_pipeline = tmp_path / "plain"
    not_a_pipeline.mkdir()
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, base={"model": str(not_a_pipeline)}), ["generate"],
            r"no model_index\.json")
    # a hub id cannot be checked offline; the classifier baselines never load the base model
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, base={"model": "org/model"}), ["base", "finetune", "generate"])
    check_run(cfg_of(tmp_path, methods=["erm"], base={"model": missing}), ["finetune", "generate", "train"])


def test_clip_model_folder_must_exist(tmp_path):
    missing = str(tmp_path / "clip")
    refuses(cfg_of(tmp_path, embed={"embedder": "clip", "model": missing}), ["embed"],
            r"config key 'embed\.model' has value .*clip.*folder not found")
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, filter={"embedder": "clip"}, embed={"model": missing}),
            ["filter"], r"embed\.model")
    check_run(cfg_of(tmp_path, embed={"embedder": "clip", "model": "openai/clip-vit-base-patch32"}), ["embed"])
    check_run(cfg_of(tmp_path, embed={"embedder": "clip", "model": str(tmp_path)}), ["embed"])


def test_data_root_must_exist(tmp_path):
    refuses(cfg_of(tmp_path, data={"source": "csv", "root": str(tmp_path / "nowhere")}), ["prepare"],
            r"data\.root .*nowhere.* does not exist")
    check_run(cfg_of(tmp_path, data={"source": "csv", "root": str(tmp_path)}), ["prepare"])
    check_run(cfg_of(tmp_path), ["prepare"])  # colored_digits reads no folder


# --------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("stage,section,key", [
    ("embed", "embed", "num_gpus"), ("filter", "embed", "num_gpus"),
    ("finetune", "finetune", "num_gpus_per_job"), ("generate", "generate", "num_gpus"),
    ("ddb", "finetune", "num_gpus_per_job"), ("ddb", "generate", "num_gpus"),
])
def test_gpu_requests_beyond_the_local_ray_are_refused(tmp_path, stage, section, key):
    cfg = cfg_of(tmp_path, methods=GEN_METHODS, ray={"num_cpus": 2, "num_gpus": 0}, **{section: {key: 1.0}})
    refuses(cfg, [stage], rf"config key '{section}\.{key}' has value 1\.0.*ray\.num_gpus=0.*{section}\.{key}=0")
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray={"num_cpus": 2, "num_gpus": 1}, **{section: {key: 1.0}}),
              [stage])
    # an existing cluster's GPUs are not known before joining it
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray={"address": "auto"}, **{section: {key: 1.0}}), [stage])


def test_train_gpus_count_one_per_worker_for_every_method(tmp_path, monkeypatch):
    import raybias.stages.preflight as preflight

    one_gpu = {"num_cpus": 2, "num_gpus": 1}
    cfg = cfg_of(tmp_path, methods=["erm", "vanilla"], ray=one_gpu, train={"use_gpu": True, "num_workers": 2})
    refuses(cfg, ["train"], r"config key 'train\.use_gpu' has value True.*2 GPU\(s\).*method 'erm'")
    refuses(cfg, ["ddb"], r"train\.use_gpu.*DDB bias amplifier")
    check_run(cfg_of(tmp_path, ray=one_gpu, train={"use_gpu": True, "num_workers": 1}), ["train"])
    # every `methods:` entry is checked with its own train section, not train.method alone
    seen = []
    monkeypatch.setattr(preflight, "_classifier", lambda cfg, t, what: seen.append((what, t.method, t.generator)))
    check_run(cfg_of(tmp_path, methods=["erm", "jtt", "lora", "ddb_recipe1"], train={"method": "groupdro"}), ["train"])
    assert [(w, m) for w, m, _ in seen] == [("method 'erm'", "erm"), ("method 'jtt'", "jtt"),
                                            ("method 'lora'", "two_stage"), ("method 'ddb_recipe1'", "ddb_recipe1")]
    assert seen[2][2] == "lora"


def test_gpus_found_on_this_machine_count_when_ray_num_gpus_is_unset(tmp_path, monkeypatch):
    import raybias.stages.preflight as preflight

    monkeypatch.setattr(preflight, "_detected_gpus", lambda: 0.0)
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, generate={"num_gpus": 1.0}), ["generate"],
            r"generate\.num_gpus.*0 GPU\(s\) found on this machine")
    monkeypatch.setattr(preflight, "_detected_gpus", lambda: None)  # unknown: the stage's require_gpus decides
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, generate={"num_gpus": 1.0}), ["generate"])


def test_sweep_checks_its_trials_gpus_and_every_stage_of_its_methods(tmp_path):
    refuses_sweep(cfg_of(tmp_path, ray={"num_cpus": 2, "num_gpus": 0}, sweep={"gpus_per_trial": 1.0}),
                  r"config key 'sweep\.gpus_per_trial' has value 1\.0")
    csv = {"source": "csv", "root": str(tmp_path)}
    refuses_sweep(cfg_of(tmp_path, data=csv, methods=["erm"], sweep={"methods": ["erm", "vanilla"]}),
                  r"filter\.alpha")
    check_sweep(cfg_of(tmp_path, data=csv, methods=["erm"], sweep={"methods": ["erm", "groupdro"]}))


# --------------------------------------------------------------------------- attention, pretrained weights


def test_xformers_attention_needs_a_gpu(tmp_path):
    remote = {"address": "ray://head:10001"}  # the workers' xformers install is not looked for here
    refuses(cfg_of(tmp_path, methods=GEN_METHODS, ray=remote, generate={"attention": "xformers"}), ["generate"],
            r"generate\.attention=xformers needs the model on a CUDA GPU")
    refuses(cfg_of(tmp_path, methods=["ddb_recipe1"], ray=remote, generate={"attention": "xformers"}), ["ddb"],
            r"generate\.attention=xformers")
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray=remote, generate={"attention": "xformers", "num_gpus": 1}),
              ["generate"])


def test_pretrained_weights_must_be_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = cfg_of(tmp_path, methods=["erm", "groupdro"], train={"model": "resnet18", "pretrained": "imagenet"})
    refuses(cfg, ["train"], r"train\.pretrained=imagenet .*resnet18.*does not exist")
    refuses(cfg, ["ddb"], r"train\.pretrained=imagenet")
    from raybias.classify.models import cached_weights_path

    path = Path(cached_weights_path("resnet18"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    check_run(cfg, ["train"])


def test_unknown_stage_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        check_run(cfg_of(tmp_path), ["prepare", "finetunes"])


# --------------------------------------------------------------------------- CPUs for actor pools

@pytest.mark.parametrize("stage,overrides,words", [
    ("embed", {"ray": {"num_cpus": 1}}, r"embed needs 2 CPUs at once \(embed\.concurrency=1 .* read tasks\)"),
    ("embed", {"ray": {"num_cpus": 2}, "embed": {"concurrency": 2}}, r"embed needs 3 CPUs"),
    ("generate", {"ray": {"num_cpus": 2}, "generate": {"concurrency": 3}},
     r"generate needs 3 CPUs at once \(generate\.concurrency=3 actor\(s\) x 1 CPU"),
    ("generate", {"ray": {"num_cpus": 2}, "generate": {"concurrency": 1, "num_cpus": 4}}, r"generate needs 4 CPUs"),
    ("filter", {"ray": {"num_cpus": 1}, "embed": {"concurrency": 2}}, r"filter needs 2 CPUs"),
    ("ddb", {"ray": {"num_cpus": 1}, "generate": {"concurrency": 2}}, r"ddb generation needs 2 CPUs"),
])
def test_actor_pools_that_cannot_all_be_placed_are_refused_naming_the_keys(tmp_path, stage, overrides, words):
    """Ray Data would wait for ever for actors (or reads) that the CPUs cannot place."""
    cfg = cfg_of(tmp_path, methods=GEN_METHODS, **overrides)
    refuses(cfg, [stage], words + r".*ray\.num_cpus")


def test_actor_pools_that_fit_pass_and_a_gpu_pool_needs_only_the_readers_cpu(tmp_path):
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray={"num_cpus": 2}, embed={"concurrency": 1},
                     generate={"concurrency": 2}), ["embed", "generate", "filter"])
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray={"num_cpus": 1, "num_gpus": 2},
                     embed={"concurrency": 2, "num_gpus": 1.0}), ["embed"])
    # an existing cluster's CPUs are not known before joining it (it may autoscale)
    check_run(cfg_of(tmp_path, methods=GEN_METHODS, ray={"address": "auto"}, generate={"concurrency": 64}),
              ["generate"])
