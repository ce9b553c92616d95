"""RLOO and REINFORCE++: critic-free policy gradients with a baseline from the other samples.

RLOO (Ahmadian et al. 2024, "Back to Basics", Sec. 3): the whole response is one action with the
KL-penalised reward R = r(x, y) - beta * log pi(y|x)/pi_ref(y|x); with k samples per prompt each
one's baseline is the mean of the other k - 1: A_i = R_i - mean_{j != i} R_j.
REINFORCE++ (Hu et al. 2025): per-token rewards r_t = -beta * KL_t plus the score on the last
token, returns G_t = sum_{s >= t} r_s, normalised over the whole batch; "_baseline" first
subtracts each prompt's mean score. Both then take clipped-ratio steps (one pass by default,
which is plain REINFORCE with ratio 1). Each step:
  1. sample rloo.group_size responses per prompt; 2. score, pi_old and pi_ref logprobs;
  3. advantages (leave-one-out, or REINFORCE++ returns); 4. update; 5. log, checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus.config import LogArgs, ModelArgs, OnlineArgs, OptimArgs, RunArgs, as_config, opt
from rufus.trainers import common, online


@dataclass
class RLOOSection:
    """Samples per prompt, the advantage estimator and the update."""

    group_size: int = opt(4, "k: responses sampled per prompt", ge=2)
    advantage: Literal["rloo", "reinforce_pp", "reinforce_pp_baseline"] = opt(
        "rloo",
        "rloo: leave-one-out over the k samples; reinforce_pp: per-token KL rewards, returns "
        "normalised over the batch; reinforce_pp_baseline: minus each prompt's mean score first",
    )
    epochs: int = opt(1, "update passes over each batch (1 = on-policy REINFORCE)", ge=1)
    minibatches: int = opt(1, "optimiser steps per pass", ge=1)
    clip: float = opt(0.2, "clip range of the ratio (matters only with several passes or minibatches)", gt=0)


@dataclass
class RLOOKLSection:
    """KL to the reference, in the reward."""

    coef: float = opt(0.05, "beta; 0 = no KL term and no reference model loaded", ge=0)


@dataclass
class RLOOConfig(OnlineArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """RLOO / REINFORCE++: critic-free policy gradient with a sample baseline."""

    output_dir: str = opt(
        "runs/rloo", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/"
    )
    lr: float = opt(1e-6, "learning rate", gt=0)
    batch_size: int = opt(8, "prompts per step, over all processes (each sampled rloo.group_size times)", ge=1)
    grad_accum: int = opt(1, "micro-batches per minibatch", ge=1)
    rloo: RLOOSection = opt(RLOOSection, "estimator and update")
    kl: RLOOKLSection = opt(RLOOKLSection, "KL penalty")


RLOOResult = online.PolicyResult


def train_rloo(config: RLOOConfig | dict, reward_fn=None) -> RLOOResult:
    """Run RLOO or REINFORCE++. `reward_fn(prompts, completions, **kw) -> list[float]` adds a reward source."""
    from rufus.advantages import (
        group_advantages,
        kl_penalized_rewards,
        reinforce_pp_returns,
        rloo_advantages,
        whiten_global,
    )
    from rufus.losses.kl import kl_penalty
    from rufus.losses.ppo import policy_loss

    cfg = as_config(RLOOConfig, config)
    run = common.start_run(cfg)
    acc = run.accelerator
    K = cfg.rloo.group_size
    micro_size = online.micro_batch_size(cfg, acc.num_processes, "rloo")

    # 0. prompts and reward sources before the models; the policy, and a reference only for a KL term
    tokenizer, prompts, reward, plan, max_steps = online.load_inputs(cfg, run, reward_fn)
    policy, optimizer, scheduler = online.load_policy(cfg, run, tokenizer, max_steps)
    use_kl = cfg.kl.coef > 0
    reference = online.load_reference(cfg, run, tokenizer, needed=use_kl)
    start_step, _, logger, samples = online.open_outputs(run, acc.unwrap_model(policy), optimizer, scheduler, reward)

    def loss_fn(part, out, micro):  # clipped policy gradient
        adv = part.advantages
        if adv.dim() == 1:  # RLOO: one advantage per response, on each of its tokens
            adv = adv.unsqueeze(-1).expand_as(out["logprobs"])
        # RLOO's gradient is 1/N sum_i A_i grad log pi(y_i|x), log pi summed over tokens: a constant
        # normaliser, the sequences; REINFORCE++'s advantages are per token: the tokens
        if cfg.rloo.advantage == "rloo":
            reduce = dict(aggregation="constant", normalizer=micro.sequences)
        else:
            reduce = dict(aggregation="token", normalizer=micro.tokens)
        loss, stats = policy_loss(out["logprobs"], part.logprobs, adv, part.response_mask, clip=cfg.rloo.clip, **reduce)
        return loss, online.policy_stats(loss, stats, out["entropy"], part.response_mask)

    forward = online.logprobs_forward(cfg, policy)
    engine = online.rollout_engine(cfg, acc, acc.unwrap_model(policy), tokenizer)
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc=cfg.rloo.advantage)
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in plan.micro_batches(plan.global_batch(step))[0]]

        # 1. k responses per prompt from pi_old
        ro = online.sample(cfg, acc, engine, tokenizer, batch, K, step)
        t_rollout = time.perf_counter() - t0

        # 2. scores; pi_old and pi_ref logprobs; per-token KL
        ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
        reward_stats = online.mean_over_processes(acc, reward_stats)  # the whole batch's
        ro.scores = ro.scores.to(acc.device)  # (N,)
        online.old_and_ref_logprobs(cfg, acc, policy, reference, ro, micro_size, with_reference=use_kl)
        mask = ro.response_mask.float()  # (N, A)
        ro.kl = (
            torch.where(mask.bool(), kl_penalty(ro.logprobs, ro.ref_logprobs, "k1"), 0.0)
            if use_kl
            else torch.zeros_like(mask)
        )  # (N, A) log pi_old - log pi_ref

        # 3. advantages
        if cfg.rloo.advantage == "rloo":
            ro.rewards = ro.scores - cfg.kl.coef * ro.kl.sum(-1)  # (N,) R = r - beta * sequence log-ratio
            ro.advantages = rloo_advantages(ro.rewards, K)  # (N,) leave-one-out
        else:
            score = ro.scores
            if cfg.rloo.advantage == "reinforce_pp_baseline":  # minus each prompt's mean score
                score = group_advantages(score, K, scale=False)
            ro.rewards = kl_penalized_rewards(score, ro.kl, mask, cfg.kl.coef)  # (N, A)
            ro.advantages = whiten_global(
                reinforce_pp_returns(ro.rewards, mask),
                mask,  # (N, A)
                common.sum_over_processes(acc),
            )

        # 4. clipped policy-gradient steps
        t_train = time.perf_counter()
        stats = online.update_epochs(cfg, acc, ro, [policy], [optimizer], cfg.rloo, micro_size, step, forward, loss_fn)
        scheduler.step()
        online.sync_engine(acc, engine, acc.unwrap_model(policy))
        t_train = time.perf_counter() - t_train

        # 5. log, samples, checkpoint
        row = {
            **online.batch_stats(acc, ro, ro.kl, cfg.kl.coef),
            **stats,
            **reward_stats,
            "lr": scheduler.get_last_lr()[0],
            **online.step_times(t0, t_rollout, t_train),
        }
        save = (acc.unwrap_model(policy), optimizer, scheduler, {"reward": reward.state_dict()})
        online.end_step(run, logger, progress, step, max_steps, row, {"reward": row["reward/mean"]}, save, samples, ro)
    progress.close()
    engine.close()

    final_dir = common.save_final(run, acc.unwrap_model(policy), tokenizer)
    logger.close()
    common.finish_run(run, ["reward/mean", "kl/mean", "response/length"])
    return RLOOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, acc.unwrap_model(policy), reference)
