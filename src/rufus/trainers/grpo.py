"""GRPO: group-relative policy optimisation, no critic.

DeepSeekMath (Shao et al. 2024, Sec. 4.1): for each prompt sample a group of G responses, score
them, and use each response's score standardised within its group as the advantage of every one
of its tokens; optimise the clipped surrogate with a k3 KL penalty to the reference in the loss.
Options from the follow-ups: Dr. GRPO (Liu et al. 2025: no std division, constant normaliser),
DAPO (Yu et al. 2025: asymmetric clip-higher, token-level loss, dropping groups with equal rewards).
Each step:
  1. sample G responses for each of batch_size prompts from the current policy (pi_old);
  2. score them (reward sources) and compute pi_old (and pi_ref) logprobs;
  3. group-relative advantages;
  4. grpo.epochs passes of clipped updates in grpo.minibatches;
  5. log, sample, checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rufus.config import LogArgs, ModelArgs, OnlineArgs, OptimArgs, PlacementArgs, RunArgs, as_config, opt
from rufus.trainers import common, online

log = logging.getLogger(__name__)


@dataclass
class GRPOSection:
    """Groups, advantages and the update."""

    group_size: int = opt(8, "G: responses sampled per prompt", ge=2)
    scale_rewards: bool = opt(True, "divide by the group's std (false = Dr. GRPO: centre only)")
    loss_aggregation: Literal["token", "sequence", "constant"] = opt(
        "token",
        "token: mean over all tokens (DAPO); sequence: mean per response, then over responses "
        "(GRPO paper); constant: sum / (max_new_tokens x responses) (Dr. GRPO)",
    )
    clip: float = opt(0.2, "lower clip range epsilon of the ratio (and upper, unless clip_high is set)", gt=0)
    clip_high: float | None = opt(None, "upper clip range (DAPO clip-higher uses 0.28)", gt=0)
    epochs: int = opt(1, "mu: update passes over each batch of samples", ge=1)
    minibatches: int = opt(1, "optimiser steps per update pass", ge=1)
    drop_equal_groups: bool = opt(False, "leave out groups whose rewards are all equal (zero advantage; DAPO)")


@dataclass
class GRPOKLSection:
    """KL to the reference, in the loss (k3 estimator)."""

    coef: float = opt(0.04, "beta; 0 = no KL term and no reference model loaded at all", ge=0)


@dataclass
class GRPOConfig(PlacementArgs, OnlineArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """GRPO: group-relative advantages, no critic."""

    output_dir: str = opt(
        "runs/grpo", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/"
    )
    lr: float = opt(1e-6, "learning rate", gt=0)
    batch_size: int = opt(8, "prompts per step, over all processes (each sampled group_size times)", ge=1)
    grad_accum: int = opt(1, "micro-batches per minibatch", ge=1)
    grpo: GRPOSection = opt(GRPOSection, "groups and update")
    kl: GRPOKLSection = opt(GRPOKLSection, "KL penalty")


GRPOResult = online.PolicyResult


def train_grpo(config: GRPOConfig | dict, reward_fn=None) -> GRPOResult:
    """Run GRPO. `reward_fn(prompts, completions, **kw) -> list[float]` (or a list) adds reward sources."""
    from rufus.advantages import equal_reward_groups, group_advantages
    from rufus.losses.kl import kl_penalty

    cfg = as_config(GRPOConfig, config)
    if cfg.placement == "ray":  # the same loop, its roles in Ray actor groups
        from rufus.trainers.placed import train_grpo_placed

        return train_grpo_placed(cfg, reward_fn)
    run = common.start_run(cfg)
    acc = run.accelerator
    G = cfg.grpo.group_size
    micro_size = online.micro_batch_size(cfg, acc.num_processes, "grpo")

    # 0. prompts and reward sources before the models; the policy, and a reference only for a KL term
    tokenizer, prompts, reward, plan, max_steps = online.load_inputs(cfg, run, reward_fn)
    policy, optimizer, scheduler = online.load_policy(cfg, run, tokenizer, max_steps)
    use_kl = cfg.kl.coef > 0
    reference = online.load_reference(cfg, run, tokenizer, needed=use_kl)
    start_step, _, logger, samples = online.open_outputs(run, acc.unwrap_model(policy), optimizer, scheduler, reward)

    loss_fn = grpo_loss(cfg)
    forward = online.logprobs_forward(cfg, policy)
    engine = online.rollout_engine(cfg, acc, acc.unwrap_model(policy), tokenizer)
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="grpo")
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in plan.micro_batches(plan.global_batch(step))[0]]

        # 1. a group of G responses per prompt from pi_old
        ro = online.sample(cfg, acc, engine, tokenizer, batch, G, step)
        t_rollout = time.perf_counter() - t0

        # 2. scores; pi_old and pi_ref logprobs
        ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
        reward_stats = online.mean_over_processes(acc, reward_stats)  # the whole batch's
        ro.scores = ro.scores.to(acc.device)  # (B*G,)
        # one update over the whole batch (grpo.epochs = minibatches = 1): pi_old comes from the
        # update's own forward pass, not from a pass of its own
        single_update = cfg.grpo.epochs == 1 and cfg.grpo.minibatches == 1
        online.old_and_ref_logprobs(
            cfg, acc, policy, reference, ro, micro_size, with_reference=use_kl, with_old=not single_update
        )
        sampled_mask = ro.response_mask

        # 3. group-relative advantages (B*G,), the same for every token of a response
        ro.advantages = group_advantages(ro.scores, G, scale=cfg.grpo.scale_rewards)
        equal = equal_reward_groups(ro.scores, G)  # (B,) groups with no signal
        if cfg.grpo.drop_equal_groups:
            keep = (~equal).repeat_interleave(G).long()  # (B*G,)
            ro.response_mask = ro.response_mask * keep.unsqueeze(-1)

        # 4. clipped updates
        t_train = time.perf_counter()
        stats = {}
        if ro.response_mask.sum() > 0 or acc.num_processes > 1:
            stats = online.update_epochs(
                cfg, acc, ro, [policy], [optimizer], cfg.grpo, micro_size, step, forward, loss_fn
            )
        scheduler.step()
        online.sync_engine(acc, engine, acc.unwrap_model(policy))
        t_train = time.perf_counter() - t_train
        if ro.logprobs is None:  # nothing was trained (every group equal): pi_old for the log only
            online.old_and_ref_logprobs(cfg, acc, policy, reference, ro, micro_size, with_reference=False)
        # logged KL: log pi_old - log pi_ref (k1) per token, summed per response
        ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") if use_kl else None
        sample_stats = online.batch_stats(acc, ro, ro.kl, cfg.kl.coef, mask=sampled_mask)

        # 5. log, samples, checkpoint
        row = {
            **sample_stats,
            **stats,
            **reward_stats,
            "groups/equal": acc.reduce(equal.float().mean(), reduction="mean").item(),
            "lr": scheduler.get_last_lr()[0],
            **online.step_times(t0, t_rollout, t_train),
        }
        save = (acc.unwrap_model(policy), optimizer, scheduler, {"reward": reward.state_dict()})
        online.end_step(run, logger, progress, step, max_steps, row, {"reward": row["reward/mean"]}, save, samples, ro)
    progress.close()
    engine.close()

    final_dir = common.save_final(run, acc.unwrap_model(policy), tokenizer)
    logger.close()
    common.finish_run(run, ["reward/mean", "kl/mean", "policy/clipfrac", "response/length"])
    return GRPOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, acc.unwrap_model(policy), reference)


def grpo_loss(cfg):
    """The micro-batch loss of the update: the clipped surrogate with the k3 KL to pi_ref in the loss,
    normalised as grpo.loss_aggregation says; (part, out, micro) -> (loss, stats)."""
    from rufus.losses.grpo import grpo_policy_loss

    def loss_fn(part, out, micro):
        normalizer = {
            "token": micro.tokens,
            "sequence": micro.sequences,
            "constant": micro.sequences * cfg.generation.max_new_tokens,
        }[cfg.grpo.loss_aggregation]
        loss, stats = grpo_policy_loss(
            out["logprobs"],
            part.logprobs,
            part.ref_logprobs,
            part.advantages,
            part.response_mask,
            clip=cfg.grpo.clip,
            clip_high=cfg.grpo.clip_high,
            kl_coef=cfg.kl.coef,
            aggregation=cfg.grpo.loss_aggregation,
            normalizer=normalizer,
        )
        stats = online.policy_stats(loss, stats, out["entropy"], part.response_mask)
        stats["policy/ref_kl"] = stats.pop("policy/kl")  # mean k3 to pi_ref per token, the loss's KL term
        return loss, stats

    return loss_fn
