"""SFT loss against hand-derived values, and invariance to how a batch is split."""

import math

import torch

from rufus.losses.aggregation import aggregate, masked_mean, masked_sum, masked_var
from rufus.losses.sft import IGNORE_INDEX, sft_loss, token_logprobs


def test_hand_derived_value():
    # vocab of 2, one sequence of 3 tokens; labels[0] is masked (-100) and position t predicts t+1.
    # position 0: logits (0, 0), target 1 -> p = 1/2, nll = ln 2
    # position 1: logits (ln 3, 0), target 0 -> p = 3/4, nll = ln(4/3)
    # position 2 predicts nothing (no label after it)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, stats = sft_loss(logits, labels)
    expected = (math.log(2) + math.log(4 / 3)) / 2  # = ln(8/3)/2 = 0.490415
    assert abs(loss.item() - expected) < 1e-6
    assert stats["num_tokens"].item() == 2
    assert abs(stats["nll_sum"].item() - 2 * expected) < 1e-6


def test_masked_positions_do_not_count():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :3] = IGNORE_INDEX
    loss, _ = sft_loss(logits, labels)
    # naive reference loop over (sequence, position)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1].item()
            if y != IGNORE_INDEX:
                total -= torch.log_softmax(logits[b, t], -1)[y].item()
                count += 1
    assert abs(loss.item() - total / count) < 1e-5


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(2, 4, 9)
    targets = torch.randint(0, 9, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), expected, atol=1e-6)


def test_micro_batches_with_global_token_count_give_the_full_batch_gradient():
    # Sequences with very different numbers of labelled tokens: averaging per micro-batch and then
    # over micro-batches would weight them wrongly; dividing by the global count is exact.
    torch.manual_seed(0)
    w = torch.randn(6, 11, requires_grad=True)
    x = torch.randn(4, 8, 6)
    labels = torch.randint(0, 11, (4, 8))
    labels[0, :7] = IGNORE_INDEX  # 1 token
    labels[2, :2] = IGNORE_INDEX
    full, _ = sft_loss(x @ w, labels)
    (g_full,) = torch.autograd.grad(full, w)

    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    g_split = torch.zeros_like(w)
    total = 0.0
    for part in ([0], [1, 2], [3]):
        loss, _ = sft_loss(x[part] @ w, labels[part], num_tokens=n)
        g_split += torch.autograd.grad(loss, w)[0]
        total += loss.item()
    assert abs(total - full.item()) < 1e-5
    assert torch.allclose(g_split, g_full, atol=1e-6)


def test_masked_reductions_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, m).item() == 7.0
    assert abs(masked_mean(x, m).item() - 7.0 / 3) < 1e-6
    assert torch.equal(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0]))
    # values 1, 2, 4: mean 7/3, biased variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 42/27
    assert abs(masked_var(x, m).item() - 42 / 27) < 1e-6
    assert abs(aggregate(x, m, "token").item() - 7.0 / 3) < 1e-6
    assert aggregate(x, m, "sequence").item() == (1.5 + 4.0) / 2
    assert abs(aggregate(x, m, "constant", normalizer=10).item() - 0.7) < 1e-6
