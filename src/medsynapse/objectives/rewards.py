"""Stage II rewards: answer accuracy (shared extraction) and the causal counterfactual reward (paper Eq. 5)."""

from __future__ import annotations

import torch

from medsynapse.data.schema import Sample
from medsynapse.objectives.answers import is_correct

CAUSAL_REDUCTIONS = ("sum", "mean")
CAUSAL_GATES = ("none", "correct")


def accuracy_rewards(texts: list[str], samples: list[Sample]) -> torch.Tensor:
    """1.0 when the extracted answer equals the gold answer, else 0.0 (unparseable scores 0: no guessing)."""
    return torch.tensor([float(is_correct(t, s.answer, s.answer_type, s.options)[0]) for t, s in zip(texts, samples)])


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
    when it is right; on the SynthMed demo this cost accuracy (see README, Stage II).
    """
    if gate not in CAUSAL_GATES:
        raise ValueError(f"unknown causal gate {gate!r}; expected one of {CAUSAL_GATES}")
    causal = r_causal * (r_acc > 0).to(r_causal.dtype) if gate == "correct" else r_causal
    return lambda_acc * r_acc + lambda_causal * causal
