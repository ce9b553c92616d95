"""DPO trainer: log 2 at the start, learns a synthetic taste, variants, reference handling, rounds, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rufus.data.errors import DataError
from rufus.report.metrics import read_metrics
from rufus.trainers.dpo import train_dpo
from tests.helpers import preference_rows, write_jsonl


def completion_length(prompts, completions, **kw):
    """Programmatic reward with few ties: the number of characters in the completion."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    return write_jsonl(d / "train.jsonl", preference_rows(64, seed=1)), write_jsonl(
        d / "eval.jsonl", preference_rows(64, seed=2)
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("small") / "train.jsonl", preference_rows(32, seed=3))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"what is {i} plus {i + 2} ?"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def dpo_config(tiny_model, train, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(train), "max_length": 48},
        "batch_size": 8,
        "lr": 3e-3,
        "max_steps": 4,
        "dtype": "float32",
        "progress": False,
        "log_every": 1,
        "generation": {"max_new_tokens": 8},
    }
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[key] = v
    return cfg


def test_pairs_label_only_the_response_and_sequence_logprobs_match_a_naive_loop(tiny_model, tmp_path):
    from rufus.data.dpo import PairCollator, tokenize_pairs
    from rufus.data.loading import load_records
    from rufus.data.sft import encode_prompt
    from rufus.models.loading import load_causal_lm, load_tokenizer
    from rufus.rollout.logprobs import sequence_logprobs

    tok = load_tokenizer(str(tiny_model))
    rows = preference_rows(3, seed=5)
    pairs = tokenize_pairs(
        load_records(write_jsonl(tmp_path / "three.jsonl", rows), kind="preference"), tok, max_length=48
    )
    for row, pair in zip(rows, pairs):
        prompt = encode_prompt(tok, row["prompt"])
        for side in ("chosen", "rejected"):
            ids, labels = pair[side]["input_ids"], pair[side]["labels"]
            assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {-100}  # the prompt is masked
            assert labels[len(prompt) :] == ids[len(prompt) :] and ids[-1] == tok.eos_token_id  # response + eos
    batch = PairCollator(tok.pad_token_id)(pairs)  # (6, T): 3 chosen rows, then 3 rejected rows
    assert batch["input_ids"].shape[0] == 6 and batch["labels"][3][0] == -100
    model = load_causal_lm(str(tiny_model), tokenizer=tok).eval()
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
        for n, pair in enumerate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]):
            ids = pair["input_ids"]  # one sequence alone, no padding
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
            first = sum(1 for x in pair["labels"] if x == -100)  # the prompt's length
            want = sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))  # response tokens only
            assert got[n].item() == pytest.approx(want, abs=1e-4), n


def test_starts_at_log2_and_learns_the_held_out_preference(tiny_model, prefs, tmp_path):
    train, held_out = prefs
    result = train_dpo(
        dpo_config(tiny_model, train, tmp_path / "run", max_steps=6, eval_every=3, **{"data.eval": str(held_out)})
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # pi == pi_ref at step 1 (dropout off), so h = 0 and the loss is -log sigmoid(0) = log 2
    assert abs(rows[0]["dpo/loss"] - math.log(2)) < 1e-4, rows[0]
    assert abs(rows[0]["rewards/margin"]) < 1e-4
    for key in (
        "dpo/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "time/step_s",
        "dpo/round",
    ):
        assert key in rows[-1], key
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"eval/dpo/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margin"} <= set(evals[-1])
    # the acceptance bar: the implicit reward beta log pi/pi_ref ranks held-out pairs as people did
    assert result.eval["eval/rewards/accuracy"] > 0.9, result.eval
    assert evals[-1]["eval/dpo/loss"] < evals[0]["eval/dpo/loss"] < math.log(2)
    assert (tmp_path / "run" / "config.yaml").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in result.policy.state_dict().items() if k in reloaded)


def test_precomputed_and_on_the_fly_reference_and_grad_accum_give_the_same_losses(tiny_model, small, tmp_path):
    # reference log-probs computed once up front vs in every micro-batch, and one batch of 8 pairs vs
    # 4 accumulated micro-batches of 2: the loss is divided by the optimiser batch's pair count either way
    runs = {"precomputed": {}, "on_the_fly_accumulated": {"dpo.precompute_ref": False, "grad_accum": 4}}
    losses = {}
    for name, over in runs.items():
        train_dpo(dpo_config(tiny_model, small, tmp_path / name, max_steps=3, **over))
        losses[name] = [r["dpo/loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert len(losses["precomputed"]) == 3 and losses["precomputed"][-1] < losses["precomputed"][0]
    assert losses["on_the_fly_accumulated"] == pytest.approx(losses["precomputed"], abs=1e-5)


@pytest.mark.parametrize(
    "variant",
    [{"dpo.loss_type": "ipo"}, {"dpo.loss_type": "hinge"}, {"dpo.label_smoothing": 0.1}],
    ids=["ipo", "hinge", "cdpo"],
)
def test_variants_reduce_their_loss(tiny_model, small, tmp_path, variant):
    train_dpo(dpo_config(tiny_model, small, tmp_path / "run", max_steps=3, **variant))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # at h = 0: ipo (0 - 1/(2 beta))^2 = 25, hinge max(0, 1 - 0) = 1, cDPO -(1-e+e) log sigmoid(0) = log 2
    start = {"ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0}.get(variant.get("dpo.loss_type"), math.log(2))
    assert rows[0]["dpo/loss"] == pytest.approx(start, abs=1e-3)
    assert rows[-1]["dpo/loss"] < 0.9 * rows[0]["dpo/loss"], [r["dpo/loss"] for r in rows]


def test_lora_reference_is_the_adapter_disabled_base(tiny_model, small, tmp_path):
    result = train_dpo(
        dpo_config(
            tiny_model,
            small,
            tmp_path / "lora",
            max_steps=3,
            lr=1e-2,
            **{"lora.r": 4, "lora.alpha": 8, "dpo.precompute_ref": False},
        )
    )
    assert result.reference is None  # no second model: the base with adapters off is pi_ref
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for name, p in result.policy.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p.detach(), base[key]), name
    rows = read_metrics(tmp_path / "lora" / "metrics.jsonl")
    assert abs(rows[0]["dpo/loss"] - math.log(2)) < 1e-4  # adapters start at zero: pi == pi_ref
    assert rows[-1]["dpo/loss"] < rows[0]["dpo/loss"]
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed  # the adapters were merged into the saved weights


def test_online_rounds_train_on_pairs_sampled_from_the_policy(tiny_model, prompts, tmp_path):
    # a prompt-only file: every round is online, round 1 included
    result = train_dpo(
        dpo_config(
            tiny_model, prompts, tmp_path / "online", max_steps=2, **{"dpo.rounds": 2, "dpo.prompts_per_round": 12}
        ),
        reward_fn=completion_length,
    )
    rows = read_metrics(tmp_path / "online" / "metrics.jsonl")
    assert [r["dpo/round"] for r in rows] == [1, 1, 2, 2]
    for first in (rows[0], rows[2]):  # each round's sampling statistics are logged with its first row
        assert 0 < first["online/pairs"] <= 12 and first["online/pairs"] + first["online/ties"] == 12
        assert first["score/chosen"] > first["score/rejected"]
        assert "score/mean" in first and "response/length" in first
    pairs = [json.loads(x) for x in (tmp_path / "online" / "pairs.jsonl").read_text().splitlines()]
    by_round = {r: [p for p in pairs if p["round"] == r] for r in (1, 2)}
    assert len(by_round[2]) == rows[2]["online/pairs"] and len(by_round[1]) == rows[0]["online/pairs"]
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert all(p["score_chosen"] == len(p["chosen"]) and p["score_rejected"] == len(p["rejected"]) for p in pairs)
    # round 2 sampled from the policy round 1 trained, not from the reference: new responses
    assert {p["chosen"] for p in by_round[2]} != {p["chosen"] for p in by_round[1]}
    assert result.final_dir.exists() and result.steps == 4


def test_resume_reproduces_the_uninterrupted_run(tiny_model, small, tmp_path):
    # round 1 offline on the pairs, round 2 online; resume at the round boundary (the round's pairs
    # are sampled again, identically) and inside round 2 (its pairs come back from the checkpoint)
    train = small
    common = dict(max_steps=2, save_every=1, save_total_limit=0, **{"dpo.rounds": 2, "dpo.prompts_per_round": 8})
    straight = train_dpo(dpo_config(tiny_model, train, tmp_path / "straight", **common), reward_fn=completion_length)
    final = {k: v.clone() for k, v in straight.policy.state_dict().items()}
    assert read_metrics(tmp_path / "straight" / "metrics.jsonl")[2]["online/pairs"] > 0
    for cut_at in (2, 3):
        cut = tmp_path / f"cut{cut_at}"
        (cut / "checkpoints").mkdir(parents=True)
        name = f"step-{cut_at:07d}"
        shutil.copytree(tmp_path / "straight" / "checkpoints" / name, cut / "checkpoints" / name)
        for f in ("metrics.jsonl", "pairs.jsonl"):  # as an interrupted run leaves them (rows past the cut too)
            shutil.copy(tmp_path / "straight" / f, cut / f)
        resumed = train_dpo(dpo_config(tiny_model, train, cut, resume=True, **common), reward_fn=completion_length)
        assert all(torch.equal(v, final[k]) for k, v in resumed.policy.state_dict().items()), cut_at
        a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        assert [r["dpo/loss"] for r in b] == pytest.approx([r["dpo/loss"] for r in a], abs=1e-7)
        assert (cut / "pairs.jsonl").read_text() == (tmp_path / "straight" / "pairs.jsonl").read_text()


def test_bad_pairs_fail_before_training_naming_file_line_and_field(tiny_model, tmp_path):
    rows = preference_rows(4)
    del rows[2]["rejected"]
    bad = write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataError, match=r"missing\.jsonl, line 3.*rejected"):
        train_dpo(dpo_config(tiny_model, bad, tmp_path / "run"))
    rows = preference_rows(4)
    rows[1]["rejected"] = rows[1]["chosen"]
    same = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(DataError, match=r"same\.jsonl, line 2.*identical"):
        train_dpo(dpo_config(tiny_model, same, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- reference-free objectives: ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024) ----------------


def rule_rows(n: int, seed: int) -> list[dict]:
    """Pairs the start model ranks at chance: both sides are the same words, then "the dog" or "a
    three" against "the three" or "a dog", and then " ." (the taste: "the" takes "dog", "a" takes
    "three"). " dog" and " three" are one token each, so the two sides have equal length and differ
    in that one token only, and rows come in pairs sharing their words, one of each rule. A start
    model that prefers one word whatever comes before ranks exactly half the pairs right."""
    import random

    from tests.helpers import WORDS

    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("dog", "three", "the", "a")]
    rows = []
    for i in range(n):
        if i % 2 == 0:
            words, q = rng.choices(filler, k=rng.randint(1, 4)), rng.randint(0, 9)
        rule, want, other = ("the", "dog", "three") if i % 2 == 0 else ("a", "three", "dog")
        rows.append(
            {
                "prompt": f"what is {q} ?",
                "chosen": " " + " ".join(words + [rule, want]) + " .",
                "rejected": " " + " ".join(words + [rule, other]) + " .",
            }
        )
    return rows


@pytest.fixture(scope="module")
def rule_prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rule")
    return write_jsonl(d / "train.jsonl", rule_rows(64, seed=1)), write_jsonl(d / "eval.jsonl", rule_rows(64, seed=2))


@pytest.fixture
def no_reference(monkeypatch):
    """Fails the test on any use of a reference: loading one, entering one (a separate model or the
    LoRA policy with adapters disabled), or precomputing reference log-probs."""
    from rufus.trainers import dpo as dpo_trainer
    from rufus.trainers import online

    calls = []

    def forbidden(name):
        def spy(*args, **kw):
            calls.append(name)
            raise AssertionError(f"{name} called by a reference-free objective")

        return spy

    monkeypatch.setattr(online, "load_reference", forbidden("load_reference"))
    monkeypatch.setattr(online, "reference_model", forbidden("reference_model"))
    monkeypatch.setattr(dpo_trainer, "_attach_reference", forbidden("_attach_reference"))
    return calls


def naive_mean_logprobs(model_dir, rows, tmp_path) -> list[tuple[float, float]]:
    """(m_w, m_l) per pair: log pi(y|x) / |y| of each side alone (no padding, no batch), from the
    model's logits by hand in float64."""
    from rufus.data.dpo import tokenize_pairs
    from rufus.data.loading import load_records
    from rufus.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer=tok).eval()
    pairs = tokenize_pairs(
        load_records(write_jsonl(tmp_path / "naive.jsonl", rows), kind="preference"), tok, max_length=48
    )
    out = []
    with torch.no_grad():
        for pair in pairs:
            means = []
            for side in ("chosen", "rejected"):
                ids, labels = pair[side]["input_ids"], pair[side]["labels"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
                tokens = [t for t in range(1, len(ids)) if labels[t] != -100]  # the response's positions
                means.append(sum(logp[t - 1, ids[t]].item() for t in tokens) / len(tokens))
            out.append(tuple(means))
    return out


def naive_loss(loss_type: str, means, beta: float, gamma: float) -> float:
    """ORPO (lam = beta) or SimPO on (m_w, m_l) pairs, per pair in python floats, then the mean."""
    total = 0.0
    for m_w, m_l in means:
        if loss_type == "orpo":  # -m_w + lam * -log sigmoid(log odds ratio), odds = P / (1 - P), P = e^m
            ratio = (m_w - math.log(1 - math.exp(m_w))) - (m_l - math.log(1 - math.exp(m_l)))
            total += -m_w + beta * math.log1p(math.exp(-ratio))
        else:  # -log sigmoid(beta m_w - beta m_l - gamma)
            total += math.log1p(math.exp(-(beta * (m_w - m_l) - gamma)))
    return total / len(means)


REFERENCE_FREE = {  # beta is ORPO's lambda (the paper's 0.1) and SimPO's reward scale (the paper's 2.0)
    "orpo": {"dpo.loss_type": "orpo", "dpo.beta": 0.1},
    "simpo": {"dpo.loss_type": "simpo", "dpo.beta": 2.0, "dpo.gamma": 1.0},
}


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_objectives_learn_the_held_out_preference_without_a_reference(
    tiny_model, rule_prefs, tmp_path, no_reference, loss_type
):
    from tests.test_metrics_doc import DOC, documented_keys, matches

    train, held_out = rule_prefs
    # the start: the implicit reward (log odds for ORPO, beta m for SimPO) ranks a pair as the mean
    # token log-probability m does, so its held-out accuracy is the share of pairs with m_w > m_l
    start = naive_mean_logprobs(tiny_model, rule_rows(64, seed=2), tmp_path)
    start_accuracy = sum((w > r) + 0.5 * (w == r) for w, r in start) / len(start)
    over = {**REFERENCE_FREE[loss_type], "data.eval": str(held_out)}
    result = train_dpo(dpo_config(tiny_model, train, tmp_path / "run", max_steps=8, eval_every=4, **over))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert no_reference == [] and result.reference is None
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    got = [r["eval/rewards/accuracy"] for r in evals]
    print(f"{loss_type}: held-out accuracy {start_accuracy:.3f} at the start, then {got} at steps 4, 8")
    # the acceptance bar: from chance to ranking held-out pairs as the data does
    assert 0.35 <= start_accuracy <= 0.65, start_accuracy
    assert result.eval["eval/rewards/accuracy"] >= 0.8 and got[-1] - start_accuracy >= 0.3, (start_accuracy, got)
    losses = [r["dpo/loss"] for r in rows]
    assert losses[-1] < losses[0] and evals[-1]["eval/dpo/loss"] < evals[0]["eval/dpo/loss"]
    extra = {"orpo/nll", "orpo/or_loss"}
    assert extra <= set(rows[-1]) if loss_type == "orpo" else not extra & set(rows[-1])
    # every key it logs (eval/orpo/... too) is in docs/metrics.md
    documented = documented_keys(DOC.read_text(encoding="utf-8"))
    assert not [k for r in rows for k in r if not matches(k, documented)]
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in result.policy.state_dict().items() if k in reloaded)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_first_loss_by_hand_grad_accum_and_lora(tiny_model, tmp_path, no_reference, loss_type):
    # 8 pairs, batch 8: step 1 is the loss over all of them at the start model, by hand (each sequence
    # alone, no padding) from naive_mean_logprobs; grad_accum=4 (micro-batches of 2 pairs) logs the
    # same losses; under LoRA (adapters start at zero: the base) the first loss is the same again, and
    # no adapter-disabled pass is ever made
    rows = rule_rows(8, seed=3)
    train = write_jsonl(tmp_path / "eight.jsonl", rows)
    objective = REFERENCE_FREE[loss_type]
    want = naive_loss(
        loss_type, naive_mean_logprobs(tiny_model, rows, tmp_path), 0.1 if loss_type == "orpo" else 2.0, 1.0
    )
    runs = {"whole": {}, "accumulated": {"grad_accum": 4}, "lora": {"lora.r": 4, "lora.alpha": 8, "lr": 1e-2}}
    losses = {}
    for name, over in runs.items():
        train_dpo(dpo_config(tiny_model, train, tmp_path / name, max_steps=3, **objective, **over))
        losses[name] = [r["dpo/loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert losses["whole"][0] == pytest.approx(want, abs=1e-5), (losses, want)
    assert losses["accumulated"] == pytest.approx(losses["whole"], abs=1e-5)
    assert losses["lora"][0] == pytest.approx(want, abs=1e-5)
    for name in runs:
        assert losses[name][-1] < losses[name][0], (name, losses[name])
    assert no_reference == []


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_online_rounds_and_resume_reproduce_the_uninterrupted_run(
    tiny_model, small, tmp_path, no_reference, loss_type
):
    # as test_resume_reproduces_the_uninterrupted_run: round 1 offline, round 2 online, resumed at the
    # round boundary and inside round 2, with no reference anywhere
    common = dict(
        max_steps=2,
        save_every=1,
        save_total_limit=0,
        **{"dpo.rounds": 2, "dpo.prompts_per_round": 8},
        **REFERENCE_FREE[loss_type],
    )
    straight = train_dpo(dpo_config(tiny_model, small, tmp_path / "straight", **common), reward_fn=completion_length)
    final = {k: v.clone() for k, v in straight.policy.state_dict().items()}
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["dpo/round"] for r in a] == [1, 1, 2, 2] and a[2]["online/pairs"] > 0
    for cut_at in (2, 3):
        cut = tmp_path / f"cut{cut_at}"
        (cut / "checkpoints").mkdir(parents=True)
        name = f"step-{cut_at:07d}"
        shutil.copytree(tmp_path / "straight" / "checkpoints" / name, cut / "checkpoints" / name)
        for f in ("metrics.jsonl", "pairs.jsonl"):
            shutil.copy(tmp_path / "straight" / f, cut / f)
        resumed = train_dpo(dpo_config(tiny_model, small, cut, resume=True, **common), reward_fn=completion_length)
        assert all(torch.equal(v, final[k]) for k, v in resumed.policy.state_dict().items()), cut_at
        b = read_metrics(cut / "metrics.jsonl")
        assert [r["step"] for r in b] == [1, 2, 3, 4]
        assert [r["dpo/loss"] for r in b] == pytest.approx([r["dpo/loss"] for r in a], abs=1e-7)
    assert no_reference == []


def test_reference_free_config_errors(tiny_model, small, tmp_path):
    from rufus.config import ConfigError

    with pytest.raises(ConfigError, match="ref_model: dpo.loss_type=orpo uses no reference model"):
        train_dpo(dpo_config(tiny_model, small, tmp_path / "a", ref_model=str(tiny_model), **{"dpo.loss_type": "orpo"}))
    with pytest.raises(ConfigError, match="label_smoothing applies to loss_type=sigmoid only"):
        train_dpo(
            dpo_config(tiny_model, small, tmp_path / "b", **{"dpo.loss_type": "simpo", "dpo.label_smoothing": 0.1})
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("recipe", ["orpo", "simpo"])
def test_orpo_and_simpo_recipes_are_valid(recipe):
    from rufus.config import load_config
    from rufus.trainers.dpo import DPOConfig

    cfg = load_config(DPOConfig, f"configs/{recipe}_tiny.yaml")
    assert cfg.model.startswith("builtin:") and cfg.dpo.loss_type == recipe and cfg.ref_model is None
    # the papers' values: ORPO's lambda 0.1; SimPO's beta 2.0 with gamma / beta = 0.5
    assert (cfg.dpo.beta, cfg.dpo.gamma) == ((0.1, 0.5) if recipe == "orpo" else (2.0, 1.0))
