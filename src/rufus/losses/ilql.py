"""Implicit Language Q-Learning (ILQL): offline RL on logged (prompt, response, reward) rows.

Snell, Kostrikov, Su, Yang, Levine 2022, "Offline RL for Natural Language Generation with Implicit
Language Q Learning" (arXiv 2206.11871). Each response token is an action: the state s_t is the
prompt and the response tokens before t, the action a_t the token at t, and the episode's reward
arrives with its last token (r_t = R at the last token, 0 before). A language model carries a value
head V(s) and Q heads Q_i(s, .) over the vocabulary (two, i = 1, 2, for double Q-learning), plus
target copies Qhat_i of the Q heads that follow them by Polyak averaging. The losses (paper Sec. 4):

  Bellman (eq. 1)    L_Q   = sum_i E_t[(Q_i(s_t, a_t) - y_t)^2],   y_t = r_t + gamma V(s_{t+1})
                     with V(s_{t+1}) = 0 after the last token (the episode ends) and no gradient
                     through the target y_t.
  expectile (eq. 2)  L_V   = E_t[|tau - 1(u_t < 0)| u_t^2],        u_t = min_i Qhat_i(s_t, a_t) - V(s_t)
                     tau > 0.5 moves V toward an upper expectile of Q over the data's actions: an
                     estimate of the best in-data action's value without querying unseen actions
                     (implicit Q-learning, Kostrikov et al. 2021, arXiv 2110.06169, eq. 5).
  conservative (eq. 4) L_CQL = sum_i E_t[logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t)]
                     CQL (Kumar et al. 2020, arXiv 2006.04779): the cross-entropy of softmax(Q_i)
                     against the data's token; it pushes down the Q of tokens the data never took.

  L = L_Q + L_V + alpha L_CQL   (+ the language-model NLL on the data, weighted, by the trainer)

and the policy extracted at decoding time (Sec. 4.3) perturbs the data's language model pi_beta:

  pi(a | s)  proportional to  pi_beta(a | s) exp(beta (Q(s, a) - V(s))),   Q = min_i Qhat_i

Expectations are over the response tokens of a batch: each function sums over its tokens and
divides by `normalizer` (default: the number of tokens), so micro-batches that each pass the whole
batch's token count add up to the whole batch's loss.
"""

from __future__ import annotations

import torch


def next_state_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, A) V(s_{t+1}) for each action a_t: the value of the state after it, 0 after the last
    response token (terminal) and wherever `mask` is 0.

    values (B, A)  V(s_t), the value of the state in which a_t is taken (position t of the response)
    mask   (B, A)  1 on response tokens (contiguous from t = 0), 0 on padding
    """
    mask = mask.to(values.dtype)
    after = torch.zeros_like(values)
    after[:, :-1] = values[:, 1:] * mask[:, 1:]  # the next state exists only if the next token does
    return after * mask


def bellman_targets(rewards: torch.Tensor, next_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, A) y_t = r_t + gamma V(s_{t+1}), detached (paper eq. 1: the target is held fixed)."""
    return (rewards + gamma * next_values).detach()


def q_loss(q_taken: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """L_Q = sum_i sum_t mask (Q_i(s_t, a_t) - y_t)^2 / normalizer.

    q_taken (H, B, A)  Q_i(s_t, a_t) of the H online Q heads; targets (B, A) y_t; mask (B, A)."""
    mask = mask.to(q_taken.dtype)
    return ((q_taken - targets.detach()) ** 2 * mask).sum() / _norm(normalizer, mask)


def expectile_loss(
    target_q: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, tau: float, normalizer=None
) -> torch.Tensor:
    """L_V = sum_t mask |tau - 1(u_t < 0)| u_t^2 / normalizer, u_t = Qhat(s_t, a_t) - V(s_t).

    target_q (B, A) min_i Qhat_i(s_t, a_t) (detached here: only V learns from this loss);
    values (B, A) V(s_t); tau in (0, 1). tau = 0.5 weighs both signs alike (half the squared error,
    whose minimiser is the mean); tau -> 1 approaches the maximum over the data's actions."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    mask = mask.to(values.dtype)
    u = target_q.detach() - values
    weight = (tau - (u < 0).to(u.dtype)).abs()  # |tau - 1(u < 0)|
    return (weight * u**2 * mask).sum() / _norm(normalizer, mask)


def cql_loss(q_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    """L_CQL = sum_i sum_t mask (logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t)) / normalizer.

    q_logits (H, B, A, V) Q_i(s_t, .) of the online heads over the vocabulary; actions (B, A) a_t."""
    mask = mask.to(q_logits.dtype)
    taken = q_logits.gather(-1, actions.expand(q_logits.shape[0], *actions.shape).unsqueeze(-1)).squeeze(-1)
    return ((torch.logsumexp(q_logits, dim=-1) - taken) * mask).sum() / _norm(normalizer, mask)


def ilql_loss(
    q_logits: torch.Tensor,
    target_q_taken: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 0.99,
    tau: float = 0.7,
    cql_alpha: float = 0.1,
    normalizer=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_Q + L_V + alpha L_CQL (module docstring) over a batch of responses.

    q_logits       (H, B, A, V)  Q_i(s_t, .) of the H online Q heads, differentiable
    target_q_taken (H, B, A)     Qhat_i(s_t, a_t) of the target heads (no gradient)
    values         (B, A)        V(s_t), differentiable
    actions        (B, A)        a_t, the response's token ids
    rewards        (B, A)        r_t: the episode's reward at its last token, 0 elsewhere
    mask           (B, A)        1 on response tokens (contiguous from t = 0)
    gamma, tau, cql_alpha        discount, expectile, CQL weight (the paper's gamma, tau, alpha)

    stats (detached means over the response tokens): loss/q, loss/v, loss/cql, and q/mean (online
    Q of the taken tokens, mean over heads), q/target (min_i Qhat_i), v/mean, advantage/mean
    (min_i Qhat_i - V, what decoding adds beta times).
    """
    q_logits = _upcast(q_logits)
    dtype = q_logits.dtype
    values, rewards = values.to(dtype), rewards.to(dtype)
    target_q_taken = target_q_taken.detach().to(dtype)
    mask = mask.to(dtype)
    q_taken = q_logits.gather(-1, actions.expand(q_logits.shape[0], *actions.shape).unsqueeze(-1)).squeeze(-1)
    targets = bellman_targets(rewards, next_state_values(values, mask), gamma)  # (B, A) y_t
    target_q = target_q_taken.min(dim=0).values  # (B, A) min_i Qhat_i(s_t, a_t)
    l_q = q_loss(q_taken, targets, mask, normalizer)
    l_v = expectile_loss(target_q, values, mask, tau, normalizer)
    l_cql = cql_loss(q_logits, actions, mask, normalizer)
    loss = l_q + l_v + cql_alpha * l_cql
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "loss/q": l_q.detach(),
            "loss/v": l_v.detach(),
            "loss/cql": l_cql.detach(),
            "q/mean": (q_taken.mean(0) * mask).sum() / n,
            "q/target": (target_q * mask).sum() / n,
            "v/mean": (values * mask).sum() / n,
            "advantage/mean": ((target_q - values) * mask).sum() / n,
        }
    return loss, stats


def perturbed_logits(logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """(..., V) log pi_beta(. | s) + beta (Q(s, .) - V(s)): ILQL's policy as logits (Sec. 4.3).

    logits (..., V) the language model's; q (..., V) min_i Qhat_i(s, .); v (...) V(s). beta = 0 gives
    the language model's own log-probabilities. Softmax of the result is the decoding distribution;
    V(s) shifts every token alike, so it changes the distribution not at all, but keeps the logits'
    scale readable (the advantage of each token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if beta == 0:
        return logp
    return logp + beta * (q.float() - v.float().unsqueeze(-1))


def _norm(normalizer, mask: torch.Tensor):
    return mask.sum().clamp(min=1) if normalizer is None else normalizer


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()
