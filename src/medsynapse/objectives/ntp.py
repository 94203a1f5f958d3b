"""Next-token loss on answer tokens (Stage I, paper Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("token", "sample", "sum")


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Shifted cross-entropy where `labels` != -100.

    token: mean over all answer tokens of the batch (long answers weigh more); sample: mean of per-sample means
    (a yes/no answer counts as much as a caption); sum: the paper's token sum, divided by the batch size.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    shift_logits = logits[:, :-1]
    if shift_logits.dtype != torch.float64:  # bf16 / fp16 logits in float32; a float64 run stays float64
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none") * mask
    if reduction == "token":
        return nll.sum() / mask.sum().clamp(min=1)
    per_sample = nll.sum(1)
    if reduction == "sample":
        per_sample = per_sample / mask.sum(1).clamp(min=1)
    return per_sample.mean()
