"""Typed config: overrides apply, and every bad value fails at load naming the key, the value
and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from raybias.config import ConfigError, config_from_dict, config_hash, load_config, with_overrides

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_yaml_and_overrides_are_merged_over_the_defaults():
    cfg = load_config(QUICKSTART, ["data.severity=0.95", "train.lr=0.01", "seeds=[4,5]",
                                   "data.source=csv", "data.root=/data/mine", "data.aligned=[1,0]"])
    assert cfg.data.severity == 0.95 and cfg.train.lr == 0.01 and list(cfg.seeds) == [4, 5]
    assert cfg.data.source == "csv" and cfg.data.root == "/data/mine" and list(cfg.data.aligned) == [1, 0]
    assert cfg.methods == ["erm", "reweight", "groupdro", "jtt", "vanilla", "lora", "dreambooth",
                           "clustered_dreambooth", "ddb_recipe1", "ddb_recipe2"]  # from the YAML
    assert cfg.data.image_size == 16 and cfg.data.image_format == "png"  # YAML, then defaults
    assert load_config(QUICKSTART, ["data.severity=original"]).data.severity == "original"


def test_config_hash_follows_the_values_of_its_sections():
    a = load_config(QUICKSTART)
    b = with_overrides(a, ["train.lr=0.5"])
    c = with_overrides(a, ["data.seed=3"])
    assert config_hash(a, ("data",)) == config_hash(b, ("data",))
    assert config_hash(a, ("data",)) != config_hash(c, ("data",))
    assert config_hash(a, ("data", "train")) != config_hash(b, ("data", "train"))


def error(overrides, path=QUICKSTART) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("override, key", [
    ("data.sevrity=0.9", "data.sevrity"),
    ("trian.lr=1", "trian"),
    ("train.stage1.betta=0.3", "train.stage1.betta"),
])
def test_unknown_keys_are_named(override, key):
    msg = error([override])
    assert f"unknown config key '{key}'" in msg and "command-line overrides" in msg


def test_unknown_key_in_the_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source: colored_digits\n  image_sise: 32\n")
    msg = error([], path)
    assert "data.image_sise" in msg and str(path) in msg


@pytest.mark.parametrize("override, key, value, allowed", [
    ("data.image_size=abc", "data.image_size", "abc", "Integer"),
    ("train.lr=fast", "train.lr", "fast", "Float"),
    ("data.aligned=[0,x]", "data.aligned[1]", "x", "Integer"),
    ("data.center_crop=maybe", "data.center_crop", "maybe", "bool"),
])
def test_wrong_types_are_named(override, key, value, allowed):
    msg = error([override])
    assert key in msg and value in msg and allowed in msg


@pytest.mark.parametrize("override, key, value, allowed", [
    ("data.severity=0", "data.severity", "0", "(0, 1]"),
    ("data.severity=1.5", "data.severity", "1.5", "(0, 1]"),
    ("data.severity=-0.1", "data.severity", "-0.1", "(0, 1]"),
    ("data.severity=often", "data.severity", "often", "'original'"),
    ("generate.per_group=-5", "generate.per_group", "-5", ">= 1"),
    ("data.shard_rows=0", "data.shard_rows", "0", ">= 1"),
    ("finetune.steps=-1", "finetune.steps", "-1", ">= 1"),
    ("seeds=[0,-1]", "seeds", "-1", ">= 0"),
    ("methods=[erm,magic]", "methods", "magic", "one of erm, reweight, groupdro"),
    ("train.method=magic", "train.method", "magic", "one of erm"),
    ("data.source=imagenet", "data.source", "imagenet", "colored_digits, celeba, waterbirds, utkface, csv"),
    ("data.image_format=gif", "data.image_format", "gif", "png, jpeg"),
    ("data.val_fraction=0.7", "data.val_fraction", "0.7", "(0, 0.5]"),
    ("data.colors=[red,mauve]", "data.colors", "mauve", "colour names among red"),
    ("data.old_ages=[3,10]", "data.old_ages", "[3, 10]", "above data.young_ages"),
    ("data.young_ages=[5,1]", "data.young_ages", "[5, 1]", "min <= max"),
    ("data.load_workers=-2", "data.load_workers", "-2", ">= 0"),
    ("data.prompt_template='a {cls}'", "data.prompt_template", "a {cls}", "{member} and {bias}"),
    ("filter.keep_fraction=0", "filter.keep_fraction", "0", "(0, 1]"),
    ("cluster.k=0", "cluster.k", "0", "'auto'"),
    ("train.stage2=best", "train.stage2", "best", "one of head, full, auto"),
    ("train.stage2_candidates=[head+erm,half+erm]", "train.stage2_candidates", "half+erm", "full+groupdro"),
    ("train.stage2_candidates=[full+erm,full+erm]", "train.stage2_candidates", "['full+erm', 'full+erm']",
     "without repeats"),
    ("train.stage2_candidates=[]", "train.stage2_candidates", "[]", "a non-empty list of head+erm"),
    ("train.stage2_rank=mean", "train.stage2_rank", "mean", "one of final, best"),
    ("train.stage1.projection=conv", "train.stage1.projection", "conv", "one of mlp, linear, none"),
    ("train.stage1.projection_dim=0", "train.stage1.projection_dim", "0", ">= 1"),
    ("train.stage1.projection_hidden=0", "train.stage1.projection_hidden", "0", ">= 1"),
    ("train.stage1.supcon_anchors=some", "train.stage1.supcon_anchors", "some", "all, with_positive"),
    ("train.stage1.base_temperature=0", "train.stage1.base_temperature", "0", "(0, 10]"),
    ("diagnostics.sample_per_group=1", "diagnostics.sample_per_group", "1", ">= 2"),
])
def test_out_of_range_values_name_key_value_and_allowed(override, key, value, allowed):
    msg = error([override])
    assert f"'{key}'" in msg and value in msg and allowed in msg, msg


def test_stage1_and_stage2_keys():
    cfg = load_config(QUICKSTART, ["train.stage2=auto", "train.stage2_candidates=[full+groupdro,head+erm]",
                                   "train.stage1.projection=linear", "train.stage1.base_temperature=null"])
    assert list(cfg.train.stage2_candidates) == ["full+groupdro", "head+erm"]
    assert cfg.train.stage1.projection == "linear" and cfg.train.stage1.base_temperature is None
    defaults = config_from_dict({}).train
    assert defaults.stage1.projection == "mlp" and defaults.stage1.projection_dim == 128  # SupContrast's head
    assert defaults.stage1.supcon_anchors == "all" and defaults.stage1.base_temperature == 0.07
    assert len(defaults.stage2_candidates) == 6
    msg = error(["train.stage1.projection=linear", "train.stage1.projection_hidden=64"])
    assert "'train.stage1.projection_hidden'" in msg and "unless train.stage1.projection=mlp" in msg


def test_dataset_specific_checks():
    msg = error(["data.source=celeba"])
    assert "'data.root'" in msg and "required for data.source=celeba" in msg
    msg = error(["data.source=celeba", "data.root=/x", "data.bias_attr=Blond_Hair"])
    assert "'data.bias_attr'" in msg and "other than data.target_attr" in msg
    msg = error(["data.class_words=[[seven],[]]"])
    assert "data.class_words[1]" in msg


def test_missing_or_broken_files_and_malformed_overrides(tmp_path):
    assert "config file not found" in error([], tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    assert "not valid YAML" in error([], bad)
    assert "not of the form key=value" in error(["data.severity"])


def test_config_from_dict_validates_too():
    with pytest.raises(ConfigError, match="data.severity"):
        config_from_dict({"data": {"severity": 2}})
    with pytest.raises(ConfigError, match="unknown config key 'data.colour'"):
        config_from_dict({"data": {"colour": "red"}})


def test_yaml_no_for_mixed_precision_means_no(tmp_path):
    """YAML 1.1 reads `no` as false; the config takes it as the string the field allows."""
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  mixed_precision: no\n")
    assert load_config(str(path)).finetune.mixed_precision == "no"
    assert load_config(str(path), ["finetune.mixed_precision=no"]).finetune.mixed_precision == "no"
    assert load_config(str(path), ["finetune.mixed_precision=bf16"]).finetune.mixed_precision == "bf16"


# --- the papers' values in the real-data configs (REFERENCES.md; docs/design.md, Methods) -----

PAPER_JTT = {  # the JTT paper (Liu et al.); UTKFace has no JTT run: CelebA's, the other face set
    "waterbirds": {"jtt_epochs": 60, "jtt_lambda": 100, "jtt_lr": 1e-5, "jtt_weight_decay": 1.0},
    "celeba": {"jtt_epochs": 1, "jtt_lambda": 50, "jtt_lr": 1e-5, "jtt_weight_decay": 0.1},
    "utkface": {"jtt_epochs": 1, "jtt_lambda": 50, "jtt_lr": 1e-5, "jtt_weight_decay": 0.1},
}


@pytest.mark.parametrize("name", sorted(PAPER_JTT))
def test_real_data_configs_use_the_papers_values(name):
    cfg = load_config(str(Path(QUICKSTART).parent / f"{name}.yaml"))
    t = cfg.train
    assert t.groupdro_eta == 0.01  # Sagawa et al.'s code and FFR
    assert {k: t[k] for k in PAPER_JTT[name]} == PAPER_JTT[name]
    assert t.jtt_optimizer == "sgd" and t.jtt_draw == "exact"
    assert cfg.data.val_protocol == "biased"  # FFR's validation protocol
    text = (Path(QUICKSTART).parent / f"{name}.yaml").read_text()
    assert "Validation protocol: FFR's" in text and "Severity rule: FFR's" in text


def test_quickstart_keeps_the_built_in_benchmark_defaults():
    cfg = load_config(QUICKSTART)
    t = cfg.train
    assert (t.groupdro_eta, t.jtt_epochs, t.jtt_lambda, t.jtt_optimizer) == (0.1, 2, 20.0, None)
    assert cfg.data.val_protocol == "untouched"
    assert "val_protocol: untouched" in Path(QUICKSTART).read_text()
