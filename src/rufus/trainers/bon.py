"""Best-of-n rejection-sampling fine-tuning: sample n, keep the best, fine-tune on them, repeat.

Best-of-n sampling against a reward is the baseline of Nakano et al. 2021 (WebGPT, Sec. 5) and
Stiennon et al. 2020; fine-tuning on the kept samples and sampling again from the improved policy
is RAFT (Dong et al. 2023), ReST's Improve/Grow loop (Gulcehre et al. 2023), Llama 2's rejection
sampling (Touvron et al. 2023, Sec. 3.2.3) and expert iteration. Each round:
  1. sample bon.group_size (n) responses per prompt from the current policy;
  2. score them with the reward sources;
  3. keep the best bon.top_k of each prompt's n (at least bon.threshold, if set): `rufus.bon.select_best`;
  4. fine-tune on the kept (prompt, response) pairs with the SFT loss, response tokens only;
  5. log, checkpoint.
One round of n samples moves the policy at most log n - (n-1)/n nats from the sampler
(`rufus.bon.bon_kl_bound`, logged as bon/kl_bound); fine-tuning then distils that into the weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rufus.config import ConfigError, DataSection, LogArgs, ModelArgs, OptimArgs, RunArgs, SamplingArgs, as_config, opt
from rufus.trainers import common, online

log = logging.getLogger(__name__)


@dataclass
class BoNSection:
    """Best-of-n rejection sampling: samples per prompt, which are kept, how many rounds."""

    group_size: int = opt(4, "n: responses sampled per prompt each round", ge=1)
    top_k: int = opt(1, "responses kept per prompt: the top_k highest-scoring of its n", ge=1)
    threshold: float | None = opt(
        None, "keep only responses scoring at least this (among the top_k); None = no threshold"
    )
    rounds: int = opt(
        1, "rounds of sample -> score -> keep -> fine-tune, each sampling from the policy as it then is", ge=1
    )
    prompts_per_round: int | None = opt(
        None, "prompts sampled each round, cycling through the data in a seeded order; None = all", ge=1
    )
    sft_epochs: float = opt(
        1.0, "passes of SFT over each round's kept set (max_steps > 0 fixes the steps per round instead)", gt=0
    )
    prompts_per_generate: int = opt(0, "prompts per generate call, each repeated n times; 0 = batch_size", ge=0)


@dataclass
class BoNConfig(SamplingArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """Best-of-n rejection-sampling fine-tuning (RAFT / ReST-style expert iteration)."""

    output_dir: str = opt(
        "runs/bon", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/"
    )
    batch_size: int = opt(
        8, "kept (prompt, response) pairs per SFT optimiser step, over all processes and accumulation steps", ge=1
    )
    max_steps: int = opt(
        -1, "SFT optimiser steps per round; -1 = as many as bon.sft_epochs passes over the kept set take", ge=-1
    )
    epochs: float = opt(1.0, "unused: bon.rounds and bon.sft_epochs set the length of a run")
    save_every: int = opt(1, "write a checkpoint every this many rounds (and after the last; 0 = only then)", ge=0)
    data: DataSection = opt(DataSection, "prompts (prompt-only format); data.max_prompt_length bounds them")
    bon: BoNSection = opt(BoNSection, "best-of-n selection and rounds")
    num_samples: int = opt(4, "kept (prompt, response, score) rows written to samples.jsonl per round (0 = none)", ge=0)


@dataclass
class BoNResult:
    output_dir: Path
    final_dir: Path
    rounds: int
    steps: int  # SFT optimiser steps over all rounds
    metrics: list[dict]  # one row per round written to metrics.jsonl by this process (main process only)
    policy: object = None  # the trained policy (unwrapped; a peft model under LoRA)
    reward: object = None  # the RewardPipeline


def train_bon(config: BoNConfig | dict, reward_fn=None) -> BoNResult:
    """Run best-of-n fine-tuning as configured. `reward_fn(prompts, completions, **kw) -> list[float]`
    (or a list of such functions) adds Python reward sources to those in `config.reward`."""
    from accelerate.utils import gather_object

    from rufus.bon import bon_kl_bound, select_best
    from rufus.data.sft import SFTCollator

    cfg = as_config(BoNConfig, config)
    _check(cfg)
    run = common.start_run(cfg)
    acc = run.accelerator
    world, rank = acc.num_processes, acc.process_index
    b = cfg.bon

    # 0. prompts and reward sources first: bad input fails before the model loads
    tokenizer = common.load_run_tokenizer(cfg)
    prompts = online.load_prompts(cfg, acc, tokenizer)
    # no cross-process gather for reward.scale: each process samples its own number of responses
    reward = online.build_reward(cfg, run, reward_fn, gather=False)
    per_round = b.prompts_per_round or len(prompts)
    prompt_plan = common.BatchPlan(len(prompts), per_round, 1, 1, 0, cfg.seed)  # round r's prompts: global_batch(r)
    common.BatchPlan(1, cfg.batch_size, cfg.grad_accum, world, rank, cfg.seed)  # batch_size splits? (raises if not)
    # the LR schedule spans the most SFT steps the rounds can take (every prompt keeping top_k)
    steps_cap = cfg.max_steps if cfg.max_steps > 0 else _sft_steps(cfg, per_round * b.top_k)
    collate = SFTCollator(tokenizer.pad_token_id)

    model, optimizer, scheduler = online.load_policy(cfg, run, tokenizer, b.rounds * steps_cap, dropout_off=False)
    policy = acc.unwrap_model(model)
    start_round, saved, logger, samples = online.open_outputs(run, policy, optimizer, scheduler, reward)
    updates = saved.get("updates", 0)

    chunk = b.prompts_per_generate or cfg.batch_size
    engine = online.rollout_engine(cfg, acc, policy, tokenizer)
    progress = common.progress_bar(cfg, acc, b.rounds, start_round, desc="bon")
    for rnd in range(start_round + 1, b.rounds + 1):
        t0 = time.perf_counter()
        online.sync_engine(acc, engine, policy)  # the policy as the earlier rounds left it
        mine = prompt_plan.global_batch(rnd)[rank::world]  # this process's share of the round's prompts
        kept, sums = [], torch.zeros(5, dtype=torch.float64)  # score sum, score^2 sum, samples, length sum, no EOS
        for start in range(0, len(mine), chunk):
            group = [prompts[i] for i in mine[start : start + chunk]]

            # 1-2. sample n responses per prompt from the current policy; score them
            got = online.sample_and_score(cfg, acc, engine, tokenizer, group, b.group_size, reward, len(group))
            scores = got.scores  # (G*n,) prompt g's samples at g*n .. g*n+n-1
            lengths, no_eos = sum(map(len, got.responses)), (~got.has_eos).sum().item()
            sums += torch.tensor(
                [scores.sum().item(), (scores.double() ** 2).sum().item(), len(scores), lengths, no_eos]
            )

            # 3. keep the best: top_k of each prompt's n, at least threshold
            for j in select_best(scores, b.group_size, top_k=b.top_k, threshold=b.threshold):
                prompt = group[j // b.group_size]
                kept.append(_example(prompt, got, j, cfg.data.completion_only_loss))
        t_sample = time.perf_counter() - t0
        kept = gather_object(kept) if world > 1 else kept  # every process holds the whole kept set, rank order
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu().tolist()

        # 4. fine-tune on the kept pairs with the SFT loss (response tokens only)
        t_train = time.perf_counter()
        row = {}
        if kept:
            steps = cfg.max_steps if cfg.max_steps > 0 else _sft_steps(cfg, len(kept))
            row = _fine_tune(cfg, acc, model, optimizer, scheduler, kept, collate, rnd, steps)
            updates += steps
        else:
            log.warning("round %d: no response reached bon.threshold=%s; nothing to fine-tune on", rnd, b.threshold)
        t_train = time.perf_counter() - t_train

        # 5. log, samples, checkpoint
        score_mean = sums[0] / sums[2]
        row.update(
            {
                "score/mean": score_mean,
                "score/std": max(sums[1] / sums[2] - score_mean**2, 0.0) ** 0.5,
                "bon/kept": len(kept),
                "bon/kl_bound": bon_kl_bound(b.group_size),
                "response/length": sums[3] / sums[2],
                "response/no_eos": sums[4] / sums[2],
                "lr": scheduler.get_last_lr()[0],
                "sft/updates": updates,
                "time/sample_s": t_sample,
                "time/train_s": t_train,
                "time/round_s": time.perf_counter() - t0,
            }
        )
        if kept:
            row["score/kept"] = sum(k["score"] for k in kept) / len(kept)
        samples.write([samples.row(rnd, k["prompt"], k["response"], k["score"]) for k in kept[: cfg.num_samples]])
        save = (policy, optimizer, scheduler, {"reward": reward.state_dict(), "updates": updates})
        online.end_step(run, logger, progress, rnd, b.rounds, row, {"score": score_mean}, save)
    progress.close()
    engine.close()

    final_dir = common.save_final(run, policy, tokenizer)
    logger.close()
    common.finish_run(run, ["score/mean", "score/kept", "bon/kept", "loss"])
    return BoNResult(Path(cfg.output_dir), final_dir, b.rounds, updates, logger.rows, policy, reward)


def _check(cfg: BoNConfig) -> None:
    """The bon section's values make sense together (before anything loads); each key's own range
    is checked with the config."""
    b = cfg.bon
    if b.top_k > b.group_size:
        raise ConfigError(f"bon.top_k: must be between 1 and bon.group_size={b.group_size}, got {b.top_k}")


def _sft_steps(cfg: BoNConfig, num_kept: int) -> int:
    return max(1, math.ceil(cfg.bon.sft_epochs * num_kept / cfg.batch_size))


def _example(prompt: dict, got, j: int, completion_only: bool) -> dict:
    """Sample j as an SFT example: the prompt's ids, then the response ids exactly as sampled (EOS
    included when it had one; no re-tokenisation of the decoded text, which need not round-trip)."""
    ids, response = list(prompt["ids"]), got.responses[j]
    labels = ([-100] * len(ids) if completion_only else ids) + response
    return {
        "input_ids": ids + response,
        "labels": labels,
        "score": float(got.scores[j]),
        "prompt": prompt["prompt"],
        "response": got.completions[j],
    }


def _fine_tune(cfg, acc, model, optimizer, scheduler, examples: list[dict], collate, rnd: int, steps: int) -> dict:
    """`steps` SFT optimiser steps over `examples`, as trainers/sft.py does them: each step's loss is
    summed over its micro-batches and divided by the whole global batch's labelled-token count, so
    gradient accumulation and the number of processes leave the update unchanged."""
    from rufus.trainers.sft import sft_update

    # a fresh example order every round, a function of (seed, round) alone (resume needs no sampler state)
    plan = common.BatchPlan(
        len(examples), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed + 7919 * rnd
    )
    label_counts = [sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples]
    window = common.Window()
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss_value, grad_norm, num_tokens = sft_update(
            cfg, acc, model, optimizer, scheduler, examples, plan.global_batch(step), plan, collate, label_counts
        )
        window.add(loss=loss_value, grad_norm=grad_norm, time=time.perf_counter() - t0, tokens=num_tokens)
    return window.flush(**{"sft/steps": steps})
