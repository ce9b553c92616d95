"""Kahneman-Tversky Optimization (KTO): a loss on single completions labelled desirable or undesirable.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306),
Sec. 4, eq. 7 (the KTO loss). Where DPO needs a pair (y_w, y_l) for each prompt, KTO needs only a
binary signal per completion: was it desirable or not. With the implicit reward

    r(x, y) = log pi_theta(y|x) - log pi_ref(y|x)                                        (B,)

(SEQUENCE log-probabilities, the sum over the response tokens, as in `rufus.losses.dpo`), and the
reference point z0, an estimate of KL(pi_theta || pi_ref) that is detached (no gradient flows
through it) and clamped at 0, the value of a completion is

    v(x, y) = lambda_D sigmoid(beta (r(x, y) - z0))    if y is desirable
    v(x, y) = lambda_U sigmoid(beta (z0 - r(x, y)))    if y is undesirable

and the loss is the mean over the batch of lambda_y - v(x, y), where lambda_y is the weight of the
row's class. A desirable completion gains value by rising above the reference point, an undesirable
one by falling below it; because z0 is shared by the batch, the policy cannot raise every r at once
(that would raise z0 too), which is what ties the two classes together without pairs.

The reference point (Sec. 4, "Implementation"): z0 is the mean of r(x_i, y_j) over MISMATCHED pairs
of the batch, prompt x_i with the completion y_j of another row (the paper shifts the completions of
the micro-batch by one, j = i + 1 mod m). `kl_estimate` sums those log-ratios; a trainer that spreads
the batch over processes adds up each process's share before the clamp in `kto_loss`.

Weights: the paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3], n_D and n_U the counts of
desirable and undesirable examples; `weight_advice` says when a data set falls outside and what to set.
"""

from __future__ import annotations

import torch

RATIO_RANGE = (1.0, 4.0 / 3.0)  # the recommended lambda_D n_D / (lambda_U n_U)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss of eq. 7 (module docstring), per row

        l = lambda_y - v(x, y) = lambda_y sigmoid(-s beta (r - z0)),   s = +1 desirable, -1 undesirable,

    (1 - sigmoid(a) = sigmoid(-a), computed in that form: exact when v is close to lambda_y).

    policy_logps  (B,)  log pi_theta(y|x), summed over response tokens, differentiable
    ref_logps     (B,)  log pi_ref(y|x) (detached and moved to the policy's device and dtype)
    desirable     (B,)  bool: True for a desirable completion, False for an undesirable one
    kl                  () z0 before the clamp: the batch's KL estimate (`kl_estimate`); detached
                        here and clamped at 0, so it never carries a gradient
    beta                > 0; 0.1 in the paper and TRL
    desirable_weight    lambda_D > 0
    undesirable_weight  lambda_U > 0
    normalizer          loss = sum_b l_b / normalizer; default B (0 loss for no rows). A trainer that
                        splits one optimiser batch into micro-batches passes the whole batch's row count,
                        so the micro-batch losses and gradients add up to the whole batch's exactly (z0
                        must then be the whole batch's too)

    At r = z0 every value is lambda_y / 2, so a policy equal to its reference (r = 0, z0 = 0) starts
    at a loss of lambda_y / 2 per row.

    stats (detached; means over this call's rows of each class, 0 when it has none):
      rewards/desirable    mean implicit reward beta r over the desirable rows
      rewards/undesirable  mean beta r over the undesirable rows
      count/desirable, count/undesirable   how many rows of each class (to pool means over calls)
      kl                   z0 after the clamp
    Computed in at least float32 (bf16 inputs are upcast).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(
            f"desirable_weight and undesirable_weight must be > 0, got {desirable_weight} and {undesirable_weight}"
        )
    shapes = [tuple(x.shape) for x in (policy_logps, ref_logps, desirable)]
    if len(set(shapes)) > 1 or len(shapes[0]) != 1:
        raise ValueError(
            "policy_logps, ref_logps and desirable must all be (B,), got " + ", ".join(str(s) for s in shapes)
        )
    policy_logps = _upcast(policy_logps)
    dtype, device = policy_logps.dtype, policy_logps.device
    ref_logps = ref_logps.detach().to(device=device, dtype=dtype)
    desirable = desirable.to(device=device, dtype=torch.bool)
    if isinstance(kl, torch.Tensor):
        z0 = kl.detach().to(device=device, dtype=dtype)
    else:  # a Python number: straight to the loss's dtype (through float32 it would round)
        z0 = torch.tensor(float(kl), device=device, dtype=dtype)
    if z0.numel() != 1:
        raise ValueError(f"kl must be one number (the batch's z0), got shape {tuple(z0.shape)}")
    z0 = z0.reshape(()).clamp(min=0.0)  # () the reference point: detached, >= 0

    ratio = policy_logps - ref_logps  # (B,) r = log pi_theta(y|x) / pi_ref(y|x)
    sign = torch.where(desirable, ratio.new_tensor(1.0), ratio.new_tensor(-1.0))  # (B,) +1 desirable, -1 not
    weight = torch.where(  # (B,) lambda_y, in the loss's dtype (a float32 weight would round 1.2)
        desirable, ratio.new_tensor(desirable_weight), ratio.new_tensor(undesirable_weight)
    )
    per_row = weight * torch.sigmoid(-sign * beta * (ratio - z0))  # (B,) lambda_y - v(x, y)

    if normalizer is None:
        normalizer = max(ratio.numel(), 1)
    loss = per_row.sum() / normalizer

    with torch.no_grad():
        reward = beta * ratio  # (B,) implicit reward beta log pi_theta / pi_ref
        n_desirable = desirable.sum().to(dtype)
        n_undesirable = (~desirable).sum().to(dtype)
        stats = {
            "rewards/desirable": reward[desirable].sum() / n_desirable.clamp(min=1),
            "rewards/undesirable": reward[~desirable].sum() / n_undesirable.clamp(min=1),
            "count/desirable": n_desirable,
            "count/undesirable": n_undesirable,
            "kl": z0.clone(),
        }
    return loss, stats


def kl_estimate(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, normalizer: float | None = None
) -> torch.Tensor:
    """z0 before the clamp: sum over mismatched rows (x_i, y_j), j != i, of
    log pi_theta(y_j|x_i) - log pi_ref(y_j|x_i), divided by `normalizer` (default: the row count, the
    mean). Detached: the paper does not back-propagate through the reference point.

    policy_logps  (M,)  log pi_theta(y_j|x_i) of the mismatched rows
    ref_logps     (M,)  log pi_ref(y_j|x_i)
    normalizer          the number of mismatched rows over every process, when this call holds one
                        process's share (the shares' results then add up to the mean)
    Returns a () float tensor (0 for no rows). Clamp at 0 after summing the shares, as `kto_loss` does:
    the clamp of a sum is not the sum of clamps.
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1:
        shapes = f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        raise ValueError(f"policy_logps and ref_logps must both be (M,), got {shapes}")
    policy_logps = _upcast(policy_logps.detach())
    ref_logps = ref_logps.detach().to(device=policy_logps.device, dtype=policy_logps.dtype)
    if normalizer is None:
        normalizer = max(policy_logps.numel(), 1)
    return (policy_logps - ref_logps).sum() / normalizer


def weight_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """None when lambda_D n_D / (lambda_U n_U) lies in [1, 4/3], the range the KTO paper recommends
    (Sec. 4: undesirable examples weigh more per example, as losses loom larger than gains, but the
    desirable side should carry at least as much total weight); otherwise a sentence with the ratio
    and the weights that would bring it into range. Keys are named as `rufus kto` reads them."""
    lo, hi = RATIO_RANGE
    if n_desirable == 0 or n_undesirable == 0:
        which = "desirable" if n_desirable == 0 else "undesirable"
        return (
            f"kto: the training data holds no {which} completions ({n_desirable} desirable, {n_undesirable} "
            "undesirable), so the paper's weight rule lambda_D n_D / (lambda_U n_U) in [1, 4/3] cannot hold; "
            "KTO still trains, against the reference point z0 alone"
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if lo - 1e-9 <= ratio <= hi + 1e-9:
        return None
    # lambda_D = q lambda_U n_U / n_D and lambda_U = lambda_D n_D / (q n_U) for q in [1, 4/3]
    d_lo = lo * undesirable_weight * n_undesirable / n_desirable
    d_hi = hi * undesirable_weight * n_undesirable / n_desirable
    u_lo = desirable_weight * n_desirable / (hi * n_undesirable)
    u_hi = desirable_weight * n_desirable / (lo * n_undesirable)
    suggest = d_lo if ratio < lo else d_hi  # the nearest end of the range
    return (
        f"kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight:g} * "
        f"{n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3g}, outside [1, 4/3], the range "
        f"the KTO paper recommends; set kto.desirable_weight between {d_lo:.3g} and {d_hi:.3g} "
        f"(e.g. kto.desirable_weight={suggest:.3g}), or kto.undesirable_weight between {u_lo:.3g} and {u_hi:.3g}"
    )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> float32; float64 stays (tests compare in double)."""
    return x if x.dtype == torch.float64 else x.float()
