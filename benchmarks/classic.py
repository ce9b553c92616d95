"""The classic agents at their showcase settings: the figures each one must reach.

    .venv/bin/python benchmarks/classic.py [--only ppo,dqn,q_learning,td3,cliff] [--seed 0]

Each agent runs with its defaults (no extra flags) on its showcase environment; the script prints
one line per check with the figure, the threshold and the wall time, then a RESULT json line.
  ppo         CartPole-v1    mean return of the last 20 episodes >= 475 within 500k steps
  dqn         CartPole-v1    mean return of the last 20 episodes >= 400
  q_learning  FrozenLake-v1  (4x4, slippery) greedy success rate >= 0.70
  td3         Pendulum-v1    mean return of the last 20 episodes >= -250
  cliff       CliffWalking-v1, epsilon 0.1: SARSA's greedy path keeps off the cliff edge, Q-learning's
              runs along it (Sutton & Barto, Example 6.6)
Runs take minutes each on 2 CPU cores (PPO the longest); outputs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

CHECKS = ("ppo", "dqn", "q_learning", "td3", "cliff")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(CHECKS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    bad = [c for c in only if c not in CHECKS]
    if bad:
        p.error(f"--only: unknown {', '.join(bad)} (choose from {', '.join(CHECKS)})")

    from rufus.classic import train

    out = {}
    with tempfile.TemporaryDirectory(prefix="rufus-classic-") as tmp:

        def run(algo, **over):
            t0 = time.perf_counter()
            result = train(
                algo,
                {"seed": args.seed, "progress": False, "output_dir": str(Path(tmp) / f"{algo}-{len(out)}"), **over},
            )
            return result, time.perf_counter() - t0

        for check in only:
            if check in ("ppo", "dqn", "td3"):
                result, wall = run(check)
                value = result.mean_return(20)
                threshold = {"ppo": 475.0, "dqn": 400.0, "td3": -250.0}[check]
                steps = result.episodes[-1][0] if result.episodes else 0
                out[check] = {
                    "env": result.env,
                    "mean_return_last20": value,
                    "threshold": threshold,
                    "passed": value >= threshold,
                    "steps": steps,
                    "seconds": round(wall, 1),
                    **{k: v for k, v in result.extra.items() if isinstance(v, (int, float))},
                }
                print(
                    f"{check:10s} {result.env:14s} mean return (last 20) {value:8.1f}  threshold {threshold:6.0f}  "
                    f"{'PASS' if value >= threshold else 'FAIL'}  {steps} steps, {wall:.0f}s",
                    flush=True,
                )
            elif check == "q_learning":
                result, wall = run("q_learning")
                rate = result.extra["greedy_success_rate"]
                out[check] = {
                    "env": result.env,
                    "greedy_success_rate": rate,
                    "threshold": 0.70,
                    "passed": rate >= 0.70,
                    "seconds": round(wall, 1),
                }
                print(
                    f"{check:10s} {result.env:14s} greedy success rate {rate:.3f}  threshold 0.70  "
                    f"{'PASS' if rate >= 0.70 else 'FAIL'}  {wall:.0f}s",
                    flush=True,
                )
            else:
                summaries = {}
                for algo in ("sarsa", "q_learning"):
                    result, wall = run(algo, **CLIFF)
                    edge = result.extra["cliff_edge_cells"]  # path cells right beside the cliff (row 2)
                    summaries[algo] = {
                        "length": result.extra["greedy_path_length"],
                        "cliff_edge_cells": edge,
                        "safe": edge == 0,
                        "along_cliff": edge == 10,
                        "online_return_last200": result.mean_return(200),
                        "seconds": round(wall, 1),
                    }
                passed = summaries["sarsa"]["safe"] and summaries["q_learning"]["along_cliff"]
                out[check] = {**summaries, "passed": passed}
                print(
                    f"cliff      CliffWalking-v1 sarsa path {summaries['sarsa']['length']} steps "
                    f"(safe: {summaries['sarsa']['safe']}), q_learning path {summaries['q_learning']['length']} "
                    f"steps (along the cliff: {summaries['q_learning']['along_cliff']})  "
                    f"{'PASS' if passed else 'FAIL'}",
                    flush=True,
                )
    print("RESULT " + json.dumps(out))
    return out


# Sutton & Barto, Example 6.6: constant epsilon 0.1, undiscounted
CLIFF = dict(
    env="CliffWalking-v1", total_steps=30_000, alpha=0.2, gamma=1.0, epsilon_start=0.1, epsilon_end=0.1, eval_episodes=1
)


if __name__ == "__main__":
    main()
