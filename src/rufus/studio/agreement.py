"""How much annotators agree: raw agreement, Cohen's and Fleiss' kappa, Krippendorff's alpha (ordinal).

The data is `labels[unit][annotator] = value`: a unit is what several people labelled (an item of a
pairwise round; one response of a ranking or rating item), the value a category (pairwise outcome)
or an ordinal number (a rank, a rating). Units with fewer than two labels carry no information about
agreement and are left out, as the coefficients' definitions do.

- **Raw agreement**: over units with n_u >= 2 labels, the share of agreeing ordered pairs of labels,
  P_u = sum_c n_uc (n_uc - 1) / (n_u (n_u - 1)), averaged over units (Fleiss' P-bar).
- **Cohen's kappa** (Cohen 1960) for two annotators on the units both labelled:
  kappa = (p_o - p_e) / (1 - p_e), p_o the share of equal labels, p_e = sum_c p1_c p2_c from each
  annotator's own category shares.
- **Fleiss' kappa** (Fleiss 1971), for any number of annotators, each unit labelled by n_u >= 2 of
  them (n_u may vary; Fleiss' P_u per unit as above): kappa = (P-bar - P_e) / (1 - P_e), with
  P_e = sum_c p_c^2 and p_c the share of all labels in category c.
- **Krippendorff's alpha** (Krippendorff 2011, "Computing Krippendorff's alpha-reliability") with the
  ordinal difference: from the coincidence matrix o_ck = sum_u (pairs c-k within u) / (n_u - 1),
  n_c = sum_k o_ck, n = sum_c n_c,
      alpha = 1 - (n - 1) sum_{c,k} o_ck d_ck / sum_{c,k} n_c n_k d_ck,
      d_ck = (sum_{g between c and k} n_g - (n_c + n_k) / 2)^2   (ordinal metric),
  with the nominal difference d_ck = [c != k] as an option. 1 = perfect agreement, 0 = what chance
  gives, below 0 = systematic disagreement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from itertools import combinations
from typing import Literal

Labels = Mapping[Hashable, Mapping[Hashable, Hashable]]  # unit -> annotator -> value


def _shared(labels: Labels) -> dict:
    return {u: dict(by) for u, by in labels.items() if len(by) >= 2}


def raw_agreement(labels: Labels) -> float | None:
    """Mean over units (>= 2 labels) of the share of agreeing pairs; None without such units."""
    units = _shared(labels)
    if not units:
        return None
    total = 0.0
    for by in units.values():
        n = len(by)
        counts = Counter(by.values())
        total += sum(k * (k - 1) for k in counts.values()) / (n * (n - 1))
    return total / len(units)


def cohen_kappa(labels: Labels, first: Hashable, second: Hashable) -> dict | None:
    """{"kappa", "agreement", "units"} for two annotators on the units both labelled; None if none.
    kappa is None when chance agreement is 1 (both always gave the same single category)."""
    pairs = [(by[first], by[second]) for by in labels.values() if first in by and second in by]
    if not pairs:
        return None
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    one, two = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(one[c] * two[c] for c in set(one) | set(two)) / (n * n)
    kappa = None if p_e == 1 else (p_o - p_e) / (1 - p_e)
    return {"kappa": kappa, "agreement": p_o, "units": n}


def pairwise_cohen(labels: Labels) -> list[dict]:
    """Cohen's kappa for every pair of annotators who share at least one unit."""
    people = sorted({a for by in labels.values() for a in by}, key=str)
    out = []
    for first, second in combinations(people, 2):
        result = cohen_kappa(labels, first, second)
        if result is not None:
            out.append({"annotators": (first, second), **result})
    return out


def fleiss_kappa(labels: Labels) -> float | None:
    """Fleiss' kappa over units with >= 2 labels (module docstring); None without such units or when
    every label is in one category (chance agreement 1)."""
    units = _shared(labels)
    if not units:
        return None
    p_bar = raw_agreement(units)
    shares = Counter(v for by in units.values() for v in by.values())
    total = sum(shares.values())
    p_e = sum((k / total) ** 2 for k in shares.values())
    if p_e == 1:
        return None
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(labels: Labels, level: Literal["ordinal", "nominal"] = "ordinal") -> float | None:
    """Krippendorff's alpha (module docstring); ordinal values must be orderable (numbers, ranks).
    None without pairable values or when every value is the same (no expected disagreement)."""
    units = _shared(labels)
    values = (
        sorted({v for by in units.values() for v in by.values()})
        if level == "ordinal"
        else list(dict.fromkeys(v for by in units.values() for v in by.values()))
    )
    if len(values) < 2:
        return None
    index = {v: i for i, v in enumerate(values)}
    m = len(values)
    o = [[0.0] * m for _ in range(m)]  # coincidence matrix
    for by in units.values():
        vals = list(by.values())
        n_u = len(vals)
        for i, a in enumerate(vals):
            for j, b in enumerate(vals):
                if i != j:
                    o[index[a]][index[b]] += 1.0 / (n_u - 1)
    n_c = [sum(row) for row in o]
    n = sum(n_c)

    def delta(c: int, k: int) -> float:
        if level == "nominal":
            return float(c != k)
        low, high = min(c, k), max(c, k)
        return (sum(n_c[low : high + 1]) - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c][k] * delta(c, k) for c in range(m) for k in range(m))
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in range(m) for k in range(m))
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected
