"""ILQL's losses against values derived by hand, and a naive per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from rufus.losses.ilql import (
    bellman_targets,
    cql_loss,
    expectile_loss,
    ilql_loss,
    next_state_values,
    perturbed_logits,
    q_loss,
)


def test_next_state_values_shift_left_and_end_at_the_last_token():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # row 0: V(s_1), V(s_2), then 0 after the last real token (t = 2), 0 on padding
    # row 1: 6, 7, 8, and 0 after its last token (t = 3: the episode ends)
    assert next_state_values(values, mask).tolist() == [[2.0, 3.0, 0.0, 0.0], [6.0, 7.0, 8.0, 0.0]]


def test_bellman_targets_add_the_discounted_next_value():
    rewards = torch.tensor([[0.0, 0.0, 5.0]])
    next_v = torch.tensor([[2.0, 3.0, 0.0]])
    # y = r + gamma V(s'): 0 + 0.5*2 = 1, 0 + 0.5*3 = 1.5, 5 + 0 = 5
    y = bellman_targets(rewards, next_v.requires_grad_(), gamma=0.5)
    assert y.tolist() == [[1.0, 1.5, 5.0]] and not y.requires_grad


def test_q_loss_sums_heads_and_averages_tokens():
    q = torch.tensor([[[1.0, 2.0]], [[0.0, 2.0]]])  # (H=2, B=1, A=2)
    y = torch.tensor([[1.0, 1.0]])
    # head 1: (1-1)^2 + (2-1)^2 = 1; head 2: (0-1)^2 + (2-1)^2 = 2; (1 + 2) / 2 tokens = 1.5
    assert q_loss(q, y, torch.ones(1, 2)).item() == pytest.approx(1.5)
    # the second token masked: head 1: 0, head 2: 1 -> 1 / 1 token
    assert q_loss(q, y, torch.tensor([[1, 0]])).item() == pytest.approx(1.0)


def test_expectile_loss_weights_the_two_signs_by_tau():
    target_q = torch.tensor([[2.0, 0.0, 4.0]])
    v = torch.tensor([[1.0, 1.0, 2.0]])
    # u = Qhat - V = 1, -1, 2; weights |0.7 - 1(u<0)| = 0.7, 0.3, 0.7
    # 0.7*1 + 0.3*1 + 0.7*4 = 3.8, / 3 tokens
    assert expectile_loss(target_q, v, torch.ones(1, 3), tau=0.7).item() == pytest.approx(3.8 / 3)
    # tau = 0.5: half the mean squared error, (1 + 1 + 4) / 2 / 3
    assert expectile_loss(target_q, v, torch.ones(1, 3), tau=0.5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(target_q, v, torch.ones(1, 3), tau=1.0)


def test_expectile_value_goes_to_an_upper_expectile_of_the_targets():
    # V fitted to the targets {0, 1} with tau = 0.9: the minimiser of 0.1 v^2 + 0.9 (1-v)^2 (v in
    # [0, 1]) has derivative 0.2 v - 1.8 (1 - v) = 0 -> v = 1.8 / 2.0 = 0.9
    v = torch.zeros(1, 2, requires_grad=True)
    target = torch.tensor([[0.0, 1.0]])
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(500):
        opt.zero_grad()
        shared = v.mean().expand(1, 2)  # one V for both targets
        expectile_loss(target, shared, torch.ones(1, 2), tau=0.9).backward()
        opt.step()
    assert v.mean().item() == pytest.approx(0.9, abs=1e-4)


def test_cql_loss_is_the_cross_entropy_of_softmax_q_against_the_taken_token():
    q = torch.tensor([[[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]]])  # (H=1, B=1, A=2, V=2)
    actions = torch.tensor([[0, 1]])
    # logsumexp(0, ln 3) = ln 4; token 0: ln 4 - 0 = 1.386294; token 1: ln 4 - ln 3 = 0.287682
    want = (math.log(4) + math.log(4) - math.log(3)) / 2
    assert cql_loss(q, actions, torch.ones(1, 2)).item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx((1.386294 + 0.287682) / 2, abs=1e-6)


def test_ilql_loss_by_hand_on_one_two_token_response():
    # B = 1, A = 2 tokens, V = 2 tokens in the vocabulary, H = 2 heads; actions a_0 = 1, a_1 = 0
    q = torch.tensor(
        [
            [[[0.0, 1.0], [2.0, 0.0]]],  # Q_1(s_0, .) = (0, 1), Q_1(s_1, .) = (2, 0)
            [[[0.0, 0.5], [1.0, 0.0]]],  # Q_2
        ]
    )
    target_taken = torch.tensor([[[1.0, 2.0]], [[0.8, 3.0]]])  # Qhat_i(s_t, a_t)
    v = torch.tensor([[0.5, 1.0]])
    actions = torch.tensor([[1, 0]])
    rewards = torch.tensor([[0.0, 2.0]])
    mask = torch.ones(1, 2)
    loss, stats = ilql_loss(q, target_taken, v, actions, rewards, mask, gamma=0.9, tau=0.7, cql_alpha=0.5)
    # targets: y_0 = 0 + 0.9 V(s_1) = 0.9; y_1 = 2 + 0 (terminal) = 2
    # Q_1 taken (1, 2): (1 - 0.9)^2 + (2 - 2)^2 = 0.01; Q_2 taken (0.5, 1): 0.16 + 1 = 1.16; L_Q = 1.17 / 2
    l_q = 1.17 / 2
    # min_i Qhat = (0.8, 2); u = (0.3, 1.0) both >= 0: 0.7 * (0.09 + 1.0) / 2
    l_v = 0.7 * 1.09 / 2
    # CQL: head 1: lse(0,1) - 1 and lse(2,0) - 2; head 2: lse(0,0.5) - 0.5 and lse(1,0) - 1
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    l_cql = ((lse(0, 1) - 1) + (lse(2, 0) - 2) + (lse(0, 0.5) - 0.5) + (lse(1, 0) - 1)) / 2
    assert stats["loss/q"].item() == pytest.approx(l_q, abs=1e-6)
    assert stats["loss/v"].item() == pytest.approx(l_v, abs=1e-6)
    assert stats["loss/cql"].item() == pytest.approx(l_cql, abs=1e-6)
    assert loss.item() == pytest.approx(l_q + l_v + 0.5 * l_cql, abs=1e-6)
    assert stats["advantage/mean"].item() == pytest.approx((0.3 + 1.0) / 2, abs=1e-6)
    assert stats["q/mean"].item() == pytest.approx(((1 + 0.5) / 2 + (2 + 1) / 2) / 2, abs=1e-6)


def _naive(q, tq, v, actions, rewards, mask, gamma, tau, alpha):
    """Token by token, as the paper writes it."""
    H, B, A, _ = q.shape
    total_q = total_v = total_c = 0.0
    n = 0
    for b in range(B):
        last = max(t for t in range(A) if mask[b, t])
        for t in range(A):
            if not mask[b, t]:
                continue
            n += 1
            nxt = 0.0 if t == last else v[b, t + 1].item()
            y = rewards[b, t].item() + gamma * nxt
            a = actions[b, t].item()
            for i in range(H):
                total_q += (q[i, b, t, a].item() - y) ** 2
                total_c += torch.logsumexp(q[i, b, t], 0).item() - q[i, b, t, a].item()
            u = min(tq[i, b, t].item() for i in range(H)) - v[b, t].item()
            total_v += (tau if u >= 0 else 1 - tau) * u * u
    return (total_q + total_v + alpha * total_c) / n


def test_ilql_loss_matches_a_naive_loop_and_micro_batches_add_up():
    g = torch.Generator().manual_seed(0)
    H, B, A, V = 2, 4, 5, 7
    q = torch.randn(H, B, A, V, generator=g, dtype=torch.float64)
    tq = torch.randn(H, B, A, generator=g, dtype=torch.float64)
    v = torch.randn(B, A, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, A), generator=g)
    lengths = [5, 3, 1, 4]
    mask = torch.tensor([[1] * n + [0] * (A - n) for n in lengths])
    rewards = torch.zeros(B, A, dtype=torch.float64)
    for b, n in enumerate(lengths):
        rewards[b, n - 1] = torch.randn(1, generator=g, dtype=torch.float64).item()
    kw = dict(gamma=0.95, tau=0.8, cql_alpha=0.3)
    whole, _ = ilql_loss(q, tq, v, actions, rewards, mask, **kw)
    assert whole.item() == pytest.approx(_naive(q, tq, v, actions, rewards, mask, 0.95, 0.8, 0.3), abs=1e-10)
    # two micro-batches, each divided by the whole batch's token count, add up to the whole
    n = mask.sum()
    parts = [
        ilql_loss(q[:, s], tq[:, s], v[s], actions[s], rewards[s], mask[s], **kw, normalizer=n)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-12)


def test_gradients_flow_only_where_the_paper_lets_them():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 3, 4, generator=g, requires_grad=True)
    tq = torch.randn(2, 1, 3, generator=g, requires_grad=True)
    v = torch.randn(1, 3, generator=g, requires_grad=True)
    actions = torch.tensor([[0, 3, 1]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, _ = ilql_loss(q, tq, v, actions, rewards, mask, gamma=0.9, tau=0.7, cql_alpha=0.0)
    loss.backward()
    assert tq.grad is None  # the target heads never learn from the loss
    # V learns from the expectile loss alone (the Bellman target's V(s') is held fixed):
    # d/dV w u^2 / n = -2 w u / n, u = min_i Qhat - V
    u = tq.detach().min(0).values - v.detach()
    w = torch.where(u < 0, 0.3, 0.7)
    assert torch.allclose(v.grad, -2 * w * u / 3, atol=1e-6)


def test_perturbed_logits_tilt_the_language_model_by_the_advantage():
    logits = torch.tensor([[0.0, 0.0]])  # pi_beta = (1/2, 1/2)
    q = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([0.5])
    out = perturbed_logits(logits, q, v, beta=2.0)
    # log(1/2) + 2 (1 - 0.5) and log(1/2) + 2 (0 - 0.5)
    assert out[0].tolist() == pytest.approx([-math.log(2) + 1.0, -math.log(2) - 1.0])
    # softmax: e^1 / (e^1 + e^-1) = sigmoid(2) = 0.880797
    assert out.softmax(-1)[0, 0].item() == pytest.approx(0.880797, abs=1e-6)
    assert torch.allclose(perturbed_logits(logits, q, v, beta=0.0), torch.log_softmax(logits, -1))
