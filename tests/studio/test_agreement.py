"""Agreement coefficients against examples computed by hand (the working is in the comments)."""

from __future__ import annotations

import pytest

from rufus.studio.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_cohen,
    raw_agreement,
)


def two_raters(table):
    """Units from a 2x2 table {(label of 1, label of 2): count}."""
    labels, u = {}, 0
    for (a, b), count in table.items():
        for _ in range(count):
            labels[u] = {"one": a, "two": b}
            u += 1
    return labels


def test_cohen_kappa_by_hand():
    # 50 units: yes-yes 20, yes-no 5, no-yes 10, no-no 15. p_o = 35/50 = 0.7; rater one says yes 25/50,
    # rater two 30/50, so p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 and kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    labels = two_raters({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15})
    result = cohen_kappa(labels, "one", "two")
    assert result["agreement"] == pytest.approx(0.7) and result["kappa"] == pytest.approx(0.4)
    assert result["units"] == 50
    (pair,) = pairwise_cohen(labels)
    assert pair["annotators"] == ("one", "two") and pair["kappa"] == pytest.approx(0.4)
    # always the same single category on both sides: chance agreement is 1, kappa undefined
    assert cohen_kappa(two_raters({("a", "a"): 3}), "one", "two")["kappa"] is None
    assert cohen_kappa(labels, "one", "nobody") is None


def test_fleiss_kappa_and_raw_agreement_by_hand():
    # u1 x x x: P = 1; u2 x x y: P = (2*1 + 1*0) / (3*2) = 1/3; u3 y y y: P = 1; P-bar = 7/9.
    # p_x = 5/9, p_y = 4/9, P_e = 25/81 + 16/81 = 41/81; kappa = (63/81 - 41/81) / (40/81) = 22/40
    labels = {
        1: {"a": "x", "b": "x", "c": "x"},
        2: {"a": "x", "b": "x", "c": "y"},
        3: {"a": "y", "b": "y", "c": "y"},
        4: {"a": "x"},
    }  # one label only: left out
    assert raw_agreement(labels) == pytest.approx(7 / 9)
    assert fleiss_kappa(labels) == pytest.approx(0.55)
    assert fleiss_kappa({1: {"a": "x", "b": "x"}}) is None and raw_agreement({1: {"a": "x"}}) is None


def test_fleiss_reduces_to_a_known_value_for_two_raters():
    # two raters, the table above: P-bar = 0.7 (p_o); pooled shares yes 55/100, no 45/100, P_e = 0.505;
    # kappa = (0.7 - 0.505) / 0.495 = 0.39394 (Scott's pi, which Fleiss' kappa is for two raters)
    labels = two_raters({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15})
    assert fleiss_kappa(labels) == pytest.approx(0.195 / 0.495)


def test_krippendorff_alpha_by_hand():
    # u1 {1, 1}, u2 {2, 3}, u3 {3, 3}. Coincidences: o11 = 2, o23 = o32 = 1, o33 = 2; n1 = 2, n2 = 1,
    # n3 = 3, n = 6. Ordinal differences: d12 = (3 - 1.5)^2 = 2.25, d23 = (4 - 2)^2 = 4,
    # d13 = (6 - 2.5)^2 = 12.25. Observed sum o d = 2 * 4 = 8; expected sum n_c n_k d =
    # 2 * (2*1*2.25 + 2*3*12.25 + 1*3*4) = 180; alpha = 1 - 5 * 8 / 180 = 7/9
    labels = {1: {"a": 1, "b": 1}, 2: {"a": 2, "b": 3}, 3: {"a": 3, "b": 3}}
    assert krippendorff_alpha(labels) == pytest.approx(7 / 9)
    # nominal: observed 2, expected 2 * (2*1 + 2*3 + 1*3) = 22; alpha = 1 - 5 * 2 / 22 = 6/11
    assert krippendorff_alpha(labels, "nominal") == pytest.approx(6 / 11)
    assert krippendorff_alpha({1: {"a": 5, "b": 5}, 2: {"a": 2, "b": 2}}) == pytest.approx(1.0)
    assert krippendorff_alpha({1: {"a": 5, "b": 5}}) is None  # one value: nothing expected to differ


def test_krippendorff_alpha_below_zero_for_systematic_disagreement():
    # a always says 1, b always 7 on units where they both rate: the pairs are maximally apart
    labels = {u: {"a": 1, "b": 7} for u in range(4)}
    assert krippendorff_alpha(labels) < 0
