"""`rufus generate`: sample responses from a model, optionally the best of n by a reward.

Best-of-n at inference time (Nakano et al. 2021, WebGPT Sec. 5; Stiennon et al. 2020): for each
prompt, sample n responses, score them with the reward sources and return the highest-scoring one.
No weights change. The resulting policy is at most log n - (n-1)/n nats of KL from the sampler
(Stiennon et al. 2020 App.; an upper bound, exact only for continuous rewards without ties:
Beirami et al. 2024, arXiv 2401.01879), reported as `bon/kl_bound`.

  1. sample best_of responses per prompt (each prompt repeated best_of times in a batch);
  2. score them with the reward sources;
  3. keep the best of each prompt's n (`rufus.bon.select_best`);
  4. write one row per prompt and return a summary.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rufus.config import REQUIRED, ConfigError, GenerationSection, RewardSection, opt

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Sample responses to prompts; with best_of > 1, keep the best of n by the reward."""

    model: str = opt(REQUIRED, "model to sample from: local path, hub id, or builtin:tiny-llama", model_path=True)
    tokenizer: str | None = opt(None, "tokenizer path or hub id (default: the model's)", model_path=True)
    prompts: str | None = opt(None, "prompt-format file (.jsonl/.json/.csv/.parquet) or hub dataset; or set `prompt`")
    prompt: str | None = opt(None, "a single prompt string, instead of a `prompts` file")
    split: str = opt("train", "split to read when `prompts` is a hub dataset")
    output: str | None = opt(
        None,
        "jsonl file for the generations, '-' = stdout; default output_dir/generations.jsonl, "
        "or stdout without output_dir",
    )
    output_dir: str | None = opt(None, "if set, write config.yaml, generations.jsonl and summary.json here")
    generation: GenerationSection = opt(GenerationSection, "sampling")
    reward: RewardSection = opt(
        RewardSection, "reward sources: required for best_of > 1; otherwise, if set, each response is scored"
    )
    best_of: int = opt(1, "n: responses sampled per prompt, the highest-scoring one returned", ge=1)
    return_all: bool = opt(
        False, "with each row also write all n candidates and their scores (all_responses, all_scores)"
    )
    batch_size: int = opt(16, "prompts per generate call (each repeated best_of times)", ge=1)
    max_prompt_length: int | None = opt(
        None, "cut longer prompts from the left to this many tokens (None = no limit)", ge=1
    )
    chat_template: str | None = opt(None, "Jinja chat template overriding the tokenizer's (for message-list prompts)")
    seed: int = opt(0, "random seed of the sampler", ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "weights dtype; auto = bfloat16 where the hardware runs it fast"
    )
    trust_remote_code: bool = opt(False, "allow model code from the hub to run (off: untrusted code never runs)")
    progress: bool = opt(True, "show a progress bar")
    ilql_beta: float | None = opt(
        None,
        "a model saved by rufus ilql: the decoding strength beta of pi_beta exp(beta (Q - V)) "
        "(None = the beta saved with it; 0 = its language model alone)",
        ge=0,
    )


def generate(config: GenerateConfig | dict, reward_fn=None) -> dict:
    """Sample as configured; write one row per prompt ({"prompt", "response"[, "score"]}) and return a
    summary: prompts, samples, best_of, bon/kl_bound, score/mean (every sample), score/best (the picked ones)
    (the returned ones), response/length, output, plus "generations" (the rows, for Python callers).

    `reward_fn(prompts, completions, **kw) -> list[float]` (or a list of them) adds reward sources.
    """
    from tqdm.auto import tqdm
    from transformers import set_seed

    from rufus.bon import bon_kl_bound, select_best
    from rufus.config import as_config, atomic_write_text, save_config
    from rufus.models.ilql import load_decoding_model
    from rufus.models.loading import load_tokenizer, resolve_dtype
    from rufus.rewards import build_reward_pipeline
    from rufus.rollout.generate import generate_responses

    cfg = as_config(GenerateConfig, config)
    if (cfg.prompts is None) == (cfg.prompt is None):
        raise ConfigError("prompts / prompt: set exactly one (a prompt file, or a single prompt string)")
    fns = [] if reward_fn is None else (list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn])
    scored = bool(cfg.reward.model or cfg.reward.function or fns)
    if cfg.best_of > 1 and not scored:
        raise ConfigError(
            f"best_of: {cfg.best_of} needs a reward to pick the best; set reward.model or "
            "reward.function, or pass reward_fn"
        )
    n = cfg.best_of
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    set_seed(cfg.seed)

    # prompts and reward sources first: bad input fails before the model loads
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template
    )
    items = _prompts(cfg, tokenizer)
    reward = None
    if scored:
        reward = build_reward_pipeline(
            cfg.reward, device=device, dtype=dtype, extra_functions=fns, trust_remote_code=cfg.trust_remote_code
        )
    # a rufus ilql model decodes with its heads (beta-perturbed logits); any other model as it is
    model = load_decoding_model(
        cfg.model, tokenizer=tokenizer, dtype=dtype, beta=cfg.ilql_beta, trust_remote_code=cfg.trust_remote_code
    )
    model.to(device).eval()

    t0 = time.perf_counter()
    rows, all_scores, best_scores, lengths = [], [], [], []
    progress = tqdm(total=len(items), desc="generate", unit="prompt", dynamic_ncols=True, disable=not cfg.progress)
    for start in range(0, len(items), cfg.batch_size):
        group = items[start : start + cfg.batch_size]
        rep = [p for p in group for _ in range(n)]  # prompt g's samples sit at g*n .. g*n+n-1

        # 1. sample n responses per prompt
        ro = generate_responses(
            model, tokenizer, [p["prompt"] for p in rep], [p["ids"] for p in rep], cfg.generation, device=device
        )

        # 2. score them
        scores = None
        if reward is not None:
            extra = {k: [p["extra"][k] for p in rep] for k in rep[0]["extra"]}
            scores, _ = reward(ro.prompts, ro.completions, ro.has_eos, **extra)  # (G*n,)
            all_scores += scores.tolist()

        # 3. keep the best of each prompt's n
        best = select_best(scores, n, top_k=1) if n > 1 else range(len(rep))
        for j in best:
            g = j // n
            row = {"prompt": group[g]["prompt"], "response": ro.completions[j]}
            if scores is not None:
                row["score"] = float(scores[j])
                best_scores.append(float(scores[j]))
            if cfg.return_all:
                row["all_responses"] = ro.completions[g * n : (g + 1) * n]
                if scores is not None:
                    row["all_scores"] = scores[g * n : (g + 1) * n].tolist()
            rows.append(row)
            lengths.append(int(ro.response_length[j]))
        progress.update(len(group))
    progress.close()

    # 4. write the rows, return the summary
    output = cfg.output or (str(Path(cfg.output_dir) / "generations.jsonl") if cfg.output_dir else "-")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
    summary = {"prompts": len(rows), "samples": len(rows) * n, "best_of": n, "bon/kl_bound": bon_kl_bound(n)}
    if reward is not None:
        summary["score/mean"] = sum(all_scores) / len(all_scores)
        summary["score/best"] = sum(best_scores) / len(best_scores)
    summary.update(
        {"response/length": sum(lengths) / len(lengths), "time/s": time.perf_counter() - t0, "output": output}
    )
    if cfg.output_dir:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")
    if n > 1:
        log.info(
            "best of %d: mean score %.4g (all samples) -> %.4g (best); KL to the sampler <= %.4f nats",
            n,
            summary["score/mean"],
            summary["score/best"],
            summary["bon/kl_bound"],
        )
    return {**summary, "generations": rows}


def _prompts(cfg: GenerateConfig, tokenizer) -> list[dict]:
    """[{"prompt", "ids", "extra"}]: the `prompt` string, or the validated rows of `prompts`."""
    from rufus.data.loading import load_records
    from rufus.data.prompts import tokenize_prompts
    from rufus.data.readers import options_from
    from rufus.data.sft import encode_prompt

    limit = cfg.max_prompt_length or 10**9
    if cfg.prompt is not None:
        ids = encode_prompt(tokenizer, cfg.prompt)
        if len(ids) > limit:  # as tokenize_prompts cuts: keep the end, and a leading bos
            keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            ids = ids[:keep_bos] + ids[len(ids) - limit + keep_bos :]
        return [{"prompt": cfg.prompt, "ids": ids, "extra": {}}]
    return tokenize_prompts(
        load_records(cfg.prompts, kind="prompt", split=cfg.split, key="prompts", options=options_from(cfg, tokenizer)),
        tokenizer,
        max_prompt_length=limit,
        truncation="truncate",
        key="prompts",
    )
