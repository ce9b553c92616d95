"""Best-of-n facts: the KL of the best-of-n policy, the unbiased estimator of its expected gold
reward from a fixed pool of samples, and selecting the best responses of each group.

Best-of-n (BoN): draw n responses y_1..y_n ~ pi_ref, keep the one the proxy reward scores highest.
It is the simplest way to optimise a reward model, the baseline every RL curve is compared against
(Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization", Sec. 2), and, with
fine-tuning on the kept responses, rejection-sampling fine-tuning (trainers/bon.py).

Pure functions; python numbers or 1-D tensors in, python numbers out. Sources: Gao et al. 2022
(arXiv 2210.10760), Sec. 2; Nakano et al. 2021 ("WebGPT", arXiv 2112.09332), App. I; Beirami et al.
2024 (arXiv 2401.01879) for discrete outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def bon_kl_bound(n: int) -> float:
    """KL(pi_bon || pi_ref) = log n - (n - 1) / n, in nats, for a continuous proxy reward (no ties).

    Stiennon et al. 2020 ("Learning to summarize from human feedback", appendix on best-of-N) and
    Gao et al. 2022, Sec. 2 (their KL_bon). Derivation: with u = F(r(y)) uniform under pi_ref, the
    best of n has density n u^(n-1) relative to pi_ref, so KL = E[log n + (n-1) log u] with
    u ~ Beta(n, 1), E[log u] = -1/n. For discrete outputs or ties it is an UPPER bound on the exact
    KL (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
    arXiv 2401.01879); e.g. 4 equiprobable outcomes and n = 2 give 0.1740 < 0.1931.

    n = 1 gives 0 (no selection); values: 0.1931 (2), 0.6363 (4), 1.2044 (8), 5.9088 (1000).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return math.log(n) - (n - 1) / n


def bon_expected_gold(proxy: torch.Tensor | Sequence[float], gold: torch.Tensor | Sequence[float], n: int) -> float:
    """Unbiased estimate of E[gold reward of the proxy-best of n draws] from N >= n samples.

    Nakano et al. 2021 ("WebGPT"), App. I; used by Gao et al. 2022, Sec. 2 for every n at once:

        E[g_bon(n)] = sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * g_(i)

    where g_(i) is the gold score of the sample ranked i-th smallest by proxy (1-based). Why: each of
    the C(N, n) size-n subsets is equally likely, and sample (i) is its proxy-argmax exactly when the
    other n - 1 members come from the i - 1 samples below it: C(i-1, n-1) subsets. So this equals
    the average over all subsets of the gold score of each subset's proxy-argmax (tested by brute
    force), without enumerating them.

    Weights are computed from w_N = n/N and w_{i-1} = w_i (i-n)/(i-1) in float64: ratios <= 1, no
    binomial is ever formed, so N = 10^4 (or 10^6) neither overflows nor loses precision (tiny
    weights underflow to 0, which they are to double precision). They sum to 1 (hockey stick).

    Ties in proxy: the argmax among tied samples is taken uniformly at random, which is the same as
    giving every sample of a tied block the block's mean gold score (a subset holding m of the block
    picks each of them with probability 1/m; by symmetry the expectation is the block mean). With no
    ties this changes nothing.

    proxy, gold  (N,)  proxy-RM and gold scores of the same N samples from one prompt's pi_ref (or
                       a pool of iid samples); finite. proxy == gold gives the proxy's own BoN curve.
    n                  1 <= n <= N. n = 1 is the mean gold; n = N the gold of the proxy-argmax.
    """
    proxy = _as_1d(proxy, "proxy")
    gold = _as_1d(gold, "gold")
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold must have the same length, got {proxy.numel()} and {gold.numel()}")
    total = proxy.numel()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"n must be an integer in [1, N={total}], got {n!r}")
    if not (torch.isfinite(proxy).all() and torch.isfinite(gold).all()):
        raise ValueError("proxy and gold scores must be finite")

    order = torch.argsort(proxy, stable=True)  # (N,) ascending by proxy
    proxy_sorted, gold_sorted = proxy[order], gold[order]  # (N,)
    # tied proxies: every member of a block of equal scores gets the block's mean gold
    _, block, counts = torch.unique_consecutive(proxy_sorted, return_inverse=True, return_counts=True)
    block_gold = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, block, gold_sorted)
    gold_sorted = (block_gold / counts)[block]  # (N,)

    i = torch.arange(n + 1, total + 1, dtype=torch.float64)  # (N - n,) i = n+1 .. N
    ratios = (i - n) / (i - 1)  # w_{i-1} / w_i
    below_top = (n / total) * torch.cumprod(ratios.flip(0), dim=0)  # w_{N-1}, w_{N-2}, ..., w_n
    weights = torch.cat([below_top.flip(0), torch.tensor([n / total], dtype=torch.float64)])  # w_n .. w_N
    return float((weights * gold_sorted[n - 1 :]).sum())


def select_best(
    scores: torch.Tensor | Sequence[float],
    group_size: int,
    *,
    top_k: int = 1,
    threshold: float | None = None,
) -> list[int]:
    """Indices into the flat list of the responses kept from each group (rejection sampling).

    scores      (N,) one score per response, N = B * group_size, prompt b's responses at
                b*group_size .. b*group_size + group_size - 1
    top_k       keep the k best of each group (1 = best-of-n); 1 <= top_k <= group_size
    threshold   if given, keep only those of the top_k with score >= threshold (a group may then
                give none), as in RAFT / ReST-style filtering

    Ties are broken by the lower index (the earlier sample wins), so the result is deterministic.
    Returned group by group, best first within a group. Scores must not be nan (nan has no rank).
    """
    values = _as_1d(scores, "scores").tolist()
    total = len(values)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or total % group_size:
        raise ValueError(f"group_size must be a positive divisor of the number of scores ({total}), got {group_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= group_size:
        raise ValueError(f"top_k must be an integer in [1, group_size={group_size}], got {top_k!r}")
    if any(math.isnan(v) for v in values):
        raise ValueError("scores contain nan")
    kept = []
    for start in range(0, total, group_size):
        ranked = sorted(range(start, start + group_size), key=lambda i: (-values[i], i))[:top_k]
        if threshold is not None:
            ranked = [i for i in ranked if values[i] >= threshold]
        kept += ranked
    return kept


def _as_1d(x: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    """A detached float64 CPU copy of a 1-D tensor or sequence of numbers."""
    t = x.detach().to("cpu", torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
    return t
