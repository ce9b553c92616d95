"""Implicit Language Q-Learning (ILQL): offline RL from logged (prompt, response, reward) rows.

Snell et al. 2022 (arXiv 2206.11871). No sampling during training and no reward model in the loop:
every response of the data is an episode whose reward arrives with its last token, scored once.
A value head and two Q heads (with Polyak-averaged targets) on the language model learn
(`rufus.losses.ilql`):
    L = L_Q (Bellman, eq. 1) + L_V (expectile tau, eq. 2) + alpha L_CQL (eq. 4) + w L_LM,
the last term the language model's NLL on the data, which keeps pi_beta (the policy that decoding
perturbs) fitted to it. At decoding time the policy is
    pi(a|s) proportional to pi_beta(a|s) exp(beta (min_i Qhat_i(s, a) - V(s)))
with beta chosen then (`rufus generate` / `rufus eval` on the saved model, `ilql_beta`).

  1. rows: graded (prompt, completion, score), rankings (each response with its score) or
     preference pairs (chosen ilql.chosen_reward, rejected ilql.rejected_reward); with reward
     sources set, every response is scored by them instead; rewards whitened over the data;
  2. the language model, its heads, the optimiser (the target heads never train);
Each step:
  3. one forward over the batch's (prompt, response) sequences: the LM's logits and the heads' Q,
     Qhat, V at every response token;
  4. the loss over the whole optimiser batch's response tokens; clip, step;
  5. the target heads move toward the online ones (Polyak, every ilql.target_every steps);
  6. log, evaluate the losses on data.eval, save.
final/ holds the language model (loadable with from_pretrained) and the heads (`rufus.models.ilql`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rufus import distributed
from rufus.config import (
    ConfigError,
    DataSection,
    LogArgs,
    LoraSection,
    ModelArgs,
    OptimArgs,
    RewardSection,
    RunArgs,
    as_config,
    opt,
)
from rufus.trainers import common

log = logging.getLogger(__name__)


@dataclass
class ILQLSection:
    """ILQL's losses, its target heads, and how rows become rewards."""

    tau: float = opt(0.7, "expectile of the value loss (0.5 = mean; toward 1 = best in-data action)", gt=0, lt=1)
    gamma: float = opt(0.99, "discount per token", ge=0, le=1)
    cql_alpha: float = opt(0.1, "weight of the conservative (CQL) term", ge=0)
    lm_weight: float = opt(1.0, "weight of the language model's NLL on the data (keeps pi_beta fitted)", ge=0)
    heads_lr: float | None = opt(
        None, "peak learning rate of the value and Q heads, which start from scratch (None = lr)", gt=0
    )
    polyak: float = opt(0.01, "target heads move this share of the way to the online heads", gt=0, le=1)
    target_every: int = opt(1, "steps between target-head updates", ge=1)
    beta: float = opt(4.0, "decoding strength saved with the model: generate / eval use it unless told otherwise", ge=0)
    normalize_rewards: bool = opt(True, "whiten the rewards over the training rows (mean 0, std 1)")
    chosen_reward: float = opt(1.0, "reward of a preference pair's chosen response")
    rejected_reward: float = opt(0.0, "reward of a preference pair's rejected response")


@dataclass
class ILQLConfig(LogArgs, OptimArgs, RunArgs, ModelArgs):
    """ILQL: offline RL on (prompt, response, reward) rows, decoded with beta-perturbed logits."""

    output_dir: str = opt("runs/ilql", "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    lr: float = opt(1e-5, "peak learning rate (AdamW), for the language model and the heads", gt=0)
    data: DataSection = opt(DataSection, "graded rows, rankings or preference pairs (the rewards' source)")
    reward: RewardSection = opt(
        RewardSection, "optional: score every response with these sources (e.g. a reward model) instead"
    )
    lora: LoraSection = opt(LoraSection, "LoRA adapters on the language model (the heads train in full)")
    ilql: ILQLSection = opt(ILQLSection, "ILQL losses, target heads, rewards")


@dataclass
class ILQLResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]
    model: object = None  # the trained ILQLModel (policy + heads), unwrapped
    eval: dict | None = None


_LOSS_KEYS = ("loss", "loss/q", "loss/v", "loss/cql", "loss/lm", "q/mean", "q/target", "v/mean", "advantage/mean")


def train_ilql(config: ILQLConfig | dict, reward_fn=None) -> ILQLResult:
    """Run ILQL as configured. `reward_fn(prompts, completions, **kw) -> list[float]` (or a list)
    adds Python reward sources that score the rows (module docstring, step 1)."""
    from rufus.models.ilql import ILQLHeads, ILQLModel

    cfg = as_config(ILQLConfig, config)
    if cfg.strategy != "ddp":
        raise ConfigError(
            f"strategy: ilql runs with ddp only (every process holds the model and its heads), not {cfg.strategy}"
        )
    run = common.start_run(cfg)
    acc = run.accelerator

    # 1. rows and their rewards, tokenised before the language model loads
    tokenizer = common.load_run_tokenizer(cfg)
    scorer = None
    if cfg.reward.model or cfg.reward.function or reward_fn:
        from rufus.trainers import online

        scorer = online.build_reward(cfg, run, reward_fn, gather=False)
    train, stats = load_episodes(cfg, acc, tokenizer, cfg.data.train, cfg.data.train_split, "data.train", scorer)
    evals = None
    if cfg.data.eval:
        evals, _ = load_episodes(
            cfg, acc, tokenizer, cfg.data.eval, cfg.data.eval_split, "data.eval", scorer, whiten_with=stats
        )
    del scorer
    plan = common.BatchPlan(len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_for_epochs(cfg.epochs)
    counts = [len(ex["response_ids"]) for ex in train]  # response tokens: the loss denominator

    # 2. the language model, its heads, the optimiser
    policy = common.load_trainable_lm(cfg, tokenizer)
    heads = ILQLHeads(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0])
    model = ILQLModel(policy, heads).to(acc.device)
    heads_lr = {"heads.": cfg.ilql.heads_lr} if cfg.ilql.heads_lr else None
    optimizer, scheduler = common.make_optimizer(cfg, model, max_steps, lr_overrides=heads_lr)
    heads.target_q_heads.float()  # Polyak steps of 1% vanish in bfloat16: the targets stay float32
    for p in heads.target_q_heads.parameters():
        p.rufus_checkpoint = True  # frozen but changing: saved with checkpoints
    sources = _online_sources(optimizer, heads)
    model, optimizer = distributed.prepare(acc, model, optimizer)
    whole = acc.unwrap_model(model)
    start_step, _ = common.maybe_resume(run, whole, optimizer, scheduler)
    logger = common.open_metrics(run, start_step)
    if acc.is_main_process and start_step == 0:
        logger.log(0, stats)
    collate = EpisodeCollator(tokenizer.pad_token_id)

    # 3-6. the loop
    eval_size = max(1, cfg.batch_size // acc.num_processes // cfg.grad_accum)
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="ilql")
    window, row = common.Window(), {}
    model.train()
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        got = _step(cfg, acc, model, train, plan, plan.global_batch(step), collate, counts)
        grad_norm = common.clip_and_step(cfg, acc, model, optimizer, scheduler)
        if step % cfg.ilql.target_every == 0:  # 5. Qhat <- (1 - rate) Qhat + rate Q
            heads.sync_targets(cfg.ilql.polyak, sources)
        window.add(grad_norm=grad_norm, time=time.perf_counter() - t0, **got)
        progress.update(1)
        progress.set_postfix(loss=f"{got['loss']:.4f}")
        held_out = (lambda: evaluate(cfg, acc, model, evals, collate, eval_size)) if evals else None
        save = (whole, optimizer, scheduler, None)
        row = common.log_evaluate_save(run, logger, step, max_steps, window, model, held_out, save)
    progress.close()

    # the language model (from_pretrained loads it) and, beside it, the heads
    from rufus.models.ilql import save_heads
    from rufus.precision import restore_float32

    restore_float32(whole)
    final_dir = common.save_final(run, whole.policy, tokenizer)
    if acc.is_main_process:
        meta = {k: getattr(cfg.ilql, k) for k in ("beta", "tau", "gamma", "cql_alpha")}
        save_heads(whole.heads, final_dir, {**meta, "reward_mean": stats["data/reward_mean"]})
    acc.wait_for_everyone()
    logger.close()
    common.finish_run(run, ["loss", "loss/q", "loss/v", "advantage/mean", "eval/loss"])
    final_eval = {k: v for k, v in row.items() if k.startswith("eval/")} or None
    return ILQLResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, whole, final_eval)


def _online_sources(optimizer, heads) -> list[torch.Tensor]:
    """The tensors the targets follow: the online Q heads' float32 masters under bfloat16 (rounded
    bfloat16 weights would lose the small Polyak steps), else the heads' own parameters."""
    from rufus.precision import master_weights_of

    masters = master_weights_of(optimizer)
    master_of = {id(p): m for p, m in masters.pairs} if masters is not None else {}
    return [master_of.get(id(p), p) for p in heads.q_heads.parameters()]


def _forward_loss(cfg, model, batch: dict, normalizer) -> tuple[torch.Tensor, dict]:
    """The ILQL loss of one micro-batch (its share of the whole batch by `normalizer`) and its stats."""
    from rufus.losses.ilql import ilql_loss
    from rufus.losses.sft import token_logprobs

    logits, q, target_q_taken, values = model(batch["input_ids"], batch["attention_mask"], batch["prompt_length"])
    mask, actions = batch["response_mask"], batch["actions"]  # (B, A)
    s = cfg.ilql
    loss, stats = ilql_loss(
        q,
        target_q_taken,
        values,
        actions,
        batch["rewards"],
        mask,
        gamma=s.gamma,
        tau=s.tau,
        cql_alpha=s.cql_alpha,
        normalizer=normalizer,
    )
    nll = -(token_logprobs(logits.float(), actions) * mask).sum() / normalizer  # the LM's NLL on the data
    loss = loss + s.lm_weight * nll
    stats["loss/lm"] = nll.detach()
    return loss, stats


def _step(cfg, acc, model, examples, plan, global_idx, collate, counts) -> dict:
    """One optimiser step's backward passes over this process's micro-batches; the whole batch's
    statistics (token-weighted means over every process)."""
    tokens = sum(counts[i] for i in global_idx)
    normalizer = max(tokens, 1) / acc.num_processes  # DDP averages gradients over processes
    sums = dict.fromkeys(_LOSS_KEYS, 0.0)
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        batch = collate([examples[i] for i in idx], acc.device)
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            loss, stats = _forward_loss(cfg, model, batch, normalizer)
            distributed.backward(acc, model, loss)
        n = float(batch["response_mask"].sum())
        sums["loss"] += loss.item()  # already this micro-batch's share of the whole batch's mean
        for key in _LOSS_KEYS[1:]:  # the loss parts are shares too; the other means weigh by tokens
            scale = 1.0 if key.startswith("loss/") else n / max(tokens, 1) * acc.num_processes
            sums[key] += stats[key].item() * scale
    keys = list(sums)
    values = acc.reduce(torch.tensor([sums[k] for k in keys], device=acc.device), reduction="sum")
    out = {k: v / acc.num_processes for k, v in zip(keys, values.tolist())}
    out["tokens"] = tokens
    return out


@torch.no_grad()
def evaluate(cfg, acc, model, examples: list[dict], collate, micro: int) -> dict:
    """eval/loss and its parts over every held-out row, token-weighted, shared out across processes."""
    was = model.training
    model.eval()
    mine = list(range(acc.process_index, len(examples), acc.num_processes))
    sums = torch.zeros(len(_LOSS_KEYS) + 1, device=acc.device)  # sums over tokens, then the token count
    for start in range(0, len(mine), micro):
        batch = collate([examples[i] for i in mine[start : start + micro]], acc.device)
        n = batch["response_mask"].sum()
        with acc.autocast():
            loss, stats = _forward_loss(cfg, model, batch, n.clamp(min=1))
        stats["loss"] = loss
        sums += torch.stack([stats[k].float() * n for k in _LOSS_KEYS] + [n.float()])
    sums = acc.reduce(sums, reduction="sum")
    model.train(was)
    total = max(sums[-1].item(), 1.0)
    return {f"eval/{k}": v / total for k, v in zip(_LOSS_KEYS, sums[:-1].tolist())}


# --- rows -> episodes ------------------------------------------------------------------------------


def load_episodes(cfg, acc, tokenizer, spec: str, split: str, key: str, scorer=None, whiten_with: dict | None = None):
    """([{"prompt_ids", "response_ids", "reward"}], reward statistics) from a data file (module
    docstring, step 1). Rewards are whitened with the training rows' mean and std (`whiten_with`:
    the held-out rows use the training rows' statistics)."""
    from rufus.data.encoding import encode_response
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from
    from rufus.data.sft import LengthPolicy

    with acc.main_process_first():  # the first process fills the datasets cache, the others read it
        records = load_records(
            spec,
            kind=("graded", "ranking", "preference"),
            split=split,
            key=key,
            options=options_from(cfg.data, tokenizer),
        )
    rows = []  # (prompt, response, reward from the file, where)
    for i, r in enumerate(records.dataset):
        where = f"{key}: {records.where(i)}"
        if records.kind == "graded":
            rows.append((r["prompt"], r["completion"], float(r["score"]), where))
        elif records.kind == "ranking":
            rows += [(r["prompt"], y, float(s), where) for y, s in zip(r["responses"], r["scores"])]
        else:
            s = cfg.ilql
            rows += [
                (r["prompt"], r["chosen"], s.chosen_reward, where),
                (r["prompt"], r["rejected"], s.rejected_reward, where),
            ]
    if scorer is not None:  # every process scores its share (a collective: outside main_process_first)
        rewards = _score(scorer, acc, rows, cfg.reward.batch_size)
        rows = [(p, y, r, w) for (p, y, _, w), r in zip(rows, rewards)]
    policy = LengthPolicy(
        cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation, key=key, noun="response"
    )
    episodes, dropped, truncated = [], [], 0
    for prompt, response, reward, where in rows:
        enc = encode_response(tokenizer, prompt, response, where, "response")
        if policy.too_long(enc):
            if cfg.data.truncation == "reject":
                raise policy.error(enc, where, "prompt", "response")
            if cfg.data.truncation == "drop":
                dropped.append(where)
                continue
            enc = policy.cut(enc, tokenizer.bos_token_id)
            truncated += 1
        if len(enc.ids) <= enc.n_prompt:
            continue  # the cut left no response token
        episodes.append(
            {"prompt_ids": enc.ids[: enc.n_prompt], "response_ids": enc.ids[enc.n_prompt :], "reward": reward}
        )
    if dropped or truncated:
        log.warning("%s: %d responses dropped and %d truncated to fit %s", key, len(dropped), truncated, policy.limits)
    if not episodes:
        raise ConfigError(f"{key}: no responses left to learn from")
    raw = torch.tensor([e["reward"] for e in episodes], dtype=torch.float64)
    mean, std = raw.mean().item(), raw.std(unbiased=False).item() if len(raw) > 1 else 0.0
    stats = {"data/responses": len(episodes), "data/reward_mean": mean, "data/reward_std": std}
    if cfg.ilql.normalize_rewards:
        m, s = (whiten_with["data/reward_mean"], whiten_with["data/reward_std"]) if whiten_with else (mean, std)
        for e in episodes:
            e["reward"] = (e["reward"] - m) / (s if s > 1e-8 else 1.0)
    log.info("%s: %d responses, reward mean %.4g, std %.4g (%s)", key, len(episodes), mean, std, records.kind)
    return episodes, stats


def _score(scorer, acc, rows: list, batch_size: int) -> list[float]:
    """The reward sources' score of every (prompt, response): each process scores its share."""
    from accelerate.utils import gather_object

    per = math.ceil(len(rows) / acc.num_processes)
    mine = rows[acc.process_index * per : (acc.process_index + 1) * per]
    scores = []
    for i in range(0, len(mine), batch_size):
        part = mine[i : i + batch_size]
        complete = torch.ones(len(part), dtype=torch.bool)  # logged responses are whole: no EOS penalty
        got, _ = scorer([p for p, *_ in part], [y for _, y, *_ in part], complete)
        scores += [float(x) for x in got.tolist()]
    return gather_object(scores) if acc.num_processes > 1 else scores


class EpisodeCollator:
    """Episodes -> a batch in the rollout layout: prompts left-padded to P, responses right-padded to A.

    input_ids, attention_mask (B, P + A); prompt_length P; actions, response_mask, rewards (B, A),
    the reward at each response's last token."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, episodes: list[dict], device=None) -> dict:
        from rufus.rollout.generate import left_pad

        prompt_ids, prompt_mask = left_pad([e["prompt_ids"] for e in episodes], self.pad)
        A = max(len(e["response_ids"]) for e in episodes)
        actions = torch.full((len(episodes), A), self.pad, dtype=torch.long)
        mask = torch.zeros((len(episodes), A), dtype=torch.long)
        rewards = torch.zeros((len(episodes), A))
        for i, e in enumerate(episodes):
            n = len(e["response_ids"])
            actions[i, :n] = torch.tensor(e["response_ids"])
            mask[i, :n] = 1
            rewards[i, n - 1] = e["reward"]
        batch = {
            "input_ids": torch.cat([prompt_ids, actions], 1),
            "attention_mask": torch.cat([prompt_mask, mask], 1),
            "actions": actions,
            "response_mask": mask,
            "rewards": rewards,
        }
        batch = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
        batch["prompt_length"] = prompt_ids.shape[1]
        return batch
