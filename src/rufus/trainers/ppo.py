"""RL fine-tuning with PPO and four models: actor, critic, reward model, reference.

Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022, eq. 2), with the implementation details
of Huang et al. ("The N (and N+) implementation details of RLHF with PPO"). Each step:
  1. generate one response per prompt with the actor (pi_old);
  2. evaluate: logprobs under pi_old and pi_ref, values V, scores from the reward sources;
  3. per-token rewards r_t = -beta * KL_t (+ score on the last token), GAE advantages, whitening;
  4. ppo.epochs passes over the batch in ppo.minibatches: clipped surrogate + clipped value loss
     (+ entropy bonus, + PPO-ptx language-model loss), gradient accumulation, clipping;
  5. update the KL coefficient, log, sample, checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus import distributed
from rufus.config import ConfigError, LogArgs, ModelArgs, OnlineArgs, OptimArgs, PlacementArgs, RunArgs, as_config, opt
from rufus.trainers import common, online
from rufus.trainers.ptx import PtxSection, load_ptx_data, ptx_loss

log = logging.getLogger(__name__)


@dataclass
class KLSection:
    """The KL penalty that keeps the actor near the reference."""

    coef: float = opt(0.05, "beta: weight of the per-token KL penalty in the reward (initial value if adaptive)", ge=0)
    target: float | None = opt(None, "adaptive beta towards this KL per sequence (Ziegler et al.); None = fixed", gt=0)
    horizon: int = opt(10000, "adaptive controller horizon in samples", ge=1)
    estimator: Literal["k1", "k3"] = opt(
        "k1", "per-token KL estimator in the reward: k1 = log ratio, k3 = low-variance"
    )


@dataclass
class GAESection:
    """Generalised advantage estimation."""

    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)


@dataclass
class PPOSection:
    """The PPO update."""

    epochs: int = opt(4, "passes over each rollout batch", ge=1)
    minibatches: int = opt(1, "optimiser steps per pass (the batch is split into this many minibatches)", ge=1)
    clip: float = opt(0.2, "clip range of the probability ratio", gt=0)
    value_clip: float | None = opt(0.2, "clip range of the value update (None = unclipped)", gt=0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = opt(0.0, "weight of the entropy bonus", ge=0)
    target_kl: float | None = opt(None, "stop a step's remaining updates once approx_kl exceeds this", gt=0)
    objective: Literal["clip", "kl_penalty"] = opt(
        "clip",
        "clip = the clipped surrogate (Schulman et al. 2017, eq. 7); kl_penalty = ratio * A - beta * KL(pi_old, pi) "
        "per token (Sec. 4), beta adapting to kl_target; the KL to the reference stays in the reward either way",
    )
    kl_target: float = opt(
        0.01, "kl_penalty: the mean per-token KL(pi_old, pi) of a step's update that beta steers toward", gt=0
    )
    kl_beta: float = opt(1.0, "kl_penalty: beta's starting value", gt=0)
    kl_factor: float = opt(
        2.0, "kl_penalty: beta is multiplied / divided by this above kl_target * 1.5 / below kl_target / 1.5", gt=1
    )
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 over the batch")
    whiten_rewards: bool = opt(False, "scale per-token rewards to unit std over the batch (mean kept)")


@dataclass
class CriticSection:
    """The value model."""

    model: str | None = opt(
        None,
        "start from this model: a reward model keeps its head (recommended), a policy gets a zero head; "
        "default: the policy",
        model_path=True,
    )
    lr: float = opt(1e-5, "critic learning rate", gt=0)
    shared: bool = opt(False, "value head on the actor's backbone instead of a separate critic model (less memory)")


@dataclass
class PPOConfig(PlacementArgs, OnlineArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """PPO with actor, critic, reward and reference models."""

    output_dir: str = opt(
        "runs/ppo", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/"
    )
    lr: float = opt(1e-6, "actor learning rate", gt=0)
    batch_size: int = opt(16, "prompts per rollout step (one response each), over all processes", ge=1)
    grad_accum: int = opt(1, "micro-batches per minibatch", ge=1)
    max_grad_norm: float = opt(1.0, "clip each model's gradient norm to this (0 = no clipping)", ge=0)
    kl: KLSection = opt(KLSection, "KL penalty")
    gae: GAESection = opt(GAESection, "advantage estimation")
    ppo: PPOSection = opt(PPOSection, "PPO update")
    critic: CriticSection = opt(CriticSection, "value model")
    ptx: PtxSection = opt(PtxSection, "pretraining-loss mix")


@dataclass
class PPOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    policy: object = None  # the trained policy (the actor; unwrapped, a peft model under LoRA)
    critic: object = None
    reference: object = None  # None under LoRA (the base with adapters disabled is the reference)
    reward: object = None  # the RewardPipeline


def train_ppo(config: PPOConfig | dict, reward_fn=None) -> PPOResult:
    """Run PPO as configured. `reward_fn(prompts, completions, **kw) -> list[float]` (or a list of
    such functions) adds Python reward sources to those in `config.reward`."""
    from rufus.advantages import gae, kl_penalized_rewards, whiten_global
    from rufus.kl_control import PenaltyController, make_kl_controller
    from rufus.losses.kl import kl_penalty
    from rufus.losses.ppo import explained_variance
    from rufus.models.loading import set_dropout
    from rufus.models.value import load_critic, save_critic

    cfg = as_config(PPOConfig, config)
    if cfg.placement == "ray" and cfg.ppo.objective == "kl_penalty":
        raise ConfigError("ppo.objective=kl_penalty: not yet with placement=ray; use placement=local")
    if cfg.placement == "ray":  # the same loop, its roles in Ray actor groups
        from rufus.trainers.placed import train_ppo_placed

        return train_ppo_placed(cfg, reward_fn)
    run = common.start_run(cfg)
    acc = run.accelerator
    micro_size = online.micro_batch_size(cfg, acc.num_processes, "ppo")

    # 0. prompts, ptx text and reward sources first: bad input fails before the big models load
    tokenizer, prompts, reward, plan, max_steps = online.load_inputs(cfg, run, reward_fn)
    with acc.main_process_first():
        ptx = load_ptx_data(cfg, tokenizer)

    # the four models: actor and critic train; reference and reward model are frozen
    actor = common.load_trainable_lm(cfg, tokenizer)
    set_dropout(actor, 0.0)  # logprobs must be reproducible: the first ratio is then exactly 1
    if cfg.critic.shared and distributed.is_strategy(cfg, acc, "fsdp"):
        raise ConfigError("critic.shared: not yet with strategy=fsdp; use a separate critic (critic.shared=false)")
    if cfg.critic.shared and cfg.strategy.startswith("zero") and acc.num_processes > 1:
        raise ConfigError(f"critic.shared: not yet with strategy={cfg.strategy}; use a separate critic")
    reference = online.load_reference(cfg, run, tokenizer)
    if cfg.critic.shared:
        from rufus.models.value import SharedActorCritic

        if cfg.critic.model:
            raise ConfigError("critic.model: a shared critic lives on the actor; leave critic.model unset")
        actor, critic = SharedActorCritic(actor), None
        actor_opt, actor_sched = common.make_optimizer(cfg, actor, max_steps, {"value_head": cfg.critic.lr})
        actor, actor_opt = acc.prepare(actor, actor_opt)
    else:
        critic = load_critic(
            cfg.critic.model or cfg.model, tokenizer=tokenizer, lora=cfg.lora, **common.trainable_model_args(cfg)
        )
        actor, critic = distributed.shard(cfg, acc, actor), distributed.shard(cfg, acc, critic)  # fsdp: sharded
        actor_opt, actor_sched = common.make_optimizer(cfg, actor, max_steps)
        critic_opt, critic_sched = common.make_optimizer(dataclasses.replace(cfg, lr=cfg.critic.lr), critic, max_steps)
        actor, actor_opt = distributed.prepare(acc, actor, actor_opt)
        critic, critic_opt = distributed.prepare(acc, critic, critic_opt)
    kl_ctl = make_kl_controller(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    penalty = None  # ppo.objective=kl_penalty: beta of the surrogate's KL(pi_old, pi), adapted after each step
    if cfg.ppo.objective == "kl_penalty":
        penalty = PenaltyController(cfg.ppo.kl_beta, cfg.ppo.kl_target, cfg.ppo.kl_factor)

    models = {"actor": acc.unwrap_model(actor)}
    optimizers = {"actor": actor_opt}
    schedulers = {"actor": actor_sched}
    if critic is not None:
        models["critic"] = acc.unwrap_model(critic)
        optimizers["critic"], schedulers["critic"] = critic_opt, critic_sched
    trained = [actor] + ([critic] if critic is not None else [])
    start_step, saved, logger, samples = online.open_outputs(run, models, optimizers, schedulers, reward)
    if saved:
        kl_ctl.load_state_dict(saved["kl_controller"])
        if penalty is not None:
            penalty.load_state_dict(saved["penalty"])

    engine = online.rollout_engine(cfg, acc, models["actor"], tokenizer)

    def forward(part):  # (b, A) logprobs, entropy and values of a micro-batch, with gradients
        return _forward(cfg, actor, critic, part, with_entropy=True)

    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="ppo")
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in plan.micro_batches(plan.global_batch(step))[0]]

        # 1. rollout: one response per prompt from pi_old
        ro = online.sample(cfg, acc, engine, tokenizer, batch, 1, step)
        t_rollout = time.perf_counter() - t0

        # 2. evaluation: pi_old and pi_ref logprobs, values, scores
        with torch.no_grad():
            actor.eval()
            with acc.autocast():  # in the micro-batches of the first update: its first ratio is exactly 1
                parts = [_forward(cfg, actor, critic, chunk) for chunk in ro.chunks(micro_size)]
            ro.logprobs = torch.cat([p["logprobs"] for p in parts])  # (B, A) log pi_old
            ro.values = torch.cat([p["values"] for p in parts])  # (B, A) V
            ro.ref_logprobs = online.reference_logprobs(cfg, acc, actor, reference, ro, micro_size)  # (B, A)
            ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
            reward_stats = online.mean_over_processes(acc, reward_stats)  # the whole batch's
            ro.scores = ro.scores.to(acc.device)  # (B,)

        # 3. per-token rewards r_t = -beta * KL_t (+ score on the last token), GAE, whitening
        mask = ro.response_mask.float()  # (B, A)
        ro.kl = torch.where(mask.bool(), kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator), 0.0)  # (B, A)
        ro.rewards = kl_penalized_rewards(ro.scores, ro.kl, mask, kl_ctl.value)  # (B, A)
        if cfg.ppo.whiten_rewards:
            ro.rewards = whiten_global(ro.rewards, mask, common.sum_over_processes(acc), shift_mean=False)
        ro.advantages, ro.returns = gae(ro.rewards, ro.values * mask, mask, gamma=cfg.gae.gamma, lam=cfg.gae.lam)
        if cfg.ppo.whiten_advantages:
            ro.advantages = whiten_global(ro.advantages, mask, common.sum_over_processes(acc))
        stats = online.batch_stats(acc, ro, ro.kl, kl_ctl.value)

        # 4. PPO epochs over minibatches: clipped surrogate + clipped value loss (+ entropy, + ptx)
        beta = penalty.value if penalty is not None else None

        def loss_fn(part, out, micro, step=step, beta=beta):
            actor_part, critic_part, part_stats = _ppo_loss(cfg, part, out, micro, beta)
            if ptx is not None:
                lm = ptx_loss(cfg, acc, actor, ptx, step, micro)
                actor_part = actor_part + cfg.ptx.coef * lm
                part_stats["ptx/loss"] = lm.item()
            if critic is None:  # a shared critic: one model, one loss
                return actor_part + critic_part, part_stats
            return [actor_part, critic_part], part_stats  # each back through its own model

        t_train = time.perf_counter()
        opts = [optimizers[n] for n in models]
        stats.update(online.update_epochs(cfg, acc, ro, trained, opts, cfg.ppo, micro_size, step, forward, loss_fn))
        stats["value/explained_variance"] = explained_variance(ro.values, ro.returns, ro.response_mask)
        if penalty is not None:  # Sec. 4: beta for the next update, from this update's KL(pi_old, pi)
            stats["ppo/kl_beta"] = beta
            stats["ppo/kl"] = update_kl(cfg, acc, actor, critic, ro, micro_size)
            penalty.update(stats["ppo/kl"])
        for sched in schedulers.values():
            sched.step()
        online.sync_engine(acc, engine, models["actor"])
        t_train = time.perf_counter() - t_train

        # 5. KL controller, log, samples, checkpoint
        kl_ctl.update(stats["kl/mean"], n_steps=cfg.batch_size)
        tokens = stats["response/length"] * cfg.batch_size  # response tokens over every process
        times = online.step_times(t0, t_rollout, t_train)
        row = {**stats, **reward_stats, "kl/coef": kl_ctl.value, "lr": actor_sched.get_last_lr()[0], **times}
        row["tokens_per_s"] = tokens / max(times["time/step_s"], 1e-9)
        state = {"kl_controller": kl_ctl.state_dict(), "reward": reward.state_dict()}
        if penalty is not None:
            state["penalty"] = penalty.state_dict()
        postfix = {"reward": stats["reward/mean"], "kl": stats["kl/mean"]}
        save = (models, optimizers, schedulers, state)
        online.end_step(run, logger, progress, step, max_steps, row, postfix, save, samples, ro, kl=ro.kl.sum(-1))
    progress.close()
    engine.close()

    policy = models["actor"].policy if cfg.critic.shared else models["actor"]
    final_dir = common.save_final(run, policy, tokenizer)
    critic = models.get("critic", models["actor"])  # a shared critic lives on the actor
    whole = distributed.unsharded(critic)  # gathered to the main process when sharded
    if acc.is_main_process:
        save_critic(whole, run.output_dir / "final_critic")
    logger.close()
    common.finish_run(run, ["reward/mean", "score/mean", "kl/mean", "policy/entropy", "policy/loss", "value/loss"])
    return PPOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, policy, critic, reference, reward)


@torch.no_grad()
def update_kl(cfg, acc, actor, critic, ro, micro_size: int) -> float:
    """The mean per-token KL(pi_old || pi_theta) after the step's update, over every process's valid
    response tokens: k3 = (r - 1) - log r, r = pi_theta / pi_old, on the rollout's own tokens (drawn
    from pi_old, so unbiased; Schulman 2020). One forward pass of the actor, in the micro-batches."""
    actor.eval()
    total = torch.zeros(2, device=acc.device)  # sum of k3, valid tokens
    with acc.autocast():
        for chunk in ro.chunks(micro_size):
            out = _forward(cfg, actor, None, chunk) if critic is None else actor_forward(cfg, actor, chunk)
            new = out["logprobs"].float()  # (b, A) log pi_theta
            log_ratio = torch.where(chunk.response_mask.bool(), new - chunk.logprobs.float(), 0.0)
            k3 = (torch.exp(log_ratio) - 1.0) - log_ratio
            total += torch.stack([k3.sum(), chunk.response_mask.sum().float()])
    actor.train()
    total = acc.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _forward(cfg, actor, critic, part, with_entropy: bool = False) -> dict:
    """(b, A) "logprobs", "entropy" (None unless with_entropy) and "values" of a Rollout slice `part`:
    one pass for a shared actor-critic, else two."""
    from rufus.losses.ppo import entropy_from_logits
    from rufus.losses.sft import token_logprobs
    from rufus.rollout.logprobs import response_outputs

    if critic is not None:
        return {**actor_forward(cfg, actor, part, with_entropy), **critic_forward(critic, part)}
    ids, mask, P = part.input_ids, part.attention_mask, part.prompt_length
    out, logits = response_outputs(actor, ids, mask, P, cfg.generation.temperature)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return {"logprobs": token_logprobs(logits, ids[:, P:]), "entropy": entropy, "values": out["values"][:, P - 1 : -1]}


def actor_forward(cfg, actor, part, with_entropy: bool = False) -> dict:
    """(b, A) "logprobs" and "entropy" (None unless with_entropy) of the actor on a Rollout slice."""
    from rufus.losses.ppo import entropy_from_logits
    from rufus.losses.sft import token_logprobs
    from rufus.rollout.logprobs import response_outputs

    ids, mask, P = part.input_ids, part.attention_mask, part.prompt_length
    _, logits = response_outputs(actor, ids, mask, P, cfg.generation.temperature)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return {"logprobs": token_logprobs(logits, ids[:, P:]), "entropy": entropy}


def critic_forward(critic, part) -> dict:
    """(b, A) "values" V(x, y_<t) of a separate critic on a Rollout slice."""
    from rufus.models.value import values_at_response

    return {"values": values_at_response(critic, part.input_ids, part.attention_mask, part.prompt_length)}


def _ppo_loss(cfg, part, out, micro, beta: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The micro-batch's share of the minibatch loss, as (the actor's part: clipped surrogate (or the
    KL-penalised one, coefficient `beta`) - entropy_coef * entropy; the critic's part: vf_coef *
    clipped value loss; stats), each summed over its tokens / the minibatch's token count. The loss
    is their sum."""
    actor_part, actor_stats = actor_loss(cfg, part, out, micro, beta)
    critic_part, critic_stats = critic_loss(cfg, part, out, micro)
    return actor_part, critic_part, {**actor_stats, **critic_stats}


def actor_loss(cfg, part, out, micro, beta: float | None = None) -> tuple[torch.Tensor, dict]:
    """The actor's part of the micro-batch's loss: the clipped surrogate (or, ppo.objective=kl_penalty,
    the KL-penalised one with coefficient `beta`) - entropy_coef * entropy."""
    from rufus.losses.aggregation import masked_mean
    from rufus.losses.ppo import kl_penalty_policy_loss, policy_loss

    mask = part.response_mask  # (b, A)
    per_token = dict(aggregation="token", normalizer=micro.tokens)  # summed over tokens / the minibatch's count
    if cfg.ppo.objective == "kl_penalty":  # beta * (log pi_old - log pi_theta) per token: Sec. 4's penalty
        if beta is None:
            raise ValueError("ppo.objective=kl_penalty: actor_loss needs the current beta")
        pg, pg_stats = kl_penalty_policy_loss(
            out["logprobs"], part.logprobs, part.advantages, mask, beta=beta, **per_token
        )
    else:
        pg, pg_stats = policy_loss(
            out["logprobs"], part.logprobs, part.advantages, mask, clip=cfg.ppo.clip, **per_token
        )
    entropy = (out["entropy"] * mask).sum() / micro.tokens
    return pg - cfg.ppo.entropy_coef * entropy, {
        "policy/loss": pg.item(),
        "policy/entropy": masked_mean(out["entropy"].detach(), mask).item(),
        **{f"policy/{k}": float(v) for k, v in pg_stats.items()},
    }


def critic_loss(cfg, part, out, micro) -> tuple[torch.Tensor, dict]:
    """The critic's part of the micro-batch's loss: vf_coef * clipped value loss."""
    from rufus.losses.ppo import value_loss

    per_token = dict(aggregation="token", normalizer=micro.tokens)
    vf, vf_stats = value_loss(
        out["values"], part.values, part.returns, part.response_mask, clip=cfg.ppo.value_clip, **per_token
    )
    return cfg.ppo.vf_coef * vf, {"value/loss": vf.item(), "value/clipfrac": float(vf_stats["clipfrac"])}
