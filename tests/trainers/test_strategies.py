"""Sharded strategies give the single-process update: two CPU processes (one gloo group on 127.0.0.1) under
`strategy=fsdp|zero1|zero2|zero3` end with the weights of one process on the same global batch and
seed; the sharded checkpoints resume to the same weights; `final/` loads with `from_pretrained`."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rufus.report.metrics import read_metrics
from tests import published
from tests.helpers import run_cli, sft_rows, write_jsonl

TOLERANCE = 1e-5  # float32 on CPU: the runs sum the same gradients in another order (seen: up to 1e-6)
SHARDED = ["fsdp", "zero2", "zero3"]


def needs(strategy: str) -> None:
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the ZeRO strategies need the deepspeed extra")


def run(command: str, args: list[str], nproc: int, cwd) -> None:
    run_cli(command, args, nproc, cwd)


def rl_args(tmp_path, model, *, reward: str | None = None, batch_size: int = 8, max_steps: int = 3) -> list[str]:
    """The RL runs' shared settings: 16 arithmetic prompts, 6 new tokens, the digit-share reward function
    (or `reward`, another reward.* override)."""
    from tests.helpers import arithmetic_prompts

    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(16))
    helpers = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "helpers.py"))
    return [
        f"model={model}",
        f"data.train={prompts}",
        "data.max_length=64",
        reward or f"reward.function=[{helpers}:digit_fraction]",
        "generation.max_new_tokens=6",
        f"batch_size={batch_size}",
        f"max_steps={max_steps}",
        "lr=3e-3",
        "dtype=float32",
        "progress=false",
        "seed=3",
    ]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_weights(a, b, tolerance=TOLERANCE):
    assert sorted(a) == sorted(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < tolerance, worst


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_sft_matches_one_process_resumes_and_saves_a_loadable_model(strategy, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    needs(strategy)
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    held = write_jsonl(tmp_path / "eval.jsonl", sft_rows(5))  # 3 and 2 rows per process: uneven forwards
    common = [
        f"model={tiny_model}",
        f"data.train={train}",
        f"data.eval={held}",
        "data.max_length=48",
        "batch_size=8",
        "max_steps=6",
        "eval_every=3",
        "lr=3e-3",
        "dtype=float32",
        "progress=false",
        "seed=3",
    ]
    run("sft", common + [f"output_dir={tmp_path / 'one'}", "grad_accum=2"], 1, tmp_path)
    # activation checkpointing on the sharded side: recomputing the blocks must not change the update
    sharded = [f"output_dir={tmp_path / 'two'}", f"strategy={strategy}", "grad_accum=2", "gradient_checkpointing=true"]
    run("sft", common + sharded, 2, tmp_path)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert_same_weights(one, two)
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert (one["model.norm.weight"] - start["model.norm.weight"]).abs().max() > 1e-3  # it trained
    evals = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "eval/loss" in r]
    evals_one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["eval/loss"] for r in evals] == pytest.approx([r["eval/loss"] for r in evals_one], abs=1e-4)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert_same_weights({k: v for k, v in loaded.state_dict().items() if k in two}, two, 1e-7)

    # sharded checkpoints: stop after step 3 (drop the later ones), resume, same final weights
    resume = common + [f"output_dir={tmp_path / 'res'}", f"strategy={strategy}", "save_every=1", "save_total_limit=0"]
    run("sft", resume + ["grad_accum=2"], 2, tmp_path)
    for step in (4, 5, 6):
        shutil.rmtree(tmp_path / "res" / "checkpoints" / f"step-{step:07d}")
    shutil.rmtree(tmp_path / "res" / "final")
    run("sft", resume + ["grad_accum=2", "resume=true"], 2, tmp_path)
    assert_same_weights(weights(tmp_path / "res"), two, 1e-7)


@pytest.mark.multiprocess
@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_sharded_rm_and_dpo_match_one_process(command, tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "hh.jsonl", published.hh_rlhf(16))
    common = [
        f"model={tiny_model}",
        f"data.train={train}",
        f"data.eval={train}",
        "data.max_length=96",
        "batch_size=8",
        "max_steps=4",
        "lr=3e-3",
        "dtype=float32",
        "progress=false",
        "seed=3",
    ]
    run(command, common + [f"output_dir={tmp_path / 'one'}", "grad_accum=2"], 1, tmp_path)
    one = weights(tmp_path / "one")
    for strategy in SHARDED:
        needs(strategy)
        run(command, common + [f"output_dir={tmp_path / strategy}", f"strategy={strategy}"], 2, tmp_path)
        assert_same_weights(one, weights(tmp_path / strategy))


@pytest.mark.multiprocess
def test_sharded_ppo_matches_one_process(tmp_path, tiny_model):
    # greedy decoding: the rollouts do not depend on how sampling is seeded per process, so one and two
    # processes see the same responses and must make the same updates to actor and critic
    common = rl_args(tmp_path, tiny_model) + ["generation.temperature=0"]
    run("ppo", common + [f"output_dir={tmp_path / 'one'}"], 1, tmp_path)
    one = weights(tmp_path / "one")
    one_critic = load_file(tmp_path / "one" / "final_critic" / "model.safetensors")
    for strategy in SHARDED:
        needs(strategy)
        run("ppo", common + [f"output_dir={tmp_path / strategy}", f"strategy={strategy}"], 2, tmp_path)
        assert_same_weights(one, weights(tmp_path / strategy))
        assert_same_weights(one_critic, load_file(tmp_path / strategy / "final_critic" / "model.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_sharded_group_methods_match_ddp(command, tmp_path, tiny_model):
    # sampled responses (a group of greedy ones would all be equal and teach nothing): the same seeds
    # per process under both strategies give the same rollouts, so fsdp must make ddp's updates
    common = rl_args(tmp_path, tiny_model, batch_size=4) + [f"{command}.group_size=4"]
    run(command, common + [f"output_dir={tmp_path / 'ddp'}"], 2, tmp_path)
    ddp = weights(tmp_path / "ddp")
    start = load_file(tiny_model / "model.safetensors")
    assert max((ddp[k] - start[k]).abs().max().item() for k in start if k in ddp) > 1e-4  # it trained
    for strategy in ("fsdp", "zero3"):
        needs(strategy)
        run(command, common + [f"output_dir={tmp_path / strategy}", f"strategy={strategy}"], 2, tmp_path)
        assert_same_weights(ddp, weights(tmp_path / strategy))


@pytest.mark.multiprocess
def test_fsdp_ppo_resumes_to_the_uninterrupted_run(tmp_path, tiny_model):
    args = rl_args(tmp_path, tiny_model, max_steps=4) + ["strategy=fsdp", "save_every=1", "save_total_limit=0"]
    run("ppo", args + [f"output_dir={tmp_path / 'whole'}"], 2, tmp_path)
    run("ppo", args + [f"output_dir={tmp_path / 'cut'}"], 2, tmp_path)
    for step in (3, 4):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{step:07d}")
    shutil.rmtree(tmp_path / "cut" / "final")
    run("ppo", args + [f"output_dir={tmp_path / 'cut'}", "resume=true"], 2, tmp_path)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "cut"), 1e-7)
    whole = load_file(tmp_path / "whole" / "final_critic" / "model.safetensors")
    assert_same_weights(whole, load_file(tmp_path / "cut" / "final_critic" / "model.safetensors"), 1e-7)


@pytest.mark.multiprocess
def test_fsdp_frozen_models_sharded_or_replicated_score_alike(tmp_path, tiny_model):
    # the reference and the reward model sharded over the processes (shard_frozen=true) give the scores
    # and log-probabilities of full copies (false): the same PPO run either way
    pairs = write_jsonl(tmp_path / "pairs.jsonl", published.trl_implicit(8))
    run(
        "rm",
        [f"model={tiny_model}", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}", "max_steps=1"],
        1,
        tmp_path,
    )
    reward = f"reward.model=[{tmp_path / 'rm' / 'final'}]"
    common = rl_args(tmp_path, tiny_model, reward=reward, max_steps=2) + ["strategy=fsdp"]
    run("ppo", common + [f"output_dir={tmp_path / 'sharded'}", "shard_frozen=true"], 2, tmp_path)
    run("ppo", common + [f"output_dir={tmp_path / 'copies'}", "shard_frozen=false"], 2, tmp_path)
    assert_same_weights(weights(tmp_path / "sharded"), weights(tmp_path / "copies"))
    scores = [[r["score/mean"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("sharded", "copies")]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_bfloat16_saves_the_float32_masters(strategy, tmp_path, tiny_model):
    # bfloat16 compute, float32 masters: final/ must hold the masters (values a bfloat16 weight cannot
    # represent), not the bfloat16 copies the forward used
    needs(strategy)
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    args = [f"model={tiny_model}", f"data.train={train}", "data.max_length=48", "batch_size=8", "max_steps=3"]
    args += ["lr=3e-3", "dtype=bfloat16", "progress=false", f"strategy={strategy}", f"output_dir={tmp_path / 'out'}"]
    run("sft", args, 2, tmp_path)
    w = weights(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32
    assert not torch.equal(w, w.bfloat16().float())
