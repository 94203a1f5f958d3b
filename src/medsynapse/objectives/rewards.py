"""Stage II rewards: answer accuracy (shared extraction) and the causal counterfactual reward (paper Eq. 5).

Two ways to combine them (`causal_form`):
- "paper": R = λ_acc·r_acc + λ_causal·r_causal, the paper's composite reward with Eq. 5 as is (`total_reward`).
- "ranked": R = λ_acc·r_acc + λ_causal·b(r_causal), b a bounded odd squash, with 2·λ_causal ≤ λ_acc
  (`ranked_reward`): correctness always ranks first, r_causal only orders rollouts of equal correctness.
- "centred" (recommended): the causal term enters the *advantage*, not the reward: A = GRPO's advantage of
  λ_acc·r_acc + λ_causal·c, c = r_causal centred and scaled within each group's rollouts of equal correctness
  (`centred_causal`). Why not "ranked": it keeps the order but not the margin. A correct rollout with a negative
  r_causal and a wrong one with a positive r_causal get R = 0.5005 and 0.4995, so the accuracy signal can all but
  vanish; on the demo every ranked run learnt less than plain GRPO (docs/design.md). Centred, c sums to zero within each
  class, so the push from wrong to right answers is exactly plain GRPO's and r_causal only reorders within a class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from medsynapse.answers import is_correct

CAUSAL_REDUCTIONS = ("sum", "mean")
CAUSAL_GATES = ("none", "correct")
CAUSAL_FORMS = ("paper", "ranked", "centred")
# b(r) = (1 - RANKED_MARGIN)·tanh(r / scale). tanh rounds to exactly ±1 in floating point once |r| / scale exceeds
# ~9 (float32) or ~19 (float64); the margin keeps |b| ≤ 0.999 < 1 so dominance stays strict at 2·λ_causal = λ_acc.
RANKED_MARGIN = 1e-3


class GoldAnswer(Protocol):
    """What the accuracy reward reads of a question (a data.schema.Sample has it): no data types in objectives."""

    answer: str
    answer_type: str
    options: dict[str, str]


def accuracy_rewards(texts: list[str], samples: Sequence[GoldAnswer], answer_format: str = "direct") -> torch.Tensor:
    """1.0 when the extracted answer equals the gold answer, else 0.0 (unparseable scores 0: no guessing; with the
    "reasoning" format a rollout without a final <answer> tag is unparseable)."""
    return torch.tensor([float(is_correct(t, s.answer, s.answer_type, s.options, answer_format)[0])
                         for t, s in zip(texts, samples)])


def causal_rewards(logp_factual: torch.Tensor, logp_counterfactual: torch.Tensor, mask: torch.Tensor,
                   reduction: str = "sum", clip: float | None = None) -> torch.Tensor:
    """r_causal = sum_t [log pi(o_t | M) - log pi(o_t | M')] over each trajectory's tokens (N, T) -> (N,).

    `mean` divides by the trajectory length (the reference code's choice); `clip` bounds the result to [-clip, clip].
    """
    if reduction not in CAUSAL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {CAUSAL_REDUCTIONS}")
    mask = mask.to(logp_factual.dtype)
    reward = ((logp_factual - logp_counterfactual) * mask).sum(-1)
    if reduction == "mean":
        reward = reward / mask.sum(-1).clamp(min=1.0)
    if clip is not None:
        reward = reward.clamp(-clip, clip)
    return reward


def total_reward(r_acc: torch.Tensor, r_causal: torch.Tensor, lambda_acc: float = 1.0, lambda_causal: float = 0.5,
                 gate: str = "none") -> torch.Tensor:
    """R = λ_acc·r_acc + λ_causal·r_causal (paper, gate "none").

    gate "correct" credits r_causal only to correct rollouts. Why: ungated, a *wrong* answer that the counterfactual
    memory makes unlikely earns a large causal reward, and the answer the counterfactual favours is penalised even
    when it is right; on the SynthMed demo this cost accuracy (see docs/design.md, Stage II).
    """
    if gate not in CAUSAL_GATES:
        raise ValueError(f"unknown causal gate {gate!r}; expected one of {CAUSAL_GATES}")
    causal = r_causal * (r_acc > 0).to(r_causal.dtype) if gate == "correct" else r_causal
    return lambda_acc * r_acc + lambda_causal * causal


def check_ranked(lambda_acc: float, lambda_causal: float, scale: float) -> None:
    """ValueError unless the ranked form's guarantee holds: λ_acc > 0, 0 ≤ 2·λ_causal ≤ λ_acc, 0 < scale < inf."""
    if not (math.isfinite(lambda_acc) and lambda_acc > 0):
        raise ValueError(f"causal_form 'ranked' needs lambda_acc > 0, got {lambda_acc}")
    if not (math.isfinite(lambda_causal) and 0 <= 2 * lambda_causal <= lambda_acc):
        raise ValueError(f"causal_form 'ranked' needs 0 <= 2·lambda_causal <= lambda_acc (so that every correct "
                         f"rollout outranks every wrong one), got lambda_causal={lambda_causal}, "
                         f"lambda_acc={lambda_acc}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"causal_scale must be a positive finite number of nats, got {scale}")


def causal_bonus(r_causal: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """b(r) = (1 − RANKED_MARGIN)·tanh(r / scale) ∈ [−0.999, 0.999], in float64; monotone non-decreasing and odd.

    Odd: the sign of the causal effect is kept (b(0) = 0: memory without effect earns nothing). Near 0 it is linear
    with slope 1/scale, so small effects are ranked in proportion; effects ≫ scale saturate instead of growing
    without bound (Eq. 5 is a log-ratio summed over tokens, unbounded in both directions).
    """
    return (1.0 - RANKED_MARGIN) * torch.tanh(r_causal.double() / scale)


def ranked_reward(r_acc: torch.Tensor, r_causal: torch.Tensor, lambda_acc: float = 1.0, lambda_causal: float = 0.5,
                  scale: float = 1.0) -> torch.Tensor:
    """R = λ_acc·r_acc + λ_causal·b(r_causal) for binary r_acc, with 2·λ_causal ≤ λ_acc (ValueError otherwise).

    Why it ranks: |b| ≤ 1 − m (m = RANKED_MARGIN), so a correct rollout has R ≥ λ_acc − λ_causal·(1 − m) and a wrong
    one R ≤ λ_causal·(1 − m); their difference is ≥ λ_acc − 2·λ_causal·(1 − m) ≥ 2·m·λ_causal (or λ_acc when
    λ_causal = 0) > 0. So every correct rollout of a group gets a strictly higher R than every wrong one, whatever
    r_causal is (the causal term can never buy a wrong answer a better rank: the paper form's reward hacking, see
    docs/design.md), and within the correct and within the wrong rollouts R = const + λ_causal·b(r_causal) follows the
    r_causal order: never inverted, strictly where tanh is not saturated and the difference survives rounding
    (equal r_causal give exactly equal R). Computed in float64, returned in the inputs' (promoted) float dtype;
    rounding to it is monotone, so these orders hold in the returned tensor too. Unlike `total_reward`'s gate
    "correct", wrong rollouts keep their causal order as well.
    """
    check_ranked(lambda_acc, lambda_causal, scale)
    dtype = torch.promote_types(torch.promote_types(r_acc.dtype, r_causal.dtype), torch.float32)
    reward = lambda_acc * r_acc.double() + lambda_causal * causal_bonus(r_causal, scale)
    return reward.to(dtype)


def centred_causal(r_acc: torch.Tensor, r_causal: torch.Tensor, group_size: int, scale: float = 1.0) -> torch.Tensor:
    """c (B*G,) in [−1, 1]: r_causal z-scored within each group's correct rollouts and, separately, its wrong ones.

    c = (r − mean_class) / max(σ_class, scale) · √G / (G − 1), σ unbiased; the z-score of one value among n ≤ G is at
    most (n − 1)/√n ≤ (G − 1)/√G, so |c| ≤ 1. Within a class c sums to 0 (exactly, up to rounding), so adding λ·c to
    an advantage leaves the class's mean advantage unchanged. `scale` (nats) floors σ: r_causal values that differ by
    rounding noise (1e-3 nats among identical answers) give c ≈ 0, not ±1. A class of one rollout, a class whose
    values are all equal, an unscorable rollout (NaN r_acc) and a NaN r_causal get exactly 0. Float64 inside.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"causal_scale must be a positive finite number of nats, got {scale}")
    acc = r_acc.double().view(-1, group_size)
    r = r_causal.double().view(-1, group_size)
    out = torch.zeros_like(r)
    bound = (group_size - 1) / math.sqrt(group_size) if group_size > 1 else 1.0
    for member in (acc > 0, acc == 0):  # NaN r_acc is in neither class
        member = member & torch.isfinite(r)
        values = torch.where(member, r, torch.zeros_like(r))
        count = member.sum(1, keepdim=True)
        mean = values.sum(1, keepdim=True) / count.clamp(min=1)
        var = (((r - mean) * member) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        low = torch.where(member, r, torch.full_like(r, math.inf)).amin(1, keepdim=True)
        high = torch.where(member, r, torch.full_like(r, -math.inf)).amax(1, keepdim=True)
        spread = (count > 1) & (low < high)
        z = (r - mean) / var.sqrt().clamp(min=scale) / bound
        out = torch.where(member & spread, z, out)
    return out.view(-1).to(torch.promote_types(r_causal.dtype, torch.float32))


def check_centred(lambda_acc: float, lambda_causal: float, std_floor: float, eps: float = 1e-4) -> None:
    """ValueError unless every correct rollout's advantage stays above every wrong one's in the "centred" form.

    The accuracy advantage of a group split by correctness separates its classes by λ_acc / max(σ + eps, floor), and
    σ of binary rewards is at most λ_acc·√(G / (4(G − 1))) ≤ λ_acc/√2 (G = 2, the worst case); |λ_causal·c| ≤
    λ_causal. So 2·λ_causal < λ_acc / max(λ_acc/√2 + eps, floor) is needed (λ_causal < 0.707 with no floor).
    """
    if not (math.isfinite(lambda_acc) and lambda_acc > 0):
        raise ValueError(f"causal_form 'centred' needs lambda_acc > 0, got {lambda_acc}")
    gap = lambda_acc / max(lambda_acc / math.sqrt(2) + eps, std_floor)
    if not (math.isfinite(lambda_causal) and 0 <= 2 * lambda_causal < gap):
        raise ValueError(f"causal_form 'centred' needs 0 <= 2·lambda_causal < {gap:.4f} (the smallest gap between "
                         f"a correct and a wrong rollout's accuracy advantage), got lambda_causal={lambda_causal}")


def composite_reward(r_acc: torch.Tensor, r_causal: torch.Tensor, form: str = "paper", lambda_acc: float = 1.0,
                     lambda_causal: float = 0.5, gate: str = "none", scale: float = 1.0) -> torch.Tensor:
    """Stage II's R in the chosen `form`: "paper" → `total_reward` (with `gate`), "ranked" → `ranked_reward`."""
    if form not in CAUSAL_FORMS:
        raise ValueError(f"unknown causal_form {form!r}; expected one of {CAUSAL_FORMS}")
    if form == "centred":
        raise ValueError("causal_form 'centred' adds the causal term to the advantage, not to the reward: use "
                         "centred_causal with the group advantages of λ_acc·r_acc")
    if form == "paper":
        return total_reward(r_acc, r_causal, lambda_acc, lambda_causal, gate)
    if gate != "none":
        raise ValueError("causal_gate is a paper-form option; causal_form 'ranked' already ranks correct rollouts "
                         "first (set causal_gate: none)")
    return ranked_reward(r_acc, r_causal, lambda_acc, lambda_causal, scale)
