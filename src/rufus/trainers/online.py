"""The pieces every online trainer (PPO, GRPO, RLOO / REINFORCE++, online DPO, best-of-n) shares.

Each is defined once and called from each trainer's own numbered loop; what differs between the
algorithms (the advantage estimator, the loss) stays in the trainer file. In a step's order:

  load_inputs (load_prompts, build_reward), load_policy, load_reference,
  reference_model, micro_batch_size, open_outputs  set-up
  sample, sample_and_score                 1. the rollout (through `rollout.engine.sample_rollout`)
  reference_logprobs, old_and_ref_logprobs 2. teacher-forced pi_old and pi_ref in micro-batches
  batch_stats                              score, reward, KL and length over every process
  update_epochs (logprobs_forward, policy_stats)   4. epochs x minibatches x grad-accum updates
  SamplesFile, end_step                    5. samples.jsonl, log, progress, checkpoint
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rufus import distributed
from rufus.config import ConfigError
from rufus.trainers import common


@dataclass
class PolicyResult:
    """What a critic-free online trainer (GRPO, RLOO) returns."""

    output_dir: Path
    final_dir: Path  # the trained policy, loadable with AutoModelForCausalLM.from_pretrained
    steps: int
    metrics: list[dict]  # the rows written to metrics.jsonl (main process only)
    policy: object = None  # the trained policy (unwrapped; a peft model under LoRA)
    reference: object = None  # None when kl.coef == 0 or under LoRA


# --- set-up -----------------------------------------------------------------------------------------


def load_inputs(cfg, run, reward_fn=None):
    """0. What a run reads before any big model loads, so bad input fails first: the tokenizer, the
    prompts, the reward sources, the batch plan over the prompts and the number of steps.
    Returns (tokenizer, prompts, reward, plan, max_steps)."""
    acc = run.accelerator
    tokenizer = common.load_run_tokenizer(cfg)
    prompts = load_prompts(cfg, acc, tokenizer)
    reward = build_reward(cfg, run, reward_fn)
    plan = common.BatchPlan(len(prompts), cfg.batch_size, 1, acc.num_processes, acc.process_index, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)
    return tokenizer, prompts, reward, plan, max_steps


def load_policy(cfg, run, tokenizer, max_steps: int, *, dropout_off: bool = True):
    """The policy that trains (LoRA if set), its optimiser and schedule, prepared for the accelerator:
    (policy, optimizer, scheduler). dropout_off: the logprobs of pi_old and of the update's first pass
    must agree bit for bit (the first PPO ratio exactly 1, DPO's loss log 2 at the start)."""
    from rufus.models.loading import set_dropout

    policy = common.load_trainable_lm(cfg, tokenizer)
    if dropout_off:
        set_dropout(policy, 0.0)
    policy = distributed.shard(cfg, run.accelerator, policy)  # strategy=fsdp: sharded
    optimizer, scheduler = common.make_optimizer(cfg, policy, max_steps)
    policy, optimizer = distributed.prepare(run.accelerator, policy, optimizer)
    return policy, optimizer, scheduler


def open_outputs(run, models, optimizers, schedulers, reward=None, samples: str | None = "samples.jsonl"):
    """Resume from the checkpoint, if any (the reward's running statistics too), then open
    metrics.jsonl and the samples file (None: no samples file). Returns (start_step, saved trainer
    state, logger, samples)."""
    start_step, saved = common.maybe_resume(run, models, optimizers, schedulers)
    if saved.get("reward") and reward is not None:
        reward.load_state_dict(saved["reward"])
    logger = common.open_metrics(run, start_step)  # creates output_dir
    return start_step, saved, logger, SamplesFile(run, samples, resume_step=start_step, enabled=samples is not None)


def load_prompts(cfg, acc, tokenizer, records=None, *, drop_columns: tuple[str, ...] = ()) -> list[dict]:
    """The prompts of data.train, tokenised: [{"prompt", "ids", "extra"}], prompts longer than
    data.max_prompt_length (default: data.max_length - generation.max_new_tokens) handled per
    data.truncation. `records`: rows already loaded (DPO reads preference rows and samples from their
    prompts); `drop_columns`: columns kept from the reward functions' extra arguments."""
    from rufus.data.loading import load_records
    from rufus.data.prompts import tokenize_prompts

    max_prompt = cfg.data.max_prompt_length or max(1, cfg.data.max_length - cfg.generation.max_new_tokens)
    with acc.main_process_first():
        if records is None:
            from rufus.data.readers import options_from

            read = options_from(cfg.data, tokenizer)
            records = load_records(cfg.data.train, kind="prompt", split=cfg.data.train_split, options=read)
        rows = tokenize_prompts(records, tokenizer, max_prompt_length=max_prompt, truncation=cfg.data.truncation)
    if drop_columns:
        for row in rows:
            row["extra"] = {k: v for k, v in row["extra"].items() if k not in drop_columns}
    return rows


def load_reference(cfg, run, tokenizer, needed: bool = True):
    """The frozen reference pi_ref, or None: when not `needed` (no KL term) and under LoRA, where the
    reference is the policy with its adapters disabled (no second copy of the base weights)."""
    from rufus.models.loading import load_causal_lm

    if cfg.lora.r > 0 and cfg.ref_model:
        raise ConfigError("ref_model: with LoRA the reference is the adapter-disabled base; leave ref_model unset")
    if not needed or cfg.lora.r > 0:
        return None
    reference = (
        load_causal_lm(
            cfg.ref_model or cfg.model,
            tokenizer=tokenizer,
            dtype=run.compute_dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            compile=cfg.compile,
        )
        .to(run.accelerator.device)
        .eval()
    )
    reference.requires_grad_(False)
    return distributed.shard(cfg, run.accelerator, reference, trained=False)


@contextlib.contextmanager
def reference_model(policy, reference):
    """The frozen reference: a separate model, or (LoRA) the policy with its adapters disabled."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def build_reward(cfg, run, reward_fn=None, *, gather: bool = True, why: str = ""):
    """The RewardPipeline of cfg.reward plus the Python functions `reward_fn` (one or a list).

    gather=True keeps one running score std over all processes (every process scales alike); a
    trainer whose processes score different numbers of samples (best-of-n) passes False. `why` is
    added to a configuration error (e.g. why this run needs a reward at all)."""
    from rufus.rewards import build_reward_pipeline

    acc = run.accelerator
    try:
        pipeline = build_reward_pipeline(
            cfg.reward,
            device=acc.device,
            dtype=run.compute_dtype,
            extra_functions=reward_fn,
            trust_remote_code=cfg.trust_remote_code,
            gather=(lambda t: acc.gather(t.to(acc.device)).cpu()) if gather else None,
        )
    except ConfigError as e:
        if not why:
            raise
        raise ConfigError(f"{e} ({why})") from None
    if gather:  # every process scores as many samples, so a sharded reward model's forwards stay in step
        for _, source in pipeline.sources:
            if getattr(source, "model", None) is not None:
                source.model = distributed.shard(cfg, acc, source.model, trained=False)
    return pipeline


def micro_batch_size(cfg, world: int, section: str) -> int:
    """Sequences per micro-batch: each process's share of batch_size prompts, times the section's
    group_size (samples per prompt; 1 without), split into `<section>.minibatches` x grad_accum equal
    parts. A ConfigError naming the keys when they do not split."""
    update = getattr(cfg, section)
    n, minibatches = getattr(update, "group_size", 1), update.minibatches
    per_process, rem0 = divmod(cfg.batch_size, world)
    size, rem = divmod(per_process * n, minibatches * cfg.grad_accum)
    if rem0 or rem or size == 0:
        what = f"{cfg.batch_size} prompts x {section}.group_size {n} = {cfg.batch_size * n} responses do"
        raise ConfigError(
            f"batch_size: {what if n > 1 else f'{cfg.batch_size} does'} not split into {world} processes x "
            f"{section}.minibatches {minibatches} x grad_accum {cfg.grad_accum} equal micro-batches"
        )
    return size


# --- 1-2. rollout and teacher-forced logprobs -----------------------------------------------------


def rollout_engine(cfg, acc, policy, tokenizer):
    """The rollout engine (`rollout.engine`) for the trained `policy` (unwrapped)."""
    from rufus.rollout.engines import make_engine

    r = cfg.rollout
    options = {}
    if r.engine == "vllm":  # the longest prompt (load_prompts' limit) and its response
        max_prompt = cfg.data.max_prompt_length or max(1, cfg.data.max_length - cfg.generation.max_new_tokens)
        max_len = max_prompt + cfg.generation.max_new_tokens
        options = {"gpu_memory_utilization": r.gpu_memory_utilization, "sleep": r.sleep, "max_model_len": max_len}
    return make_engine(r.engine, policy, tokenizer, device=acc.device, **options)


def sampling_seed(cfg, process: int, step: int, call: int = 0) -> int:
    """The seed of a step's `call`-th sampling call for process `process`: responses depend on (seed,
    step, process, call) and the weights only, so a resumed run and a run whose roles are placed
    elsewhere (placement=ray) sample what the uninterrupted local run samples."""
    import numpy as np

    return int(np.random.SeedSequence([cfg.seed, step, process, call]).generate_state(1, np.uint64)[0] >> 2)


def sample(cfg, acc, engine, tokenizer, rows: list[dict], n: int, step: int, call: int = 0):
    """1. n responses per prompt row from the current policy: a Rollout of len(rows) * n sequences."""
    from rufus.rollout.engine import sample_rollout

    seed = sampling_seed(cfg, acc.process_index, step, call)
    return sample_rollout(engine, tokenizer, rows, n, cfg.generation, seed=seed, device=acc.device)


def sync_engine(acc, engine, policy) -> None:
    """After the step's optimiser updates: an engine with its own copy of the weights loads the new ones
    (full tensors, gathered from a sharded policy); the hf engine samples from `policy` itself."""
    if getattr(engine, "name", "hf") == "hf":
        return
    from rufus import distributed
    from rufus.rollout.engines import policy_weights

    with distributed.gathered(policy):  # every process's engine gets the full weights
        engine.update_weights(policy_weights(policy))


@dataclass
class Scored:
    """Samples and their scores, prompt i's n samples at i*n .. i*n + n - 1 (N = prompts x n)."""

    completions: list[str]  # (N,) the responses as text
    responses: list[list[int]]  # (N,) each response's token ids, up to and including its EOS
    has_eos: torch.Tensor  # (N,) bool
    scores: torch.Tensor  # (N,) the reward sources' scores


def sample_and_score(cfg, acc, engine, tokenizer, rows: list[dict], n: int, reward, per_call: int) -> Scored:
    """1-2. n responses to each prompt row from the current policy, `per_call` prompts per generate call,
    then all of them scored in one call of `reward` (for the algorithms that keep samples, not a
    Rollout: best-of-n, online DPO). Sampling draws from the process's generator (the callers seed it)."""
    from rufus.rollout.engine import sample_rollout

    completions, responses, has_eos = [], [], []
    for start in range(0, len(rows), per_call):
        part = rows[start : start + per_call]
        ro = sample_rollout(engine, tokenizer, part, n, cfg.generation, device=acc.device)
        completions += ro.completions
        has_eos.append(ro.has_eos.cpu())
        masks = ro.response_mask.cpu().bool()
        responses += [ids[m].tolist() for ids, m in zip(ro.response_ids.cpu(), masks, strict=True)]
    repeated = [row for row in rows for _ in range(n)]
    extra = {k: [r["extra"][k] for r in repeated] for k in (repeated[0]["extra"] if repeated else {})}
    scores, _ = reward([r["prompt"] for r in repeated], completions, torch.cat(has_eos), **extra)
    return Scored(completions, responses, torch.cat(has_eos), scores)


@torch.no_grad()
def reference_logprobs(cfg, acc, policy, reference, ro, micro_size: int) -> torch.Tensor:
    """(B, A) log pi_ref(y_t | x, y_<t) of the rollout's responses, in micro-batches."""
    from rufus.rollout.logprobs import batched_logprobs

    with acc.autocast(), reference_model(acc.unwrap_model(policy), reference) as ref:
        return batched_logprobs(
            ref, ro.input_ids, ro.attention_mask, ro.prompt_length, cfg.generation.temperature, micro_size
        )


@torch.no_grad()
def old_and_ref_logprobs(
    cfg, acc, policy, reference, ro, micro_size: int, with_reference: bool, with_old: bool = True
) -> None:
    """Fill ro.logprobs (pi_old) and, when asked, ro.ref_logprobs (pi_ref), in micro-batch chunks.

    The chunks are those of the first update pass, so the first ratio is exactly 1.
    `with_old=False` leaves ro.logprobs None: with one update over the whole batch pi_old is the
    policy of that update, and `update_epochs` takes pi_old from its own forward pass (one forward
    pass fewer per step).
    """
    from rufus.rollout.logprobs import batched_logprobs

    policy.eval()
    ro.logprobs = None
    if with_old:
        with acc.autocast():
            ro.logprobs = batched_logprobs(
                policy, ro.input_ids, ro.attention_mask, ro.prompt_length, cfg.generation.temperature, micro_size
            )
    if with_reference:
        ro.ref_logprobs = reference_logprobs(cfg, acc, policy, reference, ro, micro_size)


def mean_over_processes(acc, stats: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over the processes: the whole batch's means, when they are means over
    equal shares (the reward pipeline's score/<source>, score/raw, response/no_eos, ...)."""
    if acc.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = acc.reduce(torch.tensor([float(stats[k]) for k in keys], device=acc.device), reduction="mean")
    return dict(zip(keys, values.tolist()))


def batch_stats(acc, ro, kl: torch.Tensor | None, kl_coef: float, mask: torch.Tensor | None = None) -> dict:
    """Means over every process's samples: score/mean, score/std (the reward sources' score),
    reward/mean, reward/std (score - kl_coef * sum_t KL_t, the KL-penalised sequence reward),
    kl/mean (sum_t KL_t per response, nats) and response/length. `kl` (B, A) per-token KL, 0 outside
    the mask, or None (no reference); `mask` defaults to ro.response_mask."""
    mask = (ro.response_mask if mask is None else mask).float()
    seq_kl = (kl * mask).sum(-1) if kl is not None else torch.zeros_like(ro.scores)
    reward = ro.scores - kl_coef * seq_kl
    sums = torch.stack(
        [
            ro.scores.sum(),
            (ro.scores**2).sum(),
            reward.sum(),
            (reward**2).sum(),
            seq_kl.sum(),
            mask.sum(),
            torch.tensor(float(len(ro.scores)), device=ro.scores.device),
        ]
    )
    s = acc.reduce(sums, reduction="sum").tolist()
    n = s[6]
    score, reward = s[0] / n, s[2] / n
    return {
        "score/mean": score,
        "score/std": max(s[1] / n - score**2, 0.0) ** 0.5,
        "reward/mean": reward,
        "reward/std": max(s[3] / n - reward**2, 0.0) ** 0.5,
        "kl/mean": s[4] / n,
        "response/length": s[5] / n,
    }


# --- 4. the update ------------------------------------------------------------------------------------


@dataclass
class Micro:
    """A micro-batch's place in the update, and the loss denominators of its whole minibatch."""

    tokens: torch.Tensor  # valid response tokens of the minibatch over all processes, / processes
    sequences: torch.Tensor  # sequences of the minibatch over all processes, / processes
    epoch: int  # update pass over the batch, from 0
    start: int  # the minibatch's first position in the pass's order
    index: int  # the micro-batch's index within its minibatch
    count: int  # micro-batches in the minibatch


def logprobs_forward(cfg, policy):
    """The differentiable pass of a policy-only update: part -> {"logprobs", "entropy"}, each (B, A)."""
    from rufus.rollout.logprobs import response_logprobs

    def forward(part):
        logprobs, entropy = response_logprobs(
            policy,
            part.input_ids,
            part.attention_mask,
            part.prompt_length,
            cfg.generation.temperature,
            with_entropy=True,
        )
        return {"logprobs": logprobs, "entropy": entropy}

    return forward


def policy_stats(loss: torch.Tensor, stats: dict, entropy: torch.Tensor, mask: torch.Tensor) -> dict:
    """A micro-batch's policy statistics under their logged names: policy/loss, policy/<stat> for a
    policy loss's stats (clipfrac, approx_kl, ratio_mean, ratio_max), policy/entropy (token mean)."""
    from rufus.losses.aggregation import masked_mean

    out = {"policy/loss": loss.item(), **{f"policy/{k}": float(v) for k, v in stats.items()}}
    out["policy/entropy"] = masked_mean(entropy.detach(), mask).item()
    return out


def update_epochs(
    cfg, acc, ro, models: list, optimizers: list, update, micro_size: int, step: int, forward, loss_fn, max_updates=None
):
    """`update.epochs` passes over the rollout, each in `update.minibatches` optimiser steps of
    grad-accumulated micro-batches of `micro_size` sequences (`update`: the algorithm's config section);
    every model in `models` steps its optimiser (same order) after each minibatch. The learning-rate
    schedules are the caller's (once per rollout step).

    forward(part) -> dict: the differentiable pass over a micro-batch `part` (a Rollout slice), with
        at least "logprobs" (B, A), log pi_theta of the response tokens.
    loss_fn(part, out, micro: Micro) -> (loss, stats): the algorithm's loss for the micro-batch (or a
        list of losses, one per model of `models`, each going back through its own model's engine:
        PPO's actor and critic under DeepSpeed, which reduces each engine's gradients in its own
        backward). Divide
        by micro.tokens or micro.sequences (the minibatch's counts over all processes, divided by the
        process count that DDP averages back) so micro-batching leaves the update unchanged. Stats are
        scalars: keys ending in "loss" are the micro-batch's share of the minibatch loss (summed over
        its micro-batches, averaged over minibatch steps); any other is a mean over the micro-batch's
        tokens (averaged weighted by tokens).
    update.target_kl (where the section has one, not None): stop the remaining updates once the running
    mean of stats["policy/approx_kl"] exceeds it. `max_updates`: stop after this many optimiser steps
    (a critic placed apart from its actor stops where the actor's target_kl stopped it).
    A forward without "logprobs" (a critic's alone) skips the first-ratio check.

    The first pass keeps the rollout order, so its first micro-batch is exactly the chunk pi_old was
    computed on: the ratio there is 1 bit for bit (logged as policy/ratio_dev_first, max |ratio - 1|,
    0 when everything is consistent); later passes reshuffle with a seed of (seed, step, epoch).
    When ro.logprobs is None (`old_and_ref_logprobs(with_old=False)`) there must be one update
    (epochs = minibatches = 1): pi_old is the detached logprobs of that update's own forward pass
    (ratio 1, the plain policy gradient), and ro.logprobs is filled from them.
    Returns the stats, plus policy/ratio_dev_first and policy/updates (optimiser steps taken).
    """
    epochs, minibatches, target_kl = update.epochs, update.minibatches, getattr(update, "target_kl", None)
    if max_updates is not None:
        target_kl = None  # the count decides
    N = ro.input_ids.shape[0]
    mb_size = N // minibatches
    fill_old = ro.logprobs is None
    if fill_old and (epochs, minibatches) != (1, 1):
        raise ValueError("old logprobs can come from the update pass only with one epoch and one minibatch")
    old_parts = []
    for model in models:
        model.train()
    weighted: dict[str, float] = {"tokens": 0.0}
    summed: dict[str, float] = {}
    first_dev, updates = None, 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + epoch)
        order = torch.arange(N) if epoch == 0 else torch.randperm(N, generator=g)
        for start in range(0, N, mb_size):
            mb = order[start : start + mb_size]
            counts = torch.stack(
                [
                    ro.response_mask[mb.to(ro.response_mask.device)].sum().float(),
                    torch.tensor(float(len(mb)), device=ro.response_mask.device),
                ]
            )
            counts = acc.reduce(counts, reduction="sum")
            micro = [mb[i : i + micro_size] for i in range(0, len(mb), micro_size)]
            for k, idx in enumerate(micro):
                part = ro.select(idx)
                where = Micro(
                    tokens=counts[0].clamp(min=1) / acc.num_processes,
                    sequences=counts[1] / acc.num_processes,
                    epoch=epoch,
                    start=start,
                    index=k,
                    count=len(micro),
                )
                with common.sync_gradients_if(acc, models, last=k == len(micro) - 1), acc.autocast():
                    out = forward(part)
                    if fill_old:
                        part.logprobs = out["logprobs"].detach()
                        old_parts.append(part.logprobs)
                    loss, stats = loss_fn(part, out, where)
                    if isinstance(loss, (list, tuple)):  # one loss per model
                        for model, model_loss in zip(models, loss, strict=True):
                            distributed.backward(acc, model, model_loss)
                    else:
                        distributed.backward(acc, models[0] if len(models) == 1 else None, loss)
                mask = part.response_mask
                if first_dev is None and "logprobs" in out:
                    ratio = torch.exp(out["logprobs"].detach() - part.logprobs)
                    first_dev = float(((ratio - 1).abs() * mask).max())
                w = float(mask.sum())
                weighted["tokens"] += w
                for key, value in stats.items():
                    if key.endswith("loss"):
                        summed[key] = summed.get(key, 0.0) + float(value)
                    else:
                        weighted[key] = weighted.get(key, 0.0) + float(value) * w
            for model, optimizer in zip(models, optimizers, strict=True):
                common.clip_and_step(cfg, acc, model, optimizer)
            updates += 1
            if max_updates is not None and updates >= max_updates:
                break
            if target_kl is not None:
                approx = acc.reduce(
                    torch.tensor(weighted["policy/approx_kl"] / max(weighted["tokens"], 1), device=acc.device),
                    reduction="mean",
                ).item()
                if approx > target_kl:
                    break
        else:
            continue
        break  # target_kl reached
    if fill_old:  # one epoch, one minibatch in rollout order: the parts are the rows in order
        ro.logprobs = torch.cat(old_parts)
    keys = sorted(weighted) + sorted(summed)
    totals = dict(
        zip(
            keys,
            acc.reduce(
                torch.tensor([{**weighted, **summed}[k] for k in keys], device=acc.device), reduction="sum"
            ).tolist(),
        )
    )
    tokens = max(totals.pop("tokens"), 1.0)
    out = {k: (v / acc.num_processes / updates if k in summed else v / tokens) for k, v in totals.items()}
    out["policy/ratio_dev_first"] = first_dev
    out["policy/updates"] = updates
    return out


# --- 5. samples, log, checkpoint --------------------------------------------------------------------


class SamplesFile:
    """A JSON-lines file of examples for people to read (samples.jsonl, DPO's pairs.jsonl), one row
    per sample with the step that made it. A fresh run starts it empty; a resumed run keeps the rows
    up to its checkpoint's step. Only the main process writes."""

    def __init__(self, run, name: str | None = "samples.jsonl", *, resume_step: int = 0, enabled: bool = True):
        self.path = Path(run.output_dir) / (name or "samples.jsonl")
        self.enabled = enabled and run.accelerator.is_main_process
        if self.enabled:
            kept = []
            if run.resume_from is not None and self.path.exists():
                rows = map(json.loads, self.path.read_text(encoding="utf-8").splitlines())
                kept = [r for r in rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if self.enabled and rows:
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    @staticmethod
    def row(step: int, prompt, response: str, score: float, **columns) -> dict:
        """One sample's row: a chat prompt is shown by its last message."""
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return {"step": step, "prompt": shown, "response": response, "score": float(score), **columns}

    def write_rollout(self, step: int, ro, n: int, **columns) -> None:
        """The first n samples of a rollout: prompt, response, score, and per-sample `columns`
        (name -> (B,) tensor or list)."""
        self.write(
            [
                self.row(
                    step, ro.prompts[i], ro.completions[i], ro.scores[i], **{k: float(v[i]) for k, v in columns.items()}
                )
                for i in range(min(n, len(ro.completions)))
            ]
        )


def step_times(t0: float, rollout_s: float, train_s: float) -> dict:
    """time/rollout_s, time/train_s and time/step_s (since `t0`, the step's start) for the step's row."""
    return {"time/rollout_s": rollout_s, "time/train_s": train_s, "time/step_s": time.perf_counter() - t0}


def sample_due(cfg, step: int) -> bool:
    """samples.jsonl gets rows at step 1 and every sample_every steps (0 = never)."""
    return bool(cfg.sample_every) and (step % cfg.sample_every == 0 or step == 1)


def end_step(
    run,
    logger,
    progress,
    step: int,
    last_step: int,
    row: dict,
    postfix: dict,
    save: tuple,
    samples: SamplesFile | None = None,
    ro=None,
    **columns,
) -> None:
    """5. write the first num_samples samples of rollout `ro` (with per-sample `columns`) to `samples`
    at step 1 and every sample_every steps; log `row` (every log_every steps and at the last);
    advance the progress bar; checkpoint every save_every steps (0 = only at the end) and at the
    last step: `save` = (models, optimizers, schedulers, trainer state) as `save_checkpoint` takes them."""
    cfg = run.cfg
    if samples is not None and sample_due(cfg, step):
        samples.write_rollout(step, ro, cfg.num_samples, **columns)
    if step % cfg.log_every == 0 or step == last_step:
        logger.log(step, row)
    progress.update(1)
    progress.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})
    if (cfg.save_every and step % cfg.save_every == 0) or step == last_step:
        models, optimizers, schedulers, state = save
        common.save_checkpoint(run, step, models, optimizers, schedulers, state=state)
