"""Config loading: YAML + overrides, strictness, help text, round trip through config.yaml."""

import pytest
import yaml

from rufus.config import ConfigError, config_help, load_config, save_config
from rufus.trainers.sft import SFTConfig


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_win_and_round_trip(tmp_path):
    path = write(
        tmp_path, "model: m1\nlr: 1.0e-4\nbatch_size: 4\ndata:\n  train: a.jsonl\n  max_length: 128\nlora:\n  r: 8\n"
    )
    cfg = load_config(
        SFTConfig,
        path,
        ["lr=3e-5", "data.train=b.jsonl", "lora.target_modules=q_proj,v_proj", "resume=true", "output_dir=out/123"],
    )
    assert cfg.model == "m1"
    assert cfg.lr == pytest.approx(3e-5)  # "3e-5" has no dot: YAML reads a string, the float key accepts it
    assert cfg.batch_size == 4
    assert cfg.data.train == "b.jsonl" and cfg.data.max_length == 128
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.resume is True
    assert cfg.output_dir == "out/123"

    save_config(cfg, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == "b.jsonl" and saved["lora"]["r"] == 8
    again = load_config(SFTConfig, tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_string_keys_keep_override_text(tmp_path):
    cfg = load_config(SFTConfig, None, ["model=123", "data.train=2024", "resume=ckpt/step-1"])
    assert cfg.model == "123" and cfg.data.train == "2024" and cfg.resume == "ckpt/step-1"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model=m", "data.train=x", "lerning_rate=1"], "unknown key 'lerning_rate'"),
        (["model=m", "data.train=x", "data.trian=y"], "did you mean 'data.train'"),
        (["model=m", "data.train=x", "bach_size=3"], "did you mean 'batch_size'"),
        (["model=m", "data.train=x", "batch_size=eight"], "batch_size: expected int"),
        (["model=m", "data.train=x", "batch_size=2.5"], "batch_size: expected int"),
        (["model=m", "data.train=x", "lr=fast"], "lr: expected float"),
        (["model=m", "data.train=x", "progress=maybe"], "progress: expected bool"),
        (["model=m", "data.train=x", "dtype=bf16"], "dtype: 'bf16' is not one of"),
        (["model=m", "data.train=x", "lora.r=[1]"], "lora.r: expected int"),
        (["data.train=x"], "model: required"),
        (["model=m"], "data.train: required"),
        (["model=m", "data.train=x", "noequals"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, overrides)
    assert needle in str(e.value)


def test_yaml_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'data.evl'; did you mean 'data.eval'"):
        load_config(SFTConfig, write(tmp_path, "model: m\ndata:\n  train: x\n  evl: y\n"))
    with pytest.raises(ConfigError, match="warmup_steps: expected int, got str"):
        load_config(SFTConfig, write(tmp_path, "model: m\ndata: {train: x}\nwarmup_steps: ten\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_dotted_yaml_keys_and_dict_defaults():
    cfg = load_config(SFTConfig, None, ["data.max_prompt_length=null"], defaults={"model": "m", "data.train": "t"})
    assert cfg.data.train == "t" and cfg.data.max_prompt_length is None
    cfg = load_config(SFTConfig, None, [], defaults={"model": "m", "data": {"train": "t", "eval": "e"}})
    assert cfg.data.eval == "e"


def test_help_lists_every_key_with_type_default_and_doc():
    text = config_help(SFTConfig)
    for key in [
        "model",
        "tokenizer",
        "output_dir",
        "seed",
        "max_steps",
        "batch_size",
        "grad_accum",
        "lr",
        "dtype",
        "data.train",
        "data.eval",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
    ]:
        line = next((ln for ln in text.splitlines() if ln.split() and ln.split()[0] == key), None)
        assert line is not None, key
        assert len(line.split()) >= 4, line  # key, type, default, doc
    assert "auto|float32|bfloat16" in text


def test_open_mappings_take_dotted_keys_and_merge_over_defaults(tmp_path):
    """A dict[str, Any] field (the pipeline's stage settings) takes `stage.a.b=value` overrides,
    nested by the dots, merged over the YAML and the defaults rather than replacing them."""
    from dataclasses import dataclass
    from typing import Any

    from rufus.config import ConfigError, load_config, opt

    @dataclass
    class Staged:
        rl: dict[str, Any] = opt({}, "stage settings")
        lr: float = opt(1.0, "a plain key")

    path = tmp_path / "p.yaml"
    path.write_text("rl:\n  kl: {target: 6}\n  batch_size: 8\n")
    cfg = load_config(
        Staged,
        path,
        ["rl.kl.coef=0", "rl.algo=grpo", "lr=2"],
        defaults={"rl": {"algo": "ppo", "kl": {"coef": 0.1}, "max_steps": 100}},
    )
    assert cfg.rl == {"algo": "grpo", "kl": {"coef": 0, "target": 6}, "max_steps": 100, "batch_size": 8}
    assert cfg.lr == 2.0
    with pytest.raises(ConfigError, match="unknown key 'rll.a'; did you mean 'rl'"):
        load_config(Staged, None, ["rll.a=1"])
    with pytest.raises(ConfigError, match="unknown key 'lr.x'"):
        load_config(Staged, None, ["lr.x=1"])  # a plain key has no inside


@pytest.mark.parametrize(
    "old, new, cls",
    [
        ("grpo.iterations", "grpo.epochs", "rufus.trainers.grpo:GRPOConfig"),
        ("rloo.k", "rloo.group_size", "rufus.trainers.rloo:RLOOConfig"),
        ("bon.n", "bon.group_size", "rufus.trainers.bon:BoNConfig"),
    ],
)
def test_a_renamed_key_names_its_new_name(old, new, cls):
    import importlib

    module, name = cls.split(":")
    config_cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=f"unknown key '{old}': it was renamed; did you mean '{new}'"):
        load_config(config_cls, overrides=[f"{old}=2", "model=m", "data.train=t"])
    section, key = old.split(".")
    with pytest.raises(ConfigError, match=f"did you mean '{new}'"):  # nested, as a YAML file or dict holds it
        load_config(config_cls, defaults={"model": "m", section: {key: 2}})
    assert load_config(config_cls, overrides=[f"{new}=2", "model=m", "data.train=t"]) is not None
