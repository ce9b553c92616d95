"""`rufus eval`: evaluate a policy on held-out prompts against a baseline and a reference.

One response per prompt is sampled from the policy and, with `baseline`, one from the baseline for
the same prompts (the sampler re-seeded before each, so the same model gives the same responses).
What is measured, each metric over the prompts:

  kl          sampled estimate of KL(pi || pi_ref) per sequence, sum over response tokens of
              log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) at the sampling temperature (the k1
              estimator of the RL trainers, summed: Schulman 2020, "Approximating KL divergence"),
              averaged over prompts, with its standard error `kl_std_err`
  length      response tokens, EOS included
  distinct_n  distinct word n-grams / all word n-grams over all responses (Li et al. 2016, NAACL)
  score       the reward sources' score; `win_rate` = share of prompts where the policy's response
              scores above the baseline's (ties 1/2), the reward acting as judge
  gold/...    on the playground (`preference`): the hidden gold taste, with a 95% normal interval
  rm/...      with `pairs`: how often the reward orders held-out comparisons as their labels do, and
              (with `preference`) as the gold taste does

  1. load and check prompts, pairs and reward sources (bad input fails before any model loads);
  2. sample the policy's responses and their logprobs; free the policy;
  3. sample the baseline's responses; reference logprobs of the policy's responses; free each model;
  4. score both sides with the reward sources, the gold taste, and score the pairs;
  5. write config.yaml, eval.json and generations.jsonl; return the metrics and the rows.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus.config import REQUIRED, ConfigError, GenerationSection, RewardSection, opt

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate a policy on held-out prompts: reward score, KL to a reference, length, diversity, win rate."""

    model: str = opt(REQUIRED, "policy to evaluate: local path, hub id, or builtin:...", model_path=True)
    tokenizer: str | None = opt(
        None, "tokenizer path or hub id (default: the model's); baseline and ref_model use it too", model_path=True
    )
    baseline: str | None = opt(
        None,
        "model to compare with (e.g. the SFT model): its responses to the same prompts "
        "give win_rate and, on the playground, gold win rate",
        model_path=True,
    )
    ref_model: str | None = opt(
        None, "reference for the KL estimate (default: baseline; None and no baseline = no KL)", model_path=True
    )
    prompts: str = opt(REQUIRED, "prompt-format file (.jsonl/.json/.csv/.parquet) or hub dataset")
    split: str = opt("train", "split to read when `prompts` or `pairs` is a hub dataset")
    num_prompts: int | None = opt(None, "evaluate on the first N prompts (None = all)", ge=1)
    generation: GenerationSection = opt(GenerationSection, "sampling, for both policy and baseline")
    reward: RewardSection = opt(
        RewardSection,
        "reward sources: the score and the judge of win_rate (optional: without any, score and win_rate are skipped)",
    )
    preference: str | None = opt(
        None,
        "playground gold taste (a name such as default/concise/polite/helpful or "
        "'dim=w,...'): adds gold metrics; None = not the playground",
    )
    pairs: str | None = opt(
        None,
        "held-out comparisons (preference format) for the reward's accuracy against the "
        "labels and, with `preference`, against gold",
    )
    output_dir: str | None = opt(None, "if set, write config.yaml, eval.json (the metrics) and generations.jsonl here")
    batch_size: int = opt(32, "prompts per generate call and per logprob forward pass", ge=1)
    max_prompt_length: int | None = opt(
        None, "cut longer prompts from the left to this many tokens (None = no limit)", ge=1
    )
    seed: int = opt(0, "random seed of the sampler (re-used for the baseline)", ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "weights dtype; auto = bfloat16 where the hardware runs it fast"
    )
    trust_remote_code: bool = opt(False, "allow model code from the hub to run (off: untrusted code never runs)")
    progress: bool = opt(True, "show a progress bar")
    ilql_beta: list[float] = opt(
        [],
        "a model saved by rufus ilql: decoding strengths beta to score in one evaluation (the first "
        "gives the headline metrics, each its ilql/beta_<b>/... ones); empty = the beta saved with it",
    )


def evaluate(config: EvalConfig | dict, reward_fn=None) -> dict:
    """Evaluate as configured (module docstring); return the metrics plus "generations", one row per
    prompt: {prompt, response[, baseline_response][, kl][, score, baseline_score][, gold, baseline_gold]}.

    `reward_fn(prompts, completions, **kw) -> list[float]` (or a list of them) adds reward sources.
    """
    from rufus.config import as_config, atomic_write_text, save_config
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from
    from rufus.models.ilql import is_ilql_dir
    from rufus.models.loading import load_tokenizer, resolve_dtype
    from rufus.rewards import build_reward_pipeline

    cfg = as_config(EvalConfig, config)
    fns = [] if reward_fn is None else (list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn])
    scored = bool(cfg.reward.model or cfg.reward.function or fns)
    if cfg.pairs and not scored:
        raise ConfigError(
            "pairs: scoring comparisons needs a reward; set reward.model or reward.function, or pass reward_fn"
        )
    if cfg.preference is not None:
        from rufus.playground.taste import resolve_preference

        try:
            resolve_preference(cfg.preference)
        except ValueError as e:
            raise ConfigError(f"preference: {e}") from None
    ilql = is_ilql_dir(cfg.model)
    if cfg.ilql_beta and not ilql:
        raise ConfigError(f"ilql_beta: {cfg.model} is not a model saved by rufus ilql (no ilql.json)")
    if any(b < 0 for b in cfg.ilql_beta):
        raise ConfigError(f"ilql_beta: {cfg.ilql_beta} must be >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    ref_name = cfg.ref_model or cfg.baseline

    # 1. prompts, pairs and reward sources first: bad input fails before the models load
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    items = _prompts(cfg, tokenizer)
    pairs = None
    if cfg.pairs:  # a published preference file (hh-rlhf, ...) works as it is
        read = options_from(cfg, tokenizer)
        pairs = load_records(cfg.pairs, kind="preference", split=cfg.split, key="pairs", options=read).dataset
    reward = None
    if scored:
        reward = build_reward_pipeline(
            cfg.reward, device=device, dtype=dtype, extra_functions=fns, trust_remote_code=cfg.trust_remote_code
        )
    t0 = time.perf_counter()
    prompts = [p["prompt"] for p in items]
    extra = {k: [p["extra"][k] for p in items] for k in items[0]["extra"]}  # columns for reward functions

    with torch.no_grad():
        # 2. the policy's responses (an ILQL policy: one set per beta) and, for the KL, their
        # logprobs log pi(y_t | x, y_<t)
        model = _load(cfg, cfg.model, tokenizer, dtype, device, decoding=True)
        variants = []  # [beta (ILQL) or None, rollouts, logprobs, the reference's logprobs]
        for beta in cfg.ilql_beta or [getattr(model, "beta", None)]:
            if beta is not None:
                model.beta = float(beta)
            label = "eval policy" + ("" if beta is None else f" (beta {beta:g})")
            rollouts = _sample(cfg, model, tokenizer, items, device, label)
            logprobs = _sequence_logprobs(cfg, model, rollouts) if ref_name else None
            # the same weights: the same numbers, so KL is exactly 0 (not for ILQL: its policy is not its LM)
            same = ref_name == cfg.model and not ilql
            variants.append([beta, rollouts, logprobs, logprobs if same else None])
        del model
        _free()

        # 3. the baseline's responses to the same prompts; the reference's logprobs of the policy's responses
        base_rollouts = None
        if cfg.baseline:
            model = _load(cfg, cfg.baseline, tokenizer, dtype, device)
            base_rollouts = _sample(cfg, model, tokenizer, items, device, "eval baseline")
            if ref_name == cfg.baseline:
                for v in variants:
                    v[3] = _sequence_logprobs(cfg, model, v[1]) if v[3] is None else v[3]
            del model
            _free()
        if ref_name and any(v[3] is None for v in variants):
            model = _load(cfg, ref_name, tokenizer, dtype, device)
            for v in variants:
                v[3] = _sequence_logprobs(cfg, model, v[1]) if v[3] is None else v[3]
            del model
            _free()

    # 4. scores: the reward sources, the gold taste (ILQL: for every beta, the first one the headline)
    metrics: dict = {"n_prompts": len(items)}
    rows: list[dict] = []
    for k, (beta, rollouts, logprobs, ref_logprobs) in enumerate(variants):
        got, got_rows = _side_metrics(cfg, prompts, extra, reward, rollouts, base_rollouts, logprobs, ref_logprobs)
        if k == 0:
            metrics.update(got)
            rows = got_rows
            if beta is not None:
                metrics["ilql/beta"] = float(beta)
        if len(variants) > 1:
            mine = {key: v for key, v in got.items() if not key.startswith(("baseline/", "gold/best"))}
            metrics.update({f"ilql/beta_{beta:g}/{key}": v for key, v in mine.items()})
    if pairs is not None:
        metrics.update(_pair_metrics(cfg, reward, pairs))

    # 5. write the files, log a summary, return
    metrics["time/s"] = time.perf_counter() - t0
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "eval.json", json.dumps(metrics, indent=1) + "\n")
        atomic_write_text(out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    shown = ("score", "win_rate", "kl", "gold/mean", "gold/win_rate", "rm/label_accuracy", "length", "distinct_2")
    log.info("eval on %d prompts: %s", len(items), ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
    return {**metrics, "generations": rows}


def _side_metrics(cfg: EvalConfig, prompts, extra, reward, rollouts, base_rollouts, logprobs, ref_logprobs):
    """(metrics, rows) of one set of the policy's responses against the baseline's: length,
    distinct-n, KL, reward score and win rate, gold (module docstring)."""
    completions = [c for ro in rollouts for c in ro.completions]
    rows = [{"prompt": p, "response": c} for p, c in zip(prompts, completions)]
    metrics: dict = {}
    sides = [("", rollouts)] + ([("baseline/", base_rollouts)] if base_rollouts else [])
    for prefix, ros in sides:
        texts = [c for ro in ros for c in ro.completions]
        metrics[prefix + "length"] = torch.cat([ro.response_length for ro in ros]).float().mean().item()
        metrics[prefix + "distinct_1"] = distinct_n(texts, 1)
        metrics[prefix + "distinct_2"] = distinct_n(texts, 2)
        if prefix:
            for row, text in zip(rows, texts):
                row["baseline_response"] = text
    if logprobs is not None:
        kl = (logprobs - ref_logprobs).double()  # (N,) sum_t log pi - log pi_ref, one sample per prompt
        metrics["kl"], metrics["kl_std_err"] = kl.mean().item(), _std_err(kl.tolist())
        for row, k in zip(rows, kl.tolist()):
            row["kl"] = k
    if reward is not None:
        scores = {}
        for prefix, ros in sides:
            has_eos = torch.cat([ro.has_eos.cpu() for ro in ros])
            texts = [c for ro in ros for c in ro.completions]
            scores[prefix], per_source = _score(reward, prompts, texts, has_eos, extra, cfg.batch_size)
            metrics[prefix + "score"] = sum(scores[prefix]) / len(scores[prefix])
            if len(per_source) > 1:
                metrics.update({f"{prefix}score/{name}": v for name, v in per_source.items()})
            for row, s in zip(rows, scores[prefix]):
                row[prefix.replace("/", "_") + "score"] = s
        if base_rollouts:
            metrics["win_rate"] = _win_rate(scores[""], scores["baseline/"])
    if cfg.preference is not None:
        from rufus.playground.taste import best_gold, gold_score, gold_win_rate

        for prefix, _ in sides:
            key = prefix.replace("/", "_") + "response"
            gold = [gold_score(r["prompt"], r[key], cfg.preference) for r in rows]
            for row, g in zip(rows, gold):
                row[prefix.replace("/", "_") + "gold"] = g
            mean, half = sum(gold) / len(gold), 1.96 * _std_err(gold)  # 95% normal interval
            metrics.update(
                {f"{prefix}gold/mean": mean, f"{prefix}gold/ci_low": mean - half, f"{prefix}gold/ci_high": mean + half}
            )
        metrics["gold/best"] = best_gold(cfg.preference)
        if base_rollouts:
            metrics["gold/win_rate"] = gold_win_rate(
                prompts, completions, [r["baseline_response"] for r in rows], cfg.preference
            )
    return metrics, rows


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016, "A diversity-promoting objective function for neural conversation
    models", Sec. 4.3): the number of distinct word n-grams over all `texts` divided by the number of
    word n-grams, words being the lower-cased whitespace-separated tokens and n-grams never crossing
    from one text to the next. 0 when there is no n-gram at all."""
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _prompts(cfg: EvalConfig, tokenizer) -> list[dict]:
    """[{"prompt", "ids", "extra"}] for the first `num_prompts` validated rows of `prompts`."""
    from rufus.data.loading import load_records
    from rufus.data.prompts import tokenize_prompts
    from rufus.data.readers import options_from

    read = options_from(cfg, tokenizer)  # a published data set gives its prompts
    records = load_records(cfg.prompts, kind="prompt", split=cfg.split, key="prompts", options=read)
    items = tokenize_prompts(
        records, tokenizer, max_prompt_length=cfg.max_prompt_length or 10**9, truncation="truncate", key="prompts"
    )
    return items[: cfg.num_prompts]


def _load(cfg: EvalConfig, name: str, tokenizer, dtype, device, decoding: bool = False):
    """A model as a causal LM; `decoding`: as the policy samples (a rufus ilql model with its heads)."""
    from rufus.models.ilql import load_decoding_model
    from rufus.models.loading import load_causal_lm

    load = load_decoding_model if decoding else load_causal_lm
    model = load(name, tokenizer=tokenizer, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.to(device).eval()


def _free() -> None:
    """Give a deleted model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sample(cfg: EvalConfig, model, tokenizer, items: list[dict], device, desc: str) -> list:
    """One response per prompt, `batch_size` prompts a batch: a Rollout per batch, in prompt order."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    from rufus.rollout.generate import generate_responses

    set_seed(cfg.seed)  # re-seeded for each model: reproducible, and the same model samples the same responses
    rollouts = []
    with tqdm(total=len(items), desc=desc, unit="prompt", dynamic_ncols=True, disable=not cfg.progress) as bar:
        for start in range(0, len(items), cfg.batch_size):
            group = items[start : start + cfg.batch_size]
            rollouts.append(
                generate_responses(
                    model,
                    tokenizer,
                    [p["prompt"] for p in group],
                    [p["ids"] for p in group],
                    cfg.generation,
                    device=device,
                )
            )
            bar.update(len(group))
    return rollouts


def _sequence_logprobs(cfg: EvalConfig, model, rollouts: list) -> torch.Tensor:
    """(N,) float64 CPU: sum over each response's tokens (up to and including the first EOS) of
    log p(y_t | x, y_<t) under `model`, logits divided by the sampling temperature."""
    from rufus.rollout.logprobs import batched_logprobs

    out = []
    for ro in rollouts:
        lp = batched_logprobs(
            model, ro.input_ids, ro.attention_mask, ro.prompt_length, cfg.generation.temperature, cfg.batch_size
        )  # (B, A)
        out.append(torch.where(ro.response_mask.bool(), lp, 0.0).double().sum(-1).cpu())  # (B,)
    return torch.cat(out)


def _score(
    reward, prompts: list, completions: list[str], has_eos: torch.Tensor, extra: dict, batch_size: int
) -> tuple[list[float], dict[str, float]]:
    """Scores (N,) of `completions`, `batch_size` at a time, and each source's mean over all N."""
    scores, sums = [], {name: 0.0 for name, _ in reward.sources}
    for i in range(0, len(completions), batch_size):
        part = slice(i, i + batch_size)
        s, stats = reward(prompts[part], completions[part], has_eos[part], **{k: v[part] for k, v in extra.items()})
        scores += s.tolist()
        for name in sums:  # stats hold this chunk's mean per source
            sums[name] += stats[f"score/{name}"] * len(s)
    return scores, {name: total / len(completions) for name, total in sums.items()}


def _pair_metrics(cfg: EvalConfig, reward, pairs) -> dict:
    """rm/label_accuracy over the pairs; with `preference`, rm/gold_accuracy over the pairs gold does not tie."""
    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    extra = {k: list(pairs[k]) for k in pairs.column_names if k not in ("prompt", "chosen", "rejected")}
    complete = torch.ones(len(prompts), dtype=torch.bool)  # labelled texts are whole responses: no EOS penalty
    r_chosen, _ = _score(reward, prompts, chosen, complete, extra, cfg.batch_size)
    r_rejected, _ = _score(reward, prompts, rejected, complete, extra, cfg.batch_size)
    out = {"rm/pairs": len(prompts), "rm/label_accuracy": _win_rate(r_chosen, r_rejected)}
    if cfg.preference is not None:
        from rufus.playground.taste import gold_score

        agree = []  # 1 when the reward orders the pair as gold does, 1/2 when the reward ties
        for p, c, r, rc, rr in zip(prompts, chosen, rejected, r_chosen, r_rejected):
            gold_diff = gold_score(p, c, cfg.preference) - gold_score(p, r, cfg.preference)
            if gold_diff != 0:
                agree.append(0.5 if rc == rr else float((rc > rr) == (gold_diff > 0)))
        out["rm/gold_pairs"] = len(agree)
        if agree:
            out["rm/gold_accuracy"] = sum(agree) / len(agree)
    return out


def _win_rate(a: list[float], b: list[float]) -> float:
    """Share of positions where a > b, ties counting 1/2."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def _std_err(values: list[float]) -> float:
    """Standard error of the mean, sd with n - 1 (0 for a single value)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
