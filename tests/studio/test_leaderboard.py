"""Leaderboard: Bradley-Terry by maximum likelihood (solved by hand, recovered from a known generating
model), bootstrap intervals and ranks, online Elo by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rufus.studio.leaderboard import (
    Comparison,
    LeaderboardError,
    bradley_terry,
    leaderboard,
    online_elo,
)


def games(a, b, wins_a=0, wins_b=0, ties=0):
    return [Comparison(a, b, "a")] * wins_a + [Comparison(a, b, "b")] * wins_b + [Comparison(a, b, "tie")] * ties


def test_two_models_by_hand():
    # A wins 3 of 4: P(A > B) = 3/4 = s(theta_A - theta_B), so theta_A - theta_B = ln 3 and B sits
    # 400 log10(3) = 190.85 points below the anchor A
    r = bradley_terry(games("A", "B", wins_a=3, wins_b=1))
    assert r["A"] == 1000.0
    assert r["B"] == pytest.approx(1000 - 400 * math.log10(3), abs=1e-6)
    # a tie is half a win each: 2 wins and 2 ties for A is a score of 3 : 1, the same ratings
    assert bradley_terry(games("A", "B", wins_a=2, ties=2)) == pytest.approx(r)
    # the anchor can be any model; only differences are identified
    r_b = bradley_terry(games("A", "B", wins_a=3, wins_b=1), anchor="B")
    assert r_b["B"] == 1000.0 and r_b["A"] == pytest.approx(1000 + 400 * math.log10(3))
    assert bradley_terry(games("A", "B", wins_a=1, wins_b=1, ties=3)) == pytest.approx({"A": 1000, "B": 1000})


def test_three_models_satisfy_the_likelihood_equations():
    # at the maximum, each model's score (wins + ties / 2) equals its expected score under the fit
    data = games("A", "B", 5, 3, 1) + games("B", "C", 4, 2) + games("A", "C", 6, 1, 2)
    r = bradley_terry(data)
    theta = {m: (v - 1000) * math.log(10) / 400 for m, v in r.items()}
    for m in "ABC":
        score = sum(c.score() if c.model_a == m else 1 - c.score() for c in data if m in (c.model_a, c.model_b))
        expected = sum(
            1 / (1 + math.exp(-(theta[m] - theta[c.model_b if c.model_a == m else c.model_a])))
            for c in data
            if m in (c.model_a, c.model_b)
        )
        assert score == pytest.approx(expected, abs=1e-8)
    assert r["A"] > r["B"] > r["C"]


def test_an_unbeaten_model_needs_a_prior():
    with pytest.raises(LeaderboardError, match="'A' never loses"):
        bradley_terry(games("A", "B", wins_a=3) + games("B", "C", 1, 1))
    r = bradley_terry(games("A", "B", wins_a=3) + games("B", "C", 1, 1), prior=0.01)
    assert all(math.isfinite(v) for v in r.values()) and r["A"] > r["B"]
    with pytest.raises(LeaderboardError, match="winner"):
        bradley_terry([Comparison("A", "B", "draw")])


def test_online_elo_by_hand_and_its_order_dependence():
    # both start at 1000: E = 1/2, the winner gains 4 * (1 - 1/2) = 2
    r = online_elo([Comparison("A", "B", "a")])
    assert r == {"A": 1002.0, "B": 998.0}
    # then B wins: E_B = 1 / (1 + 10^((1002 - 998) / 400)) = 0.494245, B gains 4 * 0.505755 = 2.02302
    r = online_elo([Comparison("A", "B", "a"), Comparison("A", "B", "b")])
    assert r["B"] == pytest.approx(998 + 4 * (1 - 1 / (1 + 10**0.01)), abs=1e-9)
    assert r["A"] + r["B"] == pytest.approx(2000)
    reverse = online_elo([Comparison("A", "B", "b"), Comparison("A", "B", "a")])
    assert reverse["A"] == pytest.approx(r["B"]) and reverse["A"] != pytest.approx(r["A"])


TRUE = {"m0": 1000.0, "m1": 1100.0, "m2": 900.0, "m3": 1200.0}


def simulate(n: int, seed: int, tie_rate: float = 0.0) -> list[Comparison]:
    """Comparisons of random pairs drawn from the Bradley-Terry model with the TRUE ratings."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
        if rng.random() < tie_rate:
            out.append(Comparison(a, b, "tie"))
        else:
            out.append(Comparison(a, b, "a" if rng.random() < p else "b"))
    return out


def test_ratings_of_a_known_generating_model_are_recovered():
    data = [Comparison("m0", "m1", "b")] + simulate(3000, seed=1)  # m0 first: the anchor at its true 1000
    rows = leaderboard(data, resamples=300, seed=0)
    assert [r.model for r in rows] == ["m3", "m1", "m0", "m2"]  # the true order
    assert [r.rank for r in rows] == [1, 2, 3, 4]  # 100 points apart with 3000 games: all separated
    for r in rows:
        assert abs(r.rating - TRUE[r.model]) < 30
        assert r.ci_low <= r.rating <= r.ci_high
    by_model = {r.model: r for r in rows}
    assert by_model["m0"].ci_low == by_model["m0"].ci_high == 1000.0  # the anchor
    assert sum(r.wins for r in rows) == sum(r.losses for r in rows) == len(data)


def test_the_intervals_cover_the_true_ratings_in_most_datasets():
    covered, total = 0, 0
    for seed in range(12):
        data = [Comparison("m0", "m1", "b")] + simulate(400, seed=100 + seed, tie_rate=0.1)
        for r in leaderboard(data, resamples=200, seed=seed):
            if r.model != "m0":
                covered += r.ci_low <= TRUE[r.model] <= r.ci_high
                total += 1
    # nominal 95%; with 36 intervals, fewer than 30 covered would be far outside sampling noise
    assert covered / total >= 30 / 36


def test_models_that_cannot_be_told_apart_share_a_rank():
    data = games("X", "Y", 6, 5) + games("Y", "Z", 9, 1) + games("X", "Z", 9, 1)
    rows = {r.model: r for r in leaderboard(data, resamples=300, seed=1)}
    # X (the anchor, 1000 in every resample) and Y (6 : 5 against X) overlap: both rank 1; Z lost 18 of
    # 20 and its interval lies below X's
    assert rows["X"].rank == rows["Y"].rank == 1 and rows["Z"].rank >= 2
    assert rows["Z"].ci_high < 1000 < rows["Y"].ci_high and rows["Y"].ci_low < 1000
    assert rows["X"].as_dict().keys() >= {"model", "rating", "ci_low", "ci_high", "rank", "wins", "losses", "ties"}


def test_the_bootstrap_is_seeded():
    data = simulate(200, seed=3)
    a = leaderboard(data, resamples=100, seed=7)
    b = leaderboard(data, resamples=100, seed=7)
    c = leaderboard(data, resamples=100, seed=8)
    assert [r.as_dict() for r in a] == [r.as_dict() for r in b]
    assert [r.ci_low for r in a] != [r.ci_low for r in c]
