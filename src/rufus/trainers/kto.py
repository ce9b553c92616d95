"""Kahneman-Tversky Optimization: align a policy with single completions labelled desirable or not.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306),
eq. 7 (`rufus.losses.kto`): with r = log pi(y|x) - log pi_ref(y|x) and z0 a detached estimate of
KL(pi || pi_ref), minimise the mean of lambda_y - v(x, y), v = lambda_D sigmoid(beta (r - z0)) for a
desirable completion and lambda_U sigmoid(beta (z0 - r)) for an undesirable one. No pairs are needed:
data.train is TRL's unpaired rows (prompt, completion, label), graded rows split by
kto.desirable_threshold, or preference pairs (chosen desirable, rejected undesirable). Each step:
  1. the global batch of B labelled completions (a seeded order: `common.BatchPlan`);
  2. the reference point z0: each prompt x_i with the completion y_{i+1 mod B} of the next row of the
     batch (the paper's shift by one), scored without gradients by pi_theta and pi_ref; z0 is the mean
     log-ratio over the B mismatched rows of every process, clamped at 0 in the loss;
  3. per micro-batch: log pi_theta(y|x) with gradients and log pi_ref(y|x), the loss over the whole
     batch's row count (so grad_accum and processes change nothing), backward;
  4. clip, step;
  5. log the implicit rewards beta r of the desirable and the undesirable completions and z0,
     evaluate (held-out pairs: the implicit reward's preference accuracy), save.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rufus import distributed
from rufus.config import ConfigError, DataSection, LogArgs, LoraSection, ModelArgs, OptimArgs, RunArgs, as_config, opt
from rufus.rollout.logprobs import sequence_logprobs
from rufus.trainers import common, online

log = logging.getLogger(__name__)


@dataclass
class KTOSection:
    """The KTO objective and how labels are read."""

    beta: float = opt(
        0.1, "beta: how far pi may move from pi_ref; the implicit reward is beta * log(pi / pi_ref)", gt=0
    )
    desirable_weight: float = opt(
        1.0,
        "lambda_D, the weight of a desirable completion; keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] "
        "(the paper's advice; a warning suggests a weight when the data fall outside)",
        gt=0,
    )
    undesirable_weight: float = opt(1.0, "lambda_U, the weight of an undesirable completion", gt=0)
    desirable_threshold: float | None = opt(
        None,
        "graded rows (prompt, completion, score): a score above this is desirable, below it undesirable, "
        "equal left out; unset: every score must be 1 or 0 (TRL's label true / false)",
    )


@dataclass
class KTOConfig(LogArgs, OptimArgs, RunArgs, ModelArgs):
    """KTO on unpaired feedback (prompt, completion, desirable or not), graded rows, or preference pairs."""

    output_dir: str = opt("runs/kto", "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    lr: float = opt(1e-6, "peak learning rate (AdamW); TRL's KTO default 1e-6, for billion-parameter models", gt=0)
    ref_model: str | None = opt(
        None, "reference model (default: the starting model; with LoRA, the base)", model_path=True
    )
    data: DataSection = opt(
        DataSection,
        "unpaired rows (prompt, completion, label), graded rows (with kto.desirable_threshold) or preference "
        "pairs; data.eval: pairs (eval/rewards/accuracy) or unpaired rows",
    )
    kto: KTOSection = opt(KTOSection, "KTO objective")
    lora: LoraSection = opt(LoraSection, "LoRA adapters; the reference is then the adapter-disabled base")


@dataclass
class KTOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    policy: object = None  # the trained policy (unwrapped; a peft model under LoRA)
    reference: object = None  # the reference model (None under LoRA: the adapter-disabled base)
    eval: dict | None = None  # eval/... metrics on data.eval at the end


def train_kto(config: KTOConfig | dict) -> KTOResult:
    """Run KTO as configured; return where the model went and what was logged."""
    from rufus.data.kto import EVAL_KINDS, TRAIN_KINDS, counts, load_unpaired
    from rufus.data.readers import options_from
    from rufus.data.sft import SFTCollator
    from rufus.losses.kto import weight_advice

    cfg = as_config(KTOConfig, config)
    _check(cfg)
    run = common.start_run(cfg)
    acc = run.accelerator

    # 0. data: load, validate and tokenise everything before any model loads
    tokenizer = common.load_run_tokenizer(cfg)
    limits = dict(
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
        threshold=cfg.kto.desirable_threshold,
    )
    with acc.main_process_first():  # the first process fills the datasets cache, the others read it
        read = options_from(cfg.data, tokenizer)  # how the files are written (detected, or data.format)
        train, _ = load_unpaired(
            cfg.data.train, tokenizer, kinds=TRAIN_KINDS, split=cfg.data.train_split, options=read, **limits
        )
        evals, eval_kind = None, None
        if cfg.data.eval:
            split, key = cfg.data.eval_split, "data.eval"
            evals, eval_kind = load_unpaired(
                cfg.data.eval, tokenizer, kinds=EVAL_KINDS, split=split, key=key, options=read, **limits
            )
    advice = weight_advice(*counts(train), cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    if advice and acc.is_main_process:
        warnings.warn(advice, stacklevel=2)
    plan = common.BatchPlan(len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)
    collate = SFTCollator(tokenizer.pad_token_id)
    micro = cfg.batch_size // acc.num_processes // cfg.grad_accum  # rows per forward pass

    # policy (dropout off: pi == pi_ref at the start, loss lambda / 2 per row) and reference
    model, optimizer, scheduler = online.load_policy(cfg, run, tokenizer, max_steps)
    reference = online.load_reference(cfg, run, tokenizer)
    policy = acc.unwrap_model(model)
    start_step, _, logger, _ = online.open_outputs(run, policy, optimizer, scheduler, samples=None)

    def ref_fn():  # the frozen reference: its own model, or (LoRA) the policy with adapters disabled
        return online.reference_model(policy, reference)

    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="kto")
    window, classes, row = common.Window(), _ClassMeans(), {}
    model.train()
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        # 1. the step's rows, the same for any number of processes
        global_idx = plan.global_batch(step)
        # 2. the reference point z0 over the whole batch's mismatched rows (before the clamp)
        z0 = _reference_point(cfg, acc, model, ref_fn, train, global_idx, collate, micro)
        # 3. forward and reference log-probs, loss, backward over the micro-batches
        stats, sums = _kto_step(cfg, acc, model, ref_fn, train, plan, global_idx, z0, collate)
        # 4. clip, step
        grad_norm = common.clip_and_step(cfg, acc, model, optimizer, scheduler)
        classes.add(sums)
        window.add(grad_norm=grad_norm, time=time.perf_counter() - t0, tokens=stats.pop("tokens"), **stats)
        progress.update(1)
        progress.set_postfix(loss=f"{stats['kto/loss']:.4f}", kl=f"{stats['kl']:.3f}")

        # 5. log (the classes' means pooled over the logged steps), evaluate, checkpoint
        held_out = (lambda: evaluate(cfg, acc, model, ref_fn, evals, eval_kind, collate, micro)) if evals else None
        save = (policy, optimizer, scheduler, {})
        row = common.log_evaluate_save(run, logger, step, max_steps, window, model, held_out, save, **classes.means())
        if "kto/loss" in row:
            classes.reset()
    progress.close()

    # 6. the final model, loadable with AutoModelForCausalLM.from_pretrained (LoRA merged)
    final_eval = {k: v for k, v in row.items() if k.startswith("eval/")} or None
    final_dir = common.save_final(run, policy, tokenizer)
    logger.close()
    common.finish_run(run, ["kto/loss", "kl", "rewards/margin", "eval/rewards/accuracy", "eval/rewards/margin"])
    return KTOResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, policy, reference, final_eval)


def _check(cfg) -> None:
    """Configuration errors, named by key, before anything loads or is written."""
    if cfg.batch_size < 2:
        raise ConfigError(
            f"batch_size: KTO estimates its reference point z0 on mismatched rows of a batch (a prompt with "
            f"another row's completion), so a batch needs at least 2 rows, got {cfg.batch_size}"
        )


def _objective(cfg) -> dict:
    k = cfg.kto
    return dict(beta=k.beta, desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)


class _ClassMeans:
    """Sums of the implicit rewards and log-probs per class over the steps of one metrics row, so a
    row's rewards/desirable is the mean over every desirable completion it saw (a step without one
    adds nothing, rather than a 0)."""

    NAMES = ("reward_d", "logp_d", "n_d", "reward_u", "logp_u", "n_u")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.NAMES, 0.0)

    def add(self, sums: dict) -> None:
        for k in self.NAMES:
            self.sums[k] += sums[k]

    def means(self, prefix: str = "") -> dict:
        s, out = self.sums, {}
        for cls, tag in (("desirable", "d"), ("undesirable", "u")):
            if s[f"n_{tag}"]:
                out[f"{prefix}rewards/{cls}"] = s[f"reward_{tag}"] / s[f"n_{tag}"]
                out[f"{prefix}logps/{cls}"] = s[f"logp_{tag}"] / s[f"n_{tag}"]
        if s["n_d"] and s["n_u"]:
            out[f"{prefix}rewards/margin"] = out[f"{prefix}rewards/desirable"] - out[f"{prefix}rewards/undesirable"]
        return out


@torch.no_grad()
def _logprobs(model, rows: list[dict], collate, acc, micro: int, filler: dict) -> torch.Tensor:
    """(n,) log pi(y|x) of `rows` (this process's), without gradients, `micro` rows per forward pass,
    in eval mode (dropout is off anyway). Every process runs as many passes as the one with the most
    (a sharded model's forward is a collective): the extra ones run on `filler`, their results dropped."""
    was_training = model.training
    model.eval()
    out = []
    chunks = [rows[s : s + micro] for s in range(0, len(rows), micro)]
    for chunk, real in distributed.lockstep(acc, model, chunks, filler=[filler]):
        batch = {k: t.to(acc.device) for k, t in collate(chunk).items()}
        with acc.autocast():
            logps = sequence_logprobs(model, batch).float()  # (b,)
        if real:
            out.append(logps)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=acc.device)


def _reference_point(cfg, acc, model, ref_fn, examples, global_idx: list[int], collate, micro: int) -> torch.Tensor:
    """z0 of the step before the clamp: the mean over the B mismatched rows (x_i, y_{i+1 mod B}) of the
    global batch of log pi_theta(y|x) - log pi_ref(y|x), each process scoring its contiguous share and
    the shares summed. A () tensor, the same on every process and for any grad_accum."""
    from rufus.data.kto import mismatched
    from rufus.losses.kto import kl_estimate

    b = len(global_idx)
    per = b // acc.num_processes
    mine = range(acc.process_index * per, (acc.process_index + 1) * per)
    rows = [mismatched(examples[global_idx[k]], examples[global_idx[(k + 1) % b]], cfg.data.max_length) for k in mine]
    policy_kl = _logprobs(model, rows, collate, acc, micro, rows[0])  # (B/P,) log pi_theta(y_{i+1} | x_i)
    with ref_fn() as reference:
        ref_kl = _logprobs(reference, rows, collate, acc, micro, rows[0])  # (B/P,) log pi_ref(y_{i+1} | x_i)
    share = kl_estimate(policy_kl, ref_kl, normalizer=b)  # this process's rows' sum / B
    return acc.reduce(share.reshape(1), reduction="sum")[0] if acc.num_processes > 1 else share


def _kto_step(cfg, acc, model, ref_fn, examples, plan, global_idx, z0, collate) -> tuple[dict, dict]:
    """One optimiser step's forward and backward passes; returns (step statistics, per-class sums)."""
    from rufus.losses.kto import kto_loss

    normalizer = len(global_idx) / acc.num_processes  # DDP averages gradients over processes
    totals = dict.fromkeys(("kto/loss", "tokens", *_ClassMeans.NAMES), 0.0)
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        part = [examples[i] for i in idx]
        batch = {n: t.to(acc.device) for n, t in collate(part).items()}  # (b, T)
        desirable = torch.tensor([e["desirable"] for e in part], device=acc.device)  # (b,) bool
        with torch.no_grad(), ref_fn() as reference, acc.autocast():
            ref = sequence_logprobs(reference, batch)  # (b,) log pi_ref(y|x)
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            logps = sequence_logprobs(model, batch)  # (b,) log pi_theta(y|x)
            loss, stats = kto_loss(logps, ref, desirable, z0, **_objective(cfg), normalizer=normalizer)
            distributed.backward(acc, model, loss)
        totals["kto/loss"] += loss.item()
        totals["tokens"] += int(batch["attention_mask"].sum())
        logps = logps.detach().float()
        for cls, tag, rows in (("desirable", "d", desirable), ("undesirable", "u", ~desirable)):
            count = stats[f"count/{cls}"].item()
            totals[f"reward_{tag}"] += stats[f"rewards/{cls}"].item() * count  # sum of beta r over the class
            totals[f"logp_{tag}"] += logps[rows].sum().item()
            totals[f"n_{tag}"] += count
    keys = list(totals)
    if acc.num_processes > 1:
        values = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), reduction="sum")
        totals = dict(zip(keys, values.tolist()))
    step = {"kto/loss": totals.pop("kto/loss") / acc.num_processes, "kl": max(float(z0), 0.0)}
    step["tokens"] = totals.pop("tokens")
    return step, totals


def evaluate(cfg, acc, model, ref_fn, examples: list[dict], kind: str, collate, micro: int) -> dict:
    """eval/kto/loss, eval/kl and the implicit rewards over every example of `examples` (data.eval).

    z0 comes from one mismatched row per example: the completion of the next example in a fixed
    seeded cycle through the set (consecutive examples of a pair share a prompt, so the file order
    would not mismatch them). Held-out pairs (`kind` "preference") add eval/rewards/chosen, /rejected,
    /margin and /accuracy, the fraction of pairs whose implicit reward ranks chosen over rejected
    (ties 1/2); unpaired rows give eval/rewards/desirable, /undesirable and /margin."""
    from rufus.data.kto import mismatched
    from rufus.losses.kto import kl_estimate, kto_loss

    n = len(examples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    partner = {order[k]: order[(k + 1) % n] for k in range(n)}
    per = math.ceil(n / acc.num_processes)
    mine = list(range(acc.process_index * per, min(n, (acc.process_index + 1) * per)))
    rows = [examples[i] for i in mine]
    kl_rows = [mismatched(examples[i], examples[partner[i]], cfg.data.max_length) for i in mine]
    policy = acc.unwrap_model(model)
    got = torch.zeros(per, 4, device=acc.device)  # log pi(y|x), log pi_ref(y|x), and of the mismatched rows
    pad = examples[0]  # a process with no share of a small set runs padding passes on it
    columns = [_logprobs(policy, rows, collate, acc, micro, pad), None]
    columns.append(_logprobs(policy, kl_rows, collate, acc, micro, pad))
    with ref_fn() as reference:
        columns[1] = _logprobs(reference, rows, collate, acc, micro, pad)
        columns.append(_logprobs(reference, kl_rows, collate, acc, micro, pad))
    for c, values in enumerate(columns):
        got[: len(mine), c] = values
    got = (acc.gather(got) if acc.num_processes > 1 else got)[:n].double().cpu()  # (n, 4)
    desirable = torch.tensor([e["desirable"] for e in examples])
    z0 = kl_estimate(got[:, 2], got[:, 3])
    loss, stats = kto_loss(got[:, 0], got[:, 1], desirable, z0, **_objective(cfg))
    out = {"eval/kto/loss": loss.item(), "eval/kl": stats["kl"].item()}
    reward = cfg.kto.beta * (got[:, 0] - got[:, 1])  # (n,) beta r
    if kind == "preference":  # each pair is two consecutive examples, chosen first
        chosen, rejected = reward[0::2], reward[1::2]
        gap = chosen - rejected
        out.update(
            {
                "eval/rewards/chosen": chosen.mean().item(),
                "eval/rewards/rejected": rejected.mean().item(),
                "eval/rewards/margin": gap.mean().item(),
                "eval/rewards/accuracy": ((gap > 0).double() + 0.5 * (gap == 0).double()).mean().item(),
            }
        )
    else:
        classes = _ClassMeans()
        n_d = desirable.sum().item()
        classes.add(
            {
                "reward_d": reward[desirable].sum().item(),
                "logp_d": got[desirable, 0].sum().item(),
                "n_d": n_d,
                "reward_u": reward[~desirable].sum().item(),
                "logp_u": got[~desirable, 0].sum().item(),
                "n_u": n - n_d,
            }
        )
        out.update(classes.means(prefix="eval/"))
    return out
