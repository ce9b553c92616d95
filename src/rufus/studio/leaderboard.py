"""A league table of models from people's comparisons: Bradley-Terry by maximum likelihood, bootstrap
intervals, and online Elo as a second view.

Bradley-Terry (Bradley and Terry 1952): model i beats model j with probability

    P(i > j) = 1 / (1 + exp(-(theta_i - theta_j)))

Given comparisons, `bradley_terry` maximises the log-likelihood

    L(theta) = sum over comparisons c of  s_c log s(theta_a - theta_b) + (1 - s_c) log s(theta_b - theta_a)

where s_c is 1 when a won, 0 when b won and 1/2 for a tie (a tie is half a win each), by Newton's
method on theta with one model's theta fixed at 0 (the likelihood only sees differences). The
gradient is g_i = sum_c (s_ic - p_ic) over i's comparisons and the Hessian is minus the Laplacian of
the comparison graph weighted by p(1 - p). An optional Gaussian prior (`prior`, a precision on theta)
keeps the ratings finite when a model never wins or never loses, where the maximum likelihood
estimate runs off to infinity; it is 0 (pure maximum likelihood) by default and then such data is an
error that says which model.

Ratings are reported on the Elo scale, 400 log10-odds:  rating_i = 1000 + 400 / ln(10) * (theta_i -
theta_anchor), so the anchor model is 1000 and a 400-point gap means 10:1 odds.

Confidence intervals (`leaderboard`) come from the bootstrap (Efron 1979): the comparisons are
resampled with replacement `resamples` times (seeded), the model is refitted each time, and the
2.5 and 97.5 percentiles of each rating form its 95% interval. The anchor's rating is 1000 in every
resample, so its interval has no width: the other intervals are relative to it. A model's `rank` is
1 + the number of models whose interval lies wholly above its own (the convention of Chatbot Arena,
Chiang et al. 2024), so models that cannot be told apart share a rank.

Online Elo (`online_elo`, Elo 1978) updates two ratings after each comparison,
R_a += K (S_a - E_a), R_b -= K (S_a - E_a) with E_a = 1 / (1 + 10^((R_b - R_a) / 400)), K = 4,
start 1000. Unlike Bradley-Terry its result depends on the order of the comparisons (the last ones
count most); it is shown as a second view, not used for ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0 / math.log(10.0)  # natural-log odds -> Elo points
START = 1000.0
WINNERS = ("a", "b", "tie")


class LeaderboardError(ValueError):
    """Comparisons the ratings cannot be computed from, with the reason."""


@dataclass(frozen=True)
class Comparison:
    model_a: str
    model_b: str
    winner: str  # "a" | "b" | "tie"

    def score(self) -> float:
        """s: 1 if a won, 0 if b won, 1/2 for a tie."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.winner]


def check(comparisons: Iterable[Comparison]) -> list[Comparison]:
    out = []
    for k, c in enumerate(comparisons):
        if c.winner not in WINNERS:
            raise LeaderboardError(f"comparison {k}: winner must be a, b or tie, got {c.winner!r}")
        if c.model_a == c.model_b:
            raise LeaderboardError(f"comparison {k}: a model compared with itself ({c.model_a!r})")
        out.append(c)
    if not out:
        raise LeaderboardError("no comparisons")
    return out


def models_of(comparisons: Sequence[Comparison]) -> list[str]:
    """The models in order of first appearance."""
    return list(dict.fromkeys(m for c in comparisons for m in (c.model_a, c.model_b)))


def _arrays(comparisons: Sequence[Comparison], index: dict[str, int]):
    a = np.array([index[c.model_a] for c in comparisons])
    b = np.array([index[c.model_b] for c in comparisons])
    s = np.array([c.score() for c in comparisons])
    return a, b, s


def fit_theta(
    a: np.ndarray,
    b: np.ndarray,
    s: np.ndarray,
    n: int,
    anchor: int,
    *,
    prior: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """Bradley-Terry theta (n,) with theta[anchor] = 0, by Newton's method (module docstring).

    a, b (C,) model indices of each comparison; s (C,) 1 / 0 / 0.5. Raises LeaderboardError when the
    estimate does not exist (a model with no win or no loss and prior 0, or a disconnected graph).
    """
    theta = np.zeros(n)
    free = np.array([i for i in range(n) if i != anchor])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))  # (C,) P(a beats b)
        r = s - p
        grad = np.bincount(a, r, n) - np.bincount(b, r, n) - prior * theta
        w = p * (1.0 - p)
        hess = np.zeros((n, n))  # minus the weighted Laplacian, minus the prior
        np.add.at(hess, (a, b), w)
        np.add.at(hess, (b, a), w)
        hess -= np.diag(hess.sum(axis=1) + prior)
        h = hess[np.ix_(free, free)]
        try:
            step = np.linalg.solve(h, -grad[free])
        except np.linalg.LinAlgError:
            raise LeaderboardError("the comparisons do not connect every model to the others") from None
        theta[free] += step
        if np.max(np.abs(step)) < tol:
            return theta
        if np.max(np.abs(theta)) > 50:  # odds beyond e^50: the MLE is at infinity
            break
    raise LeaderboardError(
        "the ratings do not converge: some model never wins or never loses against the "
        "connected rest (give the fit a prior, e.g. prior=0.01, to keep them finite)"
    )


def bradley_terry(
    comparisons: Iterable[Comparison],
    *,
    anchor: str | None = None,
    prior: float = 0.0,
    models: Sequence[str] | None = None,
) -> dict[str, float]:
    """Ratings on the Elo scale, anchor (default: the first model) at 1000."""
    comparisons = check(comparisons)
    names = list(models) if models else models_of(comparisons)
    index = {m: i for i, m in enumerate(names)}
    anchor = names[0] if anchor is None else anchor
    if anchor not in index:
        raise LeaderboardError(f"anchor {anchor!r} is not among the models ({', '.join(names)})")
    _no_winless(comparisons, names, prior)
    theta = fit_theta(*_arrays(comparisons, index), len(names), index[anchor], prior=prior)
    return {m: START + SCALE * theta[i] for m, i in index.items()}


def _no_winless(comparisons: Sequence[Comparison], names: Sequence[str], prior: float) -> None:
    if prior > 0:
        return
    won = {m: 0.0 for m in names}
    lost = {m: 0.0 for m in names}
    for c in comparisons:
        s = c.score()
        won[c.model_a] += s
        lost[c.model_a] += 1 - s
        won[c.model_b] += 1 - s
        lost[c.model_b] += s
    for m in names:
        if won[m] == 0 or lost[m] == 0:
            raise LeaderboardError(
                f"model {m!r} {'never wins' if won[m] == 0 else 'never loses'}, so its maximum "
                "likelihood rating is infinite; add comparisons, or use a prior (e.g. 0.01)"
            )


def online_elo(
    comparisons: Iterable[Comparison], *, k: float = 4.0, start: float = START, base: float = 10.0, scale: float = 400.0
) -> dict[str, float]:
    """Sequential Elo ratings after the comparisons in the order given (module docstring)."""
    ratings: dict[str, float] = {}
    for c in check(comparisons):
        ra, rb = ratings.setdefault(c.model_a, start), ratings.setdefault(c.model_b, start)
        expected = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (c.score() - expected)
        ratings[c.model_a], ratings[c.model_b] = ra + delta, rb - delta
    return ratings


@dataclass
class Row:
    model: str
    rating: float
    ci_low: float
    ci_high: float
    rank: int
    wins: int
    losses: int
    ties: int
    elo: float

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "rating": self.rating,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "rank": self.rank,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "elo": self.elo,
        }


def leaderboard(
    comparisons: Iterable[Comparison],
    *,
    anchor: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    prior: float = 0.0,
    elo_k: float = 4.0,
    level: float = 0.95,
) -> list[Row]:
    """The table: Bradley-Terry ratings with bootstrap intervals and ranks, counts, online Elo; best
    first. Resamples whose fit does not exist (a model that never wins in that resample) are refitted
    with a tiny prior (1e-3) rather than dropped, which would bias the intervals."""
    comparisons = check(comparisons)
    names = models_of(comparisons)
    anchor = names[0] if anchor is None else anchor
    ratings = bradley_terry(comparisons, anchor=anchor, prior=prior, models=names)
    index = {m: i for i, m in enumerate(names)}
    a, b, s = _arrays(comparisons, index)
    rng = np.random.default_rng(seed)
    samples = np.empty((resamples, len(names)))
    for r in range(resamples):
        pick = rng.integers(0, len(comparisons), len(comparisons))
        try:
            theta = fit_theta(a[pick], b[pick], s[pick], len(names), index[anchor], prior=prior)
        except LeaderboardError:
            theta = fit_theta(a[pick], b[pick], s[pick], len(names), index[anchor], prior=max(prior, 1e-3))
        samples[r] = START + SCALE * theta
    tail = (1.0 - level) / 2 * 100
    low = np.percentile(samples, tail, axis=0) if resamples else np.array([ratings[m] for m in names])
    high = np.percentile(samples, 100 - tail, axis=0) if resamples else low
    elo = online_elo(comparisons, k=elo_k)
    counts = {m: [0, 0, 0] for m in names}  # wins, losses, ties
    for c in comparisons:
        if c.winner == "tie":
            counts[c.model_a][2] += 1
            counts[c.model_b][2] += 1
        else:
            w, lose = (c.model_a, c.model_b) if c.winner == "a" else (c.model_b, c.model_a)
            counts[w][0] += 1
            counts[lose][1] += 1
    rows = []
    for m, i in index.items():
        above = sum(1 for j in range(len(names)) if j != i and low[j] > high[i])
        rows.append(Row(m, ratings[m], float(low[i]), float(high[i]), 1 + above, *counts[m], elo[m]))
    return sorted(rows, key=lambda row: (row.rank, -row.rating))


def format_table(rows: Sequence[Row], level: float = 0.95) -> str:
    width = max(5, *(len(r.model) for r in rows))
    head = (
        f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {f'{level:.0%} interval':>17}  {'wins':>5}  "
        f"{'losses':>6}  {'ties':>5}  {'online Elo':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.rank:>4}  {r.model:<{width}}  {r.rating:>7.1f}  {r.ci_low:>8.1f} - {r.ci_high:<6.1f}  "
            f"{r.wins:>5}  {r.losses:>6}  {r.ties:>5}  {r.elo:>10.1f}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path, title: str = "Bradley-Terry ratings (95% bootstrap intervals)") -> None:
    """A PNG of the ratings with their intervals, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = list(rows)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(ordered) + 1.4))
    y = np.arange(len(ordered))
    ratings = np.array([r.rating for r in ordered])
    err = np.array([[r.rating - r.ci_low for r in ordered], [r.ci_high - r.rating for r in ordered]])
    ax.errorbar(ratings, y, xerr=err, fmt="o", color="#2456a6", ecolor="#8aa6d6", capsize=4)
    ax.set_yticks(y, [f"{r.model}  (#{r.rank})" for r in ordered])
    ax.set_xlabel("rating (Elo scale: 400 points = 10:1 odds)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
