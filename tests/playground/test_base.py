"""Playground base model: builds a loadable, trained LM; caches it; SFT demos and prompts validate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rufus.data.loading import load_records
from rufus.models.tiny import make_tiny_model
from rufus.playground import base
from rufus.playground.corpus import TOPICS, make_corpus, prompt_topic
from tests.helpers import write_jsonl

SMALL = dict(
    corpus_size=300,
    steps=60,
    hidden_size=48,
    num_layers=1,
    num_heads=4,
    vocab_size=400,
    batch_size=16,
    lr=5e-3,
    max_length=96,
    progress=False,
)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return base.build_base_model(tmp_path_factory.mktemp("base") / "model", seed=0, **SMALL)


def lm_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss over every token of `texts` (each with bos and eos), computed directly."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_small_build_loads_round_trips_and_samples(small_base):
    model = AutoModelForCausalLM.from_pretrained(small_base)
    tokenizer = AutoTokenizer.from_pretrained(small_base)
    assert (small_base / "build_info.json").exists()
    assert not list(small_base.parent.glob("*.tmp-*"))  # the temporary directory was moved into place
    line = base.pretraining_text(make_corpus(3, seed=99, quality="mixed"))[0]
    assert tokenizer.decode(tokenizer(line)["input_ids"], skip_special_tokens=True) == line
    assert tokenizer.chat_template

    ids = tokenizer("Tell me about owls.", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.8, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1] and text.strip()


def test_training_lowers_held_out_lm_loss(small_base):
    tokenizer = AutoTokenizer.from_pretrained(small_base)
    trained = AutoModelForCausalLM.from_pretrained(small_base)
    untrained = make_tiny_model(
        tokenizer,
        hidden_size=SMALL["hidden_size"],
        num_layers=SMALL["num_layers"],
        num_heads=SMALL["num_heads"],
        seed=0,
    )
    held_out = base.pretraining_text(make_corpus(20, seed=12345, quality="mixed"))
    before, after = lm_loss(untrained, tokenizer, held_out), lm_loss(trained, tokenizer, held_out)
    assert after < 0.8 * before, (before, after)


def test_refuses_to_clobber_an_existing_directory(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        base.build_base_model(tmp_path / "model", **SMALL)


def test_base_model_path_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUFUS_CACHE", str(tmp_path / "cache"))
    calls = []
    real_build = base.build_base_model

    def small_build(path, *, seed=0):
        calls.append((path, seed))
        return real_build(path, seed=seed, **dict(SMALL, corpus_size=40, steps=2))

    monkeypatch.setattr(base, "build_base_model", small_build)
    first = base.base_model_path(seed=3)
    assert first == tmp_path / "cache" / "playground" / f"base-{base.BASE_VERSION}-seed3"
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    mtime = (first / "config.json").stat().st_mtime_ns
    second = base.base_model_path(seed=3)
    assert second == first and len(calls) == 1
    assert (first / "config.json").stat().st_mtime_ns == mtime
    AutoModelForCausalLM.from_pretrained(first)


def test_sft_demos_are_deterministic_and_validate(tmp_path):
    demos = base.make_sft_demos(12, seed=5)
    assert demos == base.make_sft_demos(12, seed=5)
    assert demos != base.make_sft_demos(12, seed=6)
    assert all(set(d) == {"prompt", "completion"} for d in demos)
    assert all(d["completion"].startswith(" ") for d in demos)
    records = load_records(write_jsonl(tmp_path / "sft.jsonl", demos), kind="sft")
    assert len(records.dataset) == 12


def test_prompts_are_deterministic_on_topic_and_validate(tmp_path):
    prompts = base.make_prompts(30, seed=1)
    assert prompts == base.make_prompts(30, seed=1)
    held_out = base.make_prompts(30, seed=2)
    assert prompts != held_out
    assert all(set(p) == {"prompt"} and prompt_topic(p["prompt"]) in TOPICS for p in prompts)
    records = load_records(write_jsonl(tmp_path / "prompts.jsonl", prompts), kind="prompt")
    assert len(records.dataset) == 30
