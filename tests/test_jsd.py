"""Chunked generalized JSD vs TRL's generalized_jsd_loss (test-only dependency), values and gradients."""

from __future__ import annotations

import pytest
import torch

from medsynapse.objectives.jsd import generalized_jsd, generalized_jsd_from_hidden

gkd = pytest.importorskip("trl.experimental.gkd")
trl_jsd = gkd.GKDTrainer.generalized_jsd_loss


def _logits(seed=0, shape=(3, 7, 50)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2, torch.randn(*shape, generator=g) * 2


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_trl(beta, temperature, masked):
    student, teacher = _logits()
    mask = torch.ones(3, 7, dtype=torch.bool)
    if masked:
        mask[0, :3] = False
        mask[2, 5:] = False
    labels = torch.where(mask, torch.zeros(3, 7, dtype=torch.long), torch.full((3, 7), -100))
    ours_in = student.clone().requires_grad_(True)
    theirs_in = student.clone().requires_grad_(True)
    ours = generalized_jsd(ours_in, teacher, mask, beta=beta, temperature=temperature, chunk_size=4)
    theirs = trl_jsd(theirs_in, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    (ours * 1.7).backward()
    (theirs * 1.7).backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)


def test_chunk_size_does_not_change_the_result():
    student, teacher = _logits(1)
    values = [generalized_jsd(student, teacher, chunk_size=c) for c in (1, 5, 100)]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0])


def test_fused_hidden_state_path_equals_logits_path():
    g = torch.Generator().manual_seed(2)
    hidden_s, hidden_t = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    weight = torch.randn(40, 16, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    a = hidden_s.clone().requires_grad_(True)
    b = hidden_s.clone().requires_grad_(True)
    fused = generalized_jsd_from_hidden(a, hidden_t, weight, mask, beta=0.5, temperature=0.9, chunk_size=3)
    plain = generalized_jsd(b @ weight.T, hidden_t @ weight.T, mask, beta=0.5, temperature=0.9)
    torch.testing.assert_close(fused, plain)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        generalized_jsd_from_hidden(a, hidden_t, weight.requires_grad_(True))


def test_gradcheck_on_a_tiny_vocabulary():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: generalized_jsd(s, teacher, beta=0.5, chunk_size=3), (student,))


def test_identical_distributions_give_zero_and_no_teacher_gradient():
    student, _ = _logits(4)
    teacher = student.clone().requires_grad_(True)
    loss = generalized_jsd(student.clone().requires_grad_(True), teacher)
    assert abs(loss.item()) < 1e-6
    assert teacher.grad is None
    empty = generalized_jsd(student, student, torch.zeros(3, 7, dtype=torch.bool))
    assert float(empty) == 0.0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("num_items", [None, 17.0])
def test_fused_path_with_its_defaults_equals_trl_over_many_chunks(masked, num_items):
    """Defaults (β 0.5, τ 1, chunks of 32) against TRL's own defaults; 45 rows > the hidden width, several chunks,
    `num_items` as the denominator, and a backward scaled by 1.7."""
    g = torch.Generator().manual_seed(5)
    hidden_s, hidden_t = torch.randn(3, 15, 8, generator=g), torch.randn(3, 15, 8, generator=g)
    weight = torch.randn(30, 8, generator=g)
    mask = torch.ones(3, 15, dtype=torch.bool)
    if masked:
        mask[0, :4] = False
    labels = torch.where(mask, torch.zeros(3, 15, dtype=torch.long), torch.full((3, 15), -100))
    ours_in = hidden_s.clone().requires_grad_(True)
    theirs_in = hidden_s.clone().requires_grad_(True)
    ours = generalized_jsd_from_hidden(ours_in, hidden_t, weight, mask if masked else None, num_items=num_items)
    theirs = trl_jsd(theirs_in @ weight.T, hidden_t @ weight.T, labels=labels)  # TRL: β 0.5, τ 1, batchmean
    scale = 1.0 if num_items is None else int(mask.sum()) / num_items
    torch.testing.assert_close(ours, theirs * scale, atol=1e-5, rtol=1e-5)
    (ours * 1.7).backward()
    (theirs * scale * 1.7).backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted (e.g. evaluation): the same value
        torch.testing.assert_close(generalized_jsd_from_hidden(hidden_s, hidden_t, weight, mask, num_items=num_items),
                                   ours.detach())


@pytest.mark.parametrize("num_items", [None, 9.0])
def test_logits_path_with_its_defaults_and_num_items_equals_trl(num_items):
    student, teacher = _logits(6, shape=(2, 40, 30))
    labels = torch.zeros(2, 40, dtype=torch.long)
    ours_in = student.clone().requires_grad_(True)
    theirs_in = student.clone().requires_grad_(True)
    ours = generalized_jsd(ours_in, teacher, num_items=num_items)
    theirs = trl_jsd(theirs_in, teacher, labels=labels)
    scale = 1.0 if num_items is None else 80 / num_items
    torch.testing.assert_close(ours, theirs * scale, atol=1e-5, rtol=1e-5)
    ours.backward()
    (theirs * scale).backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-6, rtol=1e-5)


def test_a_trainable_lm_head_is_refused_by_name():
    weight = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"^the fused JSD treats lm_head as frozen; pass lm_head.weight.detach\(\)"):
        generalized_jsd_from_hidden(torch.randn(2, 4), torch.randn(2, 4), weight)
    with pytest.raises(ValueError, match=r"^beta must be in \[0, 1\], got 1.5$"):
        generalized_jsd(torch.randn(2, 5), torch.randn(2, 5), beta=1.5)
