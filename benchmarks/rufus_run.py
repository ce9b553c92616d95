"""One Rufus benchmark run: train `--steps` optimiser steps of one algorithm, print one RESULT line.

    .venv/bin/python benchmarks/rufus_run.py --algo ppo --model small --precision bf16 --steps 8 --warmup 2

The Rufus side of `benchmarks/vs_trl.py` (the peer side is `benchmarks/peers/trl_run.py`, same
command line). It calls Rufus's public trainer functions with the work per step of
`common.WORK` (the module docstring of `common.py` lists it) on the shared models and data.

Per-step times come from Rufus itself: every trainer writes a metrics row per logged step with
`time/step_s`, the wall time of that optimiser step (SFT, RM, DPO: batch collation, forward,
backward, clip and AdamW step; GRPO, PPO: everything from sampling to the last update, but not
the logging, sample writing and checkpointing after it). With log_every=1 each row is exactly one
step, so no wrapping is needed. What happens once per run outside the steps (loading, tokenising,
DPO's precomputed reference log-probs, the final checkpoint and model save, the plots) is not in
the step times; the whole call's wall time goes into `notes`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # the checkout's Rufus, installed or not

import common  # noqa: E402


def completion_length(prompts, completions, **kw):
    """GRPO's reward: the completion's length in characters (cheap, and it varies within a group)."""
    return [float(len(c)) for c in completions]


def build_config(algo: str, model_dir: str, dtype: str, steps: int, out: str, ref_per_step: bool) -> dict:
    w = common.WORK[algo]
    base = dict(
        model=model_dir,
        dtype=dtype,
        output_dir=out,
        overwrite=True,
        seed=0,
        max_steps=steps,
        grad_accum=1,
        log_every=1,
        eval_every=0,
        save_every=0,
        progress=False,
    )
    # 16 + 48 tokens (+ special tokens) per sequence; truncation="reject" (the default) would stop
    # the run if anything were longer, so nothing is ever truncated
    data = dict(max_length=256)
    if algo == "sft":
        return dict(base, batch_size=w["sequences"], data=dict(data, train=str(common.data_path("sft"))))
    if algo == "rm":
        # rm.normalize off: after training it would score every chosen response once more to store a
        # gain and bias (outside the step times, but minutes of wall time on small; TRL does no such pass)
        return dict(
            base, batch_size=w["pairs"], data=dict(data, train=str(common.data_path("pref"))), rm=dict(normalize=False)
        )
    if algo == "dpo":
        # dpo.precompute_ref=true is Rufus's default: the reference scores the whole data set once
        # before the first step, so the steps themselves hold no reference forward pass
        return dict(
            base,
            batch_size=w["pairs"],
            data=dict(data, train=str(common.data_path("pref"))),
            dpo=dict(beta=w["beta"], loss_type="sigmoid", precompute_ref=not ref_per_step),
        )
    generation = dict(max_new_tokens=w["new_tokens"], stop_at_eos=False, temperature=1.0, top_k=0, top_p=1.0)
    online = dict(base, data=dict(data, train=str(common.data_path("prompts"))), generation=generation, sample_every=0)
    if algo == "grpo":
        return dict(
            online,
            batch_size=w["prompts"],
            grpo=dict(group_size=w["samples"], epochs=1, minibatches=1),
            kl=dict(coef=w["beta"]),
        )
    if algo == "ppo":
        # a separate critic and a reward model, both started from the policy's own directory: a causal
        # LM directory loads as AutoModelForSequenceClassification(num_labels=1) with a new head (the
        # critic's zeroed, the reward model's random), so no sequence-classification copy is needed
        return dict(
            online,
            batch_size=w["prompts"],
            ppo=dict(epochs=w["epochs"], minibatches=w["minibatches"]),
            critic=dict(model=model_dir, shared=False),
            reward=dict(model=[model_dir]),
        )
    raise ValueError(algo)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=common.ALGOS, required=True)
    p.add_argument("--model", choices=sorted(common.MODELS), required=True)
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    p.add_argument("--steps", type=int, default=8, help="optimiser steps in all, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--compile", action="store_true", help="compile=true: torch.compile each transformer block")
    p.add_argument(
        "--ref-per-step",
        action="store_true",
        help="dpo: reference log-probs in every step (dpo.precompute_ref=false) instead of once up front",
    )
    args = p.parse_args(argv)

    import torch

    import rufus
    from rufus.trainers import dpo, grpo, ppo, reward, sft

    model_dir = str(common.model_dir(args.model))
    if not (Path(model_dir) / "config.json").exists():
        sys.exit(f"{model_dir} missing: run `.venv/bin/python benchmarks/common.py prepare` first")
    dtype = {"float32": "float32", "bf16": "bfloat16"}[args.precision]
    # A causal LM as reward model is what this benchmark wants (only the cost matters), so Rufus's
    # "random head" warning is expected here.
    warnings.filterwarnings("ignore", message=r"reward model .* is a causal LM")

    with tempfile.TemporaryDirectory(prefix=f"rufus-bench-{args.algo}-") as out:
        cfg = build_config(args.algo, model_dir, dtype, args.steps, out, args.ref_per_step)
        cfg["compile"] = args.compile
        t0 = time.perf_counter()
        if args.algo == "sft":
            result = sft.train_sft(cfg)
        elif args.algo == "rm":
            result = reward.train_reward_model(cfg)
        elif args.algo == "dpo":
            result = dpo.train_dpo(cfg)
        elif args.algo == "grpo":
            result = grpo.train_grpo(cfg, reward_fn=completion_length)
        else:
            result = ppo.train_ppo(cfg)
        total = time.perf_counter() - t0

    rows = sorted((r for r in result.metrics if "time/step_s" in r), key=lambda r: r["step"])
    if [r["step"] for r in rows] != list(range(1, args.steps + 1)):
        raise RuntimeError(f"expected one metrics row per step 1..{args.steps}, got steps {[r['step'] for r in rows]}")
    step_seconds = [float(r["time/step_s"]) for r in rows]
    notes = [f"threads={torch.get_num_threads()}", f"whole call {total:.1f}s (loading, final save included)"]
    if args.algo == "dpo":
        notes.append(
            "reference log-probs per step"
            if args.ref_per_step
            else "reference log-probs precomputed once before step 1 (dpo.precompute_ref, Rufus default)"
        )
    if args.algo in ("grpo", "ppo"):
        lengths = [r.get("response/length") for r in rows]
        notes.append(f"response/length {min(lengths):.0f}-{max(lengths):.0f}")
    if args.algo == "ppo":
        notes.append("critic and reward model from the policy dir (new heads)")
    if args.compile:
        notes.append("compile=true (compiling happens in the first steps)")
    row = common.result_row(
        impl="rufus",
        version=rufus.__version__,
        algo=args.algo,
        model=args.model,
        precision=args.precision + ("+compile" if args.compile else ""),
        dtype_used="bfloat16" if dtype == "bfloat16" else "float32",
        step_seconds=step_seconds,
        warmup=args.warmup,
        notes="; ".join(notes),
    )
    common.print_row(row)
    return row


if __name__ == "__main__":
    main()
