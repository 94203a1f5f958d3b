"""GRPO maths as pure functions (paper Eq. 3), matching TRL's GRPOTrainer formulas.

Advantages are normalised within each prompt's group of G rollouts (TRL: unbiased std, + 1e-4), so a group whose
rewards are all equal gets advantage 0 and contributes no gradient. The per-token loss is the clipped surrogate
-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) (+ beta * k3 KL to a reference), aggregated by `loss_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True,
                     std_floor: float | None = None) -> torch.Tensor:
    """(B*G,) rewards ordered (prompt, rollout) -> advantages. NaN rewards are ignored; groups of one get 0.

    A = (R − mean) / (σ + eps) (TRL) when `std_floor` is 0 or None; A = (R − mean) / max(σ + eps, std_floor)
    otherwise, and a group whose rewards are all equal then gets exactly 0 (its float mean is not always exactly
    that value). The floor is in reward units: it stops a group whose rewards differ only by noise, e.g.
    1e-3 nats of r_causal among all-correct rollouts, from being stretched to advantages of ±1, and leaves any group
    with σ ≥ floor unchanged. A positive scale is monotone, so the order of R within a group is kept either way.
    """
    if std_floor is not None and not (math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"std_floor must be a finite number >= 0, got {std_floor}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale:
        count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
        std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
        denominator = (std + eps).clamp(min=std_floor) if std_floor else std + eps
        advantages = advantages / denominator
    if std_floor:
        low = grouped.nan_to_num(nan=float("inf")).amin(dim=1, keepdim=True)
        high = grouped.nan_to_num(nan=float("-inf")).amax(dim=1, keepdim=True)
        advantages = advantages.masked_fill(low == high, 0.0)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    grouped = rewards.view(-1, group_size)
    return float((grouped.max(dim=1).values - grouped.min(dim=1).values == 0).float().mean())


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (always >= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: float
    kl: float
    ratio_mean: float


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        epsilon_low: float = 0.2, epsilon_high: float | None = None, loss_type: str = "grpo",
                        max_completion_length: int | None = None, beta: float = 0.0,
                        ref_logp: torch.Tensor | None = None, num_items: float | None = None) -> PolicyLoss:
    """Token-level clipped surrogate. `logp`, `old_logp`, `mask`: (N, T); `advantages`: (N,).

    grpo: mean over each sequence's tokens, then over sequences (paper Eq. 3).
    dr_grpo: token sum / (N * max_completion_length).
    dapo: token sum / number of active tokens (`num_items` overrides the count, e.g. the global batch's).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl_value = 0.0
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
        kl_value = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        count = mask.sum() if num_items is None else torch.as_tensor(float(num_items), dtype=logp.dtype)
        loss = (per_token * mask).sum() / count.clamp(min=1.0)
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        clip_fraction = float((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1))
        ratio_mean = float((ratio * mask).sum() / mask.sum().clamp(min=1))
    return PolicyLoss(loss, clip_fraction, kl_value, ratio_mean)
