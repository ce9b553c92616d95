"""Strict, typed configuration shared by every command.

A command's config is a dataclass composed from the shared sections below (flat sections are
mixed in as base classes, so their keys stay top-level: `model`, `lr`, `batch_size`; nested
sections such as `data` and `lora` are fields). Values come from a YAML file first, then
`key=value` / `a.b=value` overrides, which win. Unknown keys, wrong types and missing required
values are errors that name the key and suggest the closest valid one.

Every field is declared with `opt(default, "one-line doc")`; that doc is the `--help` text.
A number's valid range is declared there too (`opt(8, "...", ge=1)`, `gt`, `le`, `lt`; for a list
of numbers, each element's): it is shown in `--help` and checked as the config is built, and again
by `as_config` on a config object made in Python. A field naming a model (`model_path=True`: a
local directory, a hub id, or `builtin:<name>`) is checked by `as_config` before anything runs: a
name that is no existing directory and cannot be a hub id is an error naming the key.
A field typed `dict[str, Any]` is an open mapping handed on to another config (the pipeline's
per-stage settings): `sft.lr=1e-4` and `rl.kl.coef=0` set keys inside it, nested by the dots, and
the config that receives the mapping checks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A problem with a configuration key or value; the message names the key."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a field the user must set (dataclasses need a default on every mixed-in field)."""


BOUNDS = ("ge", "gt", "le", "lt")
"""The range keys a field's metadata may hold: >=, >, <=, < a number."""


def opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    model_path: bool = False,
) -> Any:
    """A documented config field. Mutable defaults (lists, dicts, sections) are copied per instance.

    `ge`, `gt`, `le`, `lt` bound a number (each element of a list of numbers); None values are not
    checked. `model_path` marks a field naming models (a directory, hub id or builtin: name)."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("opt: give at most one lower bound (ge, gt) and one upper bound (le, lt)")
    meta: dict[str, Any] = {"help": help}
    meta.update((k, v) for k, v in zip(BOUNDS, (ge, gt, le, lt)) if v is not None)
    if model_path:
        meta["model_path"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --- shared sections -----------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """Which model and tokenizer to load, and how."""

    model: str = opt(REQUIRED, "model to start from: local path, hub id, or builtin:tiny-llama", model_path=True)
    tokenizer: str | None = opt(None, "tokenizer path or hub id (default: the model's)", model_path=True)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "compute dtype; bfloat16 = bfloat16 weights updated through float32 master copies (frozen models in bfloat16); "
        "auto = bfloat16 where the hardware runs it fast (CUDA with bf16, CPU with AMX), else float32",
    )
    quantization: Literal["none", "8bit", "4bit"] = opt(
        "none", "base of a LoRA run in bitsandbytes 8bit or 4bit (nf4); needs lora.r > 0 (docs/quantization.md)"
    )
    trust_remote_code: bool = opt(False, "allow model code from the hub to run (off: untrusted code never runs)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    attn_implementation: str | None = opt(
        None,
        "attention kernel: eager, sdpa, flash_attention_2 "
        "(default: eager for bfloat16 on CPU, else transformers' choice)",
    )
    compile: bool = opt(
        False,
        "torch.compile each transformer block of the trained and frozen models (one-off compile of some "
        "seconds per input shape, then faster training and scoring passes; generation stays eager)",
    )
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = opt(
        "ddp",
        "with several processes: ddp = a full copy of every model per process; fsdp = FSDP2, parameters, "
        "gradients and optimiser state sharded; zero1/2/3 = DeepSpeed ZeRO, optimiser state / + gradients / "
        "+ parameters partitioned (docs/scale.md)",
    )
    shard_frozen: bool = opt(
        True,
        "fsdp: shard the frozen models too (reference, reward model): less memory per process, one "
        "all-gather per block at each of their forwards; false = a full copy per process, no communication",
    )
    offload: bool = opt(
        False, "fsdp, zero: keep the trained models' optimiser state (and parameter shards) in CPU memory"
    )


@dataclass
class RunArgs:
    """Where a run writes and how it is seeded."""

    output_dir: str = opt(REQUIRED, "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    seed: int = opt(0, "random seed; multi-process runs use seed + rank for sampling", ge=0)
    overwrite: bool = opt(False, "start afresh even if output_dir holds checkpoints of an earlier run")


@dataclass
class OptimArgs:
    """Optimiser, schedule and batch sizes."""

    lr: float = opt(2e-5, "peak learning rate (AdamW)", gt=0)
    batch_size: int = opt(8, "examples per optimiser step, over all processes and accumulation steps", ge=1)
    grad_accum: int = opt(
        1, "micro-batches per optimiser step (each process runs batch_size / (processes * grad_accum))", ge=1
    )
    max_steps: int = opt(-1, "optimiser steps to run; -1 = as many as `epochs` passes over the data take", ge=-1)
    epochs: float = opt(1.0, "passes over the training data when max_steps is -1", gt=0)
    warmup_steps: int = opt(0, "linear warm-up steps (overrides warmup_ratio when > 0)", ge=0)
    warmup_ratio: float = opt(0.0, "fraction of max_steps used for linear warm-up", ge=0, le=1)
    scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "learning-rate decay after warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norm weights)", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)", ge=0)


@dataclass
class LogArgs:
    """Logging, evaluation, checkpoints and resuming."""

    log_every: int = opt(1, "write a metrics.jsonl row every this many steps", ge=1)
    eval_every: int = opt(0, "evaluate every this many steps (0 = only at the end, when eval data exists)", ge=0)
    save_every: int = opt(0, "write a checkpoint every this many steps (0 = none until the end)", ge=0)
    save_total_limit: int = opt(2, "keep at most this many checkpoints (0 = keep all)", ge=0)
    resume: bool | str = opt(False, "true = continue from the latest checkpoint in output_dir; or a checkpoint path")
    report_to: list[str] = opt([], "extra metric sinks: tensorboard, wandb (metrics.jsonl is always written)")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class DataSection:
    """Training and evaluation data (local jsonl/json/csv/parquet files or a hub dataset name)."""

    train: str = opt(REQUIRED, "training data: a .jsonl/.json/.csv/.parquet file or a hub dataset name")
    eval: str | None = opt(None, "evaluation data, same forms as `train`")
    train_split: str = opt("train", "split to read when `train` is a hub dataset")
    eval_split: str = opt("test", "split to read when `eval` is a hub dataset")
    max_length: int = opt(1024, "longest prompt + response in tokens", ge=1)
    max_prompt_length: int | None = opt(None, "longest prompt in tokens (default: max_length - 1)", ge=1)
    truncation: Literal["reject", "drop", "truncate"] = opt(
        "reject",
        "too-long rows: reject = stop with an error naming the row; drop = skip them; "
        "truncate = cut the prompt from the left, then the response from the right",
    )
    completion_only_loss: bool = opt(True, "SFT loss on response tokens only (prompt tokens masked)")
    chat_template: str | None = opt(None, "Jinja chat template overriding the tokenizer's")
    format: Literal[
        "auto", "hh-rlhf", "ultrafeedback", "oasst1", "shp", "summarize_from_feedback", "helpsteer2", "trl"
    ] = opt(
        "auto",
        "how the files are written: auto = detected from their columns; a published data set's name; "
        "trl = Rufus's own rows (TRL's field names); see docs/data.md",
    )
    subset: str | None = opt(None, "configuration (subset) of a hub dataset, e.g. comparisons")
    invalid_rows: Literal["error", "skip"] = opt(
        "error",
        "rows that cannot be used: error = stop, naming file, line and reason; skip = leave them out, warn once",
    )
    pairs: Literal["best_vs_worst", "best_vs_rest", "all"] = opt(
        "best_vs_worst", "preference pairs from a ranking (oasst1, raw UltraFeedback, HelpSteer2); ties never pair"
    )
    hh_rlhf: Literal["auto", "messages", "text"] = opt(
        "auto",
        "hh-rlhf dialogues as chat messages (the tokenizer's chat template applies) or plain text; "
        "auto = messages where the tokenizer has a chat template",
    )
    lang: list[str] = opt([], "oasst1: keep messages in these languages only, e.g. en,de (empty = all)")
    min_score_ratio: float = opt(0.0, "shp: keep pairs whose vote ratio is at least this, e.g. 2 (0 = all)", ge=0)
    attributes: str = opt(
        "helpfulness",
        "helpsteer2: the score, one attribute or a weighted mix, e.g. helpfulness:0.65,correctness:0.8,verbosity:-0.4",
    )


@dataclass
class LoraSection:
    """Low-rank adapters (peft). With LoRA the frozen reference is the base with adapters disabled."""

    r: int = opt(0, "LoRA rank; 0 = train all weights, no LoRA", ge=0)
    alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)", ge=1)
    dropout: float = opt(0.0, "dropout on the LoRA path", ge=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "modules to adapt: names, or all-linear")
    merge: bool = opt(True, "save final/ with the adapters merged into the base weights")


# --- loading -------------------------------------------------------------------------------------


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of `cls`, nested sections as dotted names, in declaration order."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


# Keys renamed so that one concept has one name everywhere (samples per prompt: group_size; update
# passes over a batch: epochs). An old name is refused with the new one named.
RENAMED_KEYS = {"grpo.iterations": "grpo.epochs", "rloo.k": "rloo.group_size", "bon.n": "bon.group_size"}
# Keys removed, with what took their place.
REMOVED_KEYS = {
    "rm.format": "a reward model now reads rankings or pairs as the file holds them; "
    "data.format names how a file is written (see docs/data.md)",
}


def _renamed(key: str) -> str | None:
    """The new name of a renamed key (also inside an enclosing section, e.g. rl.grpo.iterations)."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.endswith("." + old):
            return key[: len(key) - len(old)] + new
    return None


def _closest(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if not near:  # also match on the last part: "train" -> "data.train"
        near = [c for c in choices if c.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:1]
    return f"; did you mean '{near[0]}'?" if near else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(meta: Any) -> str:
    """A field's valid range from its metadata: '> 0', '>= 1', 'in [0, 1]', 'in (0, 1]'; '' if unbounded."""
    lo = ("[", ">=", meta["ge"]) if "ge" in meta else ("(", ">", meta["gt"]) if "gt" in meta else None
    hi = ("]", "<=", meta["le"]) if "le" in meta else (")", "<", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
    bound = lo or hi
    return f"{bound[1]} {_num(bound[2])}" if bound else ""


def _check_range(key: str, value: Any, meta: Any) -> None:
    """ConfigError naming `key` when the number `value` (or an element of a list of them) is out of
    the field's range. None and non-numbers pass (their type is checked elsewhere)."""
    if not any(b in meta for b in BOUNDS):
        return
    items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else [(key, value)]
    for name, x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        ok = (
            ("ge" not in meta or x >= meta["ge"])
            and ("gt" not in meta or x > meta["gt"])
            and ("le" not in meta or x <= meta["le"])
            and ("lt" not in meta or x < meta["lt"])
        )
        if not ok:  # nan fails every comparison, so it is refused too
            raise ConfigError(f"{name}: must be {range_text(meta)}, got {x}")


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Check every bounded field of the config object `cfg`, nested sections included."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, prefix + f.name + ".")
        else:
            _check_range(prefix + f.name, value, f.metadata)


def model_names(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key, name) for every model a config object names in its `model_path` fields, nested
    sections included (a list field gives one pair per entry); unset ones left out."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += model_names(value, prefix + f.name + ".")
        elif f.metadata.get("model_path"):
            names = value if isinstance(value, (list, tuple)) else [value]
            out += [(prefix + f.name, v) for v in names if isinstance(v, str)]  # not None, not REQUIRED
    return out


def _field_at(cls: type, key: str) -> tuple[Any, Any]:
    """(type, metadata) of the dotted `key` of `cls`."""
    head, _, rest = key.partition(".")
    f = next(f for f in dataclasses.fields(cls) if f.name == head)
    tp = _hints(cls)[head]
    return _field_at(tp, rest) if rest else (tp, f.metadata)


def _is_open(tp: Any) -> bool:
    """A `dict[str, Any]` field: an open mapping whose dotted sub-keys are accepted (module docstring)."""
    return typing.get_origin(tp) is dict and typing.get_args(tp) == (str, Any)


def _open_fields(cls: type, prefix: str = "") -> list[str]:
    """The dotted names of every open-mapping field of `cls`."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            out += _open_fields(tp, prefix + f.name + ".")
        elif _is_open(tp):
            out.append(prefix + f.name)
    return out


def merge_mappings(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, mappings merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(dotted: str, value: Any) -> dict:
    """ "a.b.c", v -> {"a": {"b": {"c": v}}}."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
    """Check `value` against type `tp`; return it (converted where lossless). `raw` is the
    override's original text, used as-is for string-typed keys so `name=123` stays "123"."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # Prefer the raw string for a string-accepting union when the text did not parse as
        # something else the union accepts (e.g. resume=true stays bool, resume=ckpt/ stays str).
        errors = []
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, arg, key, raw if arg is str else None)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            # a single name, or a comma-separated list from the command line
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and raw is None:
            return int(value)
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                pass
            else:
                if not math.isnan(out):
                    return out
        raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _parse_override(item: str) -> tuple[str, Any, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value, text


def _flatten(d: dict, cls: type | None, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings -> dotted keys, descending only into the config's sections (so a
    dict-typed value stays whole). Dotted keys in YAML (`data.train: x`) are accepted too."""
    hints = _hints(cls) if cls is not None else {}
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        head = str(k).split(".", 1)[0]
        tp = hints.get(head)
        if isinstance(v, dict) and "." not in str(k) and _is_section(tp):
            out.update(_flatten(v, tp, name + "."))
        else:
            out[name] = v
    return out


def _build(cls: type, values: dict[str, tuple[Any, str | None]], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if _is_section(tp):
            kwargs[f.name] = _build(tp, values, key + ".")
        elif key in values:
            value, raw = values[key]
            kwargs[f.name] = _coerce(value, tp, key, raw)
            _check_range(key, kwargs[f.name], f.metadata)
    return cls(**kwargs)


def _check_required(cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_required(value, prefix + f.name + ".")
        elif value is REQUIRED:
            raise ConfigError(f"{prefix}{f.name}: required, but not set ({f.metadata.get('help', '')})")


def load_config(
    cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None, defaults: dict | None = None
):
    """Build a `cls` from `defaults` (a command's own), then YAML `path`, then `key=value` overrides.

    Raises ConfigError naming the key for unknown keys, wrong types and missing required values.
    """
    values: dict[str, tuple[Any, str | None]] = {}
    opened = _open_fields(cls)

    def put(k: str, v: Any, raw: str | None = None) -> None:
        # an open mapping given again (defaults, then YAML) is merged, not replaced
        if k in opened and isinstance(v, dict) and isinstance(values.get(k, (None,))[0], dict):
            v = merge_mappings(values[k][0], v)
        values[k] = (v, raw)

    for k, v in _flatten(defaults or {}, cls).items():
        put(k, v)
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        for k, v in _flatten(loaded, cls).items():
            put(k, v)
    for item in overrides or []:
        key, value, raw = _parse_override(item)
        values[key] = (value, raw)
    valid = all_keys(cls)
    for key in list(values):
        if key in valid:
            continue
        owner = next((o for o in opened if key.startswith(o + ".")), None)
        if owner is None:
            new = _renamed(key)
            if new in valid:
                tp, meta = _field_at(cls, new)
                about = ", ".join(s for s in (type_name(tp), range_text(meta)) if s)
                raise ConfigError(f"unknown key '{key}': it was renamed; use '{new}' ({about})")
            gone = next((why for old, why in REMOVED_KEYS.items() if key == old or key.endswith("." + old)), None)
            if gone:
                raise ConfigError(f"unknown key '{key}': it was removed; {gone}")
            raise ConfigError(f"unknown key '{key}'{_closest(key, valid)}")
        value, _ = values.pop(key)  # a key inside an open mapping: merged into it, in order
        inner = values.get(owner, ({}, None))[0]
        if not isinstance(inner, dict):
            raise ConfigError(f"{owner}: expected a mapping, got {type(inner).__name__} {inner!r}")
        values[owner] = (merge_mappings(inner, _nest(key[len(owner) + 1 :], value)), None)
    cfg = _build(cls, values)
    _check_required(cfg)
    return cfg


def as_config(cls: type, config):
    """Accept a config object, or a dict of key -> value as a YAML file would hold it.

    Every command's function starts here, from the CLI and from Python alike, so this is where a
    config object's ranges are checked and the models it names are looked for, before anything runs.
    """
    if isinstance(config, cls):
        check_ranges(config)
        cfg = config
    elif isinstance(config, dict):
        cfg = load_config(cls, defaults=config)
    else:
        raise TypeError(f"expected {cls.__name__} or dict, got {type(config).__name__}")
    for key, name in model_names(cfg):
        check_model_name(key, name)
    return cfg


def check_model_name(key: str, name: str) -> None:
    """ConfigError naming `key` when `name` can name no model: neither an existing directory nor a
    possible hub id (`org/name`). `builtin:` names are Rufus's own and pass; so does a well-formed
    hub id with no local directory of that name (it downloads, where there is a network). Run on
    every config before anything loads (`as_config`), so a mistyped path is one line,
    not the hub's validation traceback after the data has loaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith("builtin:"):
        return
    path = Path(name)
    if name and path.is_dir():  # (Path("") is ".")
        return
    if name and path.exists():
        raise ConfigError(f"{key}: {name}: is a file, not a model directory")
    try:
        validate_repo_id(name)  # at most one "/", the hub's characters, no "--" or ".."
        hub_id = not name.startswith(("/", ".", "~")) and "\\" not in name
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise ConfigError(f"{key}: {name}: no such directory, and not a hub id")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so readers never see half a file.

    The file gets the permissions a plain `open(path, "w")` would (0666 less the umask; mkstemp
    alone would leave it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` for text (UTF-8)."""
    atomic_write(path, text)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_help(cls: type) -> str:
    """Every key with its type, default and one-line doc, grouped by section."""
    lines: list[str] = []

    def walk(c: type, prefix: str) -> None:
        hints = _hints(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if _is_section(tp):
                lines.append(f"\n  [{prefix}{f.name}] {(tp.__doc__ or '').strip().splitlines()[0]}")
                walk(tp, prefix + f.name + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[misc]
            shown = "REQUIRED" if default is REQUIRED else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").strip()
            doc = f.metadata.get("help", "")
            bounds = range_text(f.metadata)
            doc += f" ({bounds})" if bounds else ""
            lines.append(f"  {prefix + f.name:<28} {type_name(tp):<30} {shown:<14} {doc}")

    walk(cls, "")
    return "config keys (set in --config YAML or as key=value / section.key=value):\n" + "\n".join(lines)


# --- sections shared by the RL trainers (ppo, grpo, rloo, bon) --------------------------------------


@dataclass
class GenerationSection:
    """How responses are sampled during RL."""

    max_new_tokens: int = opt(64, "longest response in tokens", ge=1)
    temperature: float = opt(
        1.0, "sampling temperature (logprobs use the same scaled logits); 0 = greedy (logprobs at temperature 1)", ge=0
    )
    top_k: int = opt(0, "sample from the k most likely tokens only (0 = off)", ge=0)
    top_p: float = opt(1.0, "sample from the smallest set with this much probability (1 = off)", gt=0, le=1)
    stop_at_eos: bool = opt(True, "stop a response at EOS; false = always sample max_new_tokens (masked after EOS)")


@dataclass
class RewardSection:
    """Where the reward comes from: reward models, Python functions, or a weighted sum of several."""

    model: list[str] = opt(
        [], "reward model directories or hub ids (scores are their normalised outputs)", model_path=True
    )
    function: list[str] = opt(
        [], "Python reward functions, 'path/to/file.py:fn' or 'module:fn', called as fn(prompts, completions, **kw)"
    )
    weights: list[float] = opt([], "one weight per source, models first then functions (default: all 1)")
    missing_eos_penalty: float | None = opt(
        None, "score given to a response that never produced EOS (None = no penalty)"
    )
    scale: bool = opt(False, "divide scores by their running standard deviation (the mean is not shifted)")
    clip: float | None = opt(None, "clip scores to [-clip, clip] after scaling", gt=0)
    batch_size: int = opt(16, "sequences per reward-model forward pass", ge=1)


@dataclass
class RolloutSection:
    """What samples the responses (`rufus.rollout.engines`)."""

    engine: Literal["hf", "vllm"] = opt(
        "hf", "hf = Hugging Face generate on the trained model; vllm = a vLLM engine (the vllm extra)"
    )
    gpu_memory_utilization: float = opt(
        0.3, "vllm: share of the accelerator's memory the engine may take (weights and KV cache)", gt=0, le=1
    )
    sleep: bool = opt(False, "vllm: free the engine's memory while the trainer updates, take it back to sample")


@dataclass
class RaySection:
    """Where Ray places the roles (placement=ray; the ray extra)."""

    address: str | None = opt(
        None, "an existing Ray cluster ('auto' or host:port); unset = start a local one, on 127.0.0.1 only"
    )
    processes: int = opt(1, "processes per role: each role is a torch.distributed world of this size", ge=1)
    engines: int = opt(
        0,
        "rollout engines as Ray actors of their own, sent the weights after each update (0 = the actor samples)",
        ge=0,
    )
    colocate: str = opt("all", "roles that share placement groups: all, none, or sets such as actor_ref,critic_reward")
    cpus_per_process: float = opt(1.0, "logical CPUs each process of a role asks for", gt=0)
    gpus_per_process: float = opt(0.0, "GPUs of one bundle, shared by the roles colocated on it", ge=0)
    num_cpus: int | None = opt(None, "logical CPUs of a local cluster (default: what the roles ask for)", ge=1)
    num_gpus: int | None = opt(None, "GPUs of a local cluster (default: Ray's count)", ge=0)


@dataclass
class PlacementArgs:
    """Where the roles of an actor-critic or group method run."""

    placement: Literal["local", "ray"] = opt(
        "local", "local = this process (or the processes a launcher started); ray = Ray actor groups per role"
    )
    ray: RaySection = opt(RaySection, "Ray placement")


@dataclass
class SamplingArgs:
    """What every trainer that samples from its policy shares (online RL, online DPO, best-of-n):
    prompts, sampling, reward sources, LoRA."""

    data: DataSection = opt(DataSection, "prompts (prompt-only format; extra columns reach reward functions)")
    generation: GenerationSection = opt(GenerationSection, "sampling")
    rollout: RolloutSection = opt(RolloutSection, "the rollout engine")
    reward: RewardSection = opt(RewardSection, "reward sources (several, with weights)")
    lora: LoraSection = opt(LoraSection, "LoRA adapters; the reference is then the adapter-disabled base")


@dataclass
class OnlineArgs(SamplingArgs):
    """What the online RL trainers share: SamplingArgs, the reference, samples.jsonl."""

    ref_model: str | None = opt(
        None, "reference model (default: the starting policy; with LoRA, the adapter-disabled base)", model_path=True
    )
    sample_every: int = opt(
        10, "write a few (prompt, response, score) rows to samples.jsonl every this many steps (0 = never)", ge=0
    )
    num_samples: int = opt(4, "rows per samples.jsonl entry", ge=0)
