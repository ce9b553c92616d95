"""The hidden gold taste and simulated annotators for the built-in offline task.

The gold score of a response is a weighted sum of the qualities `rufus.playground.corpus.measure`
reads from the text (each in [0, 1]); the weights are a named preference (`PREFERENCES`) or explicit
ones ("polite=2,concise=1"), so a different taste can be chosen. Annotators see the same qualities
but each weighs them a little differently (weights perturbed multiplicatively, lognormal with
sigma = `disagreement`, fixed per annotator), and their labels are noisy: annotator j prefers a over b
with the Bradley-Terry probability

    p(a > b) = sigmoid((g_j(a) - g_j(b)) / temperature)

(Bradley & Terry 1952; the model reward modelling fits, Ouyang et al. 2022 eq. 1), and ranks K
responses by sorting g_j / temperature + Gumbel noise, a sample from the Plackett-Luce model whose
pairwise marginals are that same Bradley-Terry probability. Rows come out in the formats a
human-labelled file uses: preference {"prompt", "chosen", "rejected"} and ranking {"prompt",
"responses"} (best first), plus an "annotator" column that loaders keep and ignore.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from rufus.playground.corpus import measure

DIMENSIONS = ("on_topic", "polite", "concise", "non_repetitive", "answers")

PREFERENCES: dict[str, dict[str, float]] = {
    # helpful first (on topic, answering), then manners and brevity
    "default": {"on_topic": 2.0, "polite": 1.0, "concise": 1.0, "non_repetitive": 1.0, "answers": 2.0},
    "concise": {"on_topic": 1.0, "polite": 0.5, "concise": 4.0, "non_repetitive": 1.0, "answers": 1.0},
    "polite": {"on_topic": 1.0, "polite": 4.0, "concise": 0.5, "non_repetitive": 1.0, "answers": 1.0},
    "helpful": {"on_topic": 2.0, "polite": 0.5, "concise": 0.5, "non_repetitive": 0.5, "answers": 4.0},
}


def resolve_preference(preference: str | Mapping[str, float] | None = "default") -> dict[str, float]:
    """Weights per dimension from a name in `PREFERENCES`, "dim=w,dim=w" text, or a mapping.

    Dimensions left out weigh 0. Unknown names or dimensions and non-finite or negative weights raise
    ValueError naming the choices.
    """
    if preference is None:
        preference = "default"
    if isinstance(preference, str):
        text = preference.strip()
        if "=" not in text:
            if text not in PREFERENCES:
                raise ValueError(
                    f"unknown preference {text!r}; choose one of {', '.join(PREFERENCES)} "
                    f"or give weights like 'polite=2,concise=1'"
                )
            return dict(PREFERENCES[text])
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            try:
                pairs[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"preference weight {item!r} is not 'dimension=number'") from None
        preference = pairs
    weights = {d: 0.0 for d in DIMENSIONS}
    for name, value in preference.items():
        if name not in weights:
            raise ValueError(f"unknown preference dimension {name!r}; choose from {', '.join(DIMENSIONS)}")
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"preference weight for {name!r} must be a finite number >= 0, got {value!r}")
        weights[name] = float(value)
    if not any(weights.values()):
        raise ValueError("preference weights are all zero; give at least one positive weight")
    return weights


def _score(qualities: Mapping[str, float], weights: Mapping[str, float]) -> float:
    return sum(weights[d] * qualities[d] for d in DIMENSIONS)


def gold_score(prompt: Any, response: Any, preference: str | Mapping[str, float] | None = "default") -> float:
    """The hidden gold taste: sum over DIMENSIONS of weight * measure(prompt, response)[dimension]."""
    return _score(measure(prompt, response), resolve_preference(preference))


def best_gold(preference: str | Mapping[str, float] | None = "default") -> float:
    """The highest gold score any response can get (every quality at 1)."""
    return sum(resolve_preference(preference).values())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class Annotators:
    """`n` simulated annotators sharing a taste, each with their own fixed weights (module docstring).

    temperature: Bradley-Terry / Plackett-Luce temperature; 0 makes labels deterministic (ties broken
        at random). disagreement: sigma of the lognormal factor on each annotator's weights; 0 makes
        every annotator weigh exactly as `preference`.
    """

    def __init__(
        self,
        preference: str | Mapping[str, float] | None = "default",
        *,
        n: int = 3,
        temperature: float = 0.5,
        disagreement: float = 0.3,
        seed: int = 0,
    ):
        if n < 1:
            raise ValueError(f"need at least one annotator, got n={n}")
        if temperature < 0 or disagreement < 0:
            raise ValueError("temperature and disagreement must be >= 0")
        self.preference = resolve_preference(preference)
        self.temperature = float(temperature)
        self.disagreement = float(disagreement)
        rng = random.Random(seed)
        self.weights = [
            {d: w * rng.lognormvariate(0.0, self.disagreement) for d, w in self.preference.items()} for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.weights)

    def score(self, prompt: Any, response: Any, annotator: int = 0) -> float:
        """Annotator `annotator`'s noiseless score of `response`."""
        return _score(measure(prompt, response), self.weights[annotator])

    def compare(self, prompt: Any, a: Any, b: Any, rng: random.Random, annotator: int = 0) -> bool:
        """True when `annotator` prefers `a` to `b`: a draw with p = sigmoid((g_a - g_b) / temperature)."""
        diff = self.score(prompt, a, annotator) - self.score(prompt, b, annotator)
        if self.temperature == 0 or diff == 0:
            return diff > 0 or (diff == 0 and rng.random() < 0.5)
        return rng.random() < _sigmoid(diff / self.temperature)

    def label_pairs(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], seed: int = 0
    ) -> list[dict[str, Any]]:
        """Preference rows {"prompt", "chosen", "rejected", "annotator"}, annotators taken round-robin.

        Pairs whose texts are identical, or where either is blank, are skipped (nothing to compare,
        and the preference format rejects them).
        """
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError("prompts, responses_a and responses_b must have the same length")
        rng = random.Random(seed)
        rows = []
        for i, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            if a == b or not str(a).strip() or not str(b).strip():
                continue
            j = i % len(self)
            chosen, rejected = (a, b) if self.compare(prompt, a, b, rng, j) else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "annotator": j})
        return rows

    def rank(self, prompt: Any, responses: Sequence[str], seed: int = 0, annotator: int = 0) -> list[str]:
        """Distinct non-blank `responses` best first: sorted on g / temperature + Gumbel noise."""
        rng = random.Random(seed)
        distinct = list(dict.fromkeys(r for r in responses if isinstance(r, str) and r.strip()))

        def key(response: str) -> float:
            g = self.score(prompt, response, annotator)
            if self.temperature == 0:
                return g
            u = min(max(rng.random(), 1e-12), 1 - 1e-12)
            return g / self.temperature - math.log(-math.log(u))

        keyed = [(key(r), rng.random(), r) for r in distinct]
        return [r for _, _, r in sorted(keyed, key=lambda t: (t[0], t[1]), reverse=True)]

    def rank_rows(self, prompts: Sequence[str], groups: Sequence[Sequence[str]], seed: int = 0) -> list[dict[str, Any]]:
        """Ranking rows {"prompt", "responses" (best first), "annotator"}; groups with < 2 distinct skipped."""
        if len(prompts) != len(groups):
            raise ValueError("prompts and groups must have the same length")
        rows = []
        for i, (prompt, group) in enumerate(zip(prompts, groups)):
            j = i % len(self)
            ranked = self.rank(prompt, group, seed=seed * 1_000_003 + i, annotator=j)
            if len(ranked) >= 2:
                rows.append({"prompt": prompt, "responses": ranked, "annotator": j})
        return rows


def gold_win_rate(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    preference: str | Mapping[str, float] | None = "default",
) -> float:
    """Share of prompts where the gold taste prefers a to b; ties count 1/2."""
    weights = resolve_preference(preference)
    if not prompts:
        return 0.5
    total = 0.0
    for prompt, a, b in zip(prompts, responses_a, responses_b, strict=True):
        ga, gb = _score(measure(prompt, a), weights), _score(measure(prompt, b), weights)
        total += 1.0 if ga > gb else 0.5 if ga == gb else 0.0
    return total / len(prompts)


def gold_label_accuracy(
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    preference: str | Mapping[str, float] | None = "default",
) -> float:
    """Share of labelled pairs where the gold taste agrees with the label (ties count 1/2)."""
    return gold_win_rate(prompts, chosen, rejected, preference)
