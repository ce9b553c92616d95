"""Config loading: YAML + overrides, strictness, help text, round trip through config.yaml."""

import re

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
    "old, new, about, cls",
    [
        ("grpo.iterations", "grpo.epochs", "int, >= 1", "rufus.trainers.grpo:GRPOConfig"),
        ("rloo.k", "rloo.group_size", "int, >= 2", "rufus.trainers.rloo:RLOOConfig"),
        ("bon.n", "bon.group_size", "int, >= 1", "rufus.trainers.bon:BoNConfig"),
    ],
)
def test_a_renamed_key_names_its_new_name_type_and_range(old, new, about, cls):
    import importlib

    module, name = cls.split(":")
    config_cls = getattr(importlib.import_module(module), name)
    message = f"unknown key '{old}': it was renamed; use '{new}' ({about})"
    with pytest.raises(ConfigError) as e:
        load_config(config_cls, overrides=[f"{old}=2", "model=m", "data.train=t"])
    assert str(e.value) == message
    section, key = old.split(".")
    with pytest.raises(ConfigError) as e:  # nested, as a YAML file or dict holds it
        load_config(config_cls, defaults={"model": "m", section: {key: 2}})
    assert str(e.value) == message
    assert load_config(config_cls, overrides=[f"{new}=2", "model=m", "data.train=t"]) is not None


# --- ranges --------------------------------------------------------------------------------------


def every_config_class() -> dict[str, type]:
    """The config class of every command: the command table's, the classic agents' and the studio's."""
    import importlib

    from rufus.classic import ALGOS
    from rufus.commands import COMMANDS
    from rufus.studio.commands import COMMANDS as STUDIO
    from rufus.studio.commands import TOP_COMMANDS

    out = {name: getattr(importlib.import_module(module), cls) for name, (module, cls, _, _) in COMMANDS.items()}
    out |= {f"classic {n}": getattr(importlib.import_module(m), cls) for n, (m, cls, _) in ALGOS.items()}
    out |= {f"studio {name}": entry[0] for name, entry in {**STUDIO, **TOP_COMMANDS}.items()}
    return out


def fields_of(cls: type, prefix: str = ""):
    """(dotted key, type, field) of every key of `cls`, nested sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from fields_of(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, f


def number_type(tp) -> tuple[type, bool]:
    """(int or float, whether the key is a list of them) of a bounded key's type (None allowed)."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not list else []
    if len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def range_cases(cls: type):
    """(key, value, inside) around each bound of every bounded key of `cls`: just outside each bound
    (the bound itself when it is exclusive), and the bound itself when it is inclusive."""
    for key, tp, f in fields_of(cls):
        kind, is_list = number_type(tp)
        if not any(b in f.metadata for b in ("ge", "gt", "le", "lt")):
            continue
        assert kind in (int, float), (key, tp)
        step = 1 if kind is int else 1e-3
        for bound, sign in (("ge", -1), ("gt", -1), ("le", 1), ("lt", 1)):
            if bound not in f.metadata:
                continue
            b = f.metadata[bound]
            if bound in ("ge", "le"):
                yield key, is_list, kind(b + sign * step), False
                yield key, is_list, kind(b), True
            else:
                yield key, is_list, kind(b), False
                yield key, is_list, kind(b - sign * step), True


def required_overrides(cls: type) -> list[str]:
    """A placeholder for every required key (all of them strings)."""
    from rufus.config import REQUIRED

    out = []
    for key, tp, f in fields_of(cls):
        if f.default is REQUIRED:
            assert tp is str, key
            out.append(f"{key}=x")
    return out


def test_every_bounded_key_refuses_values_outside_its_range_and_takes_its_bounds():
    """Every command's every bounded key, from the command line (load_config) and on a config object
    made in Python (as_config): just outside a bound is an error naming the key, the range and the
    value; an inclusive bound itself is accepted."""
    import dataclasses

    from rufus.config import as_config, range_text

    checked = 0
    for command, cls in every_config_class().items():
        required = required_overrides(cls)
        for key, is_list, value, inside in range_cases(cls):
            text = f"[{value}]" if is_list else str(value)
            name = f"{key}[0]" if is_list else key
            meta = dict(next(f for k, _, f in fields_of(cls) if k == key).metadata)
            if inside:
                cfg = load_config(cls, None, [*required, f"{key}={text}"])
                *path, last = key.split(".")
                owner = cfg
                for part in path:
                    owner = getattr(owner, part)
                assert getattr(owner, last) == ([value] if is_list else value), (command, key)
                continue
            with pytest.raises(ConfigError) as e:
                load_config(cls, None, [*required, f"{key}={text}"])
            assert str(e.value) == f"{name}: must be {range_text(meta)}, got {value}", (command, key)
            # the same value set on a valid config object: as_config refuses it too
            cfg = load_config(cls, None, required)
            *path, last = key.split(".")
            owner = cfg
            for part in path:
                owner = getattr(owner, part)
            object.__setattr__(owner, last, [value] if is_list else value)
            assert dataclasses.is_dataclass(cfg)
            with pytest.raises(ConfigError, match="^" + re.escape(f"{name}: must be {range_text(meta)}, got ")):
                as_config(cls, cfg)
            checked += 1
    assert checked > 150  # every command's ranges were walked, not an empty list


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lr=-1"], "lr: must be > 0, got -1.0"),
        (["batch_size=0"], "batch_size: must be >= 1, got 0"),
        (["data.max_length=0"], "data.max_length: must be >= 1, got 0"),
        (["lora.dropout=1"], "lora.dropout: must be in [0, 1), got 1.0"),
        (["max_steps=-2"], "max_steps: must be >= -1, got -2"),
        (["lr=.nan"], "lr: must be > 0, got nan"),
    ],
)
def test_an_out_of_range_value_is_one_line_naming_key_range_and_value(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["model=m", "data.train=x", *overrides])
    assert str(e.value) == message
    for sentinel in (["max_steps=-1"], ["max_steps=0"], ["save_every=0"], ["max_grad_norm=0"], ["lora.r=0"]):
        assert load_config(SFTConfig, None, ["model=m", "data.train=x", *sentinel]) is not None


def test_ranges_of_the_rl_trainers():
    from rufus.trainers.dpo import DPOConfig
    from rufus.trainers.grpo import GRPOConfig
    from rufus.trainers.rloo import RLOOConfig

    cases = [
        (DPOConfig, "dpo.label_smoothing=0.7", "dpo.label_smoothing: must be in [0, 0.5], got 0.7"),
        (GRPOConfig, "grpo.group_size=1", "grpo.group_size: must be >= 2, got 1"),
        (RLOOConfig, "rloo.group_size=1", "rloo.group_size: must be >= 2, got 1"),
        (GRPOConfig, "generation.top_p=0", "generation.top_p: must be in (0, 1], got 0.0"),
        (GRPOConfig, "generation.temperature=-0.5", "generation.temperature: must be >= 0, got -0.5"),
    ]
    for cls, override, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(cls, None, ["model=m", "data.train=x", override])
        assert str(e.value) == message
    # greedy decoding (temperature 0) and top_p 1 (off) stay valid
    assert load_config(GRPOConfig, None, ["model=m", "data.train=x", "generation.temperature=0", "generation.top_p=1"])


def test_a_config_object_is_checked_before_the_trainer_starts(tmp_path):
    """The Python API: a config object built (or changed) in Python is range-checked by the trainer's
    as_config, before output_dir is touched."""
    from rufus.trainers.grpo import GRPOConfig, train_grpo

    cfg = load_config(GRPOConfig, None, ["model=m", "data.train=x", f"output_dir={tmp_path / 'out'}"])
    cfg.grpo.group_size = 1
    with pytest.raises(ConfigError, match=r"^grpo.group_size: must be >= 2, got 1$"):
        train_grpo(cfg)
    assert not (tmp_path / "out").exists()


def test_help_shows_each_range():
    from rufus.trainers.dpo import DPOConfig
    from rufus.trainers.grpo import GRPOConfig

    def line(cls, key):
        return next(ln for ln in config_help(cls).splitlines() if ln.split() and ln.split()[0] == key)

    assert line(SFTConfig, "lr").endswith("(> 0)")
    assert line(SFTConfig, "batch_size").endswith("(>= 1)")
    assert line(SFTConfig, "max_steps").endswith("(>= -1)")
    assert line(SFTConfig, "lora.dropout").endswith("(in [0, 1))")
    assert line(GRPOConfig, "grpo.group_size").endswith("(>= 2)")
    assert line(GRPOConfig, "generation.top_p").endswith("(in (0, 1])")
    assert line(DPOConfig, "dpo.label_smoothing").endswith("(in [0, 0.5])")
    assert "(>" not in line(SFTConfig, "model") and "(in " not in line(SFTConfig, "model")  # unbounded: none


def test_opt_refuses_two_lower_or_two_upper_bounds():
    from rufus.config import opt

    with pytest.raises(TypeError):
        opt(1, "x", ge=0, gt=0)
    with pytest.raises(TypeError):
        opt(1, "x", le=1, lt=1)


# --- models named in a config --------------------------------------------------------------------


def test_check_model_name(tmp_path):
    from rufus.config import check_model_name

    (tmp_path / "model").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    for ok in (str(tmp_path / "model"), "org/name", "gpt2", "builtin:tiny-llama", "builtin:playground-base"):
        check_model_name("model", ok)  # a directory, a possible hub id (not looked up), Rufus's own
    for bad in ("/does/not/exist", "./nope", "../nope", "~/nope", "runs/sft/final", "a\\b", "org/na me", "a--b"):
        with pytest.raises(ConfigError) as e:
            check_model_name("ref_model", bad)
        assert str(e.value) == f"ref_model: {bad}: no such directory, and not a hub id"
    with pytest.raises(ConfigError) as e:
        check_model_name("model", str(tmp_path / "weights.bin"))
    assert str(e.value) == f"model: {tmp_path / 'weights.bin'}: is a file, not a model directory"


@pytest.mark.parametrize(
    "command, values, key",
    [
        ("sft", {"model": "/nope/m", "data": {"train": "x"}}, "model"),
        ("sft", {"model": "builtin:tiny-llama", "tokenizer": "/nope/m", "data": {"train": "x"}}, "tokenizer"),
        ("grpo", {"model": "org/m", "ref_model": "/nope/m", "data": {"train": "x"}}, "ref_model"),
        ("dpo", {"model": "org/m", "ref_model": "/nope/m", "data": {"train": "x"}}, "ref_model"),
        ("ppo", {"model": "org/m", "critic": {"model": "/nope/m"}, "data": {"train": "x"}}, "critic.model"),
        ("ppo", {"model": "org/m", "reward": {"model": ["org/rm", "/nope/m"]}, "data": {"train": "x"}}, "reward.model"),
        ("eval", {"model": "org/m", "baseline": "/nope/m", "prompts": "p"}, "baseline"),
        ("eval", {"model": "org/m", "ref_model": "/nope/m", "prompts": "p"}, "ref_model"),
        ("generate", {"model": "/nope/m", "prompt": "hi"}, "model"),
        ("eval-rm", {"model": "/nope/m", "data": "d"}, "model"),
        ("pipeline", {"model": "/nope/m"}, "model"),
    ],
)
def test_a_missing_model_directory_is_one_line_naming_the_key(command, values, key):
    from rufus.commands import load_command
    from rufus.config import as_config

    cls, _ = load_command(command)
    with pytest.raises(ConfigError) as e:
        as_config(cls, values)
    assert str(e.value) == f"{key}: /nope/m: no such directory, and not a hub id"
    # a config object made in Python is checked as well
    cfg = load_config(cls, defaults=values)
    with pytest.raises(ConfigError, match=f"^{key}: /nope/m: "):
        as_config(cls, cfg)


def test_the_studio_models_are_checked():
    from rufus.config import as_config
    from rufus.studio.commands import NewRoundConfig

    with pytest.raises(ConfigError, match="^models: /nope/m: no such directory, and not a hub id$"):
        as_config(
            NewRoundConfig, {"db": "x.db", "name": "r", "prompts": "p", "models": ["builtin:tiny-llama", "/nope/m"]}
        )


def test_removed_key_says_what_replaced_it():
    from rufus.trainers.reward import RMConfig

    with pytest.raises(ConfigError) as e:
        load_config(RMConfig, overrides=["model=builtin:tiny-llama", "data.train=x.jsonl", "rm.format=ranking"])
    assert str(e.value).startswith("unknown key 'rm.format': it was removed; a reward model now reads rankings")
