"""`rufus pipeline` and `rufus demo`: the whole RLHF loop, each stage's output feeding the next.

The three steps of InstructGPT (Ouyang et al. 2022, Fig. 2), then a measurement:

  0. base     the pretrained model (on the playground: built once and cached, ~1-2 min)
  1. sft      fine-tune it on demonstrations                                  -> sft/final
  2. collect  sample K responses per prompt from the SFT model and have them compared: by
              the playground's simulated annotators, or taken from a labelled file
                                                                              -> comparisons/
  3. rm       a reward model from those comparisons, started from the SFT model -> rm/final
  4. rl       ppo (default), grpo, rloo or bon against the reward model, or dpo on the
              comparisons themselves                                           -> rl/final
  5. eval     held-out prompts: the final policy against the SFT model         -> eval/eval.json
  6. report   summary.json, report.html, report.md

A finished stage leaves `<stage>/stage.json` with a fingerprint of its settings and of the
fingerprints of the stages it read. A later run whose fingerprint matches skips the stage; a
changed setting re-runs that stage and, through the fingerprints, every stage after it.

On the playground the reward model only ever sees the annotators' comparisons; the gold taste
they are noisy samples of is used for measurement only (eval, and a weight-0 `reward/gold` curve
logged during RL so the report can show proxy reward against gold as the policy drifts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rufus.config import (
    ConfigError,
    GenerationConfig,
    atomic_write_text,
    load_config,
    merge_mappings,
    opt,
    save_config,
    to_dict,
)
from rufus.report.metrics import read_metrics as read_jsonl
from rufus.rollout.sample import sample_responses

log = logging.getLogger(__name__)

STAGES = ("sft", "collect", "rm", "rl", "eval", "report")
RL_ALGOS = ("ppo", "grpo", "rloo", "dpo", "bon")


@dataclass
class PlaygroundSection:
    """The built-in offline task (rufus.playground): base model, data and simulated annotators."""

    enabled: bool = opt(True, "use the playground; false = your own model and data (the data.* keys)")
    preference: str = opt("default", "hidden gold taste: default, concise, polite, helpful, or weights 'polite=2,concise=1'")
    annotators: int = opt(3, "simulated annotators (labels go round-robin)")
    temperature: float = opt(0.5, "Bradley-Terry temperature of each choice (0 = no noise)")
    disagreement: float = opt(0.3, "spread of the annotators' own weights (lognormal sigma; 0 = all alike)")
    sft_demos: int = opt(2000, "demonstrations of middling quality for SFT")
    comparison_prompts: int = opt(2000, "prompts whose SFT samples are compared")
    rl_prompts: int = opt(2000, "prompts for RL")
    eval_prompts: int = opt(256, "held-out prompts for evaluation")
    base_seed: int = opt(0, "seed of the cached base model (builtin:playground-base)")


@dataclass
class PipelineData:
    """Your own data (playground.enabled=false); on the playground these files are generated in output_dir/data."""

    sft: str | None = opt(None, "demonstrations (sft format)")
    prompts: str | None = opt(None, "prompts (prompt format) for sampling comparisons and for RL")
    comparisons: str | None = opt(None, "labelled comparisons (preference format): used instead of sampling + annotators")
    eval_prompts: str | None = opt(None, "held-out prompts for evaluation (default: prompts)")


@dataclass
class CollectSection:
    """Sampling the SFT model's responses for comparison."""

    responses: int = opt(4, "K responses per prompt: 2 = pairs, more = K-way rankings (all K(K-1)/2 pairs learnt at once)")
    held_out: float = opt(0.15, "share of the comparisons kept out of RM training, for evaluation")
    batch_size: int = opt(64, "prompts per generate call")
    generation: GenerationConfig = opt(GenerationConfig, "sampling")


@dataclass
class PipelineConfig:
    """The whole RLHF pipeline: sft -> collect comparisons -> rm -> rl -> eval -> report."""

    output_dir: str = opt("runs/pipeline", "directory of the run: one sub-directory per stage, summary.json, report.html")
    model: str = opt("builtin:playground-base", "the pretrained base model the pipeline starts from")
    seed: int = opt(0, "random seed of every stage")
    dtype: Literal["auto", "float32", "bfloat16"] = opt("float32", "weights dtype of every stage (auto = bfloat16 where fast)")
    stages: list[str] = opt(list(STAGES), f"stages to run, in order, from {', '.join(STAGES)}")
    overwrite: bool = opt(False, "re-run every stage even when its output is up to date")
    progress: bool = opt(True, "progress bars")
    playground: PlaygroundSection = opt(PlaygroundSection, "the built-in offline task")
    data: PipelineData = opt(PipelineData, "your own data (without the playground)")
    collect: CollectSection = opt(CollectSection, "sampling responses for comparison")
    sft: dict[str, Any] = opt({}, "settings of the sft stage: any key of `rufus sft --help` (e.g. sft.lr=1e-4)")
    rm: dict[str, Any] = opt({}, "settings of the rm stage: any key of `rufus rm --help`")
    rl: dict[str, Any] = opt({}, f"rl.algo ({'|'.join(RL_ALGOS)}, default ppo) and any key of that command's --help")
    eval: dict[str, Any] = opt({}, "settings of the eval stage: any key of `rufus eval --help`")


@dataclass
class DemoConfig(PipelineConfig):
    """The pipeline on the built-in playground, sized to finish in minutes on a laptop CPU."""

    output_dir: str = opt("runs/demo", "directory of the run: one sub-directory per stage, summary.json, report.html")


@dataclass
class PipelineResult:
    output_dir: Path
    summary: dict
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped" | "not run"


# Settings that fit the playground on a 2-core CPU (tuned with benchmarks/… see docs/pipeline.md);
# the user's stage settings are laid over these.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"lr": 1e-3, "batch_size": 32, "max_steps": 120, "warmup_steps": 10, "log_every": 10,
            "save_every": 0, "data": {"max_length": 128, "truncation": "truncate"}},
    "rm": {"lr": 1e-3, "batch_size": 32, "epochs": 3, "warmup_steps": 10, "log_every": 10, "save_every": 0,
           "data": {"max_length": 128, "truncation": "truncate"}},
    "ppo": {"lr": 5e-5, "batch_size": 32, "max_steps": 100, "log_every": 5, "save_every": 0, "sample_every": 0,
            "data": {"max_length": 128}, "generation": {"max_new_tokens": 72},
            "kl": {"coef": 0.1}, "ppo": {"epochs": 2, "minibatches": 2}, "critic": {"lr": 1e-4}},
    "grpo": {"lr": 1e-4, "batch_size": 8, "max_steps": 100, "log_every": 5, "save_every": 0, "sample_every": 0,
             "data": {"max_length": 128}, "generation": {"max_new_tokens": 72}, "grpo": {"group_size": 4},
             "kl": {"coef": 0.05}},
    "rloo": {"lr": 1e-4, "batch_size": 8, "max_steps": 100, "log_every": 5, "save_every": 0, "sample_every": 0,
             "data": {"max_length": 128}, "generation": {"max_new_tokens": 72}, "rloo": {"k": 4},
             "kl": {"coef": 0.05}},
    "dpo": {"lr": 1e-4, "batch_size": 32, "epochs": 2, "log_every": 10, "save_every": 0,
            "data": {"max_length": 128, "truncation": "truncate"}, "dpo": {"beta": 0.1}},
    "bon": {"lr": 1e-3, "batch_size": 32, "log_every": 5, "save_every": 0,
            "data": {"max_length": 128}, "generation": {"max_new_tokens": 72},
            "bon": {"n": 8, "rounds": 2, "prompts_per_round": 512}},
    "eval": {"batch_size": 64, "generation": {"max_new_tokens": 72}},
}


# --- the pieces every stage uses ---------------------------------------------------------------


def _fingerprint(out: Path, *parts: Any) -> str:
    """A stage's identity: its settings, with paths inside the run written relative to it, so a
    run directory that is copied or moved is still up to date."""
    def settings_only(x: Any) -> Any:  # how a stage shows progress does not change its output
        if isinstance(x, dict):
            return {k: settings_only(v) for k, v in x.items() if k not in ("progress", "overwrite")}
        return [settings_only(v) for v in x] if isinstance(x, (list, tuple)) else x

    text = json.dumps(settings_only(parts), sort_keys=True, default=str).replace(str(out.resolve()), "<run>")
    text = text.replace(str(out), "<run>")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_facts(spec: str | None) -> Any:
    """What identifies an input file's content cheaply: size and modification time (a hub id: itself)."""
    if spec is None or not Path(spec).exists():
        return spec
    stat = Path(spec).stat()
    return [spec, stat.st_size, stat.st_mtime_ns]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class _Stages:
    """Bookkeeping: which stages are up to date, headers, timings, the stage.json markers."""

    def __init__(self, cfg: PipelineConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.status: dict[str, str] = {s: "not run" for s in STAGES}
        self.keys: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def marker(self, stage: str) -> Path:
        return self.out / stage / "stage.json"

    def up_to_date(self, stage: str, key: str) -> bool:
        """True (and the stage is skipped) when it finished before with the same fingerprint."""
        self.keys[stage] = key
        path = self.marker(stage)
        if self.cfg.overwrite or not path.exists():
            return False
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("fingerprint") != key:
            return False
        self.seconds[stage] = float(info.get("seconds", 0.0))
        self.status[stage] = "skipped"
        print(f"[{stage}] up to date ({path.parent}), skipped", flush=True)
        return True

    def begin(self, stage: str, what: str) -> float:
        n = self.cfg.stages.index(stage) + 1
        print(f"\n[{n}/{len(self.cfg.stages)}] {stage}: {what}", flush=True)
        marker = self.marker(stage)
        if marker.exists():
            marker.unlink()  # stale from here on, until the stage finishes again
        return time.perf_counter()

    def done(self, stage: str, t0: float, info: dict | None = None) -> None:
        seconds = time.perf_counter() - t0
        self.seconds[stage] = seconds
        self.status[stage] = "ran"
        body = {"stage": stage, "fingerprint": self.keys[stage], "seconds": round(seconds, 2), **(info or {})}
        atomic_write_text(self.marker(stage), json.dumps(body, indent=1) + "\n")
        print(f"[{stage}] done in {seconds:.0f} s", flush=True)

    def info(self, stage: str) -> dict:
        path = self.marker(stage)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _stage_config(cfg: PipelineConfig, name: str, settings: dict, wiring: dict) -> dict:
    """The stage's trainer config: built-in defaults, then the pipeline's wiring (models, data,
    output_dir), then the user's `<stage>.*` settings, which may not move the output_dir."""
    if "output_dir" in settings:
        raise ConfigError(f"{name}.output_dir: set by the pipeline ({wiring['output_dir']}); "
                          "choose the pipeline's output_dir instead")
    common = {"seed": cfg.seed, "dtype": cfg.dtype, "progress": cfg.progress, "overwrite": True}
    return merge_mappings(merge_mappings(merge_mappings(common, STAGE_DEFAULTS.get(name, {})), wiring), settings)


def _validated(cls: type, name: str, values: dict):
    """load_config with the stage's prefix on every error message (`rl.kl.coeff` not `kl.coeff`)."""
    try:
        return load_config(cls, defaults=values)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("unknown key"):  # unknown key 'lrr'; did you mean 'lr'?
            msg = re.sub(r"'([^']+)'", lambda m: f"'{name}.{m.group(1)}'", msg)
        elif re.match(r"[\w.\[\]]+: ", msg):  # kl.coef: expected float, ...
            msg = f"{name}.{msg}"
        else:
            msg = f"{name}: {msg}"
        raise ConfigError(msg) from None


# --- the pipeline -----------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig | dict) -> PipelineResult:
    """Run the configured stages in order (module docstring); return the summary."""
    from rufus.trainers.common import as_config

    cfg = as_config(PipelineConfig, config)
    t_start = time.perf_counter()
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    cfg.stages = [s for s in STAGES if s in cfg.stages]  # always in pipeline order
    rl_settings = dict(cfg.rl)
    algo = rl_settings.pop("algo", "ppo")
    if algo not in RL_ALGOS:
        raise ConfigError(f"rl.algo: {algo!r} is not one of {', '.join(RL_ALGOS)}")
    pg = cfg.playground
    if pg.enabled:
        from rufus.playground.taste import resolve_preference

        try:
            resolve_preference(pg.preference)
        except ValueError as e:
            raise ConfigError(f"playground.preference: {e}") from None
    else:
        missing = [k for k, need in (("data.sft", "sft" in cfg.stages), ("data.prompts", "rl" in cfg.stages or
                   ("collect" in cfg.stages and not cfg.data.comparisons))) if need and not getattr(cfg.data, k[5:])]
        if missing:
            raise ConfigError(f"{missing[0]}: required without the playground (playground.enabled=false)")
        if "collect" in cfg.stages and not cfg.data.comparisons:
            raise ConfigError("data.comparisons: without the playground there are no simulated annotators; "
                              "give labelled comparisons (preference format)")
    if cfg.collect.responses < 2:
        raise ConfigError(f"collect.responses: need at least 2 responses to compare, got {cfg.collect.responses}")
    if not 0 < cfg.collect.held_out < 1:
        raise ConfigError(f"collect.held_out: must be in (0, 1), got {cfg.collect.held_out}")

    out = Path(cfg.output_dir)
    files = _data_files(cfg, out)
    plan = _plan(cfg, out, algo, rl_settings, files)  # every stage's config, checked before anything runs
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline.yaml")
    _quiet_libraries()
    st = _Stages(cfg, out)
    _write_playground_data(cfg, files)
    t_base = time.perf_counter()
    if _base_model(cfg):  # built now (first run): part of this run's time
        st.seconds["base"] = time.perf_counter() - t_base

    key = _fingerprint(out, "base", _base_path(cfg), {k: _file_facts(v) if not pg.enabled else v for k, v in files.items()})
    for stage in STAGES[:-1]:
        if stage in cfg.stages:
            key = RUNNERS[stage](cfg, st, plan, files, key)
        else:  # not run now: a later stage reads what an earlier run left, if anything
            key = st.info(stage).get("fingerprint", key)
    summary = _summary(cfg, st, algo, t_start)
    if "report" in cfg.stages:
        _run_report(cfg, st, algo, summary, key)
        summary["seconds"] = round(sum(st.seconds.values()), 1)  # now with the report's own time
        summary["stage_seconds"] = {s: round(v, 1) for s, v in st.seconds.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print_pipeline_summary(summary, st.status, out)
    return PipelineResult(out, summary, dict(st.status))


def _plan(cfg: PipelineConfig, out: Path, algo: str, rl_settings: dict, files: dict) -> dict:
    """The validated config of every stage, wired to the others' outputs (paths fixed in advance)."""
    import importlib

    from rufus.cli import COMMANDS

    base = _base_path(cfg)
    sft_model = str(out / "sft" / "final") if "sft" in cfg.stages or (out / "sft" / "final").exists() else base
    rm_model = str(out / "rm" / "final")
    collect = out / "collect"
    plan: dict[str, Any] = {"sft_model": sft_model, "rm_model": rm_model, "algo": algo}

    from rufus.trainers.sft import SFTConfig

    plan["sft"] = _validated(SFTConfig, "sft", _stage_config(cfg, "sft", cfg.sft, {
        "model": base, "output_dir": str(out / "sft"), "data": {"train": files["sft"]}}))

    from rufus.trainers.reward import RMConfig

    fmt = "ranking" if cfg.playground.enabled and cfg.collect.responses > 2 else "preference"
    plan["format"] = fmt
    plan["rm"] = _validated(RMConfig, "rm", _stage_config(cfg, "rm", cfg.rm, {
        "model": sft_model, "output_dir": str(out / "rm"), "rm": {"format": fmt},
        "data": {"train": str(collect / "train.jsonl"),
                 "eval": str(collect / ("eval.jsonl" if fmt == "preference" else "eval_ranking.jsonl"))}}))

    module, cls_name, fn_name, _ = COMMANDS[algo]
    mod = importlib.import_module(module)
    plan["rl_train"] = getattr(mod, fn_name)
    wiring: dict[str, Any] = {"model": sft_model, "output_dir": str(out / "rl")}
    if algo == "dpo":  # offline DPO on the same comparisons the reward model learnt from
        wiring["data"] = {"train": str(collect / "pairs.jsonl"), "eval": str(collect / "eval.jsonl")}
    else:
        wiring["data"] = {"train": files["prompts"]}
        wiring["reward"] = {"model": [rm_model]}
        if algo == "ppo":
            wiring["critic"] = {"model": rm_model}  # a reward model is the usual critic initialisation
    values = _stage_config(cfg, algo, rl_settings, wiring)
    plan["monitor"] = None
    if cfg.playground.enabled and algo != "dpo":
        plan["monitor"] = _gold_monitor(cfg.playground.preference)
        reward = values.get("reward", {})
        n = len(reward.get("model", [])) + len(reward.get("function", []))
        values["reward"] = {**reward, "weights": list(reward.get("weights") or [1.0] * n) + [0.0]}
    plan["rl"] = _validated(getattr(mod, cls_name), "rl", values)

    from rufus.evaluate import EvalConfig

    final_model = str(out / "rl" / "final") if "rl" in cfg.stages or (out / "rl" / "final").exists() else sft_model
    wiring = {"model": final_model, "baseline": sft_model, "ref_model": sft_model, "prompts": files["eval_prompts"],
              "output_dir": str(out / "eval"), "reward": {"model": [rm_model]}, "pairs": str(collect / "eval.jsonl")}
    if cfg.playground.enabled:
        wiring["preference"] = cfg.playground.preference
    values = _stage_config(cfg, "eval", cfg.eval, wiring)
    values.pop("overwrite", None)
    plan["eval"] = _validated(EvalConfig, "eval", values)
    return plan


def _quiet_libraries() -> None:
    """The stages' own progress bars are the pipeline's; the libraries' (dataset caching, shard
    writing, weight loading reports) only bury them."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_demo(config: DemoConfig | dict) -> PipelineResult:
    """`rufus demo`: the pipeline with the playground defaults."""
    from rufus.trainers.common import as_config

    return run_pipeline(as_config(DemoConfig, config))


def _data_files(cfg: PipelineConfig, out: Path) -> dict[str, str | None]:
    """Paths of the data files: the user's, or those the playground writes into out/data."""
    if not cfg.playground.enabled:
        d = cfg.data
        return {"sft": d.sft, "prompts": d.prompts, "comparisons": d.comparisons,
                "eval_prompts": d.eval_prompts or d.prompts}
    names = ("sft", "comparison_prompts", "prompts", "eval_prompts")
    return {**{name: str(out / "data" / f"{name}.jsonl") for name in names}, "comparisons": None}


def _write_playground_data(cfg: PipelineConfig, files: dict) -> None:
    """The playground's demonstrations and prompt sets (deterministic; rewritten only if different)."""
    if not cfg.playground.enabled:
        return
    from rufus.playground.base import make_prompts, make_sft_demos

    pg = cfg.playground
    # distinct seeds per use keep the prompt sets apart (held-out prompts are never trained on)
    made = {"sft": make_sft_demos(pg.sft_demos, cfg.seed * 7 + 1),
            "comparison_prompts": make_prompts(pg.comparison_prompts, cfg.seed * 7 + 2),
            "prompts": make_prompts(pg.rl_prompts, cfg.seed * 7 + 3),
            "eval_prompts": make_prompts(pg.eval_prompts, cfg.seed * 7 + 4)}
    for name, rows in made.items():
        path = Path(files[name])
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


def _base_path(cfg: PipelineConfig) -> str:
    """Where the base model is (on the playground: its cache entry, which may not be built yet)."""
    if cfg.playground.enabled and cfg.model == "builtin:playground-base":
        from rufus.models.tiny import cache_dir
        from rufus.playground.base import BASE_VERSION

        return str(cache_dir() / "playground" / f"base-{BASE_VERSION}-seed{cfg.playground.base_seed}")
    return cfg.model


def _base_model(cfg: PipelineConfig) -> bool:
    """Build the playground's base model if it is not cached yet (the one slow first step); return
    whether it was built."""
    path = Path(_base_path(cfg))
    if not (cfg.playground.enabled and cfg.model == "builtin:playground-base") or (path / "config.json").exists():
        return False
    from rufus.playground.base import base_model_path

    print("\n[0] base: building the playground base model (first run only: a tokenizer and a tiny "
          "Llama pretrained on the task's text, about 2-3 minutes)", flush=True)
    base_model_path(seed=cfg.playground.base_seed)
    return True


# --- the stages ---------------------------------------------------------------------------------


def _run_trainer(st: _Stages, stage: str, upstream: str, config, what: str, train) -> str:
    """Fingerprint a trainer stage's config; unless it is up to date, run `train()` (which returns
    what stage.json records) between the stage's header and its marker."""
    key = _fingerprint(st.out, upstream, to_dict(config))
    if not st.up_to_date(stage, key):
        t0 = st.begin(stage, what)
        st.done(stage, t0, train())
    return key


def _run_sft(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str) -> str:
    from rufus.trainers.sft import train_sft

    def train():
        result = train_sft(plan["sft"])
        return {"final": str(result.final_dir), "steps": result.steps}

    return _run_trainer(st, "sft", upstream, plan["sft"],
                        f"fine-tuning {plan['sft'].model} on demonstrations ({files['sft']})", train)


def _run_collect(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str) -> str:
    """collect/{train,eval,pairs}.jsonl: training comparisons (K > 2: rankings), held-out pairs, and
    pairs for DPO (a ranking's best against its worst)."""
    pg, c, sft_model = cfg.playground, cfg.collect, plan["sft_model"]
    settings = {"collect": to_dict(c), "seed": cfg.seed, "dtype": cfg.dtype, "model": sft_model,
                "playground": to_dict(pg) if pg.enabled else None, "comparisons": files["comparisons"]}
    key = _fingerprint(st.out, upstream, settings)
    if st.up_to_date("collect", key):
        return key
    out = st.out / "collect"
    if not pg.enabled:  # human labels: split the given file
        t0 = st.begin("collect", f"splitting the labelled comparisons {files['comparisons']}")
        from rufus.data.loading import load_records

        records = load_records(files["comparisons"], format="preference", key="data.comparisons")
        rows = [dict(r) for r in records.dataset]
        random.Random(cfg.seed).shuffle(rows)
        n_eval = max(1, round(len(rows) * c.held_out))
        _write_jsonl(out / "eval.jsonl", rows[:n_eval])
        _write_jsonl(out / "train.jsonl", rows[n_eval:])
        _write_jsonl(out / "pairs.jsonl", rows[n_eval:])
        st.done("collect", t0, {"format": "preference", "train": len(rows) - n_eval, "eval": n_eval})
        return key

    from rufus.playground.taste import Annotators, gold_label_accuracy

    prompts = [r["prompt"] for r in read_jsonl(Path(files["comparison_prompts"]))]
    k = c.responses
    t0 = st.begin("collect", f"sampling {k} responses to each of {len(prompts)} prompts from the SFT model; "
                             f"{pg.annotators} simulated annotators compare them")
    groups = sample_responses(sft_model, prompts, k, c.generation, batch_size=c.batch_size, seed=cfg.seed,
                              dtype=cfg.dtype, progress=cfg.progress, desc="collect")
    annotators = Annotators(pg.preference, n=pg.annotators, temperature=pg.temperature,
                            disagreement=pg.disagreement, seed=cfg.seed)
    n_eval = max(1, round(len(prompts) * c.held_out))
    # held-out comparisons are always pairs (the first two samples), labelled the same way
    eval_rows = annotators.label_pairs(prompts[:n_eval], [g[0] for g in groups[:n_eval]],
                                       [g[1] for g in groups[:n_eval]], seed=cfg.seed + 1)
    train_p, train_g = prompts[n_eval:], groups[n_eval:]
    if k == 2:
        train_rows = annotators.label_pairs(train_p, [g[0] for g in train_g], [g[1] for g in train_g], seed=cfg.seed)
        pairs = train_rows
    else:
        train_rows = annotators.rank_rows(train_p, train_g, seed=cfg.seed)
        # DPO trains on pairs: each ranking's best against its worst
        pairs = [{"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][-1],
                  "annotator": r["annotator"]} for r in train_rows]
    if len(train_rows) < 2 or len(eval_rows) < 1:
        raise ConfigError("collect: too few distinct responses to compare; raise playground.comparison_prompts "
                          "or the sampling temperature")
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "eval.jsonl", eval_rows)
    if k > 2:  # the reward model reads one format: its held-out pairs as rankings of two
        _write_jsonl(out / "eval_ranking.jsonl", [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]],
                                                   "annotator": r["annotator"]} for r in eval_rows])
    agreement = gold_label_accuracy([r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                                    [r["rejected"] for r in pairs], pg.preference)
    print(f"[collect] {len(train_rows)} training comparisons, {len(eval_rows)} held out; "
          f"labels agree with the gold taste on {agreement:.1%} of training pairs", flush=True)
    st.done("collect", t0, {"format": "preference" if k == 2 else "ranking", "train": len(train_rows),
                            "eval": len(eval_rows), "label_gold_agreement": agreement})
    return key


def _run_rm(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str) -> str:
    from rufus.trainers.reward import train_reward_model

    def train():
        result = train_reward_model(plan["rm"])
        return {"final": str(result.final_dir), "steps": result.steps, "eval": result.eval}

    return _run_trainer(st, "rm", upstream, plan["rm"], f"training a reward model on {plan['rm'].data.train}", train)


def _gold_monitor(preference: str):
    """A reward function giving the hidden gold score, added with weight 0: logged as reward/gold
    during RL (for the over-optimisation picture), never part of the reward."""
    from rufus.playground.taste import gold_score

    def gold(prompts, completions, **kw):
        return [gold_score(p, c, preference) for p, c in zip(prompts, completions)]

    return gold


def _run_rl(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str) -> str:
    algo, monitor = plan["algo"], plan["monitor"]

    def train():
        kwargs = {"reward_fn": monitor} if monitor is not None else {}
        result = plan["rl_train"](plan["rl"], **kwargs)
        return {"algo": algo, "final": str(result.final_dir), "steps": result.steps}

    what = f"{algo} from the SFT model" + (" on the comparisons" if algo == "dpo" else " against the reward model")
    return _run_trainer(st, "rl", _fingerprint(st.out, upstream, algo), plan["rl"], what, train)


def _run_eval(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str) -> str:
    from rufus.evaluate import evaluate

    def train():
        return {k: v for k, v in evaluate(plan["eval"]).items() if k != "generations"}

    what = f"the final policy against the SFT model on {plan['eval'].prompts}"
    return _run_trainer(st, "eval", upstream, plan["eval"], what, train)


RUNNERS = {"sft": _run_sft, "collect": _run_collect, "rm": _run_rm, "rl": _run_rl, "eval": _run_eval}


# --- summary and report -------------------------------------------------------------------------

# summary.json key -> eval metric key
SUMMARY_FROM_EVAL = {
    "gold_score_sft": "baseline/gold/mean",
    "gold_score_final": "gold/mean",
    "gold_score_final_ci_low": "gold/ci_low",
    "gold_score_final_ci_high": "gold/ci_high",
    "gold_score_best": "gold/best",
    "gold_win_rate": "gold/win_rate",
    "kl": "kl",
    "rm_gold_accuracy": "rm/gold_accuracy",
    "rm_label_accuracy": "rm/label_accuracy",
    "rm_score_sft": "baseline/score",
    "rm_score_final": "score",
    "rm_win_rate": "win_rate",
    "length_sft": "baseline/length",
    "length_final": "length",
    "distinct_2_sft": "baseline/distinct_2",
    "distinct_2_final": "distinct_2",
}


def _summary(cfg: PipelineConfig, st: _Stages, algo: str, t_start: float) -> dict:
    """The headline numbers: eval's metrics under the summary's names, plus the run's facts."""
    metrics = st.info("eval")
    summary: dict[str, Any] = {"algo": algo}
    if cfg.playground.enabled:
        summary["preference"] = cfg.playground.preference
        agreement = st.info("collect").get("label_gold_agreement")
        if agreement is not None:
            summary["label_gold_agreement"] = agreement
    for name, key in SUMMARY_FROM_EVAL.items():
        if isinstance(metrics.get(key), (int, float)):
            summary[name] = metrics[key]
    # every stage's time, earlier runs' included (the base model's when this run built it)
    summary["seconds"] = round(sum(st.seconds.values()), 1)
    summary["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    summary["stage_seconds"] = {s: round(v, 1) for s, v in st.seconds.items()}
    return summary


def overoptimisation_rows(rows: list[dict], proxy_key: str, gold_key: str = "reward/gold") -> list[dict]:
    """{step, kl, proxy, gold} from RL metrics rows that logged all three (kl/mean = KL per sequence)."""
    out = []
    for r in rows:
        if all(isinstance(r.get(k), (int, float)) for k in ("kl/mean", proxy_key, gold_key)):
            out.append({"step": r.get("step"), "kl": r["kl/mean"], "proxy": r[proxy_key], "gold": r[gold_key]})
    return out


def _run_report(cfg: PipelineConfig, st: _Stages, algo: str, summary: dict, upstream: str) -> None:
    from rufus.report.html import write_report
    from rufus.report.metrics import read_metrics

    t0 = st.begin("report", "summary.json, report.html, report.md")
    st.keys["report"] = _fingerprint(st.out, upstream)
    curves = {}
    for stage in ("sft", "rm", "rl"):
        path = st.out / stage / "metrics.jsonl"
        if path.exists():
            curves[stage if stage != "rl" else f"rl ({algo})"] = read_metrics(path)
    rl_rows = curves.get(f"rl ({algo})", [])
    from rufus.rewards.pipeline import _model_names

    proxy_key = "reward/" + _model_names([str(st.out / "rm" / "final")])[0]  # the RM's per-source mean
    overopt = overoptimisation_rows(rl_rows, proxy_key) if cfg.playground.enabled else []
    samples = []
    gen_path = st.out / "eval" / "generations.jsonl"
    if gen_path.exists():
        for r in read_jsonl(gen_path)[:12]:
            samples.append({"prompt": r["prompt"], "sft": r.get("baseline_response", ""), "final": r["response"],
                            **({"gold_sft": r["baseline_gold"], "gold_final": r["gold"]} if "gold" in r else {}),
                            **({"score_sft": r["baseline_score"], "score_final": r["score"]} if "score" in r else {})})
    notes = [f"rufus pipeline: {', '.join(cfg.stages)} in {st.out}",
             f"rl.algo={algo}" + (f", playground.preference={cfg.playground.preference}" if cfg.playground.enabled else "")]
    table = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    table.update({f"seconds/{s}": v for s, v in summary.get("stage_seconds", {}).items()})
    write_report(st.out, title=f"Rufus pipeline report ({algo})", summary=table, curves=curves,
                 overopt=overopt or None, samples=samples, notes=notes)
    st.done("report", t0)


def print_pipeline_summary(summary: dict, status: dict[str, str], out: Path) -> None:
    """The final table: what each stage did and the headline numbers."""
    print("\n" + "=" * 64)
    print(f"rufus pipeline summary ({out})")
    secs = summary.get("stage_seconds", {})
    shown = (["base"] if "base" in secs else []) + [s for s in STAGES if status.get(s) != "not run"]
    print("  stages: " + ", ".join(f"{s} {status.get(s, 'built')}" + (f" ({secs[s]:.0f} s)" if s in secs else "")
                                   for s in shown))
    rows = [("gold score, SFT", "gold_score_sft"), ("gold score, final", "gold_score_final"),
            ("gold score, best possible", "gold_score_best"), ("gold win rate, final vs SFT", "gold_win_rate"),
            ("KL(final || SFT), nats", "kl"), ("RM agrees with gold (held-out)", "rm_gold_accuracy"),
            ("RM agrees with labels (held-out)", "rm_label_accuracy"), ("RM score, SFT", "rm_score_sft"),
            ("RM score, final", "rm_score_final"), ("length, SFT -> final (tokens)", None),
            ("seconds (all stages)", "seconds")]
    for label, key in rows:
        if key is None:
            if "length_sft" in summary and "length_final" in summary:
                print(f"  {label:<34} {summary['length_sft']:.1f} -> {summary['length_final']:.1f}")
            continue
        if key in summary:
            value = summary[key]
            text = f"{value:.1%}" if key in ("gold_win_rate", "rm_gold_accuracy", "rm_label_accuracy") else f"{value:.4g}"
            if key == "gold_score_final" and "gold_score_final_ci_low" in summary:
                text += f"  (95% CI {summary['gold_score_final_ci_low']:.3g} .. {summary['gold_score_final_ci_high']:.3g})"
            print(f"  {label:<34} {text}")
    print(f"  report: {out / 'report.html'}")
    print("=" * 64)
