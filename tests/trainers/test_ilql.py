"""ILQL trainer: the beta-perturbed policy finds the best logged response, saved heads load back,
rows of every kind become rewards, resume is exact."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rufus.config import ConfigError
from rufus.report.metrics import read_metrics
from rufus.trainers.ilql import train_ilql
from tests.helpers import preference_rows, ranking_rows, write_jsonl


def offline_rows(n_prompts: int = 8) -> list[dict]:
    """The tiny offline task: for every prompt the log holds " no ." three times (reward 0) and
    " yes ." once (reward 1). The data's language model says "no" three times in four; the best
    response in the data is "yes"."""
    rows = []
    for i in range(n_prompts):
        p = f"what is {i} ?"
        rows += [{"prompt": p, "completion": " no .", "score": 0.0}] * 3
        rows += [{"prompt": p, "completion": " yes .", "score": 1.0}]
    return rows


def says_yes(prompts, completions, **kw):
    return [1.0 if c.strip().startswith("yes") else 0.0 for c in completions]


def ilql_config(model, train, out, **over):
    cfg = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"train": str(train), "max_length": 32},
        "batch_size": 16,
        "lr": 3e-3,
        "max_steps": 60,
        "dtype": "float32",
        "progress": False,
        "log_every": 10,
        "save_every": 0,
        "ilql": {"polyak": 0.1, "gamma": 1.0},
    }
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[key] = v
    return cfg


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ilql")
    train = write_jsonl(d / "train.jsonl", offline_rows())
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"what is {i} ?"} for i in range(8)])
    return train_ilql(ilql_config(tiny_model, train, d / "run", max_steps=150)), prompts


def test_the_perturbed_policy_prefers_the_best_logged_response_where_the_language_model_does_not(trained, tmp_path):
    from rufus.evaluate import evaluate
    from rufus.generate import generate

    result, prompts = trained
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert rows[0]["data/responses"] == 32 and rows[0]["data/reward_mean"] == pytest.approx(0.25)
    first, last = rows[1], rows[-1]
    for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/lm", "q/mean", "v/mean", "advantage/mean", "lr"):
        assert math.isfinite(last[key]), key
    assert last["loss"] < first["loss"] and last["loss/lm"] < first["loss/lm"]
    # the language model learnt the log: "no" three times in four (greedy: "no"); beta = 8 tilts it
    # by exp(8 (Q - V)) toward the token whose return is higher: "yes", for every prompt
    gen = {"temperature": 0.0, "max_new_tokens": 6}
    base = generate({"model": str(result.final_dir), "prompts": str(prompts), "generation": gen, "ilql_beta": 0.0})
    tilted = generate({"model": str(result.final_dir), "prompts": str(prompts), "generation": gen, "ilql_beta": 8.0})
    assert [r["response"].split()[0] for r in base["generations"]] == ["no"] * 8
    assert [r["response"].split()[0] for r in tilted["generations"]] == ["yes"] * 8
    # rufus eval scores several betas in one evaluation; the first is the headline
    got = evaluate(
        {
            "model": str(result.final_dir),
            "prompts": str(prompts),
            "baseline": str(result.final_dir),
            "generation": {"temperature": 1.0, "max_new_tokens": 6},
            "ilql_beta": [0.0, 8.0],
            "progress": False,
        },
        reward_fn=says_yes,
    )
    assert got["ilql/beta"] == 0.0 and got["score"] == got["ilql/beta_0/score"]
    assert got["ilql/beta_0/score"] <= 0.5 < 0.9 <= got["ilql/beta_8/score"]
    # the KL is that of the decoded policy to the plain language model: 0 at beta 0 only
    assert abs(got["ilql/beta_0/kl"]) < 1e-4 < got["ilql/beta_8/kl"]


def test_final_holds_a_plain_language_model_and_the_heads(trained):
    from rufus.models.ilql import ILQLPolicy, load_ilql, load_ilql_policy

    result, _ = trained
    lm = AutoModelForCausalLM.from_pretrained(result.final_dir)
    state = lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.model.policy.state_dict().items() if k in state)
    back = load_ilql(result.final_dir)
    for k, v in result.model.heads.state_dict().items():
        assert torch.equal(back.heads.state_dict()[k], v), k
    policy = load_ilql_policy(result.final_dir)
    assert isinstance(policy, ILQLPolicy) and policy.beta == 4.0  # ilql.beta's default, saved with it
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        policy.beta = 0.0
        plain = torch.log_softmax(lm(input_ids=ids).logits.float(), -1)
        assert torch.allclose(policy(ids, torch.ones_like(ids)).logits, plain, atol=1e-5)


@pytest.mark.parametrize("kind", ["preference", "ranking", "reward_fn"])
def test_pairs_rankings_and_reward_functions_give_the_rewards(tiny_model, tmp_path, kind):
    rows = preference_rows(8, seed=1) if kind != "ranking" else ranking_rows(4, k=3, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    over = {"max_steps": 2, "log_every": 1, "ilql.normalize_rewards": False}
    kw = {"reward_fn": say_length} if kind == "reward_fn" else {}
    result = train_ilql(ilql_config(tiny_model, train, tmp_path / "run", **over), **kw)
    stats = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    if kind == "preference":  # chosen 1, rejected 0
        assert stats["data/responses"] == 16 and stats["data/reward_mean"] == pytest.approx(0.5)
    elif kind == "ranking":  # each response with its score: K-1 ... 0 from the order
        assert stats["data/responses"] == 12 and stats["data/reward_mean"] == pytest.approx(1.0)
    else:  # every response scored by the function instead
        want = [len(r[side]) for r in rows for side in ("chosen", "rejected")]
        assert stats["data/reward_mean"] == pytest.approx(sum(want) / len(want))
    assert result.steps == 2


def say_length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def test_resume_reproduces_the_uninterrupted_run_target_heads_included(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", offline_rows(4))
    over = {"max_steps": 4, "log_every": 1, "save_every": 2, "batch_size": 8}
    whole = train_ilql(ilql_config(tiny_model, train, tmp_path / "whole", **over))
    train_ilql(ilql_config(tiny_model, train, tmp_path / "part", **over))
    # as if stopped after step 2's checkpoint: the run resumes there
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train_ilql(ilql_config(tiny_model, train, tmp_path / "part", **over, resume=True))
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert any("target_q_heads" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    rows = {r["step"]: r for r in read_metrics(tmp_path / "part" / "metrics.jsonl")}
    want = {r["step"]: r for r in whole.metrics}
    assert rows[4]["loss"] == pytest.approx(want[4]["loss"], rel=1e-5)


def test_refusals(tiny_model, tmp_path):
    from rufus.generate import generate

    train = write_jsonl(tmp_path / "train.jsonl", offline_rows(2))
    with pytest.raises(ConfigError, match="strategy"):
        train_ilql(ilql_config(tiny_model, train, tmp_path / "run", strategy="fsdp"))
    with pytest.raises(ConfigError, match="ilql_beta"):
        generate({"model": str(tiny_model), "prompt": "what is 1 ?", "ilql_beta": 1.0})


@pytest.mark.multiprocess
def test_two_processes_make_the_single_process_update(tiny_model, tmp_path):
    import os

    from safetensors.torch import load_file

    from tests.helpers import run_cli

    rows = offline_rows(4) + [{"prompt": f"what is {i} ?", "completion": f" {i} .", "score": 0.0} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    helpers = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "helpers.py"))
    args = [
        f"reward.function=[{helpers}:digit_fraction]",  # each process scores its share of the rows
        f"model={tiny_model}",
        f"data.train={train}",
        f"data.eval={train}",
        "data.max_length=32",
        "batch_size=8",
        "max_steps=3",
        "eval_every=3",
        "lr=3e-3",
        "dtype=float32",
        "progress=false",
        "ilql.polyak=0.5",
    ]
    run_cli("ilql", args + [f"output_dir={tmp_path / 'one'}", "grad_accum=2"], 1, tmp_path)
    run_cli("ilql", args + [f"output_dir={tmp_path / 'two'}"], 2, tmp_path)
    for name in ("model.safetensors", "ilql_heads.safetensors"):
        a, b = (load_file(tmp_path / run / "final" / name) for run in ("one", "two"))
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, (name, worst)
    one, two = (read_metrics(tmp_path / run / "metrics.jsonl")[-1] for run in ("one", "two"))
    for key in ("loss", "loss/q", "q/mean", "eval/loss", "eval/advantage/mean"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
