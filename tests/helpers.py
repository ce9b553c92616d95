"""Test helpers: tiny models and tokenizers built in the test, data files written in the test."""

from __future__ import annotations

import json
from pathlib import Path

from rufus.models.tiny import build_tiny

WORDS = "the cat sat on a mat and the dog ran to sea what is one two three plus equals yes no hello".split()


def tiny_corpus(n: int = 400) -> list[str]:
    """Deterministic short sentences for training a test tokenizer."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)]
        out.append(" ".join(words) + (" ?" if i % 3 == 0 else " ."))
    return out + [str(i) for i in range(100)]


def make_tiny_model_dir(path: Path, *, vocab_size: int = 300, **kwargs) -> Path:
    """A tiny random Llama (or arch=gpt2) + byte-level BPE tokenizer saved as a HF directory."""
    return build_tiny(path, tiny_corpus(), vocab_size=vocab_size, **kwargs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n: int = 8) -> list[dict]:
    """n distinct prompt/completion pairs."""
    return [
        {"prompt": f"what is {i} plus {i + 1} ?", "completion": f" {i} plus {i + 1} equals {2 * i + 1} ."}
        for i in range(n)
    ]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic comparisons with a learnable taste: the chosen response says "yes", the rejected
    one says "no"; otherwise both are random words from the same vocabulary."""
    import random

    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("yes", "no")]
    rows = []
    for _ in range(n):
        body = rng.choices(filler, k=rng.randint(2, 6))
        other = rng.choices(filler, k=rng.randint(2, 6))
        body.insert(rng.randint(0, len(body)), "yes")
        other.insert(rng.randint(0, len(other)), "no")
        rows.append(
            {
                "prompt": f"what is {rng.randint(0, 9)} ?",
                "chosen": " " + " ".join(body) + " .",
                "rejected": " " + " ".join(other) + " .",
            }
        )
    return rows


def ranking_rows(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """K responses per prompt, best first: more "yes" words rank higher."""
    import random

    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("yes", "no")]
    rows = []
    for _ in range(n):
        responses = []
        for j in range(k):
            words = rng.choices(filler, k=rng.randint(2, 5)) + ["yes"] * (k - 1 - j) + ["no"] * j
            rng.shuffle(words)
            responses.append(" " + " ".join(words) + " .")
        rows.append({"prompt": f"what is {rng.randint(0, 9)} ?", "responses": responses})
    return rows


def digit_fraction(prompts, completions, **kw):
    """Programmatic reward for the RL tests: the share of a completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def arithmetic_prompts(n: int = 32) -> list[dict]:
    """Prompt-only rows for the RL tests."""
    return [{"prompt": f"what is {i} plus {i + 2} ?"} for i in range(n)]


def with_overrides(cfg: dict, over: dict) -> dict:
    """Apply {"a.b": value, "c": value} overrides to a nested config dict, in place; return it."""
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[key] = v
    return cfg


# A base model that writes the task's kind of text (openers, closers, rambling or not) in ~20 s;
# its samples rarely answer, but politeness and length vary, which is what the tests below need.
SMALL_BASE = dict(
    corpus_size=1200,
    steps=200,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    vocab_size=600,
    batch_size=32,
    lr=5e-3,
    max_length=96,
    progress=False,
)
NEW = 16  # max_new_tokens everywhere: short samples keep the runs fast


def tiny(model, output_dir, **over) -> dict:
    """A pipeline config that runs every stage in seconds on the small base model."""
    cfg = {
        "model": str(model),
        "output_dir": str(output_dir),
        "progress": False,
        "playground": {"sft_demos": 48, "comparison_prompts": 40, "rl_prompts": 32, "eval_prompts": 12},
        "collect": {"responses": 3, "held_out": 0.5, "generation": {"max_new_tokens": NEW}},
        "sft": {"max_steps": 4, "batch_size": 8, "log_every": 1},
        "rm": {"epochs": 1, "batch_size": 8, "log_every": 1},
        "rl": {"max_steps": 2, "batch_size": 4, "log_every": 1, "generation": {"max_new_tokens": NEW}},
        "eval": {"batch_size": 16, "generation": {"max_new_tokens": NEW}},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def run_cli(command: str, args: list[str], nproc: int, cwd, timeout: float = 300) -> None:
    """`rufus COMMAND ARGS` as `nproc` processes of one gloo group on 127.0.0.1 (one process: alone);
    fails with every process's output when a process fails or the time runs out."""
    import os
    import sys

    from rufus.distributed.local import spawn

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = spawn([sys.executable, "-m", "rufus.cli", command, *args], nproc, env=env, cwd=cwd, timeout=timeout)
    why = f"timed out after {timeout} s" if done.timed_out else f"exit status {done.returncode}"
    assert done.returncode == 0, f"rufus {command} on {nproc} processes: {why}\n" + done.output[-6000:]
