"""Reward modelling: learn a scalar score from people's comparisons.

InstructGPT (Ouyang et al. 2022, Sec. 3.5, eq. 1): a scalar head on the SFT backbone, trained so
that sigmoid(r(x, y_w) - r(x, y_l)) is the probability people prefer y_w (Bradley-Terry). K-way
rankings become all C(K,2) pairs from one forward pass over the K responses, each prompt's pairs
weighted 1/C(K,2). Optional: hinge loss, a margin, a pointwise warm-up on graded data, a reward
centering term. After training the scores are normalised to mean 0, std 1 on a reference set.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus import distributed
from rufus.config import (
    REQUIRED,
    ConfigError,
    DataSection,
    LogArgs,
    LoraSection,
    ModelArgs,
    OptimArgs,
    RunArgs,
    as_config,
    opt,
)
from rufus.losses import reward as L
from rufus.trainers import common

log = logging.getLogger(__name__)


@dataclass
class RMSection:
    """The reward-model objective."""

    loss: Literal["logistic", "hinge"] = opt("logistic", "pairwise loss: logistic (Bradley-Terry) or hinge")
    margin: float | None = opt(None, "required score gap: logistic default 0, hinge default 1", ge=0)
    margin_from_data: bool = opt(
        False,
        "add each pair's margin from the data (a preference row's 'margin', a ranking's score gap, a published "
        "format's ratings) to the required gap, times margin_scale",
    )
    margin_scale: float = opt(1.0, "multiplier of the data's margins (rm.margin_from_data)", ge=0)
    center_coef: float = opt(0.0, "weight of the centering term mean(r^2), keeping scores near 0", ge=0)
    pointwise_data: str | None = opt(None, "graded data (prompt, completion, score) for a pointwise warm-up")
    pointwise_steps: int = opt(0, "optimiser steps of pointwise warm-up before the pairwise stage", ge=0)
    pointwise_loss: Literal["bce", "mse"] = opt("bce", "warm-up loss: bce for 0/1 grades, mse for a scale")
    normalize: bool = opt(True, "after training, store a gain and bias giving mean 0 / std 1 on the reference set")
    normalize_data: str | None = opt(
        None, "reference set for normalising (default: the training data's chosen responses)"
    )


@dataclass
class RMConfig(LogArgs, OptimArgs, RunArgs, ModelArgs):
    """Train a reward model on comparisons."""

    output_dir: str = opt("runs/rm", "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    lr: float = opt(1e-5, "peak learning rate (AdamW)", gt=0)
    data: DataSection = opt(DataSection, "training and evaluation comparisons")
    lora: LoraSection = opt(LoraSection, "LoRA adapters (lora.r > 0 turns them on; the head trains in full)")
    rm: RMSection = opt(RMSection, "reward-model objective")


@dataclass
class RMResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    model: object = None
    eval: dict | None = None  # rm/accuracy, rm/margin, rm/ece on data.eval at the end


def train_reward_model(config: RMConfig | dict) -> RMResult:
    """Train a reward model as configured; return where it went and what was logged."""
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from
    from rufus.data.reward import RewardCollator, tokenize_comparisons, tokenize_graded
    from rufus.models.loading import apply_lora
    from rufus.models.reward import head_module_names, load_reward_model

    cfg = as_config(RMConfig, config)
    run = common.start_run(cfg)
    acc = run.accelerator

    # 1. data: every comparison validated and tokenised before any model loads
    tokenizer = common.load_run_tokenizer(cfg)
    limits = dict(
        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation
    )

    read = options_from(cfg.data, tokenizer)  # how the files are written (detected, or data.format)

    def comparisons(spec, split, key):  # a ranking where the file gives one, else pairs
        records = load_records(spec, kind=("ranking", "preference"), split=split, key=key, options=read)
        return tokenize_comparisons(records, tokenizer, key=key, **limits)

    with acc.main_process_first():
        train = comparisons(cfg.data.train, cfg.data.train_split, "data.train")
        evals = comparisons(cfg.data.eval, cfg.data.eval_split, "data.eval") if cfg.data.eval else None
        graded = None
        if cfg.rm.pointwise_steps > 0:
            if not cfg.rm.pointwise_data:
                raise ConfigError(
                    "rm.pointwise_steps > 0 needs rm.pointwise_data (graded prompt/completion/score rows)"
                )
            graded = tokenize_graded(
                load_records(cfg.rm.pointwise_data, kind="graded", key="rm.pointwise_data", options=read),
                tokenizer,
                key="rm.pointwise_data",
                score_range=(0.0, 1.0) if cfg.rm.pointwise_loss == "bce" else None,
                **limits,
            )
        reference = None
        if cfg.rm.normalize and cfg.rm.normalize_data:
            reference = comparisons(cfg.rm.normalize_data, "train", "rm.normalize_data")
    if cfg.rm.margin_from_data:
        _check_margins(train, "data.train")
    collate = RewardCollator(tokenizer.pad_token_id)
    plan = common.BatchPlan(len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
    pairwise_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)
    warm_steps = cfg.rm.pointwise_steps
    warm_plan = (
        common.BatchPlan(len(graded), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
        if graded
        else None
    )
    max_steps = warm_steps + pairwise_steps

    # 2. model: scalar head on the backbone; LoRA trains adapters + the whole head
    model = load_reward_model(cfg.model, tokenizer=tokenizer, **common.trainable_model_args(cfg))
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS", modules_to_save=head_module_names(model))
    model = distributed.shard(cfg, acc, model)  # strategy=fsdp: sharded
    optimizer, scheduler = common.make_optimizer(cfg, model, max_steps)
    model, optimizer = distributed.prepare(acc, model, optimizer)
    start_step, _ = common.maybe_resume(run, acc.unwrap_model(model), optimizer, scheduler)
    logger = common.open_metrics(run, start_step)

    # 3. the loop: pointwise warm-up steps first (if any), then pairwise steps
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="rm")
    window = common.Window()
    model.train()
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        if step <= warm_steps:
            stats = _pointwise_step(cfg, acc, model, graded, warm_plan.global_batch(step), warm_plan, collate)
        else:
            stats = _pairwise_step(cfg, acc, model, train, plan.global_batch(step - warm_steps), plan, collate)
        grad_norm = common.clip_and_step(cfg, acc, model, optimizer, scheduler)
        window.add(grad_norm=grad_norm, time=time.perf_counter() - t0, tokens=stats.pop("tokens"), **stats)
        progress.update(1)
        progress.set_postfix(loss=f"{stats['loss']:.4f}")

        # 4. log, evaluate, checkpoint
        held_out = (lambda: evaluate(acc.unwrap_model(model), evals, collate, acc, cfg.batch_size)) if evals else None
        save = (acc.unwrap_model(model), optimizer, scheduler, None)
        stage = "pointwise" if step <= warm_steps else "pairwise"
        common.log_evaluate_save(run, logger, step, max_steps, window, model, held_out, save, stage=stage)
    progress.close()

    # 5. normalise (mean 0, std 1 on the reference set), save
    unwrapped = acc.unwrap_model(model)
    if cfg.rm.normalize:
        ref = reference if reference is not None else train
        mean, std = reference_stats(unwrapped, [g["responses"][_best(g)] for g in ref], collate, acc, cfg.batch_size)
        from rufus.models.reward import set_normalization

        set_normalization(unwrapped, 1.0 / max(std, 1e-6), -mean / max(std, 1e-6))
        logger.log(max_steps, {"rm/reference_mean": mean, "rm/reference_std": std})
    final_eval = evaluate(unwrapped, evals, collate, acc, cfg.batch_size) if evals else None
    final_dir = common.save_final(run, unwrapped, tokenizer)
    logger.close()
    common.finish_run(run, ["loss", "rm/accuracy", "rm/train_accuracy", "lr"])
    return RMResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, unwrapped, final_eval)


def _check_margins(groups: list[dict], key: str) -> None:
    missing = sum(1 for g in groups if "gaps" not in g)
    if missing:
        raise ConfigError(
            f"rm.margin_from_data: {missing} of {len(groups)} comparisons in {key} carry no margin (a preference "
            "row's 'margin', a ranking's 'scores', or a published format's ratings); set rm.margin_from_data=false"
        )


def _best(group: dict) -> int:
    scores = group["scores"]
    return max(range(len(scores)), key=scores.__getitem__)


def _pairwise_step(cfg, acc, model, data, global_idx, plan, collate) -> dict:
    """One optimiser step over the comparisons `global_idx`; returns detached statistics."""
    from rufus.models.reward import raw_scores

    # every prompt weighs 1, its pairs 1/(its pair count); dividing by the global prompt count
    # (times the process count that DDP's gradient averaging divides back out) makes the summed
    # micro-batch gradients equal the whole batch's
    normalizer = len(global_idx) / acc.num_processes
    num_responses = sum(len(data[i]["responses"]) for i in global_idx) / acc.num_processes
    base_margin = cfg.rm.margin if cfg.rm.margin is not None else (0.0 if cfg.rm.loss == "logistic" else 1.0)
    margin = base_margin
    total = {"loss": 0.0, "rm/train_accuracy": 0.0, "rm/train_margin": 0.0, "tokens": 0}
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        groups = [data[i] for i in idx]
        flat = [ids for g in groups for ids in g["responses"]]
        batch = {n: t.to(acc.device) for n, t in collate(flat).items()}
        better, worse, pair_counts, gaps, offset = [], [], [], [], 0
        for g in groups:  # all pairs of each prompt's K responses, one forward pass for all
            pairs = L.ranking_pairs(g["scores"])
            better += [offset + b for b, _ in pairs]
            worse += [offset + w for _, w in pairs]
            if cfg.rm.margin_from_data:  # m_p = rm.margin + scale * (the data's gap of the pair)
                gaps += [g["gaps"][b] - g["gaps"][w] for b, w in pairs]
            pair_counts.append(len(pairs))
            offset += len(g["responses"])
        weights = L.ranking_pair_weights(pair_counts).to(acc.device)
        if cfg.rm.margin_from_data:
            margin = base_margin + cfg.rm.margin_scale * torch.tensor(gaps, dtype=torch.float32, device=acc.device)
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            scores = raw_scores(model, batch["input_ids"], batch["attention_mask"])  # (N,) r(x, y)
            chosen, rejected = scores[better], scores[worse]  # (P,) per pair
            if cfg.rm.loss == "logistic":
                loss, stats = L.pairwise_logistic_loss(
                    chosen, rejected, margin=margin, weights=weights, normalizer=normalizer
                )
            else:
                loss, stats = L.pairwise_hinge_loss(
                    chosen, rejected, margin=margin, weights=weights, normalizer=normalizer
                )
            if cfg.rm.center_coef > 0:
                center, _ = L.centering_loss(scores, normalizer=num_responses)
                loss = loss + cfg.rm.center_coef * center
            distributed.backward(acc, model, loss)
        share = len(idx) / len(global_idx) * acc.num_processes  # this micro-batch's share of the step
        total["loss"] += loss.item()
        total["rm/train_accuracy"] += stats["accuracy"].item() * share
        total["rm/train_margin"] += stats["margin"].item() * share
        total["tokens"] += int(batch["attention_mask"].sum())
    return _reduce(acc, total)


def _pointwise_step(cfg, acc, model, data, global_idx, plan, collate) -> dict:
    from rufus.models.reward import raw_scores

    normalizer = len(global_idx) / acc.num_processes
    total = {"loss": 0.0, "tokens": 0}
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        batch = {n: t.to(acc.device) for n, t in collate([data[i]["ids"] for i in idx]).items()}
        targets = torch.tensor([data[i]["score"] for i in idx], dtype=torch.float32, device=acc.device)
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            scores = raw_scores(model, batch["input_ids"], batch["attention_mask"])
            loss, _ = L.pointwise_loss(scores, targets, kind=cfg.rm.pointwise_loss, normalizer=normalizer)
            distributed.backward(acc, model, loss)
        total["loss"] += loss.item()
        total["tokens"] += int(batch["attention_mask"].sum())
    return _reduce(acc, total)


def _reduce(acc, total: dict) -> dict:
    """Sum each statistic over processes (each process holds its share of the step)."""
    keys = sorted(total)
    values = acc.reduce(torch.tensor([float(total[k]) for k in keys], device=acc.device), reduction="sum")
    out = dict(zip(keys, values.tolist()))
    out["loss"] /= acc.num_processes  # each process's loss already carries the num_processes factor
    for k in ("rm/train_accuracy", "rm/train_margin"):
        if k in out:
            out[k] /= acc.num_processes
    return out


@torch.no_grad()
def _score_all(model, sequences: list[list[int]], collate, acc, batch_size: int) -> torch.Tensor:
    """Raw scores of `sequences` (shared out across processes, gathered back in order)."""
    from rufus.models.reward import raw_scores

    model.eval()
    n = len(sequences)
    per = math.ceil(n / acc.num_processes)
    mine = list(range(acc.process_index * per, min(n, (acc.process_index + 1) * per)))
    out = torch.zeros(per, device=acc.device)
    starts = list(range(0, len(mine), batch_size))
    for start, real in distributed.lockstep(acc, model, starts, filler=None):
        idx = mine[start : start + batch_size] if real else [0]
        batch = {k: t.to(acc.device) for k, t in collate([sequences[i] for i in idx]).items()}
        with acc.autocast():
            scores = raw_scores(model, batch["input_ids"], batch["attention_mask"])
        if real:
            out[start : start + len(idx)] = scores
    return acc.gather(out)[:n].cpu() if acc.num_processes > 1 else out[:n].cpu()


def evaluate(model, groups: list[dict], collate, acc, batch_size: int) -> dict:
    """rm/accuracy, rm/margin and rm/ece over every ranked pair of `groups` (raw scores)."""
    flat = [ids for g in groups for ids in g["responses"]]
    scores = _score_all(model, flat, collate, acc, batch_size)
    better, worse, offset = [], [], 0
    for g in groups:
        for b, w in L.ranking_pairs(g["scores"]):
            better.append(offset + b)
            worse.append(offset + w)
        offset += len(g["responses"])
    metrics = L.preference_metrics(scores[better], scores[worse])
    return {f"rm/{k}": v for k, v in metrics.items()}


def reference_stats(model, sequences, collate, acc, batch_size: int) -> tuple[float, float]:
    scores = _score_all(model, sequences, collate, acc, batch_size)
    return scores.mean().item(), scores.std(unbiased=False).item()


@dataclass
class EvalRMConfig:
    """Evaluate a reward model on held-out comparisons: accuracy, mean margin, calibration."""

    model: str = opt(REQUIRED, "reward model directory (or hub id)", model_path=True)
    data: str = opt(REQUIRED, "comparisons: a preference or ranking file, or a hub dataset name")
    format: Literal[
        "auto", "hh-rlhf", "ultrafeedback", "oasst1", "shp", "summarize_from_feedback", "helpsteer2", "trl"
    ] = opt("auto", "how `data` is written: auto = detected from its columns (see docs/data.md)")
    split: str = opt("test", "split to read when `data` is a hub dataset")
    batch_size: int = opt(16, "sequences scored per forward pass", ge=1)
    max_length: int = opt(1024, "longest prompt + response in tokens", ge=1)
    truncation: Literal["reject", "drop", "truncate"] = opt(
        "reject", "too-long rows: reject, drop or truncate (truncating cuts the final token the score is read at)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = opt("float32", "compute dtype")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")
    output_dir: str | None = opt(None, "if set, write metrics.jsonl and config.yaml here")


def eval_reward_model(config: EvalRMConfig | dict) -> dict:
    """rm/accuracy, rm/margin, rm/ece of a saved reward model on `data`; printed by the CLI."""
    from accelerate import Accelerator

    from rufus.config import save_config
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from
    from rufus.data.reward import RewardCollator, tokenize_comparisons
    from rufus.models.loading import load_tokenizer, resolve_dtype
    from rufus.models.reward import load_reward_model
    from rufus.report.metrics import MetricsLogger

    cfg = as_config(EvalRMConfig, config)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    groups = tokenize_comparisons(
        load_records(
            cfg.data, kind=("ranking", "preference"), split=cfg.split, key="data", options=options_from(cfg, tokenizer)
        ),
        tokenizer,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        key="data",
    )
    acc = Accelerator(cpu=not torch.cuda.is_available())
    dtype = resolve_dtype(cfg.dtype, acc.device)
    model = load_reward_model(cfg.model, tokenizer=tokenizer, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(
        acc.device
    )
    metrics = evaluate(model, groups, RewardCollator(tokenizer.pad_token_id), acc, cfg.batch_size)
    metrics["rm/pairs"] = sum(len(L.ranking_pairs(g["scores"])) for g in groups)
    if cfg.output_dir and acc.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        logger = MetricsLogger(cfg.output_dir)
        logger.log(0, metrics)
    return metrics
