"""The training forward + backward pass alone, against the machine's bfloat16 peak.

    .venv/bin/python benchmarks/fwd_bwd.py [--model small] [--tokens 16x64] [--repeats 9]

Loads the benchmark model the way a Rufus bfloat16 run does (`load_causal_lm`: bfloat16 weights,
its attention choice) and times one forward + backward of the causal-LM loss over a batch, with and
without `compile=true` (`compile_blocks`). Matrix-product FLOPs are 6 N per token (N without
embeddings, `common.n_params`); the share is against `peak.json`'s bfloat16 peak. Prints one line
per mode and one RESULT line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import common  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(common.MODELS), default="small")
    p.add_argument("--tokens", default="16x64", help="batch x sequence length")
    p.add_argument("--repeats", type=int, default=9, help="timed passes (after 3 warm-up passes); the median counts")
    args = p.parse_args(argv)
    rows, length = (int(x) for x in args.tokens.split("x"))

    import torch

    from rufus.models.loading import compile_blocks, load_causal_lm

    common.prepare()
    peak_path = common.CACHE / "peak.json"
    peak = json.loads(peak_path.read_text())["bfloat16"] if peak_path.exists() else float("nan")
    flops = 6 * common.n_params(args.model) * rows * length
    out = {"model": args.model, "tokens": args.tokens, "peak_bf16_gflops": peak}
    for mode in ("eager", "compiled"):
        model = load_causal_lm(str(common.model_dir(args.model)), dtype=torch.bfloat16)
        model.train()
        if mode == "compiled":
            compile_blocks(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=g)

        def step(model=model, ids=ids):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        gflops = flops / median / 1e9
        out[mode] = {"seconds": round(median, 4), "gflops": round(gflops, 1), "share_of_peak": round(gflops / peak, 3)}
        print(
            f"{mode:9s} forward+backward {args.model} {args.tokens}: {median * 1e3:.0f} ms, {gflops:.0f} GFLOP/s, "
            f"{100 * gflops / peak:.1f}% of the bfloat16 peak ({peak:.0f})",
            flush=True,
        )
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
