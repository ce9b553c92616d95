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

import contextlib
import json
import logging
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
from rufus.report.metrics import read_metrics
from rufus.trainers import common

log = logging.getLogger(__name__)


@dataclass
class KLSection:
    """The KL penalty that keeps the actor near the reference."""

    coef: float = opt(0.05, "beta: weight of the per-token KL penalty in the reward (initial value if adaptive)")
    target: float | None = opt(None, "adaptive beta towards this KL per sequence (Ziegler et al.); None = fixed")
    horizon: int = opt(10000, "adaptive controller horizon in samples")
    estimator: Literal["k1", "k3"] = opt("k1", "per-token KL estimator in the reward: k1 = log ratio, k3 = low-variance")


@dataclass
class GAESection:
    """Generalised advantage estimation."""

    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")


@dataclass
class PPOSection:
    """The PPO update."""

    epochs: int = opt(4, "passes over each rollout batch")
    minibatches: int = opt(1, "optimiser steps per pass (the batch is split into this many minibatches)")
    clip: float = opt(0.2, "clip range of the probability ratio")
    value_clip: float | None = opt(0.2, "clip range of the value update (None = unclipped)")
    vf_coef: float = opt(0.1, "weight of the value loss")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus")
    target_kl: float | None = opt(None, "stop a step's remaining updates once approx_kl exceeds this")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 over the batch")
    whiten_rewards: bool = opt(False, "scale per-token rewards to unit std over the batch (mean kept)")


@dataclass
class CriticSection:
    """The value model."""

    model: str | None = opt(None, "start from this model: a reward model keeps its head (recommended), a policy gets a zero head; default: the policy")
    lr: float = opt(1e-5, "critic learning rate")
    shared: bool = opt(False, "value head on the actor's backbone instead of a separate critic model (less memory)")


@dataclass
class PtxSection:
    """PPO-ptx: mix in the language-model loss on pretraining / SFT text (InstructGPT eq. 2)."""

    coef: float = opt(0.0, "gamma: weight of the LM loss (0 = off)")
    data: str | None = opt(None, "SFT-format file (prompt + completion or messages) for the LM loss")
    batch_size: int = opt(4, "LM examples per optimiser step")


@dataclass
class PPOConfig(OnlineArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """PPO with actor, critic, reward and reference models."""

    output_dir: str = opt("runs/ppo", "directory for config.yaml, metrics.jsonl, samples.jsonl, checkpoints/ and final/")
    lr: float = opt(1e-6, "actor learning rate")
    batch_size: int = opt(16, "prompts per rollout step (one response each), over all processes")
    grad_accum: int = opt(1, "micro-batches per minibatch")
    max_grad_norm: float = opt(1.0, "clip each model's gradient norm to this (0 = no clipping)")
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
    actor: object = None
    critic: object = None
    reference: object = None  # None under LoRA (the base with adapters disabled is the reference)
    reward: object = None  # the RewardPipeline


def train_ppo(config: PPOConfig | dict, reward_fn=None) -> PPOResult:
    """Run PPO as configured. `reward_fn(prompts, completions, **kw) -> list[float]` (or a list of
    such functions) adds Python reward sources to those in `config.reward`."""
    from rufus.data.loading import load_records
    from rufus.data.prompts import tokenize_prompts
    from rufus.kl_control import make_kl_controller
    from rufus.models.loading import load_causal_lm, load_tokenizer, set_dropout
    from rufus.rewards import build_reward_pipeline

    cfg = common.as_config(PPOConfig, config)
    run = common.start_run(cfg)
    acc = run.accelerator
    world, micro_size = acc.num_processes, _micro_size(cfg, acc.num_processes)

    # 0. prompts and reward sources first: bad input fails before the big models load
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.data.chat_template)
    max_prompt = cfg.data.max_prompt_length or max(1, cfg.data.max_length - cfg.generation.max_new_tokens)
    with acc.main_process_first():
        prompts = tokenize_prompts(load_records(cfg.data.train, format="prompt", split=cfg.data.train_split),
                                   tokenizer, max_prompt_length=max_prompt, truncation=cfg.data.truncation)
        ptx = _ptx_data(cfg, tokenizer) if cfg.ptx.coef > 0 else None
    # one running score std over all processes, so every process scales alike
    reward = build_reward_pipeline(cfg.reward, device=acc.device, dtype=run.compute_dtype, extra_functions=reward_fn,
                                   trust_remote_code=cfg.trust_remote_code,
                                   gather=lambda t: acc.gather(t.to(acc.device)).cpu())
    plan = common.BatchPlan(len(prompts), cfg.batch_size, 1, world, acc.process_index, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)

    # the four models: actor and critic train; reference and reward model are frozen
    actor = common.load_trainable_lm(cfg, tokenizer)
    set_dropout(actor, 0.0)  # logprobs must be reproducible: the first ratio is then exactly 1
    reference = None
    if cfg.lora.r == 0:
        reference = load_causal_lm(cfg.ref_model or cfg.model, tokenizer=tokenizer, dtype=run.compute_dtype,
                                   trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                                   compile=cfg.compile).to(acc.device).eval()
        reference.requires_grad_(False)
    elif cfg.ref_model:
        raise common.ConfigError("ref_model: with LoRA the reference is the adapter-disabled base; leave ref_model unset")
    if cfg.critic.shared:
        from rufus.models.value import SharedActorCritic

        if cfg.critic.model:
            raise common.ConfigError("critic.model: a shared critic lives on the actor; leave critic.model unset")
        actor, critic = SharedActorCritic(actor), None
        actor_opt, actor_sched = common.make_optimizer(cfg, actor, max_steps, {"value_head": cfg.critic.lr})
        actor, actor_opt = acc.prepare(actor, actor_opt)
    else:
        critic = _load_critic(cfg, tokenizer)
        actor_opt, actor_sched = common.make_optimizer(cfg, actor, max_steps)
        critic_opt, critic_sched = common.make_optimizer(_with_lr(cfg, cfg.critic.lr), critic, max_steps)
        actor, critic, actor_opt, critic_opt = acc.prepare(actor, critic, actor_opt, critic_opt)
    kl_ctl = make_kl_controller(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)

    models = {"actor": acc.unwrap_model(actor)}
    optimizers = {"actor": actor_opt}
    schedulers = {"actor": actor_sched}
    if critic is not None:
        models["critic"], optimizers["critic"], schedulers["critic"] = acc.unwrap_model(critic), critic_opt, critic_sched
    start_step, saved = common.maybe_resume(run, models, optimizers, schedulers)
    if saved:
        kl_ctl.load_state_dict(saved["kl_controller"])
        reward.load_state_dict(saved["reward"])
    logger = common.open_metrics(run, start_step)
    samples_path = run.output_dir / "samples.jsonl"
    if acc.is_main_process:  # a resumed run drops the samples written after its checkpoint
        kept = [r for r in read_metrics(samples_path) if r["step"] <= start_step] if run.resume_from else []
        samples_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="ppo")
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in plan.micro_batches(plan.global_batch(step))[0]]

        # 1. rollout: one response per prompt from pi_old
        ro = _rollout(cfg, acc, models["actor"], tokenizer, batch)
        t_rollout = time.perf_counter() - t0

        # 2. evaluation: pi_old and pi_ref logprobs, values, scores
        with torch.no_grad():
            from rufus.rollout.logprobs import batched_logprobs

            actor.eval()
            with acc.autocast():
                parts = [_forward(cfg, actor, critic, ro.input_ids[i:i + micro_size], ro.attention_mask[i:i + micro_size],
                                  ro.prompt_length) for i in range(0, len(batch), micro_size)]
                ro.logprobs = torch.cat([p[0] for p in parts])
                ro.values = torch.cat([p[2] for p in parts])
                with _reference(models["actor"], reference) as ref:
                    ro.ref_logprobs = batched_logprobs(ref, ro.input_ids, ro.attention_mask, ro.prompt_length,
                                                       cfg.generation.temperature, micro_size)
            ro.scores, reward_stats = reward(ro.prompts, ro.completions, ro.has_eos, **ro.extra)
            ro.scores = ro.scores.to(acc.device)

        # 3. per-token rewards, advantages and returns
        stats = _advantages(cfg, acc, ro, kl_ctl.value)

        # 4. PPO epochs over minibatches
        t_train = time.perf_counter()
        stats.update(_ppo_update(cfg, acc, ro, actor, critic, optimizers, micro_size, ptx, step))
        for sched in schedulers.values():
            sched.step()
        t_train = time.perf_counter() - t_train

        # 5. KL controller, log, samples, checkpoint
        kl_ctl.update(stats["kl/mean"], n_steps=cfg.batch_size)
        tokens = acc.reduce(ro.response_mask.sum().float(), reduction="sum").item()
        step_s = time.perf_counter() - t0
        row = {**stats, **reward_stats, "kl/coef": kl_ctl.value, "lr": actor_sched.get_last_lr()[0],
               "time/rollout_s": t_rollout, "time/train_s": t_train, "time/step_s": step_s,
               "tokens_per_s": tokens / max(step_s, 1e-9)}
        if step % cfg.log_every == 0 or step == max_steps:
            logger.log(step, row)
        if acc.is_main_process and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            _write_samples(samples_path, step, ro, cfg.num_samples)
        progress.update(1)
        progress.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl/mean']:.3f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == max_steps:
            common.save_checkpoint(run, step, models, optimizers, schedulers,
                                   state={"kl_controller": kl_ctl.state_dict(), "reward": reward.state_dict()})
    progress.close()

    policy = models["actor"].policy if cfg.critic.shared else models["actor"]
    final_dir = common.save_final(run, policy, tokenizer)
    if acc.is_main_process:
        if cfg.critic.shared:
            from safetensors.torch import save_file

            (run.output_dir / "final_critic").mkdir(exist_ok=True)
            save_file(models["actor"].value_head.state_dict(), run.output_dir / "final_critic" / "value_head.safetensors")
        else:
            models["critic"].save_pretrained(run.output_dir / "final_critic")
    logger.close()
    common.finish_run(run, ["reward/mean", "score/mean", "kl/mean", "entropy", "policy/loss", "value/loss"])
    return PPOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, policy,
                     models.get("critic", models["actor"]), reference, reward)


def _micro_size(cfg, world: int) -> int:
    per_process = cfg.batch_size // world
    size, rem = divmod(per_process, cfg.ppo.minibatches * cfg.grad_accum)
    if cfg.batch_size % world or rem or size == 0:
        raise common.ConfigError(
            f"batch_size: {cfg.batch_size} does not split into {world} processes x ppo.minibatches "
            f"{cfg.ppo.minibatches} x grad_accum {cfg.grad_accum} equal micro-batches")
    return size


def _with_lr(cfg, lr):
    import dataclasses

    return dataclasses.replace(cfg, lr=lr)


def _load_critic(cfg, tokenizer):
    from transformers import AutoConfig

    from rufus.models.loading import apply_lora, resolve_model_path, set_dropout
    from rufus.models.reward import head_module_names
    from rufus.models.value import ValueModel, load_value_model

    name = cfg.critic.model or cfg.model
    arch = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=cfg.trust_remote_code).architectures or []
    from_rm = any(a.endswith("ForSequenceClassification") for a in arch)
    critic = load_value_model(name, tokenizer=tokenizer, from_reward_model=from_rm,
                              trust_remote_code=cfg.trust_remote_code, gradient_checkpointing=cfg.gradient_checkpointing,
                              attn_implementation=cfg.attn_implementation, compute_dtype=common.compute_dtype(cfg),
                              compile=cfg.compile)
    if critic.classifier.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise common.ConfigError(f"critic.model: {name} has a smaller vocabulary than the policy's tokenizer")
    set_dropout(critic, 0.0)
    if cfg.lora.r > 0:
        critic = ValueModel(apply_lora(critic.classifier, cfg.lora, task_type="SEQ_CLS",
                                       modules_to_save=head_module_names(critic.classifier)))
    return critic


@contextlib.contextmanager
def _reference(actor, reference):
    """The frozen reference: a separate model, or (LoRA) the actor with its adapters disabled."""
    if reference is not None:
        yield reference
    else:
        with actor.disable_adapter():
            yield actor


def _rollout(cfg, acc, actor, tokenizer, batch):
    from rufus.rollout.generate import generate_responses

    ro = generate_responses(actor, tokenizer, [b["prompt"] for b in batch], [b["ids"] for b in batch],
                            cfg.generation, device=acc.device)
    keys = batch[0]["extra"].keys()
    ro.extra = {k: [b["extra"][k] for b in batch] for k in keys}
    return ro


def _advantages(cfg, acc, ro, beta: float) -> dict:
    """Per-token rewards (KL penalty + score on the last token), GAE, whitening; returns stats."""
    from rufus.advantages import gae
    from rufus.losses.kl import kl_penalty

    mask = ro.response_mask.float()  # (B, A)
    ro.kl = torch.where(mask.bool(), kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator), 0.0)  # (B, A) KL_t
    rewards = -beta * ro.kl
    last = ro.last_token_index()
    rewards[torch.arange(len(last)), last] += ro.scores  # the score sits on the last response token
    if cfg.ppo.whiten_rewards:
        rewards = common.whiten_across_processes(rewards, mask, acc, shift_mean=False)
    ro.rewards = rewards
    ro.advantages, ro.returns = gae(rewards, ro.values * mask, mask, gamma=cfg.gae.gamma, lam=cfg.gae.lam)
    if cfg.ppo.whiten_advantages:
        ro.advantages = common.whiten_across_processes(ro.advantages, mask, acc)

    # statistics over the whole batch (every process)
    seq_kl = ro.kl.sum(-1)
    seq_reward = rewards.sum(-1)
    sums = torch.stack([seq_kl.sum(), seq_reward.sum(), (seq_reward**2).sum(), ro.scores.sum(),
                        ro.response_length.float().sum(), torch.tensor(float(len(last)), device=seq_kl.device)])
    s = acc.reduce(sums, reduction="sum").tolist()
    n = s[5]
    reward_mean = s[1] / n
    return {"kl/mean": s[0] / n, "reward/mean": reward_mean, "reward/std": max(s[2] / n - reward_mean**2, 0.0) ** 0.5,
            "score/mean": s[3] / n, "response/length": s[4] / n}


def _forward(cfg, actor, critic, input_ids, attention_mask, prompt_length, with_entropy: bool = False):
    """(logprobs, entropy or None, values), each (B, A): one pass for a shared actor-critic, else two."""
    from rufus.losses.ppo import entropy_from_logits
    from rufus.losses.sft import token_logprobs
    from rufus.models.value import values_at_response
    from rufus.rollout.logprobs import position_ids_from_mask

    out = actor(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    logits = out.logits[:, prompt_length - 1:-1]  # position P-1+t predicts response token t
    if cfg.generation.temperature > 0 and cfg.generation.temperature != 1.0:
        logits = logits / cfg.generation.temperature
    logprobs = token_logprobs(logits, input_ids[:, prompt_length:])
    entropy = entropy_from_logits(logits) if with_entropy else None
    if critic is None:
        values = out["values"][:, prompt_length - 1:-1]
    else:
        values = values_at_response(critic, input_ids, attention_mask, prompt_length)
    return logprobs, entropy, values


def _ppo_update(cfg, acc, ro, actor, critic, optimizers, micro_size: int, ptx, step: int) -> dict:
    """ppo.epochs passes over the rollout in ppo.minibatches, each split into grad_accum micro-batches."""
    from rufus.losses.aggregation import masked_mean
    from rufus.losses.ppo import explained_variance, policy_loss, value_loss

    B = ro.input_ids.shape[0]
    mb_size = B // cfg.ppo.minibatches
    trained = [actor] + ([critic] if critic is not None else [])
    for m in trained:
        m.train()
    totals: dict[str, float] = {}
    count = 0
    first_ratio_dev = None
    stop = False
    for epoch in range(cfg.ppo.epochs):
        # the first pass keeps the rollout order, so its first micro-batch is exactly the chunk the
        # old logprobs were computed on (ratio == 1 bit for bit); later passes reshuffle
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + epoch)
        order = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=g)
        for start in range(0, B, mb_size):
            mb = order[start:start + mb_size]
            # the minibatch's valid-token count over all processes: the loss denominator
            n_tokens = acc.reduce(ro.response_mask[mb.to(ro.response_mask.device)].sum().float(), reduction="sum")
            normalizer = n_tokens.clamp(min=1) / acc.num_processes
            micro = [mb[i:i + micro_size] for i in range(0, len(mb), micro_size)]
            for k, idx in enumerate(micro):
                part = ro.select(idx)
                mask = part.response_mask
                last = k == len(micro) - 1
                with _no_sync(acc, trained, last), acc.autocast():
                    logprobs, entropy, values = _forward(cfg, actor, critic, part.input_ids, part.attention_mask,
                                                         part.prompt_length, with_entropy=True)
                    pg, pg_stats = policy_loss(logprobs, part.logprobs, part.advantages, mask, clip=cfg.ppo.clip,
                                               aggregation="sum", normalizer=normalizer)
                    vf, vf_stats = value_loss(values, part.values, part.returns, mask, clip=cfg.ppo.value_clip,
                                              aggregation="sum", normalizer=normalizer)
                    ent = (entropy * mask).sum() / normalizer
                    loss = pg + cfg.ppo.vf_coef * vf - cfg.ppo.entropy_coef * ent
                    if ptx is not None:
                        loss = loss + cfg.ptx.coef * _ptx_loss(cfg, acc, actor, ptx, step, epoch, start, k, len(micro))
                    acc.backward(loss)
                if first_ratio_dev is None:
                    ratio = torch.exp(logprobs.detach() - part.logprobs)
                    first_ratio_dev = float(((ratio - 1).abs() * mask).max())
                weight = mask.sum().item()
                _add(totals, {"policy/loss": pg.item(), "value/loss": vf.item(),
                              "entropy": masked_mean(entropy.detach(), mask).item() * weight,
                              "policy/clipfrac": float(pg_stats["clipfrac"]) * weight,
                              "policy/approx_kl": float(pg_stats["approx_kl"]) * weight,
                              "value/clipfrac": float(vf_stats["clipfrac"]) * weight,
                              "tokens": weight})
            for m, name in zip(trained, ("actor", "critic")):
                common.clip_and_step(cfg, acc, m, optimizers[name], _NoSched())
            count += 1
            if cfg.ppo.target_kl is not None:
                approx = acc.reduce(torch.tensor(totals["policy/approx_kl"] / max(totals["tokens"], 1),
                                                 device=acc.device), reduction="mean").item()
                if approx > cfg.ppo.target_kl:
                    stop = True
                    break
        if stop:
            break
    t = acc.reduce(torch.tensor([totals[k] for k in sorted(totals)], device=acc.device), reduction="sum")
    totals = dict(zip(sorted(totals), t.tolist()))
    tokens = max(totals.pop("tokens"), 1)
    out = {k: (v / tokens if k not in ("policy/loss", "value/loss") else v / acc.num_processes / count)
           for k, v in totals.items()}
    out["value/explained_variance"] = explained_variance(ro.values, ro.returns, ro.response_mask)
    out["policy/ratio_dev_first"] = first_ratio_dev
    out["ppo/updates"] = count
    return out


class _NoSched:
    """Schedulers step once per rollout step (in the loop), not per minibatch."""

    def step(self):
        pass


def _no_sync(acc, models, last: bool):
    stack = contextlib.ExitStack()
    if not last and acc.num_processes > 1:
        for m in models:
            stack.enter_context(acc.no_sync(m))
    return stack


def _add(totals: dict, values: dict) -> None:
    for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + v


def _ptx_data(cfg, tokenizer):
    from rufus.data.loading import load_records
    from rufus.data.sft import tokenize_sft

    if not cfg.ptx.data:
        raise common.ConfigError("ptx.coef > 0 needs ptx.data (an SFT-format file)")
    return tokenize_sft(load_records(cfg.ptx.data, format="sft", key="ptx.data"), tokenizer,
                        max_length=cfg.data.max_length, truncation="truncate", key="ptx.data")


def _ptx_loss(cfg, acc, actor, ptx, step, epoch, start, k, n_micro):
    """Language-model loss on a batch of ptx text, shared out over the micro-batches of a minibatch."""
    from rufus.data.sft import SFTCollator
    from rufus.losses.sft import sft_loss

    g = torch.Generator().manual_seed(cfg.seed * 104729 + step * 1009 + epoch * 101 + start)
    idx = torch.randint(len(ptx), (cfg.ptx.batch_size,), generator=g).tolist()
    idx = idx[k::n_micro]
    if not idx:
        return torch.zeros((), device=acc.device)
    pad_id = acc.unwrap_model(actor).config.pad_token_id
    batch = {n: t.to(acc.device) for n, t in SFTCollator(pad_id)([ptx[i] for i in idx]).items()}
    logits = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    loss, _ = sft_loss(logits, batch["labels"])
    return loss / n_micro


def _write_samples(path: Path, step: int, ro, n: int) -> None:
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(n, len(ro.completions))):
            prompt = ro.prompts[i] if isinstance(ro.prompts[i], str) else ro.prompts[i][-1]["content"]
            f.write(json.dumps({"step": step, "prompt": prompt, "response": ro.completions[i],
                                "score": float(ro.scores[i]), "kl": float(ro.kl[i].sum())}) + "\n")
