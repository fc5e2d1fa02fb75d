"""The backbone: offline tokenizer, tiny pipeline from config, save/load with stock diffusers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raybias.config import ConfigError, config_from_dict
from raybias.diffusion.backbone import (build_pipeline, builtin_folder, count_parameters, load_pipeline,
                                        resolve_base_model, save_pipeline)
from raybias.diffusion.prompts import group_prompt, group_prompts
from raybias.diffusion.sampling import sample
from raybias.diffusion.tokenizer import DIGIT_WORDS, build_tokenizer, default_words


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny") / "pipe")
    save_pipeline(build_pipeline("tiny", seed=0), folder)
    return folder


def test_tokenizer_task_words_are_single_tokens_and_round_trip():
    tok = build_tokenizer(["landbird"])
    for word in default_words() + ["landbird"]:
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("a sks green seven").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "a sks green seven"


def test_tokenizer_unknown_words_fall_back_to_bytes():
    tok = build_tokenizer()
    text = "a xylophone-shaped quokka, 42 zebras & émigré"
    pieces = tok.tokenize(text)
    assert pieces and tok.unk_token not in pieces
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    long = tok(" ".join(["quokka"] * 40), padding="max_length", truncation=True,
               max_length=tok.model_max_length).input_ids
    assert len(long) == tok.model_max_length


def test_tiny_pipeline_saves_and_loads_with_stock_diffusers(tiny_folder):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    files = set(os.listdir(tiny_folder))
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= files
    for part in ("unet", "vae", "text_encoder"):
        names = os.listdir(os.path.join(tiny_folder, part))
        assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".bin") for n in names)
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(tiny_folder, "tokenizer")))
    # the slow-tokenizer files alone make the same tokenizer
    tok = CLIPTokenizer(vocab=json.load(open(os.path.join(tiny_folder, "tokenizer", "vocab.json"))),
                        merges=[tuple(line.split()) for line in
                                open(os.path.join(tiny_folder, "tokenizer", "merges.txt")).read().splitlines()[1:]])
    assert tok.tokenize("a red seven") == ["a</w>", "red</w>", "seven</w>"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt="a red seven", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert stock.shape == (1, 16, 16, 3)
    ours = sample(pipe, ["a red seven", "a green one"], [0, 1], steps=2)
    assert [im.shape for im in ours] == [(16, 16, 3)] * 2 and ours[0].dtype == np.uint8
    # same weights as the in-memory pipeline
    fresh = build_pipeline("tiny", seed=0)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(fresh, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_load_pipeline_local_folder_and_errors(tiny_folder, tmp_path):
    pipe = load_pipeline(tiny_folder)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    with pytest.raises(ConfigError, match="base.model.*folder not found"):
        load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    # a hub id cannot be fetched offline: a clear error naming base.model
    with pytest.raises(ConfigError, match="base.model"):
        load_pipeline("nobody-raybias/not-a-model")


# The builtin backbone is built by `raybias base` (minutes of CPU); until it is shipped in
# raybias/assets/backbone these two checks of the shipped copy cannot run.
requires_shipped_backbone = pytest.mark.skipif(
    not os.path.isfile(os.path.join(builtin_folder(), "model_index.json")),
    reason="the builtin backbone is not shipped yet in raybias/assets/backbone (build: raybias base)")


@requires_shipped_backbone
def test_builtin_is_shipped_and_small():
    folder = builtin_folder()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert total < 20 * 2**20
    pipe = load_pipeline("builtin")
    assert pipe.unet.config.sample_size * 2 == 16
    params = count_parameters(pipe)
    assert 100_000 < params["unet"] < 5_000_000


def test_architectures_differ_in_size():
    tiny, small = count_parameters(build_pipeline("tiny")), count_parameters(build_pipeline("small"))
    assert tiny["unet"] < small["unet"]
    with pytest.raises(ConfigError, match="architecture"):
        build_pipeline("huge")


def test_resolve_base_model(tmp_path, tiny_folder):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run")})
    assert resolve_base_model(cfg) == "builtin"
    cfg.base.cache_dir = tiny_folder
    assert resolve_base_model(cfg) == tiny_folder
    cfg.base.model = "some/hub-id"
    assert resolve_base_model(cfg) == "some/hub-id"


class _Info:
    """The parts of DatasetInfo the prompt helpers read."""

    def __init__(self, template="a {bias} {member}"):
        self.class_words = [DIGIT_WORDS[:5], DIGIT_WORDS[5:]]
        self.bias_words = ["red", "green"]
        self.prompt_template = template
        self.n_bias = 2

    def y_a(self, group):
        return divmod(int(group), self.n_bias)


def test_group_prompts_name_members_and_are_deterministic():
    info = _Info()
    p = group_prompts(info, 3, 50, seed=7)
    assert p == group_prompts(info, 3, 50, seed=7) and p != group_prompts(info, 3, 50, seed=8)
    members = {s.split()[-1] for s in p}
    assert members == set(DIGIT_WORDS[5:])  # members of class 1 drawn at random
    assert all(s.startswith("a green ") for s in p)
    rng = np.random.default_rng(0)
    assert group_prompt(info, 2, rng, identifier="sks").startswith("a sks red ")
    assert group_prompt(info, 2, rng, bias_override="green").startswith("a green ")
    info2 = _Info("a photo of a {member} in {bias}")
    assert group_prompt(info2, 1, rng, identifier="sks").startswith("a photo of a sks ")
    info3 = _Info("{identifier} a {bias} {member}")
    assert group_prompt(info3, 0, rng).startswith("a red ")
    assert group_prompt(info3, 0, rng, identifier="zwx").startswith("zwx a red ")


def test_corpus_is_deterministic_and_matches_the_digits_format():
    from raybias.diffusion.corpus import PALETTE_NAMES, render_corpus, render_digit, usable_fonts

    assert len(usable_fonts()) >= 10
    a, b = render_corpus(40, 16, seed=3), render_corpus(40, 16, seed=3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (40, 16, 16, 3) and a.images.dtype == np.uint8
    assert set(PALETTE_NAMES) >= {"red", "green", "blue"} and a.palette == PALETTE_NAMES
    for i in range(40):
        words = a.captions[i].split()
        assert DIGIT_WORDS[a.digits[i]] in words or a.palette[a.colors[i]] in words
    gray = render_digit(7, np.random.default_rng(0))
    assert gray.shape == (8, 8) and gray.min() >= 0 and gray.max() <= 16 and gray.max() > 8


@pytest.fixture(scope="module")
def oracle():
    from raybias.diffusion.oracle import load_oracle

    return load_oracle()


def test_oracle_reads_real_colored_digits_colour_and_most_digits(oracle):
    """Domain gap: the oracle never saw handwriting; colour should transfer, digits partly."""
    from sklearn.datasets import load_digits

    from raybias.palette import COLOR_RGB
    from raybias.data.sources.colored_digits import colorize
    from raybias.diffusion.oracle import recognition_rate

    digits = load_digits()
    idx = np.arange(0, len(digits.target), 3)
    colors = np.arange(len(idx)) % len(COLOR_RGB)
    names = list(COLOR_RGB)
    images = np.stack([colorize(digits.images[i], COLOR_RGB[names[c]], 16) for i, c in zip(idx, colors)])
    rates = recognition_rate(images, digits.target[idx], np.array([oracle.palette.index(names[c]) for c in colors]),
                             oracle)
    assert rates["color"] >= 0.9
    assert rates["digit"] >= 0.4


@requires_shipped_backbone
def test_shipped_backbone_passes_the_quality_bar(oracle):
    """The shipped backbone draws the asked digit in the asked colour (>= 90 %, oracle-read)."""
    from raybias.diffusion.pretrain import quality_check, read_meta

    pipe = load_pipeline("builtin")
    guidance = float(read_meta(builtin_folder()).get("guidance", 1.0))
    q = quality_check(pipe, ["red", "green"], per_pair=4, guidances=[guidance], steps=25, oracle=oracle)
    assert q["best"]["n"] == 80
    assert q["best"]["both"] >= 0.9, q["best"]


# --- weights load as safetensors only; remote models are cached privately ---------------------

@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory):
    """The tiny pipeline saved with pickled (.bin) UNet and VAE weights."""
    folder = str(tmp_path_factory.mktemp("pickled") / "pipe")
    save_pipeline(build_pipeline("tiny", seed=0), folder)
    pipe = build_pipeline("tiny", seed=0)
    for part in ("unet", "vae"):
        for name in os.listdir(os.path.join(folder, part)):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, part, name))
        getattr(pipe, part).save_pretrained(os.path.join(folder, part), safe_serialization=False)
    return folder


def test_pickled_weights_are_refused_unless_allow_pickle(pickled_folder):
    assert any(n.endswith(".bin") for n in os.listdir(os.path.join(pickled_folder, "unet")))
    with pytest.raises(ConfigError) as err:
        load_pipeline(pickled_folder)
    msg = str(err.value)
    assert "base.model=" in msg and "no safetensors weights" in msg and "base.allow_pickle=true" in msg, msg
    # the opt-in (base.allow_pickle=true) loads them, with the same weights
    pipe = load_pipeline(pickled_folder, allow_pickle=True)
    fresh = build_pipeline("tiny", seed=0)
    a, b = fresh.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_sampler_loads_dreambooth_folders_as_safetensors_only(tmp_path, tiny_folder):
    from raybias.generation.sampler import ModelSwitcher
    from raybias.rundir import RunDir, StageFailed

    run = RunDir(str(tmp_path / "run"))
    base = load_pipeline(tiny_folder)
    tuned = build_pipeline("tiny", seed=1)
    tuned.unet.save_pretrained(run.local_path("generators/db/models/safe/unet"), safe_serialization=True)
    tuned.unet.save_pretrained(run.local_path("generators/db/models/pickled/unet"), safe_serialization=False)
    switcher = ModelSwitcher(base, run, 2, prepare=lambda pipe: None)
    switcher.activate({"kind": "dreambooth", "folder": "generators/db/models/safe", "name": "safe"})
    assert torch.equal(base.unet.state_dict()["conv_in.weight"], tuned.unet.state_dict()["conv_in.weight"])
    with pytest.raises(StageFailed, match="cannot load DreamBooth model 'pickled'.*safetensors"):
        switcher.activate({"kind": "dreambooth", "folder": "generators/db/models/pickled", "name": "pickled"})


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYBIAS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "raybias"


@pytest.fixture
def remote_model(tmp_path, tiny_folder):
    """A run directory holding base/model, read through its pyarrow filesystem."""
    import shutil

    from raybias.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    shutil.copytree(tiny_folder, run.local_path("base/model"))
    return run


def _tree(folder):
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            if not n.startswith(".raybias-fetch"):
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), folder)] = f.read()
    return out


def test_remote_models_are_cached_privately_and_verified(cache_home, remote_model, tmp_path):
    import hashlib
    import stat
    import tempfile

    from raybias.diffusion.backbone import fetch_to_local

    source = remote_model.local_path("base/model")
    # what the old code reused blindly: a folder anyone could plant at a predictable path
    key = hashlib.sha256(remote_model.path("base/model").encode()).hexdigest()[:12]
    planted = os.path.join(tempfile.gettempdir(), f"raybias-model-{key}")
    os.makedirs(planted, exist_ok=True)
    with open(os.path.join(planted, "model_index.json"), "w") as f:
        f.write('{"_class_name": "StableDiffusionPipeline", "planted": true}')
    try:
        got = fetch_to_local(remote_model, "base/model")
    finally:
        import shutil

        shutil.rmtree(planted, ignore_errors=True)
    assert got != planted and os.path.dirname(got) == str(cache_home)
    assert stat.S_IMODE(os.stat(cache_home).st_mode) == 0o700
    assert _tree(got) == _tree(source)
    assert os.path.isfile(os.path.join(got, ".raybias-fetch.json"))
    assert fetch_to_local(remote_model, "base/model") == got  # reused while it verifies

    # a copy changed after download (or planted in its place) is fetched again
    with open(os.path.join(got, "model_index.json"), "w") as f:
        f.write('{"planted": true}')
    again = fetch_to_local(remote_model, "base/model")
    assert _tree(again) == _tree(source)
    # so is one with an extra file
    with open(os.path.join(again, "unet", "extra.bin"), "wb") as f:
        f.write(b"x")
    assert _tree(fetch_to_local(remote_model, "base/model")) == _tree(source)

    # a changed source (e.g. the base model rebuilt) is a new version, fetched again
    with open(os.path.join(source, "scheduler", "scheduler_config.json"), "a") as f:
        f.write("\n")
    os.utime(os.path.join(source, "scheduler", "scheduler_config.json"), ns=(1, 1))
    newer = fetch_to_local(remote_model, "base/model")
    assert newer != got and _tree(newer) == _tree(source)
    pipe = load_pipeline(newer)
    assert pipe.unet is not None


def test_the_cache_folder_must_be_private(cache_home, remote_model, monkeypatch):
    from raybias.diffusion.backbone import fetch_to_local, private_cache_dir

    os.makedirs(cache_home.parent, exist_ok=True)
    os.mkdir(cache_home)
    os.chmod(cache_home, 0o777)  # someone could have put anything in it
    with pytest.raises(ConfigError, match="can be written by other users"):
        fetch_to_local(remote_model, "base/model")
    os.chmod(cache_home, 0o755)  # ours and not writable by others: fine, and made 0700
    assert private_cache_dir() == str(cache_home)
    assert os.stat(cache_home).st_mode & 0o777 == 0o700
    with monkeypatch.context() as m:
        m.setattr(os, "getuid", lambda: os.stat(cache_home).st_uid + 1)
        with pytest.raises(ConfigError, match="is owned by uid"):
            private_cache_dir()
    os.rmdir(cache_home)
    os.makedirs(cache_home.parent / "elsewhere")
    os.symlink(cache_home.parent / "elsewhere", cache_home)
    with pytest.raises(ConfigError, match="is a symlink"):
        private_cache_dir()
