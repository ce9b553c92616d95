"""Corpus generation is deterministic and `measure` reads each quality back from the text alone."""

from __future__ import annotations

import random

import pytest

from rufus.playground.corpus import TOPICS, make_corpus, make_prompt, make_response, measure

DIMS = ("on_topic", "polite", "concise", "non_repetitive", "answers")


def _pairs(flag: str, n: int = 60, seed: int = 0):
    """(measure with flag on, measure with flag off) for n prompts, other flags random."""
    rng = random.Random(seed)
    for _ in range(n):
        info = make_prompt(rng)
        others = {q: rng.random() < 0.5 for q in ("on_topic", "polite", "concise", "repetitive", "answers")}
        on = make_response(info, random.Random(1), **{**others, flag: True})
        off = make_response(info, random.Random(1), **{**others, flag: False})
        yield info, measure(info["prompt"], on), measure(info["prompt"], off)


def test_deterministic_by_seed_and_prompts_short():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)
    rows = make_corpus(300, seed=0, quality="middling")
    assert {r["topic"] for r in rows} == set(TOPICS)
    assert all(len(r["prompt"].split()) <= 20 for r in rows)


def test_topic_vocabularies_are_disjoint():
    seen: dict[str, str] = {}
    for topic, spec in TOPICS.items():
        for w in spec["subjects"] + spec["facts"]:
            assert seen.setdefault(w, topic) == topic, w


def test_lengths_concise_and_rambling():
    rng = random.Random(0)
    for _ in range(100):
        info = make_prompt(rng)
        assert len(make_response(info, rng, concise=True).split()) <= 20
        assert 30 <= len(make_response(info, rng, concise=False).split()) <= 50


@pytest.mark.parametrize(
    "flag,dim", [("on_topic", "on_topic"), ("polite", "polite"), ("answers", "answers"), ("concise", "concise")]
)
def test_each_flag_moves_its_dimension(flag, dim):
    for _, on, off in _pairs(flag):
        assert on[dim] > off[dim]


def test_repetition_lowers_non_repetitive():
    for _, rep, plain in _pairs("repetitive"):
        assert rep["non_repetitive"] < plain["non_repetitive"]


def test_arithmetic_answer_is_the_correct_sum():
    rng = random.Random(0)
    for _ in range(20):
        info = make_prompt(rng, "arithmetic")
        response = make_response(info, rng)
        assert str(info["a"] + info["b"]) in response
        assert measure(info["prompt"], response)["answers"] == 1.0
        wrong = f"Sure! The sum is {info['a'] + info['b'] + 1}."
        assert measure(info["prompt"], wrong)["answers"] == 0.0


@pytest.mark.parametrize("text", ["", "ÿÿ \x00 asdf", None, 12, "rain " * 300])
def test_measure_never_raises_and_stays_in_range(text):
    scores = measure("What causes rain?", text)
    assert set(scores) == set(DIMS)
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_measure_on_random_garbage():
    rng = random.Random(0)
    for _ in range(20):
        junk = "".join(chr(rng.randrange(0, 0x3000)) for _ in range(500))
        for prompt in (junk, "What is 3 plus 4?"):
            scores = measure(prompt, junk)
            assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_unknown_quality_raises():
    with pytest.raises(ValueError, match="middling"):
        make_corpus(3, quality="great")
