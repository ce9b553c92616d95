"""Best-of-n facts: the analytic KL (Gao et al. 2022, arXiv 2210.10760, Sec. 2; Beirami et al. 2024,
arXiv 2401.01879, for discrete outputs), the unbiased estimator of Nakano et al. 2021 ("WebGPT",
arXiv 2112.09332, App. I) against brute force over all subsets, and per-group selection."""

import itertools
import math

import pytest
import torch

from rufus.bon import bon_expected_gold, bon_kl_bound, select_best

# --- bon_kl_bound -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, 0.0),
        (2, 0.1931),
        (4, 0.6363),
        (8, 1.2044),
        (16, 1.8351),
        (64, 3.1745),
        (1000, 5.9088),
        (60000, 10.0021),
    ],
)
def test_bon_kl_bound_values(n, expected):
    # n = 2: log 2 - 1/2 = 0.693147 - 0.5 = 0.193147; n = 4: log 4 - 3/4 = 1.386294 - 0.75 = 0.636294
    assert bon_kl_bound(n) == pytest.approx(expected, abs=1e-4)


def test_bon_kl_bound_is_the_exact_kl_of_a_fine_discretisation_and_bounds_coarse_ones():
    # K equiprobable outcomes with distinct rewards: the best of n is the k-th best with probability
    # q_k = (k/K)^n - ((k-1)/K)^n, so KL = sum_k q_k log(K q_k). K = 4, n = 2: q = (1, 3, 5, 7)/16,
    # KL = 0.1740 < 0.1931 (Beirami et al. 2024, arXiv 2401.01879); as K grows it approaches
    # log n - (n-1)/n.
    def exact(k_outcomes, n):
        total = 0.0
        for k in range(1, k_outcomes + 1):
            q = (k / k_outcomes) ** n - ((k - 1) / k_outcomes) ** n
            total += q * math.log(k_outcomes * q)
        return total

    assert exact(4, 2) == pytest.approx(0.1740, abs=1e-4)
    assert exact(4, 4) == pytest.approx(0.5903, abs=1e-4)
    assert exact(4, 16) == pytest.approx(1.3301, abs=1e-4)
    for n in (2, 4, 16):
        assert exact(4, n) < bon_kl_bound(n)
        assert exact(100000, n) == pytest.approx(bon_kl_bound(n), abs=1e-3)


def test_bon_kl_bound_errors():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            bon_kl_bound(bad)


# --- bon_expected_gold ------------------------------------------------------------------------------


def _brute_force(proxy, gold, n):
    """Average over all C(N, n) subsets of the gold score of the subset's proxy-argmax; tied maxima
    share the choice uniformly (the mean gold of the tied maximisers)."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        winners = [gold[i] for i in subset if proxy[i] == best]
        total += sum(winners) / len(winners)
        count += 1
    return total / count


def test_estimator_by_hand_n2_of_3():
    # proxy (3, 1, 2), gold (10, 20, 30): sorted by proxy the golds are g_(1..3) = (20, 30, 10)
    #   n = 2: weights C(i-1, 1) / C(3, 2) for i = 2, 3: (1/3, 2/3)  ->  30/3 + 2 * 10/3 = 16.666667
    #   brute force: subsets {0,1} -> 10, {0,2} -> 10, {1,2} -> 30; mean 50/3 = 16.666667
    assert bon_expected_gold([3.0, 1.0, 2.0], [10.0, 20.0, 30.0], 2) == pytest.approx(50 / 3, abs=1e-12)
    # n = 1: the mean gold 20; n = 3: the gold of the proxy-argmax, 10
    assert bon_expected_gold([3.0, 1.0, 2.0], [10.0, 20.0, 30.0], 1) == pytest.approx(20.0, abs=1e-12)
    assert bon_expected_gold([3.0, 1.0, 2.0], [10.0, 20.0, 30.0], 3) == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_equals_brute_force_over_all_subsets(seed):
    g = torch.Generator().manual_seed(seed)
    proxy = torch.randn(7, generator=g, dtype=torch.float64)
    gold = proxy + torch.randn(7, generator=g, dtype=torch.float64)  # correlated, imperfect proxy
    # N = 7, n = 3: C(7, 3) = 35 subsets
    assert bon_expected_gold(proxy, gold, 3) == pytest.approx(_brute_force(proxy.tolist(), gold.tolist(), 3), abs=1e-9)
    for n in range(1, 8):
        assert bon_expected_gold(proxy, gold, n) == pytest.approx(
            _brute_force(proxy.tolist(), gold.tolist(), n), abs=1e-12
        )


def test_estimator_with_tied_proxy_scores_matches_random_tie_breaking():
    # a discrete proxy (e.g. a 0/1 verifier) ties a lot; the argmax among ties is a uniform pick
    proxy = [1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.5]
    gold = [0.3, -1.0, 0.9, 0.2, 0.6, 0.1, -0.4, 0.8]
    for n in range(1, 9):
        assert bon_expected_gold(proxy, gold, n) == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)
    # every proxy equal: BoN cannot choose, any n gives the mean gold
    assert bon_expected_gold([0.0] * 8, gold, 5) == pytest.approx(sum(gold) / 8, abs=1e-12)


def test_estimator_limits():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(50, generator=g, dtype=torch.float64)
    gold = torch.randn(50, generator=g, dtype=torch.float64)
    # proxy == gold and n == N: the max gold; n = 1: the mean gold
    assert bon_expected_gold(scores, scores, 50) == pytest.approx(scores.max().item(), abs=1e-12)
    assert bon_expected_gold(scores, gold, 1) == pytest.approx(gold.mean().item(), abs=1e-12)
    # n == N with another gold: the gold of the proxy-argmax
    assert bon_expected_gold(scores, gold, 50) == pytest.approx(gold[scores.argmax()].item(), abs=1e-12)
    # proxy == gold: the BoN curve rises with n
    curve = [bon_expected_gold(scores, scores, n) for n in (1, 2, 4, 8, 16, 32, 50)]
    assert all(a < b for a, b in zip(curve, curve[1:]))


def test_estimator_is_stable_for_large_n_and_matches_expected_max_of_normals():
    # N = 10^4: C(10^4, 5000) ~ 10^3008 overflows a float; the weights never form it.
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(10_000, generator=g, dtype=torch.float64)
    ones = torch.ones(10_000, dtype=torch.float64)
    for n in (1, 2, 100, 5000, 9999, 10_000):
        value = bon_expected_gold(scores, ones, n)  # gold 1 everywhere: the weights' sum
        assert value == pytest.approx(1.0, abs=1e-9)
    assert bon_expected_gold(scores, scores, 10_000) == scores.max().item()
    # with proxy = gold ~ N(0, 1), E[max of n] = integral x n phi(x) Phi(x)^(n-1) dx: 0.5642 (n=2,
    # 1/sqrt(pi)), 1.0294 (4), 1.5388 (10). Standard error, roughly sd(max of n) / sqrt(N / n):
    # 0.83 / 71 = 0.012 (n=2), 0.70 / 50 = 0.014 (4), 0.59 / 32 = 0.019 (10); tolerance 3 s.e.
    # (n = 100 would need 0.13)
    for n, expected, tol in [(2, 0.5642, 0.036), (4, 1.0294, 0.042), (10, 1.5388, 0.057)]:
        assert bon_expected_gold(scores, scores, n) == pytest.approx(expected, abs=tol)


def test_estimator_errors():
    with pytest.raises(ValueError, match="integer in \\[1, N=3\\]"):
        bon_expected_gold([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="integer in \\[1, N=3\\]"):
        bon_expected_gold([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0)
    with pytest.raises(ValueError, match="same length"):
        bon_expected_gold([1.0, 2.0, 3.0], [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="finite"):
        bon_expected_gold([1.0, float("nan")], [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="1-D"):
        bon_expected_gold(torch.zeros(2, 2), torch.zeros(2, 2), 1)


# --- select_best -------------------------------------------------------------------------------------


def test_select_best_top1_with_ties():
    # two groups of 4:
    #   group 0 (indices 0-3): scores 0.1, 0.9, 0.9, 0.3 -> best 0.9 tied at 1 and 2: the lower index, 1
    #   group 1 (indices 4-7): scores 0.5, 0.2, 0.8, 0.8 -> tied 6 and 7: 6
    scores = torch.tensor([0.1, 0.9, 0.9, 0.3, 0.5, 0.2, 0.8, 0.8])
    assert select_best(scores, 4) == [1, 6]
    assert select_best(scores.tolist(), 4) == [1, 6]  # a plain list works too


def test_select_best_top_k_and_threshold():
    scores = [0.1, 0.9, 0.9, 0.3, 0.5, 0.2, 0.8, 0.8]
    # top 2: group 0 -> 1, 2; group 1 -> 6, 7 (best first within each group)
    assert select_best(scores, 4, top_k=2) == [1, 2, 6, 7]
    # top 3: group 0 -> 1, 2, 3 (0.3 beats 0.1); group 1 -> 6, 7, 4
    assert select_best(scores, 4, top_k=3) == [1, 2, 3, 6, 7, 4]
    # threshold 0.85 on the top 2: group 0 keeps both 0.9s, group 1 keeps none
    assert select_best(scores, 4, top_k=2, threshold=0.85) == [1, 2]
    # the threshold is inclusive (>=): 0.8 passes 0.8
    assert select_best(scores, 4, threshold=0.8) == [1, 6]
    # group size = N: one group; group size 1: every response kept
    assert select_best(scores, 8, top_k=2) == [1, 2]
    assert select_best(scores, 1) == list(range(8))


def test_select_best_errors():
    with pytest.raises(ValueError, match="positive divisor"):
        select_best([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, group_size=2\\]"):
        select_best([1.0, 2.0], 2, top_k=3)
    with pytest.raises(ValueError, match="nan"):
        select_best([1.0, float("nan")], 2)
