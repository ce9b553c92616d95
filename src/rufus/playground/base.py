"""The playground's pretrained base model, and its SFT demonstrations and prompts.

The RLHF pipeline starts from a *pretrained* language model: one that already writes the task's kind
of text but has not been taught which responses are good. Here that model is built offline in about a
minute on a laptop CPU:

1. pretraining text: ``make_corpus(corpus_size, seed, "mixed")`` rendered as prompt + completion (the
   whole range of qualities, good and bad responses alike, as web text would be);
2. a byte-level BPE tokenizer trained on that text (``models.tiny.train_tokenizer``, chat template
   included);
3. a tiny Llama with random weights (``models.tiny.make_tiny_model``);
4. language modelling on every token of the text (``train_sft`` with ``completion_only_loss=False``);
5. the final model and tokenizer moved into place atomically (temporary directory + ``os.replace``).

``base_model_path`` caches the result in ``models.tiny.playground_base_dir(seed)``, under
``cache_dir()/playground/`` (``builtin:playground-base``).
``make_sft_demos`` and ``make_prompts`` give the later stages their data: middling-quality
demonstrations for SFT and prompt-only rows for RL and evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# the recipe's version, part of the cache path: bump it (in models/tiny.py) when the recipe below changes
from rufus.models.tiny import PLAYGROUND_BASE_VERSION as BASE_VERSION
from rufus.models.tiny import playground_base_dir
from rufus.playground.corpus import make_corpus, make_prompt

log = logging.getLogger(__name__)

# The default recipe: ~2 min on 2 CPU cores in bfloat16 (AMX; float32 master weights). 1200 steps rather than 500: the
# shorter run writes the task's kind of text but rarely names the prompt's subject, so its samples
# almost never answer; at 1200 steps about a third do (held-out LM loss in build_info.json).
DEFAULTS = dict(
    corpus_size=8000,
    steps=1200,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    vocab_size=1024,
    batch_size=32,
    lr=3e-3,
    max_length=128,
    dtype="auto",
)


def pretraining_text(rows: list[dict[str, Any]]) -> list[str]:
    """Corpus rows as plain text lines, prompt followed by its completion (which starts with a space)."""
    return [row["prompt"] + row["completion"] for row in rows]


def build_base_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    corpus_size: int = DEFAULTS["corpus_size"],
    steps: int = DEFAULTS["steps"],
    hidden_size: int = DEFAULTS["hidden_size"],
    num_layers: int = DEFAULTS["num_layers"],
    num_heads: int = DEFAULTS["num_heads"],
    vocab_size: int = DEFAULTS["vocab_size"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    max_length: int = DEFAULTS["max_length"],
    dtype: str = DEFAULTS["dtype"],
    progress: bool = True,
) -> Path:
    """Pretrain the playground base model on the task's text and save it (HF format) to `path`.

    `path` must not exist yet (or be empty): the model is built in a temporary directory and moved
    there in one step, so a half-built model is never seen. If another process finishes first, its
    model is kept. `path/build_info.json` records the recipe, the final losses and the build time.
    """
    from rufus.models.tiny import make_tiny_model, train_tokenizer
    from rufus.trainers.sft import train_sft

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; remove it or choose another path")
    t0 = time.perf_counter()
    rows = make_corpus(corpus_size, seed, "mixed")
    held_out = make_corpus(max(16, min(256, corpus_size // 10)), seed + 10_000, "mixed")
    tokenizer = train_tokenizer(pretraining_text(rows), vocab_size=vocab_size)
    model = make_tiny_model(
        tokenizer,
        arch="llama",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max(256, max_length),
        seed=seed,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rufus-base-") as work:
        work = Path(work)
        model.save_pretrained(work / "init")
        tokenizer.save_pretrained(work / "init")
        for name, data in (("train", rows), ("eval", held_out)):
            with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in data:
                    f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
        result = train_sft(
            {
                "model": str(work / "init"),
                "output_dir": str(work / "run"),
                "seed": seed,
                "dtype": dtype,
                "lr": lr,
                "batch_size": batch_size,
                "max_steps": steps,
                "warmup_steps": max(1, steps // 20),
                "scheduler": "cosine",
                "log_every": max(1, steps // 10),
                "eval_every": 0,
                "save_every": 0,
                "progress": progress,
                "data": {
                    "train": str(work / "train.jsonl"),
                    "eval": str(work / "eval.jsonl"),
                    "max_length": max_length,
                    "truncation": "truncate",
                    "completion_only_loss": False,
                },
            }
        )
        last = {k: v for row in result.metrics for k, v in row.items()}
        info = {
            "version": BASE_VERSION,
            "seed": seed,
            "corpus_size": corpus_size,
            "steps": steps,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "vocab_size": len(tokenizer),
            "dtype": dtype,
            "train_loss": last.get("loss"),
            "eval_loss": last.get("eval/loss"),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result.final_dir, tmp)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    try:
        if path.exists():
            path.rmdir()  # empty (checked above); a non-empty one means another process won the race
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built playground base model in %s: %s", path, info)
    return path


def base_model_path(*, seed: int = 0) -> Path:
    """The cached playground base model (``builtin:playground-base``), built on first use."""
    path = playground_base_dir(seed)
    if (path / "config.json").exists():
        return path
    log.info("building the playground base model (once, about 2-3 minutes on a laptop CPU) into %s", path)
    return build_base_model(path, seed=seed)


def make_sft_demos(n: int, seed: int) -> list[dict[str, str]]:
    """`n` demonstrations {"prompt", "completion"} of middling quality (the SFT stage's data)."""
    return [{"prompt": row["prompt"], "completion": row["completion"]} for row in make_corpus(n, seed, "middling")]


def make_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """`n` prompt-only rows {"prompt"} for RL and evaluation; use a different `seed` for held-out prompts."""
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": make_prompt(rng)["prompt"]} for _ in range(n)]
