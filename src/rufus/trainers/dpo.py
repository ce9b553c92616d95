"""Direct Preference Optimization: learn from comparisons without a reward model or RL.

Rafailov et al. 2023 (arXiv 2305.18290), eq. 7: with h the log-ratio margin
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],
minimise -log sigmoid(beta h) (or IPO's / the hinge variant, `rufus.losses.dpo`). log pi(y|x) is a
SEQUENCE log-probability, the sum over the response tokens. The reference-free objectives ORPO
(Hong et al. 2024, arXiv 2403.07691) and SimPO (Meng et al. 2024, arXiv 2405.14734) use the mean
token log-probability log pi(y|x) / |y| instead and load no pi_ref at all (no model, no adapter-
disabled pass, nothing precomputed). Each round:
  1. its pairs: data.train as given (offline), or two samples per prompt from the current policy,
     ranked by the reward sources (online: iterated DPO, Xu et al. 2023 arXiv 2312.16682; online
     AI feedback, Guo et al. 2024 arXiv 2402.04792). Round 1 is offline on preference data; every
     later round, and every round of a prompt-only data.train, is online. pi_ref stays the start.
Each step of the round:
  2. one forward pass over the batch's pairs, chosen and rejected stacked (2B rows, padded right),
     and the reference log-probs: precomputed once per dataset (dpo.precompute_ref) or on the fly
     (none for orpo / simpo, whose response lengths |y| come from the same batch's labels);
  3. the loss over the whole optimiser batch's pair count (so grad_accum and processes change nothing);
  4. clip, step;
  5. log the implicit rewards beta log pi/pi_ref (chosen, rejected, margin, accuracy; ORPO: the log
     odds, SimPO: beta log pi / |y|), evaluate, save.
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
    ConfigError,
    DataSection,
    GenerationSection,
    LogArgs,
    ModelArgs,
    OptimArgs,
    RewardSection,
    RunArgs,
    SamplingArgs,
    as_config,
    opt,
)
from rufus.losses.dpo import REFERENCE_FREE_LOSS_TYPES
from rufus.rollout.logprobs import response_lengths, sequence_logprobs
from rufus.trainers import common, online

log = logging.getLogger(__name__)


@dataclass
class DPOSection:
    """The DPO objective, the reference log-probabilities, and iterated rounds."""

    beta: float = opt(
        0.1,
        "beta: KL strength; the implicit reward is beta * log(pi / pi_ref). orpo: lambda, the odds-ratio "
        "term's weight (paper 0.1); simpo: the reward scale beta of beta/|y| log pi (paper 2.0-2.5)",
        gt=0,
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = opt(
        "sigmoid",
        "sigmoid = DPO (Rafailov et al.), ipo = (h - 1/(2 beta))^2 (Azar et al.), hinge = max(0, 1 - beta h) "
        "(SLiC); reference-free, no pi_ref loaded: orpo = NLL(y_w) - beta log sigmoid(log odds ratio) "
        "(Hong et al.), simpo = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma) (Meng et al.)",
    )
    gamma: float = opt(
        0.5,
        "simpo only: the target reward margin gamma; the SimPO paper tunes gamma/beta in about 0.25-0.5 "
        "(e.g. 1.0 with beta 2.0)",
        ge=0,
    )
    label_smoothing: float = opt(
        0.0, "conservative DPO: assumed share of flipped labels, in [0, 0.5]; sigmoid only", ge=0, le=0.5
    )
    precompute_ref: bool = opt(
        True, "reference log-probs computed once per dataset before training (false: each step); unused by orpo, simpo"
    )
    rounds: int = opt(
        1, "rounds of max_steps (or epochs) each; later rounds train on pairs sampled from the policy", ge=1
    )
    prompts_per_round: int = opt(0, "prompts per online round, two samples each (0 = every prompt of data.train)", ge=0)


@dataclass
class DPOConfig(SamplingArgs, LogArgs, OptimArgs, RunArgs, ModelArgs):
    """DPO (and IPO, hinge, cDPO, reference-free ORPO and SimPO; iterated online rounds with dpo.rounds > 1)
    on preference pairs."""

    output_dir: str = opt("runs/dpo", "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    lr: float = opt(5e-7, "peak learning rate (AdamW); Zephyr's 5e-7; TRL and the DPO paper use 1e-6", gt=0)
    ref_model: str | None = opt(
        None,
        "reference model (default: the starting model; with LoRA, the base; unused by orpo, simpo)",
        model_path=True,
    )
    data: DataSection = opt(DataSection, "preference pairs (prompt, chosen, rejected), or prompts only (online)")
    dpo: DPOSection = opt(DPOSection, "DPO objective and rounds")
    generation: GenerationSection = opt(GenerationSection, "sampling in online rounds")
    reward: RewardSection = opt(RewardSection, "reward sources that rank the two samples of an online round")


@dataclass
class DPOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    policy: object = None  # the trained policy (unwrapped; a peft model under LoRA)
    reference: object = None  # the reference model if one is still loaded (None under LoRA, once freed, orpo, simpo)
    eval: dict | None = None  # eval/... metrics on data.eval at the end


def train_dpo(config: DPOConfig | dict, reward_fn=None) -> DPOResult:
    """Run DPO as configured. `reward_fn(prompts, completions, **kw) -> list[float]` (or a list of such
    functions) adds Python reward sources to `config.reward`, for online rounds."""
    from rufus.data.dpo import PairCollator, load_pairs_or_prompts, tokenize_pairs
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from

    cfg = as_config(DPOConfig, config)
    _check(cfg)
    run = common.start_run(cfg)
    acc = run.accelerator

    # 0. data (pairs, or prompts for online rounds) and reward sources before any model loads
    tokenizer = common.load_run_tokenizer(cfg)
    limits = dict(
        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation
    )
    with acc.main_process_first():  # preference pairs, or (online) prompts only: records, None
        read = options_from(cfg.data, tokenizer)  # how the files are written (detected, or data.format)
        records, train = load_pairs_or_prompts(
            cfg.data.train, tokenizer, split=cfg.data.train_split, key="data.train", options=read, **limits
        )
        evals = None
        if cfg.data.eval:
            held_out = load_records(
                cfg.data.eval, kind="preference", split=cfg.data.eval_split, key="data.eval", options=read
            )
            evals = tokenize_pairs(held_out, tokenizer, key="data.eval", **limits)
    online_rounds = [r for r in range(1, cfg.dpo.rounds + 1) if r > 1 or train is None]
    prompts, reward = None, None
    if online_rounds:  # other columns go to reward functions; the pair itself does not
        prompts = online.load_prompts(cfg, acc, tokenizer, records, drop_columns=("chosen", "rejected"))
        why = "data.train holds prompts only" if train is None else f"dpo.rounds={cfg.dpo.rounds}"
        reward = online.build_reward(
            cfg, run, reward_fn, why=f"{why}: online rounds rank their own samples with a reward"
        )
    per_round = cfg.dpo.prompts_per_round or (len(prompts) if prompts else 0)
    per_round = math.ceil(per_round / acc.num_processes) * acc.num_processes  # equal shares per process

    def steps_for(n):  # optimiser steps of a round over n examples (known before the round's data)
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n / cfg.batch_size))

    round_steps = [steps_for(per_round if r in online_rounds else len(train)) for r in range(1, cfg.dpo.rounds + 1)]
    max_steps = sum(round_steps)
    collate = PairCollator(tokenizer.pad_token_id)
    no_grad_size = cfg.batch_size // acc.num_processes  # pairs per forward pass without gradients

    # policy (dropout off: pi == pi_ref at the start, loss log 2) and reference (none for orpo, simpo)
    model, optimizer, scheduler = online.load_policy(cfg, run, tokenizer, max_steps)
    free = _reference_free(cfg)
    reference = None if free else online.load_reference(cfg, run, tokenizer)
    policy = acc.unwrap_model(model)
    pairs_file = "pairs.jsonl" if online_rounds else None  # every online pair, for people to read
    start_step, saved, logger, pairs_file = online.open_outputs(run, policy, optimizer, scheduler, reward, pairs_file)

    # the frozen reference: its own model, or (LoRA) the policy with adapters disabled; orpo, simpo: none,
    # so no step, precompute or evaluation ever makes a reference pass
    ref_fn = None if free else (lambda: online.reference_model(policy, reference))
    # reference log-probabilities of the fixed datasets, once
    if cfg.dpo.precompute_ref and not free:
        for data in [d for d in (train, evals) if d]:
            _attach_reference(data, ref_fn, collate, acc, no_grad_size)
        if reference is not None and not online_rounds:
            reference = None  # no longer needed: free its memory for training
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="dpo")
    window, pending, row = common.Window(), {}, {}
    round_end = 0
    engine = online.rollout_engine(cfg, acc, policy, tokenizer) if online_rounds else None
    for r in range(1, cfg.dpo.rounds + 1):
        round_start, round_end = round_end, round_end + round_steps[r - 1]
        if round_end <= start_step:
            continue
        # 1. this round's pairs: the data as given, or two samples per prompt from the current policy
        if r not in online_rounds:
            pairs = train
        elif start_step > round_start:  # resumed inside the round: its pairs were saved with the checkpoint
            pairs = saved["pairs"]
        else:
            online.sync_engine(acc, engine, policy)  # the policy as the earlier rounds left it
            pairs, pending = _online_pairs(
                cfg, acc, engine, tokenizer, prompts, reward, r, online_rounds.index(r) + 1, per_round
            )
            # "step": the first step that trains on the pair (a resume before it samples again)
            pairs_file.write([{"step": round_start + 1, "round": r, **p.pop("text")} for p in pairs])
            for p in pairs:
                p.pop("text", None)
            if cfg.dpo.precompute_ref and not free and pairs:
                _attach_reference(pairs, ref_fn, collate, acc, no_grad_size)
        if not pairs:  # every sample pair tied: nothing to learn this round; keep the schedule in step
            log.warning("round %d: every pair of samples tied on the reward; no updates this round", r)
            common.skip_steps(scheduler, round_end - max(start_step, round_start))
            progress.update(round_end - max(start_step, round_start))
            continue
        plan = common.BatchPlan(
            len(pairs), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed + r - 1
        )
        model.train()
        for step in range(max(start_step, round_start) + 1, round_end + 1):
            t0 = time.perf_counter()
            # 2-3. forward and reference log-probs, loss, backward over the micro-batches
            stats = _dpo_step(cfg, acc, model, ref_fn, pairs, plan, step - round_start, collate)
            # 4. clip, step
            grad_norm = common.clip_and_step(cfg, acc, model, optimizer, scheduler)
            window.add(grad_norm=grad_norm, time=time.perf_counter() - t0, tokens=stats.pop("tokens"), **stats)
            progress.update(1)
            progress.set_postfix(loss=f"{stats['dpo/loss']:.4f}", acc=f"{stats['rewards/accuracy']:.2f}")

            # 5. log (the round's sampling statistics with its first row), evaluate, checkpoint
            held_out = (lambda: evaluate(cfg, acc, model, ref_fn, evals, collate, no_grad_size)) if evals else None
            state = {"reward": reward.state_dict()} if reward is not None else {}
            state.update({"pairs": pairs} if r in online_rounds else {})
            save = (policy, optimizer, scheduler, state)
            extra = {"dpo/round": r, **pending}
            row = common.log_evaluate_save(run, logger, step, max_steps, window, model, held_out, save, **extra)
            pending = {} if "dpo/loss" in row else pending
    progress.close()
    if engine is not None:
        engine.close()

    # 6. the final model, loadable with AutoModelForCausalLM.from_pretrained (LoRA merged)
    final_eval = {k: v for k, v in row.items() if k.startswith("eval/")} or None
    final_dir = common.save_final(run, policy, tokenizer)
    logger.close()
    common.finish_run(run, ["dpo/loss", "rewards/accuracy", "eval/rewards/accuracy", "rewards/margin"])
    return DPOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, policy, reference, final_eval)


def _check(cfg) -> None:
    """Configuration errors, named by key, before anything loads or is written (each key's own
    range is checked with the config)."""
    d = cfg.dpo
    if d.label_smoothing > 0 and d.loss_type != "sigmoid":
        raise ConfigError("dpo.label_smoothing applies to loss_type=sigmoid only")
    if _reference_free(cfg) and cfg.ref_model:
        raise ConfigError(f"ref_model: dpo.loss_type={d.loss_type} uses no reference model; leave ref_model unset")
    if d.loss_type == "simpo" and d.beta < 1:
        log.warning(
            "dpo.loss_type=simpo with dpo.beta=%g: SimPO's beta scales the mean token log-probability "
            "(the paper uses 2.0-2.5; 0.1 is DPO's default)",
            d.beta,
        )


def _reference_free(cfg) -> bool:
    """orpo and simpo: no reference model, no reference log-probabilities."""
    return cfg.dpo.loss_type in REFERENCE_FREE_LOSS_TYPES


# the objective's statistics: the implicit reward's (every loss type), and ORPO's two terms
_IMPLICIT = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
_EXTRA = {"orpo": ("orpo/nll", "orpo/or_loss")}


def _loss(cfg, logps, ref, lengths, normalizer=None):
    """(loss, stats) of the configured objective on (2b,) sequence log-probs log pi_theta(y|x), the
    b chosen rows first: against (2b,) reference log-probs `ref` (sigmoid, ipo, hinge; cDPO's label
    smoothing), or on the mean token log-probs with (2b,) response lengths |y| (orpo, simpo)."""
    from rufus.losses.dpo import dpo_loss, orpo_loss, simpo_loss

    d, b = cfg.dpo, logps.shape[0] // 2
    if d.loss_type == "orpo":  # dpo.beta is ORPO's lambda
        return orpo_loss(logps[:b], logps[b:], lengths[:b], lengths[b:], lam=d.beta, normalizer=normalizer)
    if d.loss_type == "simpo":
        return simpo_loss(
            logps[:b], logps[b:], lengths[:b], lengths[b:], beta=d.beta, gamma=d.gamma, normalizer=normalizer
        )
    return dpo_loss(
        logps[:b],
        logps[b:],
        ref[:b],
        ref[b:],
        beta=d.beta,
        loss_type=d.loss_type,
        label_smoothing=d.label_smoothing,
        normalizer=normalizer,
    )


def _dpo_step(cfg, acc, model, ref_fn, pairs, plan, local_step: int, collate) -> dict:
    """One optimiser step over the round's global batch `local_step`; returns detached statistics."""
    global_idx = plan.global_batch(local_step)
    normalizer = len(global_idx) / acc.num_processes  # DDP averages gradients over processes
    names = ["dpo/loss", "logps/chosen", "logps/rejected", "tokens", *_IMPLICIT, *_EXTRA.get(cfg.dpo.loss_type, ())]
    totals = dict.fromkeys(names, 0.0)
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        part = [pairs[i] for i in idx]
        batch = {n: t.to(acc.device) for n, t in collate(part).items()}  # (2b, T): chosen rows, then rejected
        b = len(idx)
        lengths = response_lengths(batch["labels"])  # (2b,) |y|, the tokens each log-prob sums over
        if ref_fn is None:  # orpo, simpo: reference-free
            ref = None
        elif cfg.dpo.precompute_ref:
            ref = [p["ref_chosen"] for p in part] + [p["ref_rejected"] for p in part]
            ref = torch.tensor(ref, device=acc.device)  # (2b,) log pi_ref(y|x), precomputed
        else:
            with torch.no_grad(), ref_fn() as reference, acc.autocast():
                ref = sequence_logprobs(reference, batch)  # (2b,) log pi_ref(y|x)
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            logps = sequence_logprobs(model, batch)  # (2b,) log pi_theta(y|x)
            loss, stats = _loss(cfg, logps, ref, lengths, normalizer=normalizer)
            distributed.backward(acc, model, loss)
        share = b / len(global_idx) * acc.num_processes  # this micro-batch's share of the step
        totals["dpo/loss"] += loss.item()
        for name, value in stats.items():
            totals[name] += value.item() * share
        totals["logps/chosen"] += logps[:b].detach().mean().item() * share
        totals["logps/rejected"] += logps[b:].detach().mean().item() * share
        totals["tokens"] += int(batch["attention_mask"].sum())
    keys = sorted(totals)
    values = torch.tensor([float(totals[k]) for k in keys], device=acc.device)
    out = dict(zip(keys, acc.reduce(values, reduction="sum").tolist()))
    for name in keys:  # each process holds its share; all but the token count are means
        if name != "tokens":
            out[name] /= acc.num_processes
    return out


@torch.no_grad()
def _all_logprobs(model, pairs: list[dict], collate, acc, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) log pi(y_w|x) and (n,) log pi(y_l|x) of every pair, shared out across processes."""
    n = len(pairs)
    per = math.ceil(n / acc.num_processes)
    mine = list(range(acc.process_index * per, min(n, (acc.process_index + 1) * per)))
    out = torch.zeros(per, 2, device=acc.device)
    was_training = model.training
    model.eval()
    starts = list(range(0, len(mine), max(micro, 1)))
    for start, real in distributed.lockstep(acc, model, starts, filler=None):
        idx = mine[start : start + max(micro, 1)] if real else [0]
        batch = {k: t.to(acc.device) for k, t in collate([pairs[i] for i in idx]).items()}
        with acc.autocast():
            logps = sequence_logprobs(model, batch).float()
        if real:
            out[start : start + len(idx)] = torch.stack([logps[: len(idx)], logps[len(idx) :]], dim=-1)
    model.train(was_training)
    out = acc.gather(out) if acc.num_processes > 1 else out
    return out[:n, 0].cpu(), out[:n, 1].cpu()


def _attach_reference(pairs: list[dict], ref_fn, collate, acc, micro: int) -> None:
    """Store log pi_ref(y_w|x), log pi_ref(y_l|x) with each pair (dpo.precompute_ref)."""
    with ref_fn() as reference:
        chosen, rejected = _all_logprobs(reference, pairs, collate, acc, micro)
    for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
        p["ref_chosen"], p["ref_rejected"] = c, r


def evaluate(cfg, acc, model, ref_fn, pairs, collate, micro: int) -> dict:
    """eval/dpo/loss and the implicit-reward statistics (eval/rewards/accuracy: held-out preference
    accuracy of beta log pi/pi_ref; ORPO's log odds, SimPO's beta log pi / |y|) over every pair of
    `pairs`. `ref_fn` is None for the reference-free objectives: no reference pass."""
    chosen, rejected = _all_logprobs(acc.unwrap_model(model), pairs, collate, acc, micro)
    ref = None
    if ref_fn is not None and cfg.dpo.precompute_ref:
        ref = torch.tensor([p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs])
    elif ref_fn is not None:
        with ref_fn() as reference:
            ref = torch.cat(_all_logprobs(reference, pairs, collate, acc, micro))
    lengths = [_response_length(p[side]) for side in ("chosen", "rejected") for p in pairs]
    loss, stats = _loss(cfg, torch.cat([chosen, rejected]), ref, torch.tensor(lengths))
    return {"eval/dpo/loss": loss.item(), **{f"eval/{k}": v.item() for k, v in stats.items()}}


def _response_length(encoded: dict) -> int:
    """|y| of one tokenised side of a pair, as `response_lengths` counts it, without collating."""
    return sum(1 for x in encoded["labels"][1:] if x != -100)


def _online_pairs(cfg, acc, engine, tokenizer, prompts, reward, r: int, k: int, n: int) -> tuple[list, dict]:
    """Online round r (the k-th online one): two samples per prompt from the current policy, scored by
    the reward sources; (higher, lower) pairs, ties skipped. Returns the pairs (the same list on every
    process, each with its "text" for pairs.jsonl) and the round's statistics."""
    from accelerate.utils import gather_object

    from rufus.data.dpo import pairs_from_samples

    # the round's prompts: the next n of a seeded stream of epochs over the data, each process its share
    plan = common.BatchPlan(len(prompts), n, 1, acc.num_processes, acc.process_index, cfg.seed)
    mine = [prompts[i] for i in plan.global_batch(k)[acc.process_index :: acc.num_processes]]
    per_call = max(1, cfg.batch_size // acc.num_processes // 2)  # prompts per generate call, two samples each
    devices = [torch.cuda.current_device()] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # samples depend on (seed, round, rank) only: resume-exact
        torch.manual_seed(cfg.seed * 1_000_003 + r * 1009 + acc.process_index)
        got = online.sample_and_score(cfg, acc, engine, tokenizer, mine, 2, reward, per_call)  # 2j, 2j+1: prompt j
    scores, responses = got.scores, got.responses  # (2m,)

    pairs, ties = pairs_from_samples(mine, responses, got.completions, scores.tolist())
    chosen, rejected = sum(p["text"]["score_chosen"] for p in pairs), sum(p["text"]["score_rejected"] for p in pairs)
    sums = torch.tensor([scores.sum().item(), chosen, rejected, ties, sum(map(len, responses))])
    pairs = gather_object(pairs) if acc.num_processes > 1 else pairs
    s = acc.reduce(sums.to(acc.device), reduction="sum").tolist()  # score, chosen, rejected, ties, length
    made = max(len(pairs), 1)
    stats = {
        "online/pairs": len(pairs),
        "online/ties": s[3],
        "score/mean": s[0] / (2 * n),
        "score/chosen": s[1] / made,
        "score/rejected": s[2] / made,
        "response/length": s[4] / (2 * n),
    }
    log.info("round %d: %d pairs from %d prompts (%d ties), mean score %.4f", r, len(pairs), n, s[3], s[0] / 2 / n)
    return pairs, stats
