"""Memory alignment for Stage III (an addition to the paper's IMT, off by default): the student's memory pulled toward
the teacher's, vector by vector.

L_align = Σ ||M_auto − M_pri||² / Σ ||M_pri||² over the batch: scale-free (1 for a student memory of zeros, 0 when
equal), so its weight means the same whatever the VLM's embedding scale. Why: the paper's JSD reaches A_psi only
through the answer tokens' distributions, one or two positions per SynthMed answer; the teacher's memory gives N
vectors of dense target per image. Written here because it is one line that no library names.
"""

from __future__ import annotations

import torch


def memory_alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, N, H) student and teacher memories -> the relative squared error (a scalar; gradients reach `student`)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student memory {tuple(student.shape)} and teacher memory {tuple(teacher.shape)} differ")
    teacher = teacher.detach().float()
    return (student.float() - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-12)
