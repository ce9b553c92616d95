"""The peer side of the side-by-side benchmark: one Hugging Face TRL run, one `RESULT {json}` line.

    benchmarks/.venvs/trl1/bin/python   benchmarks/peers/trl_run.py --algo dpo --model small --precision bf16
    benchmarks/.venvs/trl029/bin/python benchmarks/peers/trl_run.py --algo ppo --model tiny --precision float32

sft, rm, dpo and grpo need TRL 1.x (venv trl1); ppo needs trl 0.29.x (venv trl029), whose
`trl.experimental.ppo.PPOTrainer` is the actor-critic PPO that TRL 1.x dropped. Both venvs are
made by benchmarks/peers/setup_trl.sh. The work per optimiser step is common.WORK; how each
setting maps to TRL arguments is in benchmarks/peers/README.md.

Timing: a TrainerCallback takes time.perf_counter() at every on_step_end; a step's time is the
interval since the previous step ended (the first step's since its on_step_begin, or for PPO,
whose trainer calls no on_step_begin, since on_train_begin). The interval holds everything the
trainer does for that optimiser step: fetching the batch, generation, scoring, forward, backward,
optimiser, TRL's own per-step metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ -> common
import common  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", choices=common.ALGOS, required=True)
    p.add_argument("--model", choices=tuple(common.MODELS), required=True)
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps to run and time")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    return p.parse_args()


def read_jsonl(kind: str) -> list[dict]:
    return [json.loads(line) for line in common.data_path(kind).read_text().splitlines() if line.strip()]


def make_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds per optimiser step, from one on_step_end to the next."""

        def __init__(self):
            self.last = None
            self.seconds: list[float] = []
            self.trainer = None  # set after the trainer is built, to read GRPO's completion lengths
            self.lengths: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.seconds:  # first step: start at its beginning, not at trainer set-up
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            metrics = getattr(self.trainer, "_metrics", None)
            if isinstance(metrics, dict) and metrics.get("train", {}).get("completions/min_length"):
                self.lengths += [
                    metrics["train"]["completions/min_length"][-1],
                    metrics["train"]["completions/max_length"][-1],
                ]
            self.last = time.perf_counter()  # the bookkeeping above is not counted

    return StepTimer()


def common_args(a: argparse.Namespace, out: str, bf16: bool) -> dict:
    """TrainingArguments shared by every trainer: no eval, no saving, no logging, no checkpointing."""
    return dict(
        output_dir=out,
        max_steps=a.steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        bf16=bf16,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL 1.x defaults this to True
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=a.seed,
        torch_compile=a.compile,
    )


def load_causal(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_scalar(path):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)


def build_sft(a, out, bf16, tok, path, timer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = SFTConfig(
        **common_args(a, out, bf16), completion_only_loss=True, packing=False, padding_free=False, max_length=None
    )
    return SFTTrainer(
        model=load_causal(path),
        args=cfg,
        train_dataset=Dataset.from_list(read_jsonl("sft")),
        processing_class=tok,
        callbacks=[timer],
    )


def build_rm(a, out, bf16, tok, path, timer):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = RewardConfig(**common_args(a, out, bf16), max_length=None, center_rewards_coefficient=None)
    return RewardTrainer(
        model=load_scalar(path),
        args=cfg,
        train_dataset=Dataset.from_list(read_jsonl("pref")),
        processing_class=tok,
        callbacks=[timer],
    )


def build_dpo(a, out, bf16, tok, path, timer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    w = common.WORK["dpo"]
    cfg = DPOConfig(
        **common_args(a, out, bf16),
        beta=w["beta"],
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=False,
    )
    return DPOTrainer(
        model=load_causal(path),
        ref_model=None,
        args=cfg,
        train_dataset=Dataset.from_list(read_jsonl("pref")),
        processing_class=tok,
        callbacks=[timer],
    )


def completion_length_reward(completions, **kwargs) -> list[float]:
    """A cheap Python reward (no model): the completion's length in characters."""
    return [float(len(c)) for c in completions]


def build_grpo(a, out, bf16, tok, path, timer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    w = common.WORK["grpo"]
    args = common_args(a, out, bf16)
    args["per_device_train_batch_size"] = w["prompts"] * w["samples"]  # 16 completions = 2 prompts x 8
    cfg = GRPOConfig(
        **args,
        num_generations=w["samples"],
        generation_batch_size=w["prompts"] * w["samples"],  # -> steps_per_generation 1: one update per batch
        num_iterations=1,
        max_completion_length=w["new_tokens"],
        generation_kwargs={"min_new_tokens": w["new_tokens"]},  # EOS cannot end a completion early
        beta=w["beta"],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        use_vllm=False,
        log_completions=False,
    )
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in read_jsonl("prompts")])
    return GRPOTrainer(
        model=load_causal(path),
        reward_funcs=completion_length_reward,
        args=cfg,
        train_dataset=prompts,
        processing_class=tok,
        callbacks=[timer],
    )


def build_ppo(a, out, bf16, tok, path, timer):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    w = common.WORK["ppo"]
    tok.padding_side = "left"  # PPOTrainer expects left-padded queries
    args = common_args(a, out, bf16)
    args["per_device_train_batch_size"] = w["prompts"]
    cfg = PPOConfig(
        **args,
        total_episodes=a.steps * w["prompts"],  # -> exactly `steps` PPO updates
        num_ppo_epochs=w["epochs"],
        num_mini_batches=w["minibatches"],
        local_rollout_forward_batch_size=w["prompts"],
        response_length=w["new_tokens"],
        stop_token=None,  # no stop token: the policy's generation_config.eos_token_id becomes None,
        stop_token_id=None,  # so every response is exactly response_length tokens
        missing_eos_penalty=None,
        num_sample_generations=0,
        temperature=1.0,
    )
    ids = [tok(r["prompt"])["input_ids"] for r in read_jsonl("prompts")]
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    return PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=load_causal(path),
        ref_model=load_causal(path),
        reward_model=load_scalar(path),
        value_model=load_scalar(path),
        train_dataset=dataset,
        eval_dataset=None,
        callbacks=[timer],
    )


BUILDERS = {"sft": build_sft, "rm": build_rm, "dpo": build_dpo, "grpo": build_grpo, "ppo": build_ppo}


def main() -> None:
    a = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bf16 = a.precision == "bf16"
    notes = []
    if a.algo == "ppo" and bf16:
        # trl 0.29's PPOTrainer builds its own Accelerator() that ignores args.bf16; the accelerate way
        # (`accelerate launch --mixed_precision bf16`) is this variable, read by that Accelerator.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        notes.append(
            "bf16 via ACCELERATE_MIXED_PRECISION: autocast covers the PPO update forward only; "
            "generation and ref/value/reward scoring run float32"
        )

    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    torch.manual_seed(a.seed)
    path = str(common.model_dir(a.model))
    tok = AutoTokenizer.from_pretrained(path)
    timer = make_timer()
    with tempfile.TemporaryDirectory(prefix="trl_run_") as out:
        trainer = BUILDERS[a.algo](a, out, bf16, tok, path, timer)
        timer.trainer = trainer
        if bf16 and trainer.accelerator.mixed_precision != "bf16":
            notes.append(f"trainer refused bf16 (mixed_precision={trainer.accelerator.mixed_precision})")
        trainer.train()
    if timer.lengths:  # GRPO: shortest and longest completion over all steps (64 and 64: no early stop)
        notes.append(f"completion lengths {min(timer.lengths):.0f}-{max(timer.lengths):.0f} tokens")
    if len(timer.seconds) != a.steps:
        notes.append(f"timed {len(timer.seconds)} steps, asked for {a.steps}")
    used = "bf16-autocast" if bf16 and not any("refused" in n for n in notes) else "float32"
    notes.append(f"transformers {transformers.__version__}, torch {torch.__version__}, optim {trainer.args.optim}")
    if a.compile:
        notes.append("torch_compile=True")
    row = common.result_row(
        impl="trl",
        version=trl.__version__,
        algo=a.algo,
        model=a.model,
        precision=a.precision + ("+compile" if a.compile else ""),
        dtype_used=used,
        step_seconds=timer.seconds,
        warmup=a.warmup,
        notes="; ".join(notes),
    )
    common.print_row(row)


if __name__ == "__main__":
    main()
