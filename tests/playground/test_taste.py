"""Gold taste, named preferences and simulated annotators (Bradley-Terry pairs, Plackett-Luce ranks)."""

from __future__ import annotations

import random
import statistics

import pytest

from rufus.data import load_records
from rufus.playground.corpus import QUALITIES, make_corpus, make_prompt, make_response
from rufus.playground.taste import (
    Annotators,
    best_gold,
    gold_label_accuracy,
    gold_score,
    gold_win_rate,
    resolve_preference,
)
from tests.helpers import write_jsonl


def _random_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, a, b = [], [], []
    for _ in range(n):
        info = make_prompt(rng)
        prompts.append(info["prompt"])
        for out in (a, b):
            out.append(make_response(info, rng, **{q: rng.random() < 0.5 for q in QUALITIES}))
    return prompts, a, b


def test_resolve_preference():
    assert resolve_preference("default") == resolve_preference(None)
    assert resolve_preference("polite=2,concise=1") == {
        "on_topic": 0.0,
        "polite": 2.0,
        "concise": 1.0,
        "non_repetitive": 0.0,
        "answers": 0.0,
    }
    with pytest.raises(ValueError, match="default"):
        resolve_preference("nope")
    with pytest.raises(ValueError, match="on_topic"):
        resolve_preference("kindness=1")
    with pytest.raises(ValueError):
        resolve_preference("polite=-1")


def test_middling_corpus_leaves_room_to_improve():
    rows = make_corpus(1000, seed=0, quality="middling")
    mean = statistics.mean(gold_score(r["prompt"], r["completion"]) for r in rows)
    bad = statistics.mean(gold_score(r["prompt"], r["completion"]) for r in make_corpus(300, 0, "bad"))
    assert bad + 1.0 < mean < best_gold() - 1.0
    good = make_corpus(50, 0, "good")
    assert all(gold_score(r["prompt"], r["completion"]) == pytest.approx(best_gold()) for r in good)


def test_preferences_disagree_on_polite_rambling_vs_rude_concise():
    rng = random.Random(0)
    info = make_prompt(rng, "animals")
    polite_rambling = make_response(info, rng, polite=True, concise=False)
    rude_concise = make_response(info, rng, polite=False, concise=True)
    p = info["prompt"]
    assert gold_score(p, polite_rambling, "polite") > gold_score(p, rude_concise, "polite")
    assert gold_score(p, polite_rambling, "concise") < gold_score(p, rude_concise, "concise")


def test_noiseless_annotators_match_gold():
    prompts, a, b = _random_pairs(300)
    ann = Annotators("default", temperature=0.0, disagreement=0.0, seed=0)
    rows = ann.label_pairs(prompts, a, b, seed=0)
    for row in rows:
        g_c, g_r = gold_score(row["prompt"], row["chosen"]), gold_score(row["prompt"], row["rejected"])
        assert g_c >= g_r


def test_default_annotators_agree_with_gold_partly():
    prompts, a, b = _random_pairs(1000)
    ann = Annotators("default", seed=0)
    rows = ann.label_pairs(prompts, a, b, seed=1)
    assert {r["annotator"] for r in rows} == {0, 1, 2}
    acc = gold_label_accuracy([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert 0.6 < acc < 0.95
    assert ann.label_pairs(prompts, a, b, seed=1) == rows  # deterministic by seed


def test_gold_win_rate_ties_count_half():
    prompts, a, b = _random_pairs(50)
    assert gold_win_rate(prompts, a, a) == 0.5
    assert gold_win_rate(prompts, a, b) + gold_win_rate(prompts, b, a) == pytest.approx(1.0)


def test_rows_load_as_preference_and_ranking(tmp_path):
    prompts, a, b = _random_pairs(40)
    ann = Annotators("concise", seed=1)
    pairs = ann.label_pairs(prompts, a, b, seed=0)
    assert ann.label_pairs(prompts[:1], a[:1], a[:1]) == []  # identical texts are skipped
    records = load_records(write_jsonl(tmp_path / "pairs.jsonl", pairs), kind="preference")
    assert len(records.dataset) == len(pairs) > 30
    rng = random.Random(0)
    prompts, groups = [], []
    for _ in range(40):
        info = make_prompt(rng)
        prompts.append(info["prompt"])
        groups.append([make_response(info, rng, **{q: rng.random() < 0.5 for q in QUALITIES}) for _ in range(4)])
    groups[0] = [groups[0][0]] * 3  # one distinct response: skipped
    ranks = ann.rank_rows(prompts, groups, seed=0)
    assert len(ranks) == len(prompts) - 1
    records = load_records(write_jsonl(tmp_path / "ranks.jsonl", ranks), kind="ranking")
    assert len(records.dataset) == len(ranks)


def test_noiseless_rank_sorts_by_gold():
    rng = random.Random(0)
    info = make_prompt(rng)
    responses = [make_response(info, rng, **{q: rng.random() < 0.5 for q in QUALITIES}) for _ in range(6)]
    ranked = Annotators(temperature=0.0, disagreement=0.0).rank(info["prompt"], responses)
    scores = [gold_score(info["prompt"], r) for r in ranked]
    assert scores == sorted(scores, reverse=True)
