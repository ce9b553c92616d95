"""RLOO and REINFORCE++: critic-free policy gradients with a baseline from the other samples.

RLOO (Ahmadian et al. 2024, "Back to Basics", Sec. 3): the whole response is one action with the
KL-penalised reward R = r(x, y) - beta * log pi(y|x)/pi_ref(y|x); with k samples per prompt each
one's baseline is the mean of the other k - 1: A_i = R_i - mean_{j != i} R_j.
REINFORCE++ (Hu et al. 2025): per-token rewards r_t = -beta * KL_t plus the score on the last
token, returns G_t = sum_{s >= t} r_s, normalised over the whole batch; "_baseline" first
subtracts each prompt's mean score. Both then take clipped-ratio steps (one pass by default,
which is plain REINFORCE with ratio 1). Each step:
  1. sample rloo.k responses per prompt; 2. score, pi_old and pi_ref logprobs;
  3. advantages (leave-one-out, or REINFORCE++ returns); 4. update; 5. log, checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus.config import (
    LogArgs,
    ModelArgs,
    OnlineArgs,
    OptimArgs,
    RunArgs,
    opt,
)
from rufus.trainers import common, online


@dataclass
class RLOOSection:
    """Samples per prompt, the advantage estimator and the update."""

    k: int = opt(4, "responses sampled per prompt")
    advantage: Literal["rloo", "reinforce_pp", "reinforce_pp_baseline"] = opt(
        "rloo", "rloo: leave-one-out over the k samples; reinforce_pp: per-token KL rewards, returns "
        "normalised over the batch; reinforce_pp_baseline: minus each prompt's mean score first")
    epochs: int = opt(1, "update passes over each batch (1 = on-policy REINFORCE)")
    minibatches: int = opt(1, "optimiser steps per pass")
    clip: float = opt(0.2, "clip range of the ratio (matters only with several passes or minibatches)")


@dataclass
class RLOOKL:
    """KL to the reference, in the reward."""

    coef: float = opt(0.05, "beta; 0 = no KL term and no reference model loaded")


@dataclass
class RLOOConfig(OnlineArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """RLOO / REINFORCE++: critic-free policy gradient with a sample baseline."""

    output_dir: str = opt("runs/rloo", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/")
    lr: float = opt(1e-6, "learning rate")
    batch_size: int = opt(8, "prompts per step, over all processes (each sampled rloo.k times)")
    grad_accum: int = opt(1, "micro-batches per minibatch")
    rloo: RLOOSection = opt(RLOOSection, "estimator and update")
    kl: RLOOKL = opt(RLOOKL, "KL penalty")


@dataclass
class RLOOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    model: object = None
    reference: object = None


def train_rloo(config: RLOOConfig | dict, reward_fn=None) -> RLOOResult:
    """Run RLOO or REINFORCE++. `reward_fn(prompts, completions, **kw) -> list[float]` adds a reward source."""
    from rufus.advantages import reinforce_pp_returns, rloo_advantages
    from rufus.losses.kl import kl_penalty
    from rufus.losses.ppo import policy_loss
    from rufus.models.loading import load_tokenizer, set_dropout
    from rufus.rewards import build_reward_pipeline

    cfg = common.as_config(RLOOConfig, config)
    run = common.start_run(cfg)
    acc = run.accelerator
    K = cfg.rloo.k
    if K < 2:
        raise common.ConfigError("rloo.k: the leave-one-out baseline needs at least 2 samples per prompt")
    per_process, rem0 = divmod(cfg.batch_size, acc.num_processes)
    micro_size, rem = divmod(per_process * K, cfg.rloo.minibatches * cfg.grad_accum)
    if rem0 or rem or micro_size == 0:
        raise common.ConfigError(f"batch_size: {cfg.batch_size} prompts x rloo.k {K} do not split into "
                                 f"{acc.num_processes} processes x rloo.minibatches x grad_accum")

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.data.chat_template)
    prompts = online.load_prompts(cfg, acc, tokenizer)
    reward = build_reward_pipeline(cfg.reward, device=acc.device, dtype=run.compute_dtype, extra_functions=reward_fn,
                                   trust_remote_code=cfg.trust_remote_code,
                                   gather=lambda t: acc.gather(t.to(acc.device)).cpu())
    plan = common.BatchPlan(len(prompts), cfg.batch_size, 1, acc.num_processes, acc.process_index, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)

    actor = common.load_trainable_lm(cfg, tokenizer)
    set_dropout(actor, 0.0)
    use_kl = cfg.kl.coef > 0
    reference = online.load_reference(cfg, run, tokenizer, needed=use_kl)
    optimizer, scheduler = common.make_optimizer(cfg, actor, max_steps)
    actor, optimizer = acc.prepare(actor, optimizer)
    start_step, saved = common.maybe_resume(run, acc.unwrap_model(actor), optimizer, scheduler)
    if saved:
        reward.load_state_dict(saved["reward"])
    logger = common.open_metrics(run, start_step)
    samples_path = run.output_dir / "samples.jsonl"
    online.reset_samples(samples_path, acc, start_step if run.resume_from else None)

    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc=cfg.rloo.advantage)
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in plan.micro_batches(plan.global_batch(step))[0]]

        # 1-2. k responses per prompt; scores; pi_old and pi_ref logprobs
        ro = online.sample_groups(cfg, acc, acc.unwrap_model(actor), tokenizer, batch, K)
        t_rollout = time.perf_counter() - t0
        ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
        ro.scores = ro.scores.to(acc.device)
        online.old_and_ref_logprobs(cfg, acc, actor, reference, ro, micro_size, with_reference=use_kl)
        mask = ro.response_mask.float()
        ro.kl = (torch.where(mask.bool(), kl_penalty(ro.logprobs, ro.ref_logprobs, "k1"), 0.0)
                 if use_kl else torch.zeros_like(mask))  # (N, A) log pi_old - log pi_ref

        # 3. advantages
        if cfg.rloo.advantage == "rloo":
            ro.rewards = ro.scores - cfg.kl.coef * ro.kl.sum(-1)  # (N,) R = r - beta * sequence log-ratio
            ro.advantages = rloo_advantages(ro.rewards, K)  # (N,) leave-one-out
        else:
            score = ro.scores
            if cfg.rloo.advantage == "reinforce_pp_baseline":
                score = score - score.view(-1, K).mean(-1, keepdim=True).expand(-1, K).reshape(-1)
            token_rewards = -cfg.kl.coef * ro.kl
            token_rewards[torch.arange(len(score)), ro.last_token_index()] += score
            ro.rewards = token_rewards  # (N, A)
            ro.advantages = common.whiten_across_processes(reinforce_pp_returns(token_rewards, mask), mask, acc)  # (N, A)

        # 4. clipped policy-gradient steps
        def loss_fn(part, logprobs, normalizers):
            adv = part.advantages
            if adv.dim() == 1:
                adv = adv.unsqueeze(-1).expand_as(logprobs)
            if cfg.rloo.advantage == "rloo":  # gradient 1/N sum_i A_i grad log pi(y_i|x), log pi summed over tokens
                return policy_loss(logprobs, part.logprobs, adv, part.response_mask, clip=cfg.rloo.clip,
                                   aggregation="sum", normalizer=normalizers["sequences"])
            return policy_loss(logprobs, part.logprobs, adv, part.response_mask, clip=cfg.rloo.clip,
                               aggregation="sum", normalizer=normalizers["tokens"])

        t_train = time.perf_counter()
        stats = online.policy_gradient_epochs(cfg, acc, ro, actor, optimizer, epochs=cfg.rloo.epochs,
                                              minibatches=cfg.rloo.minibatches, micro_size=micro_size,
                                              step=step, loss_fn=loss_fn)
        scheduler.step()
        t_train = time.perf_counter() - t_train

        # 5. log, samples, checkpoint
        step_s = time.perf_counter() - t0
        row = {**online.batch_stats(acc, ro, ro.kl), **stats, **reward_stats, "lr": scheduler.get_last_lr()[0],
               "time/rollout_s": t_rollout, "time/train_s": t_train, "time/step_s": step_s}
        if step % cfg.log_every == 0 or step == max_steps:
            logger.log(step, row)
        if acc.is_main_process and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            online.write_samples(samples_path, step, ro, cfg.num_samples)
        progress.update(1)
        progress.set_postfix(reward=f"{row['reward/mean']:.3f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == max_steps:
            common.save_checkpoint(run, step, acc.unwrap_model(actor), optimizer, scheduler,
                                   state={"reward": reward.state_dict()})
    progress.close()

    final_dir = common.save_final(run, acc.unwrap_model(actor), tokenizer)
    logger.close()
    common.finish_run(run, ["reward/mean", "kl/mean", "response/length"])
    return RLOOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, acc.unwrap_model(actor), reference)
