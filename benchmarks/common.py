"""What the side-by-side benchmarks share: the models, the data, the work per step, the result rows.

Both sides (Rufus and the peer, each in its own virtual environment) read the same model
directories and data files, made once by

    .venv/bin/python benchmarks/common.py prepare        # -> benchmarks/.cache/{models,data}

and each run prints ONE JSON line (`result_row`) that `benchmarks/vs_trl.py` collects into the table.
This file imports only the standard library at module level, so the peer's environment can import
it too (`prepare` needs transformers and tokenizers, which both environments have).

Models (random weights, seeded; Llama architecture; intermediate size 4 x hidden):
  tiny   hidden 256, 4 layers, 4 heads, vocab 512   (~4.2M parameters)
  small  hidden 512, 8 layers, 8 heads, vocab 512   (~34M parameters)

Work per optimiser step (fixed settings; both sides must do exactly this):
  sft   16 sequences of 64 tokens (prompt 16 + completion 48), loss on the completion
  rm    16 pairs (chosen, rejected), each 64 tokens, Bradley-Terry loss
  dpo   16 pairs, each 64 tokens, sigmoid DPO loss, beta 0.1, reference log-probs included
  grpo  2 prompts x 8 samples, 64 new tokens each (no early stop), 1 update, beta 0.04
  ppo   16 prompts, 64 new tokens each (no early stop), 4 PPO epochs x 1 minibatch, a separate
        critic and reward model of the policy's size, a frozen reference
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
MODELS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8),
}
VOCAB = 512
PROMPT_TOKENS, COMPLETION_TOKENS = 16, 48  # sequences of 64 tokens
NEW_TOKENS = 64
ALGOS = ("sft", "rm", "dpo", "grpo", "ppo")
WORK = {  # what one optimiser step processes (see the module docstring)
    "sft": {"sequences": 16},
    "rm": {"pairs": 16},
    "dpo": {"pairs": 16, "beta": 0.1},
    "grpo": {"prompts": 2, "samples": 8, "new_tokens": NEW_TOKENS, "beta": 0.04},
    "ppo": {"prompts": 16, "new_tokens": NEW_TOKENS, "epochs": 4, "minibatches": 1},
}

WORDS = (
    "the a of to and in is was for on with as by at from this that it be are rain snow owls cats "
    "rice soup bread music piano guitar red blue green light paint train map ticket river stone "
    "garden water sun moon star cloud tree leaf seed root bird fish horse dog fox whale"
).split()


def model_dir(name: str) -> Path:
    return CACHE / "models" / name


def data_path(kind: str) -> Path:
    """kind: "sft" ({prompt, completion}), "pref" ({prompt, chosen, rejected}), "prompts" ({prompt})."""
    return CACHE / "data" / f"{kind}.jsonl"


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def prepare(force: bool = False) -> None:
    """Build the tokenizer, both models and the data files (deterministic; skipped when present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT.parent / "src"))
    from rufus.models.tiny import train_tokenizer

    rng = random.Random(0)
    texts = [_sentence(rng, 40) for _ in range(2000)]
    tokenizer = None
    for name, shape in MODELS.items():
        out = model_dir(name)
        if (out / "config.json").exists() and not force:
            continue
        tokenizer = tokenizer or train_tokenizer(texts, vocab_size=VOCAB)
        import torch

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            intermediate_size=4 * shape["hidden_size"],
            num_key_value_heads=shape["num_attention_heads"],
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **shape,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    data = CACHE / "data"
    data.mkdir(parents=True, exist_ok=True)
    if force or not data_path("sft").exists():
        tok = tokenizer or _load_tokenizer()
        rows_sft, rows_pref, rows_prompts = [], [], []
        for _ in range(512):
            prompt = _fit(tok, rng, PROMPT_TOKENS)
            rows_sft.append({"prompt": prompt, "completion": " " + _fit(tok, rng, COMPLETION_TOKENS)})
            rows_pref.append(
                {
                    "prompt": prompt,
                    "chosen": " " + _fit(tok, rng, COMPLETION_TOKENS),
                    "rejected": " " + _fit(tok, rng, COMPLETION_TOKENS),
                }
            )
            rows_prompts.append({"prompt": prompt})
        for kind, rows in (("sft", rows_sft), ("pref", rows_pref), ("prompts", rows_prompts)):
            data_path(kind).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("tiny"))


def _fit(tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Text of exactly `n_tokens` tokens (without special tokens) under `tokenizer`."""
    words = []
    while True:
        words.append(rng.choice(WORDS))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return tokenizer.decode(ids[:n_tokens])


def n_params(name: str) -> int:
    """Parameters of model `name` without embeddings (the usual FLOP-count convention)."""
    h, layers = MODELS[name]["hidden_size"], MODELS[name]["num_hidden_layers"]
    return layers * (4 * h * h + 3 * h * 4 * h) + VOCAB * h  # attention + MLP + LM head


def flops_per_step(algo: str, name: str) -> float:
    """Matrix-product FLOPs one step does (2 N per token forward, 4 N backward; attention ignored).

    The same algorithmic work on both sides, so the share of peak compares like with like.
    Generation is counted as forward passes over the new tokens.
    """
    n, seq = n_params(name), PROMPT_TOKENS + COMPLETION_TOKENS
    fwd, train = 2 * n, 6 * n
    w = WORK[algo]
    if algo == "sft":
        return train * w["sequences"] * seq
    if algo == "rm":
        return train * 2 * w["pairs"] * seq
    if algo == "dpo":  # policy trains on chosen + rejected; the reference scores them once
        return (train + fwd) * 2 * w["pairs"] * seq
    if algo == "grpo":  # generate; old / ref log-probs; one update
        b, t = w["prompts"] * w["samples"], PROMPT_TOKENS + w["new_tokens"]
        return fwd * b * w["new_tokens"] + 2 * fwd * b * t + train * b * t
    if algo == "ppo":  # generate; old, ref, value, reward passes; epochs x (actor + critic) updates
        b, t = w["prompts"], PROMPT_TOKENS + w["new_tokens"]
        return fwd * b * w["new_tokens"] + 4 * fwd * b * t + w["epochs"] * 2 * train * b * t
    raise ValueError(algo)


def tokens_per_step(algo: str) -> int:
    w = WORK[algo]
    seq = PROMPT_TOKENS + COMPLETION_TOKENS
    return {
        "sft": w.get("sequences", 0) * seq,
        "rm": 2 * w.get("pairs", 0) * seq,
        "dpo": 2 * w.get("pairs", 0) * seq,
    }.get(algo) or (w.get("prompts", 0) * w.get("samples", 1) * (PROMPT_TOKENS + NEW_TOKENS))


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_row(
    *,
    impl: str,
    version: str,
    algo: str,
    model: str,
    precision: str,
    dtype_used: str,
    step_seconds: list[float],
    warmup: int,
    notes: str = "",
) -> dict:
    """The one JSON line a run prints: timings of every step, medians after `warmup` steps."""
    timed = step_seconds[warmup:] or step_seconds
    median = statistics.median(timed)
    return {
        "impl": impl,
        "version": version,
        "algo": algo,
        "model": model,
        "precision": precision,
        "dtype_used": dtype_used,
        "step_seconds": [round(s, 4) for s in step_seconds],
        "warmup": warmup,
        "median_s": median,
        "tokens_per_s": tokens_per_step(algo) / median,
        "flops_per_s": flops_per_step(algo, model) / median,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "notes": notes,
    }


def print_row(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare(force="--force" in sys.argv)
        print(f"models and data in {CACHE}")
    else:
        print(__doc__)
