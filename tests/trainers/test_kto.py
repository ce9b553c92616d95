"""KTO trainer: lambda / 2 per row at the start, learns a held-out preference from unpaired labels, the
mismatched rows of z0, data forms and errors, grad_accum, LoRA, resume, documented metrics."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rufus.config import ConfigError
from rufus.data.errors import DataError
from rufus.report.metrics import read_metrics
from rufus.trainers.kto import train_kto
from tests.helpers import preference_rows, write_jsonl


def unpaired_rows(n: int, seed: int) -> list[dict]:
    """TRL's unpaired rows from the yes / no taste of `preference_rows`: each comparison gives ONE
    completion, its chosen one (label true) or its rejected one (label false) in turn, so no prompt
    comes with both sides: what KTO learns from cannot be read as pairs."""
    return [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
        for i, p in enumerate(preference_rows(n, seed=seed))
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kto")
    return SimpleNamespace(
        train=write_jsonl(d / "train.jsonl", unpaired_rows(64, seed=1)),
        pairs=write_jsonl(d / "pairs.jsonl", preference_rows(64, seed=2)),  # held out, as pairs
        unpaired=write_jsonl(d / "unpaired.jsonl", unpaired_rows(16, seed=4)),  # held out, unpaired
    )


def kto_config(tiny_model, train, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(train), "max_length": 48},
        "batch_size": 8,
        "lr": 3e-3,
        "max_steps": 3,
        "dtype": "float32",
        "progress": False,
        "log_every": 1,
    }
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[key] = v
    return cfg


def test_starts_at_half_the_weight_and_learns_the_held_out_preference(tiny_model, data, tmp_path):
    """The acceptance bar: trained on unpaired labels only, the implicit reward beta log pi/pi_ref ranks
    held-out PAIRS of the same task as people did. Before training pi == pi_ref, every implicit reward
    is 0 and every pair a tie: accuracy 1/2 exactly."""
    result = train_kto(
        kto_config(
            tiny_model, data.train, tmp_path / "run", max_steps=8, eval_every=4, **{"data.eval": str(data.pairs)}
        )
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # step 1: pi == pi_ref (dropout off), so r = 0 and z0 = 0: each row's loss is 1 - sigmoid(0) = 0.5
    assert rows[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    for key in ("kto/loss", "kl", "rewards/desirable", "rewards/undesirable", "rewards/margin", "logps/desirable"):
        assert key in rows[-1], key
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert result.eval["eval/rewards/accuracy"] >= 0.8, result.eval  # from 0.5 at the start
    assert result.eval["eval/rewards/margin"] > 0 and result.eval["eval/kto/loss"] < 0.5
    assert rows[-1]["rewards/desirable"] > rows[-1]["rewards/undesirable"]
    # the policy moved; the reference did not; final/ loads back as the trained policy
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in result.reference.state_dict().items())
    moved = [k for k, v in result.policy.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > len(start) // 2
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in result.policy.state_dict().items() if k in reloaded)


def test_unpaired_eval_and_every_logged_key_is_documented(tiny_model, data, tmp_path):
    from tests.test_metrics_doc import DOC, documented_keys, matches

    result = train_kto(
        kto_config(tiny_model, data.train, tmp_path / "run", max_steps=2, **{"data.eval": str(data.unpaired)})
    )
    assert {
        "eval/kto/loss",
        "eval/kl",
        "eval/rewards/desirable",
        "eval/rewards/undesirable",
        "eval/rewards/margin",
        "eval/logps/desirable",
        "eval/logps/undesirable",
    } <= set(result.eval)
    assert "eval/rewards/accuracy" not in result.eval  # unpaired rows hold no pairs to rank
    documented = documented_keys(DOC.read_text(encoding="utf-8"))
    logged = {k for row in read_metrics(tmp_path / "run" / "metrics.jsonl") for k in row}
    assert sorted(k for k in logged if not matches(k, documented)) == []


def test_grad_accum_and_the_weights_give_the_hand_computed_start(tiny_model, data, tmp_path):
    # z0 comes from the whole optimiser batch and the loss is divided by its row count, so 4
    # accumulated micro-batches of 2 log the losses of one batch of 8. lambda_D = 1.2: at the start a
    # desirable row loses 1.2 / 2 = 0.6 and an undesirable one 0.5; the first batch holds n_D of them.
    from rufus.trainers.common import BatchPlan

    rows = unpaired_rows(64, seed=1)
    n_d = sum(rows[i]["label"] for i in BatchPlan(64, 8, 1, 1, 0, seed=0).global_batch(1))
    losses = {}
    for accum in (1, 4):
        train_kto(
            kto_config(
                tiny_model, data.train, tmp_path / f"a{accum}", grad_accum=accum, **{"kto.desirable_weight": 1.2}
            )
        )
        losses[accum] = [r["kto/loss"] for r in read_metrics(tmp_path / f"a{accum}" / "metrics.jsonl")]
    assert losses[1][0] == pytest.approx((0.6 * n_d + 0.5 * (8 - n_d)) / 8, abs=1e-6) and 0 < n_d < 8
    assert losses[4] == pytest.approx(losses[1], abs=1e-5)
    assert losses[1][-1] < losses[1][0]


def test_mismatched_rows_pair_each_prompt_with_the_next_rows_completion(tiny_model, tmp_path):
    """z0 over (x_i, y_{i+1 mod B}), against a naive loop over single unpadded rows, for any chunking."""
    from accelerate import Accelerator

    from rufus.data.kto import mismatched, tokenize_unpaired
    from rufus.data.loading import load_records
    from rufus.data.sft import SFTCollator
    from rufus.models.loading import load_causal_lm, load_tokenizer
    from rufus.trainers.kto import _reference_point

    tok = load_tokenizer(str(tiny_model))
    records = load_records(write_jsonl(tmp_path / "u.jsonl", unpaired_rows(6, seed=7)), kind="graded")
    examples = tokenize_unpaired(records, tok, max_length=48)
    a, b = examples[0], examples[1]
    row = mismatched(a, b, 48)  # a's prompt, then b's completion, labelled on the completion only
    p, q = a["prompt_length"], b["prompt_length"]
    assert row["input_ids"] == a["input_ids"][:p] + b["input_ids"][q:]
    assert row["labels"] == [-100] * p + b["input_ids"][q:]
    assert mismatched(a, b, p + 2)["labels"] == [-100] * p + b["input_ids"][q : q + 2]  # cut from the right

    policy = load_causal_lm(str(tiny_model), tokenizer=tok).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    order = [3, 0, 5, 1]  # a batch of 4 examples, in this order

    def ref_fn():
        from contextlib import nullcontext

        return nullcontext(reference)

    want = 0.0  # sum over the 4 mismatched rows of log pi - log pi_ref, each row alone (no padding)
    with torch.no_grad():
        for k, i in enumerate(order):
            j = order[(k + 1) % 4]
            x = examples[i]["input_ids"][: examples[i]["prompt_length"]]
            y = examples[j]["input_ids"][examples[j]["prompt_length"] :]
            ids = torch.tensor([x + y])
            for model, sign in ((policy, 1.0), (reference, -1.0)):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
                want += sign * sum(logp[t - 1, ids[0, t]].item() for t in range(len(x), ids.shape[1]))
    want /= 4
    acc = Accelerator(cpu=True)
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=48))
    collate = SFTCollator(tok.pad_token_id)
    for micro in (1, 4):
        z0 = _reference_point(cfg, acc, policy, ref_fn, examples, order, collate, micro)
        assert z0.item() == pytest.approx(want, abs=1e-4), micro
    assert abs(want) > 1e-3  # the two models differ, so this checks something


def test_data_forms_graded_rows_with_a_threshold_and_pairs(tiny_model, tmp_path):
    from rufus.data.kto import load_unpaired
    from rufus.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    graded = [
        {"prompt": f"what is {i} ?", "completion": f" {i} yes .", "score": s} for i, s in enumerate([1, 4, 7, 5, 2])
    ]
    path = write_jsonl(tmp_path / "graded.jsonl", graded)
    examples, kind = load_unpaired(str(path), tok, max_length=48, threshold=4.0)
    # 1 and 2 below 4: undesirable; 7 and 5 above: desirable; the 4 left out
    assert kind == "graded" and [e["desirable"] for e in examples] == [False, True, True, False]
    assert all(e["pair"] is None for e in examples)
    # without a threshold only 1 and 0 are labels: line 1 (score 1) reads as desirable, line 2 (4) stops
    with pytest.raises(
        DataError, match=r"graded\.jsonl, line 2, field 'score': 4 is not a label.*kto\.desirable_threshold"
    ):
        load_unpaired(str(path), tok, max_length=48)
    # pairs: chosen desirable, rejected undesirable, kept together
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(3, seed=5))
    examples, kind = load_unpaired(str(pairs), tok, max_length=48)
    assert kind == "preference" and [(e["desirable"], e["pair"]) for e in examples] == [
        (True, 0),
        (False, 0),
        (True, 1),
        (False, 1),
        (True, 2),
        (False, 2),
    ]
    labels = examples[0]["labels"]
    assert set(labels[: examples[0]["prompt_length"]]) == {-100} and labels[-1] == tok.eos_token_id


def test_imbalanced_labels_warn_with_the_weight_to_set(tiny_model, tmp_path):
    rows = [dict(r, label=True) for r in unpaired_rows(12, seed=3)[:9]] + unpaired_rows(12, seed=3)[9:10]
    rows += [dict(r, label=False) for r in unpaired_rows(6, seed=8)[:2]]  # 9 desirable, 3 undesirable
    train = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    # 1 * 9 / (1 * 3) = 3: lambda_D between 3/9 = 0.333 and 4/9 = 0.444
    with pytest.warns(UserWarning, match=r"= 3, outside \[1, 4/3\].*kto\.desirable_weight=0\.444"):
        train_kto(kto_config(tiny_model, train, tmp_path / "run", max_steps=1))
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6)


def test_lora_reference_is_the_adapter_disabled_base(tiny_model, data, tmp_path):
    result = train_kto(kto_config(tiny_model, data.train, tmp_path / "lora", lr=1e-2, **{"lora.r": 4, "lora.alpha": 8}))
    assert result.reference is None  # no second model: the base with adapters off is pi_ref
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for name, p in result.policy.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p.detach(), base[key]), name
    rows = read_metrics(tmp_path / "lora" / "metrics.jsonl")
    assert rows[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6)  # adapters start at zero: pi == pi_ref
    assert rows[-1]["kto/loss"] < rows[0]["kto/loss"]
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in k for k in merged.state_dict())
    assert [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]


def test_resume_reproduces_the_uninterrupted_run(tiny_model, data, tmp_path):
    common = dict(max_steps=4, save_every=1, save_total_limit=0)
    straight = train_kto(kto_config(tiny_model, data.train, tmp_path / "straight", **common))
    final = {k: v.clone() for k, v in straight.policy.state_dict().items()}
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-0000002", cut / "checkpoints" / "step-0000002")
    shutil.copy(tmp_path / "straight" / "metrics.jsonl", cut / "metrics.jsonl")  # rows past the cut too
    resumed = train_kto(kto_config(tiny_model, data.train, cut, resume=True, **common))
    assert all(torch.equal(v, final[k]) for k, v in resumed.policy.state_dict().items())
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("kto/loss", "kl", "rewards/margin"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-7), key


def test_bad_rows_fail_before_training_naming_file_line_and_field(tiny_model, tmp_path):
    rows = unpaired_rows(4, seed=0)
    rows[2]["label"] = "maybe"
    bad = write_jsonl(tmp_path / "label.jsonl", rows)
    with pytest.raises(DataError, match=r"label\.jsonl, line 3, field 'label': expected true or false"):
        train_kto(kto_config(tiny_model, bad, tmp_path / "run"))
    rows = unpaired_rows(4, seed=0)
    del rows[1]["completion"]
    missing = write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataError, match=r"missing\.jsonl, line 2.*completion"):
        train_kto(kto_config(tiny_model, missing, tmp_path / "run"))
    with pytest.raises(ConfigError, match="batch_size: .* at least 2 rows, got 1"):
        train_kto(kto_config(tiny_model, missing, tmp_path / "run", batch_size=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
