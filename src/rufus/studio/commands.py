"""`rufus studio <command>`: serve, new-round, add-annotator, export, admin-token, demo.

Each command is a config dataclass plus a function, like every other Rufus command: keys come from
`--config FILE`, then `key=value` overrides, and each top-level key is also a flag (`--db PATH`,
`--models A B C`, `--labels-per-item 3`). `rufus studio <command> --help` lists them.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rufus.config import REQUIRED, ConfigError, GenerationSection, as_config, opt

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765


def _base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _quiet_datasets() -> None:
    """No progress bars from `datasets` (which reads round files): set before it is imported, or told."""
    import os

    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def login_url(url_base: str, token: str) -> str:
    return f"{url_base.rstrip('/')}/login?token={token}"


# --- serve --------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Start the labelling web server on a studio database."""

    db: str = opt(REQUIRED, "studio database: an SQLite file (created if missing) or an SQLAlchemy URL")
    host: str = opt(
        "127.0.0.1", "address to bind; anything but loopback opens the studio to the network (a warning is printed)"
    )
    port: int = opt(DEFAULT_PORT, "port to listen on", ge=1, le=65535)
    allowed_hosts: list[str] = opt(
        [], "extra Host names the server answers to (loopback names and the bound address always)"
    )
    secure_cookies: bool = opt(False, "mark session cookies Secure (set when a TLS proxy serves the studio over https)")
    log_level: str = opt("warning", "uvicorn log level: critical, error, warning, info, debug")


def serve(config: ServeConfig | dict) -> None:
    import uvicorn

    from rufus.studio import auth
    from rufus.studio.app import create_app
    from rufus.studio.db import open_database

    cfg = as_config(ServeConfig, config)
    _quiet_datasets()  # uploaded round files are read through datasets: no progress bars in the server log
    db, _ = open_database(cfg.db)
    with db.session() as s:
        token = auth.ensure_admin(s)
    base = _base_url(cfg.host, cfg.port)
    loopback = cfg.host in auth.LOOPBACK_HOSTS
    if not loopback:
        print(
            f"rufus studio: WARNING: binding {cfg.host}, not loopback: anyone who can reach this machine on port "
            f"{cfg.port} can open the studio's pages (they still need a login link). Serve it over https "
            "(a TLS proxy, with secure_cookies=true) on a shared network.",
            file=sys.stderr,
            flush=True,
        )
    print(f"rufus studio: serving {db.url} on {base}", flush=True)
    if token:
        print("rufus studio: admin login (shown once; `rufus studio admin-token` makes a new one):", flush=True)
        print(login_url(base, token), flush=True)
    app = create_app(
        db, allowed_hosts=auth.allowed_hosts(cfg.host, cfg.allowed_hosts), secure_cookies=cfg.secure_cookies
    )
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=cfg.log_level in ("info", "debug"),
        proxy_headers=False,
        server_header=False,
    )


# --- rounds -------------------------------------------------------------------------------------


@dataclass
class NewRoundConfig:
    """Create a labelling round: sample responses from models (--prompts, --models), or import them (--responses)."""

    db: str = opt(REQUIRED, "studio database: an SQLite file (created if missing) or an SQLAlchemy URL")
    name: str = opt(REQUIRED, "round name (unique)")
    task: Literal["pairwise", "ranking", "rating"] = opt(
        "pairwise",
        "what annotators do: pairwise (A/B/tie/both bad), ranking (order K, ties allowed), rating (1-7 each)",
    )
    prompts: str | None = opt(None, "prompt-format file (.jsonl/.json/.csv/.parquet) whose prompts the models answer")
    models: list[str] = opt(
        [], "models or checkpoints to sample from (local path, hub id, builtin:...), with --prompts", model_path=True
    )
    responses: str | None = opt(
        None, "instead of sampling: rows with 'prompt', a 'responses' list and optionally 'models'"
    )
    gold: str | None = opt(
        None,
        "gold items with known answers, mixed into the round: a ranking file (prompt, responses, "
        "scores; higher = better), for each annotator's accuracy",
    )
    samples_per_model: int = opt(1, "responses sampled per prompt from each model", ge=1)
    labels_per_item: int = opt(1, "independent labels each item gets (from different annotators)", ge=1)
    pairs: Literal["all", "models"] = opt(
        "all", "pairwise rounds: every pair of a prompt's responses, or only pairs from different models"
    )
    instructions: str = opt("", "guidance shown above every item")
    max_prompts: int = opt(-1, "use at most this many prompts of the file (-1 = all)", ge=-1)
    generation: GenerationSection = opt(GenerationSection, "sampling, as in rufus generate")
    batch_size: int = opt(32, "sequences per generate call", ge=1)
    seed: int = opt(0, "random seed of the sampler", ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = opt("auto", "weights dtype for sampling")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")
    progress: bool = opt(True, "show a progress bar while sampling")


def new_round(config: NewRoundConfig | dict) -> dict:
    from rufus.rollout.sample import sample_responses
    from rufus.studio.db import open_database
    from rufus.studio.files import read_candidates, read_gold, read_prompts
    from rufus.studio.rounds import Candidate, create_round

    cfg = as_config(NewRoundConfig, config)
    _quiet_datasets()
    if (cfg.responses is None) == (cfg.prompts is None):
        raise ConfigError(
            "responses / prompts: give exactly one: --responses FILE (responses made elsewhere), or "
            "--prompts FILE with --models A B ... (sampled here)"
        )
    if cfg.prompts is not None and not cfg.models:
        raise ConfigError("models: --prompts needs --models (one or more models to answer them)")
    if cfg.responses is not None and cfg.models:
        raise ConfigError("models: with --responses the model names come from the file's 'models' column")
    if cfg.prompts is not None and len(cfg.models) * cfg.samples_per_model < 2:
        raise ConfigError(
            "models / samples_per_model: a round compares at least two responses per prompt; give two "
            "models or samples_per_model >= 2"
        )
    if cfg.responses is not None:
        cands = read_candidates(cfg.responses)
        source = {"responses": cfg.responses}
    else:
        prompts = read_prompts(cfg.prompts)
        if cfg.max_prompts > 0:
            prompts = prompts[: cfg.max_prompts]
        per_model = [
            sample_responses(
                m,
                prompts,
                cfg.samples_per_model,
                cfg.generation,
                batch_size=cfg.batch_size,
                seed=cfg.seed + j,
                dtype=cfg.dtype,
                progress=cfg.progress,
                desc=f"sample {m}",
                trust_remote_code=cfg.trust_remote_code,
            )
            for j, m in enumerate(cfg.models)
        ]
        k = cfg.samples_per_model
        cands = [
            Candidate(
                p,
                [r for out in per_model for r in out[i]],
                [m for m in cfg.models for _ in range(k)],
                [j for _ in cfg.models for j in range(k)],
            )
            for i, p in enumerate(prompts)
        ]
        source = {
            "prompts": cfg.prompts,
            "models": cfg.models,
            "samples_per_model": k,
            "generation": vars(cfg.generation),
            "seed": cfg.seed,
        }
    if cfg.max_prompts > 0:
        cands = cands[: cfg.max_prompts]
    gold = read_gold(cfg.gold) if cfg.gold else None
    db, _ = open_database(cfg.db)
    summary = create_round(
        db,
        cfg.name,
        cfg.task,
        cands,
        labels_per_item=cfg.labels_per_item,
        pairs=cfg.pairs,
        instructions=cfg.instructions,
        source=source,
        gold=gold,
    )
    print_admin_token_if_new(db)
    print(
        f"rufus studio: round {summary['round']!r}: {summary['items']} {cfg.task} items from {summary['prompts']} "
        f"prompts, {cfg.labels_per_item} label(s) each"
        + (f", and {summary['gold_items']} gold items" if summary["gold_items"] else "")
        + (
            f"; {summary['skipped_prompts']} prompts skipped (fewer than two different responses)"
            if summary["skipped_prompts"]
            else ""
        )
    )
    return summary


def print_admin_token_if_new(db) -> None:
    from rufus.studio import auth

    with db.session() as s:
        token = auth.ensure_admin(s)
    if token:
        print("rufus studio: new studio; admin login for the default address (shown once):")
        print(login_url(_base_url("127.0.0.1", DEFAULT_PORT), token))


# --- people -------------------------------------------------------------------------------------


@dataclass
class AddAnnotatorConfig:
    """Create an annotator and print their secret login URL (its last line of output)."""

    name: str = opt(REQUIRED, "the annotator's name (unique)")
    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    round: str | None = opt(None, "only this round (default: every round)")
    admin: bool = opt(False, "make them an admin instead of an annotator")
    url_base: str = opt(_base_url("127.0.0.1", DEFAULT_PORT), "address the studio is served at, for the printed URL")


def add_annotator(config: AddAnnotatorConfig | dict) -> str:
    from rufus.studio import auth
    from rufus.studio.db import open_database
    from rufus.studio.rounds import add_member, get_round

    cfg = as_config(AddAnnotatorConfig, config)
    db, _ = open_database(cfg.db)
    print_admin_token_if_new(db)
    with db.session() as s:
        user, token = auth.create_user(s, cfg.name, role="admin" if cfg.admin else "annotator")
        if cfg.round:
            add_member(s, user, get_round(s, cfg.round))
    url = login_url(cfg.url_base, token)
    print(
        f"rufus studio: {'admin' if cfg.admin else 'annotator'} {cfg.name!r} created"
        + (f" for round {cfg.round!r}" if cfg.round else "")
        + "; their login URL (shown once):"
    )
    print(url)
    return url


@dataclass
class AdminTokenConfig:
    """Make a new admin login URL (the old admin link and sessions stop working)."""

    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    name: str = opt("admin", "the admin user")
    url_base: str = opt(_base_url("127.0.0.1", DEFAULT_PORT), "address the studio is served at, for the printed URL")


def admin_token(config: AdminTokenConfig | dict) -> str:
    from rufus.studio import auth
    from rufus.studio.db import StudioError, User, open_database

    cfg = as_config(AdminTokenConfig, config)
    db, _ = open_database(cfg.db, create=False)
    with db.session() as s:
        auth.ensure_admin(s)
        from sqlalchemy import select

        user = s.scalar(select(User).where(User.name == cfg.name))
        if user is None or user.role != "admin":
            raise StudioError(f"{cfg.name!r} is not an admin of this studio")
        token = auth.rotate_token(s, cfg.name)
    url = login_url(cfg.url_base, token)
    print(url)
    return url


# --- export -------------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    """Write a round's labels as a training file for rufus rm / dpo / kto / sft."""

    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    round: str = opt(REQUIRED, "round to export")
    format: Literal["preference", "ranking", "sft", "graded", "kto"] = opt(
        "preference",
        "preference (rm, dpo), ranking (rm), sft (the better answers), graded (rm warm-up), "
        "kto (prompt, completion, label: desirable or not)",
    )
    out: str = opt(REQUIRED, "output .jsonl file")
    tie: Literal["drop", "half"] = opt("drop", "ties in preference files: drop, or half (written in both orders)")
    aggregate: Literal["label", "majority"] = opt("label", "one row per label, or the majority per item")
    with_models: bool = opt(False, "add the model names of the responses (model ids are hidden while labelling)")
    scale: Literal["unit", "raw"] = opt("unit", "graded scores from ratings: unit = (r-1)/6 in [0, 1], raw = 1-7")


def export(config: ExportConfig | dict) -> int:
    from rufus.studio.db import open_database
    from rufus.studio.export import export_round

    cfg = as_config(ExportConfig, config)
    db, _ = open_database(cfg.db, create=False)
    n = export_round(
        db,
        cfg.round,
        cfg.format,
        cfg.out,
        tie=cfg.tie,
        aggregate=cfg.aggregate,
        with_models=cfg.with_models,
        scale=cfg.scale,
    )
    print(f"rufus studio: wrote {n} {cfg.format} rows of round {cfg.round!r} to {cfg.out}")
    return n


# --- demo ---------------------------------------------------------------------------------------


@dataclass
class StudioDemoConfig:
    """A studio with a round of playground prompts answered by the playground's SFT model and its base."""

    output_dir: str = opt("runs/studio-demo", "where the demo keeps its models (pipeline/) and database (studio.db)")
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(DEFAULT_PORT, "port to listen on", ge=1, le=65535)
    prompts: int = opt(40, "playground prompts in the demo round", ge=1)
    labels_per_item: int = opt(2, "labels per item", ge=1)
    annotator: str = opt("you", "name of the demo annotator whose login link is printed")
    serve: bool = opt(True, "start the server (false: only prepare the database and print the links)")
    seed: int = opt(0, "seed of the prompts and the sampler", ge=0)
    progress: bool = opt(True, "progress bars")


def demo(config: StudioDemoConfig | dict) -> dict:
    from sqlalchemy import select

    from rufus.config import GenerationSection as Gen
    from rufus.pipeline import run_pipeline
    from rufus.playground.base import make_prompts
    from rufus.rollout.sample import sample_responses
    from rufus.studio import auth
    from rufus.studio.db import Round, User, open_database
    from rufus.studio.rounds import Candidate, create_round

    cfg = as_config(StudioDemoConfig, config)
    out = Path(cfg.output_dir)
    db, _ = open_database(out / "studio.db")
    with db.session() as s:
        auth.ensure_admin(s)
        have_round = s.scalar(select(Round.id).where(Round.name == "demo")) is not None
    if not have_round:
        print(
            "[studio demo] the playground's SFT model (base model built once and cached; SFT about a minute)",
            flush=True,
        )
        pipe = run_pipeline(
            {
                "output_dir": str(out / "pipeline"),
                "stages": ["sft"],
                "seed": cfg.seed,
                "progress": cfg.progress,
                "dtype": "auto",
            }
        )
        sft, base = str(pipe.output_dir / "sft" / "final"), _playground_base()
        prompts = [r["prompt"] for r in make_prompts(cfg.prompts, 1000 + cfg.seed)]
        gen = Gen(max_new_tokens=72, temperature=0.7)
        answers = {
            name: sample_responses(
                path, prompts, 1, gen, seed=cfg.seed + j, progress=cfg.progress, desc=f"sample {name}"
            )
            for j, (name, path) in enumerate((("sft", sft), ("base", base)))
        }
        cands = [
            Candidate(p, [answers["sft"][i][0], answers["base"][i][0]], ["sft", "base"]) for i, p in enumerate(prompts)
        ]
        create_round(
            db,
            "demo",
            "pairwise",
            cands,
            labels_per_item=cfg.labels_per_item,
            pairs="models",
            instructions="Which answer helps the person more: on topic, polite, concise, answering the request?",
            source={"demo": True, "models": {"sft": sft, "base": base}},
        )
    with db.session() as s:
        if s.scalar(select(User.id).where(User.name == cfg.annotator)) is None:
            auth.create_user(s, cfg.annotator)
        you = auth.rotate_token(s, cfg.annotator)
        admin_name = s.scalar(select(User.name).where(User.role == "admin").order_by(User.id))
        admin = auth.rotate_token(s, admin_name)
    base_url = _base_url(cfg.host, cfg.port)
    print(f"\nrufus studio demo: {out / 'studio.db'}, round 'demo' (the playground's SFT model against its base)")
    print(f"  studio:          {base_url}")
    print(f"  admin login:     {login_url(base_url, admin)}")
    print(f"  annotator login: {login_url(base_url, you)}", flush=True)
    result = {
        "db": str(out / "studio.db"),
        "url": base_url,
        "admin_url": login_url(base_url, admin),
        "annotator_url": login_url(base_url, you),
    }
    if cfg.serve:
        db.dispose()
        serve({"db": str(out / "studio.db"), "host": cfg.host, "port": cfg.port})
    return result


def _playground_base() -> str:
    from rufus.playground.base import base_model_path

    return str(base_model_path(seed=0))


# --- leaderboard and agreement ----------------------------------------------------------------------


@dataclass
class LeaderboardConfig:
    """Rank models from comparisons: Bradley-Terry ratings with bootstrap intervals, and online Elo."""

    file: str | None = opt(
        None, "comparisons (.jsonl/.json/.csv/.parquet): rows with model_a, model_b, winner (a, b or tie)"
    )
    db: str | None = opt(None, "instead of a file: a studio database, with --rounds")
    rounds: list[str] = opt([], "studio rounds whose labels compare models (rankings count as all their pairs)")
    anchor: str | None = opt(None, "the model rated 1000 (default: the first one seen)")
    resamples: int = opt(1000, "bootstrap resamples for the intervals (0 = none)", ge=0)
    seed: int = opt(0, "seed of the bootstrap", ge=0)
    prior: float = opt(
        0.0,
        "Gaussian prior precision on the log-odds strengths (0 = maximum likelihood); "
        "keeps ratings finite when a model never wins or never loses",
        ge=0,
    )
    elo_k: float = opt(4.0, "K of the online Elo view", gt=0)
    out: str | None = opt(None, "write the table as JSON here")
    plot: str | None = opt(None, "write a PNG of the ratings with their intervals here")


def leaderboard(config: LeaderboardConfig | dict) -> list:
    import json

    from rufus.studio import leaderboard as L

    cfg = as_config(LeaderboardConfig, config)
    if (cfg.file is None) == (cfg.db is None):
        raise ConfigError("file / db: give a comparisons FILE, or --db with --rounds")
    if cfg.file is not None:
        from rufus.data.loading import load_records

        _quiet_datasets()
        records = load_records(cfg.file, kind="comparison", key="file")
        comparisons = [L.Comparison(r["model_a"], r["model_b"], r["winner"]) for r in records.dataset]
    else:
        from rufus.studio.db import open_database
        from rufus.studio.stats import round_comparisons

        if not cfg.rounds:
            raise ConfigError("rounds: --db needs --rounds NAME [NAME ...]")
        db, _ = open_database(cfg.db, create=False)
        comparisons = round_comparisons(db, cfg.rounds)
        if not comparisons:
            raise ConfigError(f"rounds: {', '.join(cfg.rounds)} hold no labels comparing two different models")
    try:
        rows = L.leaderboard(
            comparisons, anchor=cfg.anchor, resamples=cfg.resamples, seed=cfg.seed, prior=cfg.prior, elo_k=cfg.elo_k
        )
    except L.LeaderboardError as e:
        raise ConfigError(str(e)) from None
    print(L.format_table(rows))
    print(
        f"({len(comparisons)} comparisons; intervals from {cfg.resamples} bootstrap resamples; online Elo depends "
        "on the order of the comparisons)"
    )
    if cfg.out:
        from rufus.config import atomic_write_text

        atomic_write_text(cfg.out, json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    if cfg.plot:
        L.plot(rows, cfg.plot)
    return rows


@dataclass
class StatsConfig:
    """Agreement among a round's annotators, and progress: raw agreement, Cohen's / Fleiss' kappa,
    Krippendorff's alpha."""

    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    round: str = opt(REQUIRED, "the round")
    out: str | None = opt(None, "also write the figures as JSON here")


def stats(config: StatsConfig | dict) -> dict:
    import json

    from rufus.studio.db import open_database
    from rufus.studio.rounds import get_round, round_progress
    from rufus.studio.stats import round_agreement

    cfg = as_config(StatsConfig, config)
    db, _ = open_database(cfg.db, create=False)
    with db.read() as s:
        progress = round_progress(s, get_round(s, cfg.round))
    figures = round_agreement(db, cfg.round)
    print(
        f"round {cfg.round!r} ({figures['task']}): {progress['labels']} of {progress['labels_wanted']} labels, "
        f"{progress['complete_items']} of {progress['items']} items complete; {figures['shared_units']} units "
        "labelled by two or more people"
    )
    for key, name in (
        ("raw_agreement", "raw agreement"),
        ("fleiss_kappa", "Fleiss' kappa"),
        ("krippendorff_alpha", "Krippendorff's alpha (ordinal)"),
    ):
        if key in figures:
            value = figures[key]
            print(f"  {name:<32} {'-' if value is None else f'{value:.3f}'}")
    for pair in figures["cohen"]:
        kappa = "-" if pair["kappa"] is None else f"{pair['kappa']:.3f}"
        print(
            f"  Cohen's kappa {pair['annotators'][0]} / {pair['annotators'][1]}: {kappa} "
            f"(agreement {pair['agreement']:.3f} on {pair['units']} units)"
        )
    from rufus.studio.quality import annotator_quality

    quality = annotator_quality(db, cfg.round)
    for q in quality:
        agree = "-" if q.agreement is None else f"{q.agreement:.2f}"
        gold = "-" if q.gold_accuracy is None else f"{q.gold_accuracy:.2f}"
        print(
            f"  {q.annotator}: {q.labels} labels, agreement with the others {agree}, gold accuracy {gold}"
            + (" (excluded)" if q.excluded else "")
            + "".join(f"\n    flag: {f}" for f in q.flags)
        )
    figures["annotators"] = [q.as_dict() for q in quality]
    if cfg.out:
        from rufus.config import atomic_write_text

        atomic_write_text(
            cfg.out, json.dumps({"progress": progress, "agreement": figures}, indent=1, default=str) + "\n"
        )
    return figures


@dataclass
class ExcludeConfig:
    """Leave an annotator's labels of a round out of its exports, agreement and leaderboard (or take that back)."""

    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    round: str = opt(REQUIRED, "the round")
    annotator: str = opt(REQUIRED, "the annotator's name")
    reason: str = opt("", "why (kept in the round's log)")
    undo: bool = opt(False, "include the annotator again")


def exclude_annotator(config: ExcludeConfig | dict) -> None:
    from rufus.studio.db import open_database
    from rufus.studio.quality import exclude, include

    cfg = as_config(ExcludeConfig, config)
    db, _ = open_database(cfg.db, create=False)
    if cfg.undo:
        include(db, cfg.round, cfg.annotator)
        print(f"rufus studio: {cfg.annotator!r}'s labels of round {cfg.round!r} count again")
    else:
        exclude(db, cfg.round, cfg.annotator, cfg.reason)
        print(
            f"rufus studio: {cfg.annotator!r}'s labels of round {cfg.round!r} are left out of its exports, "
            "agreement and leaderboard"
        )


@dataclass
class SimulateConfig:
    """Simulated annotators (the playground's taste) label a round over HTTP, as people's browsers do."""

    db: str = opt(REQUIRED, "studio database: an SQLite file or an SQLAlchemy URL")
    round: str = opt(REQUIRED, "the round to label")
    annotators: int = opt(3, "honest simulated annotators (sim-1, sim-2, ...)", ge=0)
    careless: int = opt(0, "careless ones among them, who answer at random (careless-1, ...)", ge=0)
    adversarial: int = opt(0, "adversarial ones, who answer against their taste (adversarial-1, ...)", ge=0)
    preference: str = opt("default", "the taste: default, concise, polite, helpful, or weights 'polite=2,concise=1'")
    temperature: float = opt(0.5, "Bradley-Terry temperature of each choice (0 = no noise)", ge=0)
    disagreement: float = opt(0.3, "spread of the annotators' own weights (lognormal sigma)", ge=0)
    limit: int = opt(
        -1, "at most this many labels per annotator (-1 = until the round has nothing left for them)", ge=-1
    )
    url: str | None = opt(None, "a running studio to label through (default: start one on a free loopback port)")
    seed: int = opt(0, "seed of the annotators' weights and choices")


def simulate(config: SimulateConfig | dict) -> dict:
    from rufus.playground.taste import Annotators
    from rufus.studio.db import open_database
    from rufus.studio.simulate import simulate_round

    cfg = as_config(SimulateConfig, config)
    total = cfg.annotators + cfg.careless + cfg.adversarial
    if total < 1:
        raise ConfigError("annotators / careless / adversarial: simulate at least one annotator")
    try:
        taste = Annotators(
            cfg.preference, n=total, temperature=cfg.temperature, disagreement=cfg.disagreement, seed=cfg.seed
        )
    except ValueError as e:
        raise ConfigError(f"preference: {e}") from None
    db, _ = open_database(cfg.db, create=False)
    kinds = ["honest"] * cfg.annotators + ["careless"] * cfg.careless + ["adversarial"] * cfg.adversarial
    done = simulate_round(
        db, cfg.round, kinds, taste, seed=cfg.seed, limit=cfg.limit if cfg.limit > 0 else None, url=cfg.url
    )
    for name, n in done.items():
        print(f"rufus studio simulate: {name} gave {n} labels in round {cfg.round!r}")
    return done


# --- the command line ---------------------------------------------------------------------------

COMMANDS = {
    "serve": (ServeConfig, serve, "start the labelling web server", ()),
    "new-round": (NewRoundConfig, new_round, "create a round: sample from models or import responses", ()),
    "add-annotator": (AddAnnotatorConfig, add_annotator, "create an annotator and print their login URL", ("name",)),
    "export": (ExportConfig, export, "write a round's labels as a training file", ()),
    "admin-token": (AdminTokenConfig, admin_token, "print a new admin login URL (the old one stops working)", ()),
    "simulate": (SimulateConfig, simulate, "simulated annotators label a round over HTTP (offline loop)", ()),
    "exclude": (ExcludeConfig, exclude_annotator, "leave an annotator's labels of a round out (or --undo)", ()),
    "stats": (StatsConfig, stats, "agreement among a round's annotators (kappas, alpha) and its progress", ()),
    "demo": (StudioDemoConfig, demo, "a studio pre-filled with playground responses, served on loopback", ()),
}
TOP_COMMANDS = {
    "leaderboard": (
        LeaderboardConfig,
        leaderboard,
        "rank models from comparisons: Bradley-Terry with intervals, Elo",
        ("file",),
    ),
}


def add_parser(sub) -> None:
    """Add `rufus studio ...` and `rufus leaderboard` to the main parser's subcommands."""
    desc = "the labelling studio: people compare, rank and rate responses; exports feed rufus rm / dpo / sft"
    studio = sub.add_parser("studio", help=desc, description=desc)
    inner = studio.add_subparsers(dest="studio_command", metavar="command")
    for name, (cls, _, help_text, positional) in COMMANDS.items():
        _add_command(inner, name, cls, help_text, positional)
    for name, (cls, _, help_text, positional) in TOP_COMMANDS.items():
        _add_command(sub, name, cls, help_text, positional)


def _add_command(sub, name: str, cls: type, help_text: str, positional: tuple[str, ...]) -> None:
    """A subcommand whose top-level config keys are flags (--key VALUE, lists --key A B, bools --key)."""
    import argparse
    import dataclasses
    import typing

    p = sub.add_parser(
        name,
        help=help_text,
        description=(cls.__doc__ or help_text).strip(),
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-h", "--help", action="store_true", help="list every config key and exit")
    p.add_argument("--config", "-c", help="YAML config file (flags and key=value overrides win)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        doc = f.metadata.get("help", "")
        if f.name in positional:
            p.add_argument(f.name, nargs="?", metavar=f.name.upper(), help=doc)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            p.add_argument(flag, dest=f"flag_{f.name}", nargs="?", const="true", metavar="true|false", help=doc)
        elif typing.get_origin(tp) is list:
            p.add_argument(flag, dest=f"flag_{f.name}", nargs="+", metavar="VALUE", help=doc)
        else:
            p.add_argument(flag, dest=f"flag_{f.name}", metavar="VALUE", help=doc)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generation.max_new_tokens=32"
    )


def run(args, parser) -> int:
    """Run `rufus studio <command>` or `rufus leaderboard` from parsed arguments; return the exit code."""
    choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    if args.command != "studio":
        cls, fn, _, positional = TOP_COMMANDS[args.command]
        return _run_command(args, choices[args.command], f"rufus {args.command}", cls, fn, positional)
    studio = choices["studio"]
    if not args.studio_command:
        studio.print_help()
        return 2
    cls, fn, _, positional = COMMANDS[args.studio_command]
    sub = studio._subparsers._group_actions[0].choices[args.studio_command]  # noqa: SLF001
    return _run_command(args, sub, f"rufus studio {args.studio_command}", cls, fn, positional)


def _run_command(args, sub, label: str, cls: type, fn, positional: tuple[str, ...]) -> int:
    import dataclasses
    import json

    from rufus.config import config_help, load_config
    from rufus.data.errors import DataError
    from rufus.studio.db import StudioError

    if args.help:
        print(sub.format_help())
        print(config_help(cls))
        return 0
    overrides = []
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name if f.name in positional else f"flag_{f.name}", None)
        if value is None:
            continue
        overrides.append(f"{f.name}={json.dumps(value)}" if isinstance(value, list) else f"{f.name}={value}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        cfg = load_config(cls, args.config, overrides + list(args.overrides))
        fn(cfg)
    except (ConfigError, DataError, StudioError) as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
