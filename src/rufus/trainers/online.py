"""Pieces shared by the critic-free online trainers (GRPO, RLOO / REINFORCE++).

Both sample several responses per prompt from the current policy, score them, turn the scores
into advantages (each its own way), and take clipped policy-gradient steps. What differs, the
advantage estimator and the loss, stays in each trainer file; the plumbing lives here.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from rufus.trainers import common


def load_prompts(cfg, acc, tokenizer) -> list[dict]:
    """The prompt data, tokenised, with prompts longer than data.max_prompt_length handled per policy."""
    from rufus.data.loading import load_records
    from rufus.data.prompts import tokenize_prompts

    max_prompt = cfg.data.max_prompt_length or max(1, cfg.data.max_length - cfg.generation.max_new_tokens)
    with acc.main_process_first():
        return tokenize_prompts(load_records(cfg.data.train, format="prompt", split=cfg.data.train_split),
                                tokenizer, max_prompt_length=max_prompt, truncation=cfg.data.truncation)


def load_reference(cfg, run, tokenizer, needed: bool):
    """The frozen reference: None when not needed (kl.coef == 0) or under LoRA (adapters disabled)."""
    from rufus.models.loading import load_causal_lm

    if not needed or cfg.lora.r > 0:
        if cfg.lora.r > 0 and cfg.ref_model:
            raise common.ConfigError("ref_model: with LoRA the reference is the adapter-disabled base; leave it unset")
        return None
    reference = load_causal_lm(cfg.ref_model or cfg.model, tokenizer=tokenizer, dtype=run.compute_dtype,
                               trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                               compile=cfg.compile).to(run.accelerator.device).eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def reference_model(actor, reference):
    """The frozen reference: a separate model, or (LoRA) the actor with its adapters disabled."""
    if reference is not None:
        yield reference
    else:
        with actor.disable_adapter():
            yield actor


def sample_groups(cfg, acc, actor, tokenizer, batch: list[dict], n: int):
    """n responses per prompt: the Rollout holds B*n rows, each prompt's n samples consecutive."""
    from rufus.rollout.generate import generate_responses

    rows = [b for b in batch for _ in range(n)]
    ro = generate_responses(actor, tokenizer, [r["prompt"] for r in rows], [r["ids"] for r in rows],
                            cfg.generation, device=acc.device)
    ro.extra = {k: [r["extra"][k] for r in rows] for k in (rows[0]["extra"] if rows else {})}
    return ro


@torch.no_grad()
def old_and_ref_logprobs(cfg, acc, actor, reference, ro, micro_size: int, with_reference: bool,
                         with_old: bool = True) -> None:
    """Fill ro.logprobs (pi_old) and, when asked, ro.ref_logprobs (pi_ref), in micro-batch chunks.

    The chunks are those of the first update pass, so the first ratio is exactly 1.
    `with_old=False` leaves ro.logprobs None: with one update over the whole batch pi_old is the
    policy of that update, and `policy_gradient_epochs` takes pi_old from its own forward pass
    (one forward pass fewer per step).
    """
    from rufus.rollout.logprobs import batched_logprobs

    actor.eval()
    ro.logprobs = None
    with acc.autocast():
        if with_old:
            ro.logprobs = batched_logprobs(actor, ro.input_ids, ro.attention_mask, ro.prompt_length,
                                           cfg.generation.temperature, micro_size)
        if with_reference:
            with reference_model(acc.unwrap_model(actor), reference) as ref:
                ro.ref_logprobs = batched_logprobs(ref, ro.input_ids, ro.attention_mask, ro.prompt_length,
                                                   cfg.generation.temperature, micro_size)


def policy_gradient_epochs(cfg, acc, ro, actor, optimizer, *, epochs: int, minibatches: int, micro_size: int,
                           step: int, loss_fn) -> dict:
    """`epochs` passes over the rollout in `minibatches` optimiser steps of grad-accumulated micro-batches.

    `loss_fn(part, logprobs, normalizers) -> (loss, stats)` computes the algorithm's loss on a
    micro-batch `part` (a Rollout slice) from the current `logprobs` (B, A); `normalizers` holds the
    minibatch's token and sequence counts over all processes (divided by the process count that DDP
    averages back), so micro-batching leaves the update unchanged. Returns token-weighted means of
    the stats, plus the first micro-batch's max |ratio - 1| (0 when everything is consistent).

    When ro.logprobs is None (`old_and_ref_logprobs(with_old=False)`), there must be a single
    update (epochs = minibatches = 1): pi_old is the detached logprobs of that update's own forward
    pass (ratio 1, the gradient of the plain policy gradient), and ro.logprobs is filled from them.
    """
    from rufus.rollout.logprobs import response_logprobs

    N = ro.input_ids.shape[0]
    mb_size = N // minibatches
    fill_old = ro.logprobs is None
    if fill_old and (epochs, minibatches) != (1, 1):
        raise ValueError("old logprobs can come from the update pass only with one epoch and one minibatch")
    old_parts = []
    actor.train()
    totals: dict[str, float] = {}
    first_dev = None
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step * 131 + epoch)
        order = torch.arange(N) if epoch == 0 else torch.randperm(N, generator=g)
        for start in range(0, N, mb_size):
            mb = order[start:start + mb_size]
            counts = torch.stack([ro.response_mask[mb.to(ro.response_mask.device)].sum().float(),
                                  torch.tensor(float(len(mb)), device=ro.response_mask.device)])
            counts = acc.reduce(counts, reduction="sum")
            normalizers = {"tokens": counts[0].clamp(min=1) / acc.num_processes,
                           "sequences": counts[1] / acc.num_processes}
            micro = [mb[i:i + micro_size] for i in range(0, len(mb), micro_size)]
            for k, idx in enumerate(micro):
                part = ro.select(idx)
                with common.sync_gradients_if(acc, actor, last=k == len(micro) - 1), acc.autocast():
                    logprobs, entropy = response_logprobs(actor, part.input_ids, part.attention_mask,
                                                          part.prompt_length, cfg.generation.temperature,
                                                          with_entropy=True)
                    if fill_old:
                        part.logprobs = logprobs.detach()
                        old_parts.append(part.logprobs)
                    loss, stats = loss_fn(part, logprobs, normalizers)
                    acc.backward(loss)
                mask = part.response_mask
                if first_dev is None:
                    first_dev = float(((torch.exp(logprobs.detach() - part.logprobs) - 1).abs() * mask).max())
                w = float(mask.sum())
                values = {"entropy": float((entropy.detach() * mask).sum()), "tokens": w}
                values.update({k2: float(v) * w for k2, v in stats.items()})
                for k2, v in values.items():
                    totals[k2] = totals.get(k2, 0.0) + v
            common.clip_and_step(cfg, acc, actor, optimizer, _NoScheduler())
    if fill_old:  # one epoch, one minibatch in rollout order: the parts are the rows in order
        ro.logprobs = torch.cat(old_parts)
    keys = sorted(totals)
    summed = dict(zip(keys, acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device),
                                       reduction="sum").tolist()))
    tokens = max(summed.pop("tokens"), 1.0)
    out = {k: v / tokens for k, v in summed.items()}
    out["policy/ratio_dev_first"] = first_dev
    return out


class _NoScheduler:
    """The learning-rate schedule steps once per rollout step, in the trainer's loop."""

    def step(self):
        pass


def batch_stats(acc, ro, kl_per_token: torch.Tensor | None, mask: torch.Tensor | None = None) -> dict:
    """Score, KL, length statistics over every process's samples (`mask` default ro.response_mask)."""
    mask = (ro.response_mask if mask is None else mask).float()
    seq_kl = (kl_per_token * mask).sum(-1) if kl_per_token is not None else torch.zeros_like(ro.scores)
    sums = torch.stack([ro.scores.sum(), (ro.scores**2).sum(), seq_kl.sum(), mask.sum(),
                        torch.tensor(float(len(ro.scores)), device=ro.scores.device)])
    s = acc.reduce(sums, reduction="sum").tolist()
    n = s[4]
    mean = s[0] / n
    return {"reward/mean": mean, "reward/std": max(s[1] / n - mean**2, 0.0) ** 0.5, "kl/mean": s[2] / n,
            "response/length": s[3] / n}


def write_samples(path: Path, step: int, ro, n: int) -> None:
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(n, len(ro.completions))):
            prompt = ro.prompts[i] if isinstance(ro.prompts[i], str) else ro.prompts[i][-1]["content"]
            f.write(json.dumps({"step": step, "prompt": prompt, "response": ro.completions[i],
                                "score": float(ro.scores[i])}) + "\n")


def reset_samples(path: Path, acc, resume_step: int | None) -> None:
    """Start samples.jsonl afresh, or on resume keep only the rows up to the checkpoint's step."""
    if not acc.is_main_process:
        return
    kept = []
    if resume_step is not None and path.exists():
        kept = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r["step"] <= resume_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
