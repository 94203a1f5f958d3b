"""Generalized Jensen-Shannon divergence for full-vocabulary on-policy distillation (Stage III, paper Eq. 7-8).

JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M), M = β·T + (1−β)·S (T teacher, S student; β=0 is KL(T‖S), β=1 is KL(S‖T)),
summed over the vocabulary, averaged over valid positions: exactly TRL's `generalized_jsd_loss` ("batchmean").

Why hand-written: autograd over the naive formula keeps several (positions × vocabulary) fp32 tensors alive (log-probs
of both models, the mixture, two KL maps); at 151,936 tokens × 1,024 positions that is ~0.6 GB each. Here the valid
positions are walked in chunks; each chunk's loss and its analytic gradient w.r.t. the student logits are computed and
only that gradient is kept (dJ/dz = S ⊙ (g − Σ_v S_v g_v) / τ with g = (1−β)(log S − log M), or the KL special
cases). The fused variant starts from hidden states and the (frozen) lm_head weight, so full logits never exist.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _chunk_loss_and_grad(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float):
    """Per-chunk summed loss and dLoss/dstudent_logits, in fp32 (fp64 when given fp64)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_s = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    s = log_s.exp()
    if beta == 0.0:  # KL(T || S)
        t = log_t.exp()
        loss = (t * (log_t - log_s)).sum()
        grad = (s - t) / temperature
        return loss, grad
    if beta == 1.0:  # KL(S || T)
        g = log_s - log_t
        loss = (s * g).sum()
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        t = log_t.exp()
        loss = beta * (t * (log_t - log_m)).sum() + (1 - beta) * (s * (log_s - log_m)).sum()
        g = (1 - beta) * (log_s - log_m)
    grad = s * (g - (s * g).sum(-1, keepdim=True)) / temperature
    return loss, grad


class _ChunkedJSD(torch.autograd.Function):
    """Rows of (R, V) logits selected chunk by chunk through `rows`: no masked copy of the full tensors is made, and
    the only full-size buffer is the (already normalised) gradient itself."""

    @staticmethod
    def forward(ctx, student, teacher, rows, beta, temperature, chunk_size, denominator):
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        grad = torch.zeros_like(student) if student.requires_grad else None
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start:start + chunk_size]
            loss, chunk_grad = _chunk_loss_and_grad(student[index], teacher[index], beta, temperature)
            total += loss
            if grad is not None:
                grad[index] = (chunk_grad / denominator).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad_output.item() == 1.0:  # the usual loss.backward(): no second full-size tensor
            return grad, None, None, None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).bool()]


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 32,
                    num_items: float | None = None) -> torch.Tensor:
    """Mean generalized JSD over valid positions. Logits (..., V); `mask` (...) True/1 = valid.

    Gradients flow to `student_logits` only (the teacher is a target). `num_items` replaces the valid-position count
    as the denominator (e.g. the global count under gradient accumulation).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)  # views, not copies
    teacher = teacher_logits.detach().reshape(-1, vocab)
    rows = torch.arange(student.shape[0], device=student.device)
    if mask is not None:
        rows = rows[mask.reshape(-1).bool().to(student.device)]
    denominator = float(num_items) if num_items is not None else max(rows.numel(), 1)
    return _ChunkedJSD.apply(student, teacher, rows, beta, temperature, chunk_size, denominator)


class _FusedLinearJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, beta, temperature, chunk_size, denominator):
        total = torch.zeros((), dtype=torch.promote_types(student_hidden.dtype, torch.float32),
                            device=student_hidden.device)
        grad_hidden = torch.empty_like(student_hidden) if student_hidden.requires_grad else None
        for start in range(0, student_hidden.shape[0], chunk_size):
            stop = start + chunk_size
            student = student_hidden[start:stop] @ weight.T
            teacher = teacher_hidden[start:stop] @ weight.T
            loss, grad_logits = _chunk_loss_and_grad(student, teacher, beta, temperature)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.denominator = denominator
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.denominator).to(grad.dtype), None, None, None, None, None, None


def generalized_jsd_from_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                lm_head_weight: torch.Tensor, mask: torch.Tensor | None = None, beta: float = 0.5,
                                temperature: float = 1.0, chunk_size: int = 32,
                                num_items: float | None = None) -> torch.Tensor:
    """The same loss from final hidden states (..., H) and a frozen lm_head weight (V, H); logits are built per chunk.

    Gradients flow to `student_hidden` only: the lm_head is frozen in Stage III.
    """
    if lm_head_weight.requires_grad:
        raise ValueError("the fused JSD treats lm_head as frozen; pass lm_head.weight.detach() or freeze it")
    student = _valid_rows(student_hidden, mask)
    teacher = _valid_rows(teacher_hidden.detach(), mask)
    denominator = float(num_items) if num_items is not None else max(student.shape[0], 1)
    return _FusedLinearJSD.apply(student, teacher, lm_head_weight, beta, temperature, chunk_size, denominator)


def first_positions(mask: torch.Tensor) -> torch.Tensor:
    """`mask` (B, T) kept at each row's first valid position only (a row with none stays empty): the JSD on the
    answer's first token, the one that decides a short answer (Stage III's `jsd_positions: first`)."""
    valid = mask.bool()
    first = valid & (valid.cumsum(dim=1) == 1)
    return first.to(mask.dtype)

