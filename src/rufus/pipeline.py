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
they are noisy samples of is used for measurement only (eval, and a weight-0 `score/gold` curve
logged during RL so the report can show proxy reward against gold as the policy drifts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rufus.config import (
    ConfigError,
    GenerationSection,
    as_config,
    atomic_write_text,
    load_config,
    merge_mappings,
    opt,
    save_config,
    to_dict,
)
from rufus.models.tiny import PLAYGROUND_BASE, playground_base_dir
from rufus.report.metrics import read_metrics as read_jsonl
from rufus.rollout.sample import sample_responses

log = logging.getLogger(__name__)

STAGES = ("sft", "collect", "rm", "rl", "eval", "leaderboard", "report")
ROUND_STAGES = ("collect", "rm", "rl")  # repeated once per round (pipeline.rounds)
RL_ALGOS = ("ppo", "grpo", "rloo", "dpo", "kto", "simpo", "orpo", "ilql", "bon")
ALGO_COMMANDS = {"simpo": "dpo", "orpo": "dpo"}  # objectives of another command (its dpo.loss_type)
COMPARISON_ALGOS = ("dpo", "kto", "simpo", "orpo")  # learn from the collected comparisons themselves
SOURCES = ("auto", "playground", "file", "studio")
PENDING_EXIT = 75  # the exit status of a run that stops to wait for labels (sysexits' EX_TEMPFAIL: try again later)


class LabelsPending(Exception):
    """The run stopped at a studio round whose labels are not all in yet; run it again later."""

    def __init__(self, message: str, progress=None):
        super().__init__(message)
        self.progress = progress


@dataclass
class PlaygroundSection:
    """The built-in offline task (rufus.playground): base model, data and simulated annotators."""

    enabled: bool = opt(True, "use the playground; false = your own model and data (the data.* keys)")
    preference: str = opt(
        "default", "hidden gold taste: default, concise, polite, helpful, or weights 'polite=2,concise=1'"
    )
    annotators: int = opt(3, "simulated annotators (labels go round-robin)", ge=1)
    temperature: float = opt(0.5, "Bradley-Terry temperature of each choice (0 = no noise)", ge=0)
    disagreement: float = opt(0.3, "spread of the annotators' own weights (lognormal sigma; 0 = all alike)", ge=0)
    sft_demos: int = opt(2000, "demonstrations of middling quality for SFT", ge=1)
    comparison_prompts: int = opt(2000, "prompts whose SFT samples are compared", ge=1)
    rl_prompts: int = opt(2000, "prompts for RL", ge=1)
    eval_prompts: int = opt(256, "held-out prompts for evaluation", ge=1)
    base_seed: int = opt(0, "seed of the cached base model (builtin:playground-base)", ge=0)


@dataclass
class PipelineDataSection:
    """Your own data (playground.enabled=false); on the playground these files are generated in output_dir/data."""

    sft: str | None = opt(None, "demonstrations (sft format)")
    prompts: str | None = opt(None, "prompts (prompt format) for sampling comparisons and for RL")
    comparisons: str | None = opt(
        None, "labelled comparisons (preference format): used instead of sampling + annotators"
    )
    eval_prompts: str | None = opt(None, "held-out prompts for evaluation (default: prompts)")


@dataclass
class StudioCollectSection:
    """People label each round in a studio database (collect.source=studio)."""

    db: str | None = opt(None, "studio database: an SQLite file or an SQLAlchemy URL (default: <output_dir>/studio.db)")
    name: str | None = opt(
        None, "rounds are named '<name> round 1', ..., '<name> leaderboard' (default: the output_dir's name)"
    )
    prompts: int = opt(200, "prompts per round (taken from the comparison prompts)", ge=2)
    labels_per_item: int = opt(
        2, "labels each item needs before the round is complete (2 or more measures agreement)", ge=1
    )
    instructions: str = opt(
        "Which answer helps the person more: on topic, polite, concise, answering the request?",
        "shown to the annotators above every item",
    )
    wait: bool = opt(
        False,
        "wait (polling) until a round's labels are in; false = stop with a message and pick up "
        "from there when the same command is run again",
    )
    poll_seconds: float = opt(30.0, "how often to look while waiting", gt=0)
    simulate: int = opt(0, "honest simulated annotators who label every round over HTTP (0 = people label it)", ge=0)
    careless: int = opt(0, "careless simulated annotators among them (answer at random)", ge=0)
    adversarial: int = opt(0, "adversarial simulated annotators among them (answer against their taste)", ge=0)
    exclude_below_chance: bool = opt(
        False,
        "leave out the labels of annotators flagged below chance in a round (rufus studio exclude does it by hand)",
    )


@dataclass
class CollectSection:
    """Sampling the current policy's responses for comparison, and who compares them."""

    source: Literal["auto", "playground", "file", "studio"] = opt(
        "auto",
        "who labels: playground (simulated annotators), file (data.comparisons), studio (people, through "
        "rufus studio); auto = playground when it is enabled, else file",
    )
    responses: int = opt(
        4, "K responses per prompt: 2 = pairs, more = K-way rankings (all K(K-1)/2 pairs learnt at once)", ge=2
    )
    held_out: float = opt(0.15, "share of the comparisons kept out of RM training, for evaluation", gt=0, lt=1)
    batch_size: int = opt(64, "prompts per generate call", ge=1)
    generation: GenerationSection = opt(GenerationSection, "sampling")
    studio: StudioCollectSection = opt(StudioCollectSection, "labels from people in the studio (source=studio)")


@dataclass
class LeaderboardSection:
    """Every policy of the run (SFT and each round's) answers held-out prompts; their answers are compared."""

    prompts: int = opt(0, "held-out prompts each policy answers (0 = all the eval prompts)", ge=0)
    resamples: int = opt(1000, "bootstrap resamples of the rating intervals", ge=0)
    prior: float = opt(
        0.0,
        "Bradley-Terry prior strength (0 = maximum likelihood; a policy that wins or loses every "
        "comparison then gets the smallest prior that keeps its rating finite, 0.01, with a warning)",
        ge=0,
    )


@dataclass
class PipelineConfig:
    """The whole RLHF pipeline: sft -> collect comparisons -> rm -> rl -> eval -> report."""

    output_dir: str = opt(
        "runs/pipeline", "directory of the run: one sub-directory per stage, summary.json, report.html"
    )
    model: str = opt("builtin:playground-base", "the pretrained base model the pipeline starts from", model_path=True)
    seed: int = opt(0, "random seed of every stage", ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "float32", "weights dtype of every stage (auto = bfloat16 where fast)"
    )
    stages: list[str] = opt(list(STAGES), f"stages to run, in order, from {', '.join(STAGES)}")
    overwrite: bool = opt(False, "re-run every stage even when its output is up to date")
    progress: bool = opt(True, "progress bars")
    playground: PlaygroundSection = opt(PlaygroundSection, "the built-in offline task")
    data: PipelineDataSection = opt(PipelineDataSection, "your own data (without the playground)")
    rounds: int = opt(
        1,
        "iterated rounds of collect -> rm -> rl: round r samples the policy of round r-1 (and the "
        "earlier ones), its reward model learns from the labels of rounds 1..r",
        ge=1,
    )
    round_start: Literal["previous", "sft"] = opt(
        "previous",
        "where the RL of round r > 1 starts: previous = from the policy of round r-1 (the KL reference "
        "stays the SFT model); sft = from the SFT model again, with the new reward model",
    )
    collect: CollectSection = opt(CollectSection, "sampling responses for comparison")
    leaderboard: LeaderboardSection = opt(LeaderboardSection, "ranking every policy of the run")
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


OFFLINE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "batch_size": 32,
    "epochs": 2,
    "log_every": 10,
    "save_every": 0,
    "data": {"max_length": 128, "truncation": "truncate"},
}

# Settings that fit the playground on a 2-core CPU (tuned with benchmarks/… see docs/pipeline.md);
# the user's stage settings are laid over these.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {
        "lr": 1e-3,
        "batch_size": 32,
        "max_steps": 120,
        "warmup_steps": 10,
        "log_every": 10,
        "save_every": 0,
        "data": {"max_length": 128, "truncation": "truncate"},
    },
    "rm": {
        "lr": 1e-3,
        "batch_size": 32,
        "epochs": 3,
        "warmup_steps": 10,
        "log_every": 10,
        "save_every": 0,
        "data": {"max_length": 128, "truncation": "truncate"},
    },
    "ppo": {
        "lr": 5e-5,
        "batch_size": 32,
        "max_steps": 100,
        "log_every": 5,
        "save_every": 0,
        "sample_every": 0,
        "data": {"max_length": 128},
        "generation": {"max_new_tokens": 72},
        "kl": {"coef": 0.1},
        "ppo": {"epochs": 2, "minibatches": 2},
        "critic": {"lr": 1e-4},
    },
    "grpo": {
        "lr": 1e-4,
        "batch_size": 8,
        "max_steps": 100,
        "log_every": 5,
        "save_every": 0,
        "sample_every": 0,
        "data": {"max_length": 128},
        "generation": {"max_new_tokens": 72},
        "grpo": {"group_size": 4},
        "kl": {"coef": 0.05},
    },
    "rloo": {
        "lr": 1e-4,
        "batch_size": 8,
        "max_steps": 100,
        "log_every": 5,
        "save_every": 0,
        "sample_every": 0,
        "data": {"max_length": 128},
        "generation": {"max_new_tokens": 72},
        "rloo": {"group_size": 4},
        "kl": {"coef": 0.05},
    },
    # the offline algorithms: two epochs over the collected comparisons (ilql: over every response)
    "dpo": {**OFFLINE_DEFAULTS, "dpo": {"beta": 0.1}},
    "kto": {**OFFLINE_DEFAULTS, "kto": {"beta": 0.1}},
    "simpo": {**OFFLINE_DEFAULTS, "dpo": {"beta": 2.0, "gamma": 1.0}},
    "orpo": {**OFFLINE_DEFAULTS, "dpo": {"beta": 0.1}},
    # every collected response scored once by the reward model, before training
    "ilql": {**OFFLINE_DEFAULTS, "reward": {"batch_size": 64}, "ilql": {"beta": 4.0}},
    "bon": {
        "lr": 1e-3,
        "batch_size": 32,
        "log_every": 5,
        "save_every": 0,
        "data": {"max_length": 128},
        "generation": {"max_new_tokens": 72},
        "bon": {"group_size": 8, "rounds": 2, "prompts_per_round": 512},
    },
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
        self.order = [step.name for step in _steps(cfg) if step.kind in cfg.stages]  # what this run does, in order
        self.status: dict[str, str] = {step.name: "not run" for step in _steps(cfg)}
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
        n = self.order.index(stage) + 1
        print(f"\n[{n}/{len(self.order)}] {stage}: {what}", flush=True)
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
        raise ConfigError(
            f"{name}.output_dir: set by the pipeline ({wiring['output_dir']}); choose the pipeline's output_dir instead"
        )
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
    source = _source(cfg)
    if pg.enabled:
        from rufus.playground.taste import resolve_preference

        try:
            resolve_preference(pg.preference)
        except ValueError as e:
            raise ConfigError(f"playground.preference: {e}") from None
    else:
        missing = [
            k
            for k, need in (
                ("data.sft", "sft" in cfg.stages),
                ("data.prompts", "rl" in cfg.stages or ("collect" in cfg.stages and source != "file")),
            )
            if need and not getattr(cfg.data, k[5:])
        ]
        if missing:
            raise ConfigError(f"{missing[0]}: required without the playground (playground.enabled=false)")
        if source == "playground":
            raise ConfigError("collect.source: the simulated annotators are the playground's (playground.enabled=true)")
    if source == "file" and "collect" in cfg.stages and not cfg.data.comparisons:
        raise ConfigError(
            "data.comparisons: without the playground there are no simulated annotators; "
            "give labelled comparisons (preference format), or collect.source=studio"
        )
    if cfg.rounds > 1 and source == "file":
        raise ConfigError(
            "rounds: each round needs labels of the previous round's policy, which a fixed file "
            "cannot give; use collect.source=studio (people) or the playground"
        )

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

    key = _fingerprint(
        out, "base", _base_path(cfg), {k: _file_facts(v) if not pg.enabled else v for k, v in files.items()}
    )
    for step in _steps(cfg):
        if step.kind == "report":
            break
        if step.kind in cfg.stages:
            key = RUNNERS[step.kind](cfg, st, plan, files, key, step)
        else:  # not run now: a later stage reads what an earlier run left, if anything
            key = st.info(step.name).get("fingerprint", key)
    summary = _summary(cfg, st, plan, algo, t_start)
    if "report" in cfg.stages:
        _run_report(cfg, st, plan, algo, summary, key)
        summary["seconds"] = round(sum(st.seconds.values()), 1)  # now with the report's own time
        summary["stage_seconds"] = {s: round(v, 1) for s, v in st.seconds.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print_pipeline_summary(summary, st.status, out)
    return PipelineResult(out, summary, dict(st.status))


@dataclass(frozen=True)
class Step:
    """One stage of the run: `kind` from STAGES; collect, rm and rl once per round (`round` 1..N)."""

    name: str  # also its directory: "rm", or "round-2/rm" when there are several rounds
    kind: str
    round: int = 0


def _steps(cfg: PipelineConfig) -> list[Step]:
    out = []
    for kind in STAGES:
        if kind == "collect":
            for r in range(1, cfg.rounds + 1):
                for k in ROUND_STAGES:
                    out.append(Step(k if cfg.rounds == 1 else f"round-{r}/{k}", k, r))
        elif kind not in ROUND_STAGES:
            out.append(Step(kind, kind))
    return out


def _round_dir(cfg: PipelineConfig, out: Path, kind: str, r: int) -> Path:
    return out / (kind if cfg.rounds == 1 else f"round-{r}/{kind}")


def _source(cfg: PipelineConfig) -> str:
    """Who labels: collect.source, with auto resolved."""
    if cfg.collect.source == "auto":
        return "playground" if cfg.playground.enabled else "file"
    return cfg.collect.source


def _plan(cfg: PipelineConfig, out: Path, algo: str, rl_settings: dict, files: dict) -> dict:
    """The validated config of every stage, wired to the others' outputs (paths fixed in advance).

    Round r (1..rounds) samples from the policy of round r-1 (round 1: the SFT model), and from the
    second round on also from the earlier policies; its reward model learns from the labels of
    rounds 1..r; its RL starts from the policy of round r-1 (round_start=previous) or from the SFT
    model again (sft), with the SFT model as the KL reference either way.
    """
    import dataclasses

    from rufus.commands import load_command

    base = _base_path(cfg)
    sft_model = str(out / "sft" / "final") if "sft" in cfg.stages or (out / "sft" / "final").exists() else base
    source = _source(cfg)
    plan: dict[str, Any] = {"sft_model": sft_model, "algo": algo, "source": source}

    from rufus.trainers.sft import SFTConfig

    plan["sft"] = _validated(
        SFTConfig,
        "sft",
        _stage_config(
            cfg, "sft", cfg.sft, {"model": base, "output_dir": str(out / "sft"), "data": {"train": files["sft"]}}
        ),
    )

    from rufus.trainers.reward import RMConfig

    fmt = "ranking" if source != "file" and cfg.collect.responses > 2 else "preference"
    plan["format"] = fmt
    rl_cls, plan["rl_train"] = load_command(ALGO_COMMANDS.get(algo, algo))
    online = algo not in COMPARISON_ALGOS + ("ilql",)  # samples from its policy: gold is logged as it trains
    plan["monitor"] = _gold_monitor(cfg.playground.preference) if cfg.playground.enabled and online else None
    policies = [("sft", sft_model)]  # every policy of the run, in order: (name, model directory)
    plan["rounds"] = []
    for r in range(1, cfg.rounds + 1):
        collect, rm_dir, rl_dir = (_round_dir(cfg, out, k, r) for k in ROUND_STAGES)
        every = "" if r == 1 else "_all"  # from round 2 on: this round's labels and every earlier round's
        rm_model = str(rm_dir / "final")
        rm = _validated(
            RMConfig,
            "rm",
            _stage_config(
                cfg,
                "rm",
                cfg.rm,
                {
                    "model": sft_model,
                    "output_dir": str(rm_dir),
                    "data": {
                        "train": str(collect / f"train{every}.jsonl"),
                        "eval": str(collect / ("eval.jsonl" if fmt == "preference" else "eval_ranking.jsonl")),
                    },
                },
            ),
        )
        start = policies[-1][1] if cfg.round_start == "previous" else sft_model
        wiring: dict[str, Any] = {"model": start, "output_dir": str(rl_dir)}
        if algo in COMPARISON_ALGOS:  # offline, on the same comparisons the reward model learnt from
            wiring["data"] = {"train": str(collect / f"pairs{every}.jsonl"), "eval": str(collect / "eval.jsonl")}
            if algo in ALGO_COMMANDS:
                wiring["dpo"] = {"loss_type": algo}
        elif algo == "ilql":  # offline RL: every collected response, scored once by the reward model
            wiring["data"] = {"train": str(collect / f"train{every}.jsonl"), "eval": str(collect / "eval.jsonl")}
            wiring["reward"] = {"model": [rm_model]}
        else:
            wiring["data"] = {"train": files["prompts"]}
            wiring["reward"] = {"model": [rm_model]}
            if algo == "ppo":
                wiring["critic"] = {"model": rm_model}  # a reward model is the usual critic initialisation
        # orpo and simpo keep no reference (rufus dpo refuses one)
        has_ref = algo not in ALGO_COMMANDS and any(f.name == "ref_model" for f in dataclasses.fields(rl_cls))
        if start != sft_model and has_ref and not rl_settings.get("lora") and "ref_model" not in rl_settings:
            wiring["ref_model"] = sft_model  # the KL stays anchored to the SFT model, round after round
        values = _stage_config(cfg, algo, rl_settings, wiring)
        if plan["monitor"] is not None:
            reward = values.get("reward", {})
            n = len(reward.get("model", [])) + len(reward.get("function", []))
            values["reward"] = {**reward, "weights": list(reward.get("weights") or [1.0] * n) + [0.0]}
        rl = _validated(rl_cls, "rl", values)
        policy = str(rl_dir / "final") if "rl" in cfg.stages or (rl_dir / "final").exists() else policies[-1][1]
        plan["rounds"].append(
            {
                "collect": collect,
                "rm": rm,
                "rl": rl,
                "rm_model": rm_model,
                "policies": list(policies),
                "prompts": _round_prompts(cfg, files, r),
            }
        )
        if policy != policies[-1][1]:
            policies.append((f"round-{r}", policy))
    plan["policies"] = policies
    last = plan["rounds"][-1]
    plan["rm_model"] = last["rm_model"]

    from rufus.evaluate import EvalConfig

    wiring = {
        "model": policies[-1][1],
        "baseline": sft_model,
        "ref_model": sft_model,
        "prompts": files["eval_prompts"],
        "output_dir": str(out / "eval"),
        "reward": {"model": [last["rm_model"]]},
        "pairs": str(last["collect"] / "eval.jsonl"),
    }
    if cfg.playground.enabled:
        wiring["preference"] = cfg.playground.preference
    values = _stage_config(cfg, "eval", cfg.eval, wiring)
    values.pop("overwrite", None)
    plan["eval"] = _validated(EvalConfig, "eval", values)
    return plan


def _round_prompts(cfg: PipelineConfig, files: dict, r: int) -> tuple[str, int, int]:
    """(file, first row, rows) of the prompts whose responses round r has compared: on the
    playground, a prompt set of its own per round; otherwise successive slices of data.prompts."""
    source = _source(cfg)
    n = cfg.collect.studio.prompts if source == "studio" else cfg.playground.comparison_prompts
    if cfg.playground.enabled:
        return files["comparison_prompts" if r == 1 else f"comparison_prompts_{r}"], 0, n
    return files["prompts"], (r - 1) * n, n


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
    return run_pipeline(as_config(DemoConfig, config))


def _data_files(cfg: PipelineConfig, out: Path) -> dict[str, str | None]:
    """Paths of the data files: the user's, or those the playground writes into out/data."""
    if not cfg.playground.enabled:
        d = cfg.data
        return {
            "sft": d.sft,
            "prompts": d.prompts,
            "comparisons": d.comparisons,
            "eval_prompts": d.eval_prompts or d.prompts,
        }
    names = ["sft", "comparison_prompts", "prompts", "eval_prompts"]
    names += [f"comparison_prompts_{r}" for r in range(2, cfg.rounds + 1)]
    return {**{name: str(out / "data" / f"{name}.jsonl") for name in names}, "comparisons": None}


def _write_playground_data(cfg: PipelineConfig, files: dict) -> None:
    """The playground's demonstrations and prompt sets (deterministic; rewritten only if different)."""
    if not cfg.playground.enabled:
        return
    from rufus.playground.base import make_prompts, make_sft_demos

    pg = cfg.playground
    n = cfg.collect.studio.prompts if _source(cfg) == "studio" else pg.comparison_prompts
    # distinct seeds per use keep the prompt sets apart (held-out prompts are never trained on)
    made = {
        "sft": make_sft_demos(pg.sft_demos, cfg.seed * 7 + 1),
        "comparison_prompts": make_prompts(n, cfg.seed * 7 + 2),
        "prompts": make_prompts(pg.rl_prompts, cfg.seed * 7 + 3),
        "eval_prompts": make_prompts(pg.eval_prompts, cfg.seed * 7 + 4),
    }
    for r in range(2, cfg.rounds + 1):  # each round compares answers to prompts of its own
        made[f"comparison_prompts_{r}"] = make_prompts(n, cfg.seed * 7 + 5 + 1000 * r)
    for name, rows in made.items():
        path = Path(files[name])
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


def _base_path(cfg: PipelineConfig) -> str:
    """Where the base model is (builtin:playground-base: its cache entry, which may not be built yet)."""
    if cfg.model == PLAYGROUND_BASE:
        return str(playground_base_dir(cfg.playground.base_seed))
    return cfg.model


def _base_model(cfg: PipelineConfig) -> bool:
    """Build the playground's base model if it is not cached yet (the one slow first step); return
    whether it was built."""
    if cfg.model != PLAYGROUND_BASE or (Path(_base_path(cfg)) / "config.json").exists():
        return False
    from rufus.playground.base import base_model_path

    print(
        "\n[0] base: building the playground base model (first run only: a tokenizer and a tiny "
        "Llama pretrained on the task's text, about 2-3 minutes)",
        flush=True,
    )
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


def _run_sft(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    from rufus.trainers.sft import train_sft

    def train():
        result = train_sft(plan["sft"])
        return {"final": str(result.final_dir), "steps": result.steps}

    return _run_trainer(
        st,
        step.name,
        upstream,
        plan["sft"],
        f"fine-tuning {plan['sft'].model} on demonstrations ({files['sft']})",
        train,
    )


def _sample_groups(
    cfg: PipelineConfig, policies: list[tuple[str, str]], prompts: list, k: int, *, seed: int, desc: str
) -> tuple[list[list[str]], list[list[str]]]:
    """K responses to each prompt, and the name of the policy behind each. With one policy, all K
    are its samples; with several, the newest gives ceil(K/2) and the earlier ones take the other
    places in turn (prompt i's slot j: earlier policy (i + j) mod count), so every prompt compares
    the newest policy with an earlier one."""
    c = cfg.collect
    kw = {"batch_size": c.batch_size, "dtype": cfg.dtype, "progress": cfg.progress}
    (newest, newest_path), earlier = policies[-1], policies[:-1]
    n_new = k if not earlier else (k + 1) // 2
    groups = sample_responses(newest_path, prompts, n_new, c.generation, seed=seed, desc=f"{desc} {newest}", **kw)
    models = [[newest] * n_new for _ in prompts]
    if earlier:
        slots = [[(i + j) % len(earlier) for j in range(k - n_new)] for i in range(len(prompts))]
        for e, (name, path) in enumerate(earlier):
            by_count: dict[int, list[int]] = {}
            for i, row in enumerate(slots):
                if row.count(e):
                    by_count.setdefault(row.count(e), []).append(i)
            for count, idx in sorted(by_count.items()):
                answers = sample_responses(
                    path, [prompts[i] for i in idx], count, c.generation, seed=seed + 1 + e, desc=f"{desc} {name}", **kw
                )
                for i, got in zip(idx, answers):
                    groups[i] += got
                    models[i] += [name] * count
    return groups, models


def _prompt_rows(spec: tuple[str, int, int]) -> list:
    path, first, n = spec
    rows = [r["prompt"] for r in read_jsonl(Path(path))]
    if first >= len(rows):
        first %= max(len(rows), 1)  # more rounds than slices: start over
    return rows[first : first + n]


def _collect_files(
    out: Path, r: int, train_rows: list[dict], eval_rows: list[dict], pairs: list[dict], eval_ranking: list[dict] | None
) -> None:
    """Write a round's comparison files; from round 2 on also train_all / pairs_all, this round's
    rows after every earlier round's (what the round's reward model and DPO learn from)."""
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "eval.jsonl", eval_rows)
    if eval_ranking is not None:  # the reward model reads one format: its held-out pairs as rankings
        _write_jsonl(out / "eval_ranking.jsonl", eval_ranking)
    if r > 1:
        for name in ("train", "pairs"):
            earlier = [out.parent.parent / f"round-{j}" / "collect" / f"{name}.jsonl" for j in range(1, r)]
            text = "".join(path.read_text(encoding="utf-8") for path in earlier)
            atomic_write_text(out / f"{name}_all.jsonl", text + (out / f"{name}.jsonl").read_text(encoding="utf-8"))


def _run_collect(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    """collect/{train,eval,pairs}.jsonl: training comparisons (K > 2: rankings), held-out pairs, and
    pairs for DPO (a ranking's best against its worst)."""
    if plan["source"] == "studio":
        return _collect_from_studio(cfg, st, plan, upstream, step)
    pg, c, rp = cfg.playground, cfg.collect, plan["rounds"][step.round - 1]
    out = rp["collect"]
    collect = {k: v for k, v in to_dict(c).items() if k not in ("source", "studio")}
    models = [path for _, path in rp["policies"]]
    settings = {
        "collect": collect,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "model": models[0] if len(models) == 1 else models,
        "playground": to_dict(pg) if pg.enabled else None,
        "comparisons": files["comparisons"],
    }
    if cfg.rounds > 1:
        settings["prompts"] = rp["prompts"][1:]
    key = _fingerprint(st.out, upstream, settings)
    if st.up_to_date(step.name, key):
        return key
    if plan["source"] == "file":  # human labels: split the given file
        t0 = st.begin(step.name, f"splitting the labelled comparisons {files['comparisons']}")
        from rufus.data.loading import load_records

        records = load_records(files["comparisons"], kind="preference", key="data.comparisons")
        rows = [dict(r) for r in records.dataset]
        random.Random(cfg.seed).shuffle(rows)
        n_eval = max(1, round(len(rows) * c.held_out))
        _collect_files(out, 1, rows[n_eval:], rows[:n_eval], rows[n_eval:], None)
        st.done(step.name, t0, {"format": "preference", "train": len(rows) - n_eval, "eval": n_eval})
        return key

    from rufus.playground.taste import Annotators, gold_label_accuracy

    prompts = _prompt_rows(rp["prompts"])
    k = c.responses
    names = " and ".join(name for name, _ in rp["policies"]) if len(rp["policies"]) > 1 else "the SFT model"
    t0 = st.begin(
        step.name,
        f"sampling {k} responses to each of {len(prompts)} prompts from {names}; "
        f"{pg.annotators} simulated annotators compare them",
    )
    seed = cfg.seed + 100 * (step.round - 1)
    groups, _ = _sample_groups(cfg, rp["policies"], prompts, k, seed=seed, desc="collect")
    annotators = Annotators(
        pg.preference, n=pg.annotators, temperature=pg.temperature, disagreement=pg.disagreement, seed=cfg.seed
    )
    n_eval = max(1, round(len(prompts) * c.held_out))
    # held-out comparisons are always pairs (the first two samples), labelled the same way
    eval_rows = annotators.label_pairs(
        prompts[:n_eval],
        [g[0] for g in groups[:n_eval]],
        [g[-1] for g in groups[:n_eval]] if step.round > 1 else [g[1] for g in groups[:n_eval]],
        seed=seed + 1,
    )
    train_p, train_g = prompts[n_eval:], groups[n_eval:]
    if k == 2:
        train_rows = annotators.label_pairs(train_p, [g[0] for g in train_g], [g[1] for g in train_g], seed=seed)
        pairs = train_rows
    else:
        train_rows = annotators.rank_rows(train_p, train_g, seed=seed)
        # DPO trains on pairs: each ranking's best against its worst
        pairs = [
            {
                "prompt": r["prompt"],
                "chosen": r["responses"][0],
                "rejected": r["responses"][-1],
                "annotator": r["annotator"],
            }
            for r in train_rows
        ]
    if len(train_rows) < 2 or len(eval_rows) < 1:
        raise ConfigError(
            "collect: too few distinct responses to compare; raise playground.comparison_prompts "
            "or the sampling temperature"
        )
    eval_ranking = (
        None
        if k == 2
        else [
            {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "annotator": r["annotator"]}
            for r in eval_rows
        ]
    )
    _collect_files(out, step.round, train_rows, eval_rows, pairs, eval_ranking)
    agreement = gold_label_accuracy(
        [r["prompt"] for r in pairs], [r["chosen"] for r in pairs], [r["rejected"] for r in pairs], pg.preference
    )
    print(
        f"[{step.name}] {len(train_rows)} training comparisons, {len(eval_rows)} held out; "
        f"labels agree with the gold taste on {agreement:.1%} of training pairs",
        flush=True,
    )
    st.done(
        step.name,
        t0,
        {
            "format": "preference" if k == 2 else "ranking",
            "train": len(train_rows),
            "eval": len(eval_rows),
            "label_gold_agreement": agreement,
        },
    )
    return key


# --- labels from the studio ---------------------------------------------------------------------


def _studio_db(cfg: PipelineConfig, st: _Stages):
    """The run's studio database, opened once (created with an admin the first time)."""
    if getattr(st, "studio_db", None) is None:
        from rufus.studio.commands import print_admin_token_if_new
        from rufus.studio.db import open_database

        url = cfg.collect.studio.db or str(st.out / "studio.db")
        st.studio_db, _ = open_database(url)
        st.studio_url = url
        print_admin_token_if_new(st.studio_db)
    return st.studio_db


def _studio_prefix(cfg: PipelineConfig, out: Path) -> str:
    return cfg.collect.studio.name or out.resolve().name


def _simulated_kinds(cfg: PipelineConfig) -> list[str]:
    sc = cfg.collect.studio
    return ["honest"] * sc.simulate + ["careless"] * sc.careless + ["adversarial"] * sc.adversarial


def _studio_round(
    cfg: PipelineConfig,
    st: _Stages,
    step: Step,
    label: str,
    round_key: str,
    task: str,
    pairs: str,
    make_candidates,
    what: str,
):
    """Find or create the studio round of this step, have it labelled (simulated annotators, or
    people meanwhile), and return (db, round name, stage key, start time) once its labels are in;
    (None, None, key, None) when the step is up to date. Raises LabelsPending when the round is not
    complete and collect.studio.wait is off.

    The stage key covers the round's settings and the annotators excluded from it, so an admin's
    exclusion after the fact re-exports the labels and re-trains what learnt from them."""
    from rufus.studio import loop
    from rufus.studio.rounds import create_round

    sc = cfg.collect.studio
    db = _studio_db(cfg, st)
    base_name = f"{_studio_prefix(cfg, st.out)} {label}"
    name = loop.find_round(db, base_name, round_key)
    if name is not None and loop.progress(db, name).finished:
        if sc.exclude_below_chance:
            loop.exclude_below_chance(db, name)
        key = _fingerprint(st.out, round_key, loop.excluded_names(db, name))
        if st.up_to_date(step.name, key):
            return None, None, key, None
    t0 = st.begin(step.name, what)
    if name is None:
        candidates = make_candidates()
        name = loop.free_name(db, base_name, round_key)
        made = create_round(
            db,
            name,
            task,
            candidates,
            labels_per_item=sc.labels_per_item,
            pairs=pairs,
            instructions=sc.instructions,
            source={"pipeline": str(st.out.resolve()), "stage": step.name, "fingerprint": round_key},
        )
        print(
            f"[{step.name}] studio round {name!r} in {st.studio_url}: {made['items']} {task} items, "
            f"{sc.labels_per_item} label(s) each",
            flush=True,
        )
    else:
        print(f"[{step.name}] studio round {name!r} in {st.studio_url}: resuming", flush=True)
    kinds = _simulated_kinds(cfg)
    if kinds and not loop.progress(db, name).finished:
        from rufus.playground.taste import Annotators
        from rufus.studio.simulate import simulate_round

        pg = cfg.playground
        taste = Annotators(
            pg.preference, n=len(kinds), temperature=pg.temperature, disagreement=pg.disagreement, seed=cfg.seed
        )
        given = simulate_round(db, name, kinds, taste, seed=cfg.seed * 31 + step.round)
        print(
            f"[{step.name}] simulated annotators labelled through the studio's web pages: "
            + ", ".join(f"{who} {n}" for who, n in given.items()),
            flush=True,
        )
    p = loop.progress(db, name)
    last = None
    while not p.finished and sc.wait:
        if p.labels != last:
            print(f"[{step.name}] waiting for labels: {p.line()}", flush=True)
            last = p.labels
        time.sleep(max(sc.poll_seconds, 0.05))
        p = loop.progress(db, name)
    if not p.finished:
        where = st.studio_url
        raise LabelsPending(
            f"{label} open: {p.labels}/{p.wanted} labels; run the same command again when it is done\n"
            f"  round {name!r} in the studio database {where}: {p.items} items, {p.labels_per_item} label(s) each\n"
            f"  label it:  rufus studio serve --db {where}\n"
            f"  people:    rufus studio add-annotator --db {where} NAME   (prints their login link)\n"
            f"  admin:     rufus studio admin-token --db {where}",
            p,
        )
    if sc.exclude_below_chance:
        for who in loop.exclude_below_chance(db, name):
            print(f"[{step.name}] excluded {who}: labels below chance", flush=True)
    key = _fingerprint(st.out, round_key, loop.excluded_names(db, name))
    st.keys[step.name] = key
    return db, name, key, t0


def _collect_from_studio(cfg: PipelineConfig, st: _Stages, plan: dict, upstream: str, step: Step) -> str:
    """A studio round of the current policy's answers (and, from round 2 on, earlier policies'),
    labelled by people (or simulated annotators over HTTP), exported as the round's comparisons."""
    from rufus.data.formats import canonical
    from rufus.studio import loop
    from rufus.studio.export import export_rows
    from rufus.studio.rounds import Candidate

    c, sc, rp = cfg.collect, cfg.collect.studio, plan["rounds"][step.round - 1]
    k = c.responses
    settings = {
        "responses": k,
        "held_out": c.held_out,
        "batch_size": c.batch_size,
        "generation": to_dict(c.generation),
        "prompts": rp["prompts"][1:],
        "labels_per_item": sc.labels_per_item,
        "instructions": sc.instructions,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "policies": rp["policies"],
    }
    round_key = _fingerprint(st.out, upstream, settings)
    prompts = _prompt_rows(rp["prompts"])
    task = "pairwise" if k == 2 else "ranking"

    def candidates():
        groups, models = _sample_groups(
            cfg, rp["policies"], prompts, k, seed=cfg.seed + 100 * (step.round - 1), desc="collect"
        )
        return [Candidate(p, g, m) for p, g, m in zip(prompts, groups, models)]

    names = " and ".join(name for name, _ in rp["policies"])
    db, name, key, t0 = _studio_round(
        cfg,
        st,
        step,
        f"round {step.round}",
        round_key,
        task,
        "all",
        candidates,
        f"{k} answers from {names} to each of {len(prompts)} prompts, labelled in the studio",
    )
    if db is None:
        return key
    fmt = plan["format"]
    rows = export_rows(db, name, fmt)
    held = {canonical(p) for p in prompts[: max(1, round(len(prompts) * c.held_out))]}
    if fmt == "preference":
        slim = [
            {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "annotator": r["annotator_id"]}
            for r in rows
        ]
    else:
        slim = [
            {"prompt": r["prompt"], "responses": r["responses"], "scores": r["scores"], "annotator": r["annotator_id"]}
            for r in rows
        ]
    train_rows = [r for r in slim if canonical(r["prompt"]) not in held]
    held_rows = [r for r in slim if canonical(r["prompt"]) in held]
    if fmt == "preference":
        eval_rows, pairs, eval_ranking = held_rows, train_rows, None
    else:

        def best_worst(r):
            return {
                "prompt": r["prompt"],
                "chosen": r["responses"][0],
                "rejected": r["responses"][-1],
                "annotator": r["annotator"],
            }

        eval_ranking = held_rows
        eval_rows = [best_worst(r) for r in held_rows if r["scores"][0] > r["scores"][-1]]
        pairs = [best_worst(r) for r in train_rows if r["scores"][0] > r["scores"][-1]]
    if len(train_rows) < 2 or not eval_rows:
        raise ConfigError(
            f"collect: round {name!r} gave {len(train_rows)} training and {len(eval_rows)} held-out "
            "comparisons; raise collect.studio.prompts"
        )
    _collect_files(rp["collect"], step.round, train_rows, eval_rows, pairs, eval_ranking)
    figures = loop.round_figures(db, name)
    atomic_write_text(rp["collect"] / "studio.json", json.dumps(figures, indent=1, default=str) + "\n")
    info = {
        "format": fmt,
        "train": len(train_rows),
        "eval": len(eval_rows),
        "round": name,
        "excluded": loop.excluded_names(db, name),
    }
    if cfg.playground.enabled:
        from rufus.playground.taste import gold_label_accuracy

        info["label_gold_agreement"] = gold_label_accuracy(
            [r["prompt"] for r in pairs],
            [r["chosen"] for r in pairs],
            [r["rejected"] for r in pairs],
            cfg.playground.preference,
        )
    print(
        f"[{step.name}] {len(train_rows)} training comparisons, {len(eval_rows)} held out from round {name!r}"
        + (
            f"; labels agree with the gold taste on {info['label_gold_agreement']:.1%} of training pairs"
            if "label_gold_agreement" in info
            else ""
        ),
        flush=True,
    )
    st.done(step.name, t0, info)
    return key


def _run_rm(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    from rufus.trainers.reward import train_reward_model

    config = plan["rounds"][step.round - 1]["rm"]

    def train():
        result = train_reward_model(config)
        return {"final": str(result.final_dir), "steps": result.steps, "eval": result.eval}

    return _run_trainer(st, step.name, upstream, config, f"training a reward model on {config.data.train}", train)


def _gold_monitor(preference: str):
    """A reward function giving the hidden gold score, added with weight 0: logged as score/gold
    during RL (for the over-optimisation picture), never part of the reward."""
    from rufus.playground.taste import gold_score

    def gold(prompts, completions, **kw):
        return [gold_score(p, c, preference) for p, c in zip(prompts, completions)]

    return gold


def _run_rl(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    algo, monitor = plan["algo"], plan["monitor"]
    config = plan["rounds"][step.round - 1]["rl"]

    def train():
        kwargs = {"reward_fn": monitor} if monitor is not None else {}
        result = plan["rl_train"](config, **kwargs)
        return {"algo": algo, "final": str(result.final_dir), "steps": result.steps}

    start = (
        f"the round-{step.round - 1} policy" if step.round > 1 and cfg.round_start == "previous" else "the SFT model"
    )
    what = f"{algo} from {start}" + (
        " on the comparisons"
        if algo in COMPARISON_ALGOS
        else " on the collected responses, scored by the reward model"
        if algo == "ilql"
        else " against the reward model"
    )
    return _run_trainer(st, step.name, _fingerprint(st.out, upstream, algo), config, what, train)


def _run_eval(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    from rufus.evaluate import evaluate

    def train():
        return {k: v for k, v in evaluate(plan["eval"]).items() if k != "generations"}

    what = f"the final policy against the SFT model on {plan['eval'].prompts}"
    return _run_trainer(st, step.name, upstream, plan["eval"], what, train)


def _run_leaderboard(cfg: PipelineConfig, st: _Stages, plan: dict, files: dict, upstream: str, step: Step) -> str:
    """Every policy of the run answers the held-out prompts; the answers are compared (by the
    simulated annotators, or by people in a studio round) and ranked by Bradley-Terry ratings with
    bootstrap intervals; on the playground each policy's gold score and gold win rate against SFT
    are measured too."""
    from rufus.studio import leaderboard as L

    policies, lb, c = plan["policies"], cfg.leaderboard, cfg.collect
    source = plan["source"]
    prompts = [r["prompt"] for r in read_jsonl(Path(files["eval_prompts"]))]
    prompts = prompts[: lb.prompts] if lb.prompts > 0 else prompts
    settings = {
        "policies": policies,
        "prompts": len(prompts),
        "resamples": lb.resamples,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "generation": to_dict(c.generation),
        "source": source,
        "playground": to_dict(cfg.playground) if cfg.playground.enabled else None,
    }
    round_key = _fingerprint(st.out, upstream, settings)
    if len(policies) < 2 or source == "file":
        if not st.up_to_date(step.name, round_key):
            t0 = st.begin(step.name, "nothing to rank" if len(policies) < 2 else "no annotators to compare answers")
            st.done(
                step.name, t0, {"leaderboard": [], "note": "needs two policies and annotators (playground or studio)"}
            )
        return round_key
    out = st.out / step.name
    answers_path = out / "answers.jsonl"

    def answer() -> dict[str, list[str]]:
        """One sampled answer per prompt from each policy (cached: a resumed run reuses them)."""
        if answers_path.exists():
            rows = read_jsonl(answers_path)
            if [r["prompt"] for r in rows] == prompts and all(
                set(r["answers"]) == {n for n, _ in policies} for r in rows
            ):
                return {name: [r["answers"][name] for r in rows] for name, _ in policies}
        got = {}
        for j, (name, path) in enumerate(policies):
            got[name] = [
                g[0]
                for g in sample_responses(
                    path,
                    prompts,
                    1,
                    c.generation,
                    batch_size=c.batch_size,
                    seed=cfg.seed + 7 + j,
                    dtype=cfg.dtype,
                    progress=cfg.progress,
                    desc=f"leaderboard {name}",
                )
            ]
        _write_jsonl(
            answers_path, [{"prompt": p, "answers": {n: got[n][i] for n in got}} for i, p in enumerate(prompts)]
        )
        return got

    what = f"{', '.join(n for n, _ in policies)} answer {len(prompts)} held-out prompts; " + (
        "the answers are compared in the studio"
        if source == "studio"
        else "the simulated annotators compare the answers"
    )
    agreement = []
    if source == "studio":
        from rufus.studio import loop
        from rufus.studio.rounds import Candidate
        from rufus.studio.stats import round_comparisons

        def candidates():
            got = answer()
            return [
                Candidate(p, [got[n][i] for n, _ in policies], [n for n, _ in policies]) for i, p in enumerate(prompts)
            ]

        task = "pairwise" if len(policies) == 2 else "ranking"
        db, name, key, t0 = _studio_round(cfg, st, step, "leaderboard", round_key, task, "models", candidates, what)
        if db is None:
            return key
        got = answer()
        rounds = [st.info(s.name).get("round") for s in _steps(cfg) if s.kind == "collect"]
        rounds = [r for r in rounds if r] + [name]
        comparisons = round_comparisons(db, rounds)
        agreement = [loop.round_figures(db, r) for r in rounds]
    else:
        key = round_key
        if st.up_to_date(step.name, key):
            return key
        t0 = st.begin(step.name, what)
        got = answer()
        from rufus.playground.taste import Annotators

        pg = cfg.playground
        annotators = Annotators(
            pg.preference, n=pg.annotators, temperature=pg.temperature, disagreement=pg.disagreement, seed=cfg.seed
        )
        comparisons = []
        rng = random.Random(cfg.seed + 5)
        names = [n for n, _ in policies]
        for i, p in enumerate(prompts):
            for x in range(len(names)):
                for y in range(x + 1, len(names)):
                    a, b = got[names[x]][i], got[names[y]][i]
                    j = (i * len(names) + x + y) % len(annotators)
                    winner = "tie" if a == b else ("a" if annotators.compare(p, a, b, rng, j) else "b")
                    comparisons.append(L.Comparison(names[x], names[y], winner))
    if not comparisons:
        raise ConfigError("leaderboard: the answers gave no comparisons between two different policies")
    try:
        rows = L.leaderboard(comparisons, anchor="sft", resamples=lb.resamples, seed=cfg.seed, prior=lb.prior)
    except L.LeaderboardError as e:  # a clean sweep: no finite maximum-likelihood rating; keep the run's result
        log.warning("leaderboard: %s; rating with prior 0.01 instead", e)
        rows = L.leaderboard(comparisons, anchor="sft", resamples=lb.resamples, seed=cfg.seed, prior=0.01)
    print(L.format_table(rows), flush=True)
    info: dict[str, Any] = {"leaderboard": [r.as_dict() for r in rows], "comparisons": len(comparisons)}
    atomic_write_text(out / "leaderboard.json", json.dumps(info["leaderboard"], indent=1) + "\n")
    L.plot(rows, out / "leaderboard.png")
    if cfg.playground.enabled:  # the hidden taste's verdict on the same answers
        from rufus.playground.taste import gold_score, gold_win_rate

        gold = {}
        for name, _ in policies:
            gold[name] = {
                "gold_score": statistics.fmean(
                    gold_score(p, a, cfg.playground.preference) for p, a in zip(prompts, got[name])
                ),
                "gold_win_rate_vs_sft": gold_win_rate(prompts, got[name], got["sft"], cfg.playground.preference),
            }
        info["gold"] = gold
        print(
            "  gold taste: "
            + ", ".join(
                f"{n} {g['gold_score']:.3f} (wins {g['gold_win_rate_vs_sft']:.0%} vs sft)" for n, g in gold.items()
            ),
            flush=True,
        )
    if agreement:
        info["agreement"] = agreement
        atomic_write_text(out / "agreement.json", json.dumps(agreement, indent=1, default=str) + "\n")
    st.done(step.name, t0, info)
    return key


RUNNERS = {
    "sft": _run_sft,
    "collect": _run_collect,
    "rm": _run_rm,
    "rl": _run_rl,
    "eval": _run_eval,
    "leaderboard": _run_leaderboard,
}


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


def _summary(cfg: PipelineConfig, st: _Stages, plan: dict, algo: str, t_start: float) -> dict:
    """The headline numbers: eval's metrics under the summary's names, the leaderboard, the run's facts."""
    metrics = st.info("eval")
    summary: dict[str, Any] = {"algo": algo, "source": plan["source"], "rounds": cfg.rounds}
    if cfg.playground.enabled:
        summary["preference"] = cfg.playground.preference
    collects = [s for s in _steps(cfg) if s.kind == "collect"]
    agreement = st.info(collects[-1].name).get("label_gold_agreement")
    if agreement is not None:
        summary["label_gold_agreement"] = agreement
    for name, key in SUMMARY_FROM_EVAL.items():
        if isinstance(metrics.get(key), (int, float)):
            summary[name] = metrics[key]
    board = st.info("leaderboard")
    if board.get("leaderboard"):
        gold = board.get("gold", {})
        summary["policies"] = {
            r["model"]: {
                **{k: r[k] for k in ("rating", "ci_low", "ci_high", "rank", "wins", "losses", "ties", "elo")},
                **gold.get(r["model"], {}),
            }
            for r in board["leaderboard"]
        }
        summary["leaderboard_comparisons"] = board.get("comparisons")
        if board.get("agreement"):
            summary["agreement"] = [_agreement_row(a) for a in board["agreement"]]
    # every stage's time, earlier runs' included (the base model's when this run built it)
    summary["seconds"] = round(sum(st.seconds.values()), 1)
    summary["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    summary["stage_seconds"] = {s: round(v, 1) for s, v in st.seconds.items()}
    return summary


def _agreement_row(figures: dict) -> dict:
    """One studio round's agreement figures, flattened (round_figures -> summary)."""
    a = figures["agreement"]
    row = {
        "round": figures["round"],
        "task": a["task"],
        "labels": a["labels"],
        "shared_units": a["shared_units"],
        "raw_agreement": a["raw_agreement"],
    }
    for key in ("fleiss_kappa", "krippendorff_alpha"):
        if key in a:
            row[key] = a[key]
    row["annotators"] = [
        {
            "annotator": q["annotator"],
            "labels": q["labels"],
            "agreement": q["agreement"],
            "gold_accuracy": q["gold_accuracy"],
            "excluded": q["excluded"],
            "flags": q["flags"],
        }
        for q in figures["annotators"]
    ]
    return row


def overoptimisation_rows(rows: list[dict], proxy_key: str, gold_key: str = "score/gold") -> list[dict]:
    """{step, kl, proxy, gold} from RL metrics rows that logged all three (kl/mean = KL per sequence)."""
    out = []
    for r in rows:
        if all(isinstance(r.get(k), (int, float)) for k in ("kl/mean", proxy_key, gold_key)):
            out.append({"step": r.get("step"), "kl": r["kl/mean"], "proxy": r[proxy_key], "gold": r[gold_key]})
    return out


def _run_report(cfg: PipelineConfig, st: _Stages, plan: dict, algo: str, summary: dict, upstream: str) -> None:
    from rufus.report.html import write_report
    from rufus.report.metrics import read_metrics
    from rufus.rewards.pipeline import model_names

    t0 = st.begin("report", "summary.json, report.html, report.md")
    st.keys["report"] = _fingerprint(st.out, upstream)
    curves, overopt = {}, []
    path = st.out / "sft" / "metrics.jsonl"
    if path.exists():
        curves["sft"] = read_metrics(path)
    for r, rp in enumerate(plan["rounds"], start=1):
        tag = "" if cfg.rounds == 1 else f", round {r}"
        for kind, title in (("rm", f"rm{tag}" if tag else "rm"), ("rl", f"rl ({algo}{tag})")):
            path = _round_dir(cfg, st.out, kind, r) / "metrics.jsonl"
            if path.exists():
                curves[title] = read_metrics(path)
        if cfg.playground.enabled and f"rl ({algo}{tag})" in curves:
            proxy_key = "score/" + model_names([rp["rm_model"]])[0]  # the RM's per-source mean
            overopt += [{**row, "round": r} for row in overoptimisation_rows(curves[f"rl ({algo}{tag})"], proxy_key)]
    samples = []
    gen_path = st.out / "eval" / "generations.jsonl"
    if gen_path.exists():
        for r in read_jsonl(gen_path)[:12]:
            samples.append(
                {
                    "prompt": r["prompt"],
                    "sft": r.get("baseline_response", ""),
                    "final": r["response"],
                    **({"gold_sft": r["baseline_gold"], "gold_final": r["gold"]} if "gold" in r else {}),
                    **({"score_sft": r["baseline_score"], "score_final": r["score"]} if "score" in r else {}),
                }
            )
    notes = [
        f"rufus pipeline: {', '.join(cfg.stages)} in {st.out}",
        f"rl.algo={algo}, collect.source={plan['source']}, rounds={cfg.rounds}"
        + (f", playground.preference={cfg.playground.preference}" if cfg.playground.enabled else ""),
    ]
    table = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    table.update({f"seconds/{s}": v for s, v in summary.get("stage_seconds", {}).items()})
    write_report(
        st.out,
        title=f"Rufus pipeline report ({algo})",
        summary=table,
        curves=curves,
        overopt=overopt or None,
        samples=samples,
        notes=notes,
        headline=headline_rows(summary),
        sections=_report_sections(st),
    )
    st.done("report", t0)


def _report_sections(st: _Stages) -> list[dict]:
    """The leaderboard (figure and table) and the annotators' agreement, for the report."""
    board = st.info("leaderboard")
    sections = []
    if board.get("leaderboard"):
        gold = board.get("gold", {})
        header = ["policy", "rating", "95% interval", "rank", "wins / losses / ties", "online Elo"]
        if gold:
            header += ["gold score", "gold win rate vs SFT"]
        rows = []
        for r in board["leaderboard"]:
            row = [
                r["model"],
                f"{r['rating']:.0f}",
                f"{r['ci_low']:.0f} .. {r['ci_high']:.0f}",
                r["rank"],
                f"{r['wins']:g} / {r['losses']:g} / {r['ties']:g}",
                f"{r['elo']:.0f}",
            ]
            if gold:
                g = gold.get(r["model"], {})
                row += [
                    f"{g.get('gold_score', float('nan')):.3f}",
                    f"{g.get('gold_win_rate_vs_sft', float('nan')):.1%}",
                ]
            rows.append(row)
        png = st.out / "leaderboard" / "leaderboard.png"
        sections.append(
            {
                "title": "Leaderboard of the run's policies",
                "table": (header, rows),
                "figure": png.read_bytes() if png.exists() else None,
                "stem": "leaderboard",
                "text": f"Bradley-Terry ratings (Elo scale, SFT = 1000) from {board.get('comparisons')} "
                "comparisons of the policies' answers to held-out prompts, with 95% bootstrap "
                "intervals; a rank counts the policies whose interval lies wholly above. Online Elo "
                "(K = 4) depends on the order of the comparisons.",
            }
        )
    if board.get("agreement"):
        header = [
            "round",
            "task",
            "labels",
            "items labelled twice or more",
            "raw agreement",
            "Fleiss' kappa",
            "Krippendorff's alpha",
        ]
        rows, people = [], []
        for figures in board["agreement"]:
            a = _agreement_row(figures)
            rows.append(
                [
                    a["round"],
                    a["task"],
                    a["labels"],
                    a["shared_units"],
                    _fmt_opt(a["raw_agreement"]),
                    _fmt_opt(a.get("fleiss_kappa")),
                    _fmt_opt(a.get("krippendorff_alpha")),
                ]
            )
            for q in a["annotators"]:
                people.append(
                    [
                        a["round"],
                        q["annotator"],
                        q["labels"],
                        _fmt_opt(q["agreement"]),
                        "yes" if q["excluded"] else "",
                        "; ".join(q["flags"]),
                    ]
                )
        sections.append({"title": "Agreement among the annotators", "table": (header, rows)})
        sections.append(
            {
                "title": "Annotators",
                "table": (
                    ["round", "annotator", "labels", "agreement with the others' majority", "excluded", "flags"],
                    people,
                ),
            }
        )
    return sections


def _fmt_opt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# (plain name, summary key, how to show it): the figures a person reads first
HEADLINES = [
    ("gold score, SFT", "gold_score_sft", "{:.4g}"),
    ("gold score, final", "gold_score_final", "{:.4g}"),
    ("gold score, best possible", "gold_score_best", "{:.4g}"),
    ("gold win rate, final vs SFT", "gold_win_rate", "{:.1%}"),
    ("KL(final || SFT), nats", "kl", "{:.4g}"),
    ("RM agrees with gold (held-out)", "rm_gold_accuracy", "{:.1%}"),
    ("RM agrees with labels (held-out)", "rm_label_accuracy", "{:.1%}"),
    ("RM score, SFT", "rm_score_sft", "{:.4g}"),
    ("RM score, final", "rm_score_final", "{:.4g}"),
    ("labels agree with gold (training)", "label_gold_agreement", "{:.1%}"),
]


def headline_rows(summary: dict) -> list[tuple[str, str]]:
    """(plain name, value as text) for the headline figures the summary has."""
    rows = []
    for label, key, form in HEADLINES:
        if isinstance(summary.get(key), (int, float)):
            text = form.format(summary[key])
            if key == "gold_score_final" and "gold_score_final_ci_low" in summary:
                text += (
                    f"  (95% CI {summary['gold_score_final_ci_low']:.3g} .. {summary['gold_score_final_ci_high']:.3g})"
                )
            rows.append((label, text))
        if key == "rm_score_final" and "length_sft" in summary and "length_final" in summary:
            rows.append(
                ("length, SFT -> final (tokens)", f"{summary['length_sft']:.1f} -> {summary['length_final']:.1f}")
            )
    for name, p in (summary.get("policies") or {}).items():
        text = f"rating {p['rating']:.0f} ({p['ci_low']:.0f} .. {p['ci_high']:.0f}), rank {p['rank']}"
        if "gold_win_rate_vs_sft" in p and name != "sft":
            text += f", gold win rate vs SFT {p['gold_win_rate_vs_sft']:.1%}"
        rows.append((f"leaderboard: {name}", text))
    for a in summary.get("agreement") or []:
        coef = (
            f"Fleiss' kappa {a['fleiss_kappa']:.3f}"
            if a.get("fleiss_kappa") is not None
            else f"Krippendorff's alpha {a['krippendorff_alpha']:.3f}"
            if a.get("krippendorff_alpha") is not None
            else ""
        )
        raw = "-" if a["raw_agreement"] is None else f"{a['raw_agreement']:.3f}"
        rows.append(
            (f"agreement: {a['round']}", f"raw {raw}" + (f", {coef}" if coef else "") + f" ({a['labels']} labels)")
        )
    if "seconds" in summary:
        rows.append(("seconds (all stages)", f"{summary['seconds']:.4g}"))
    return rows


def print_pipeline_summary(summary: dict, status: dict[str, str], out: Path) -> None:
    """The final table: what each stage did and the headline numbers."""
    print("\n" + "=" * 64)
    print(f"rufus pipeline summary ({out})")
    secs = summary.get("stage_seconds", {})
    shown = (["base"] if "base" in secs else []) + [s for s, v in status.items() if v != "not run"]
    print(
        "  stages: "
        + ", ".join(f"{s} {status.get(s, 'built')}" + (f" ({secs[s]:.0f} s)" if s in secs else "") for s in shown)
    )
    for label, text in headline_rows(summary):
        print(f"  {label:<34} {text}")
    print(f"  report: {out / 'report.html'}")
    print("=" * 64)
