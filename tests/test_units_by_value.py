"""Small pure functions by value, against independent constructions (what mutation testing found unchecked)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medsynapse.model.memory import embedding_rms
from medsynapse.objectives.ntp import answer_nll
from medsynapse.recipes import trainer


def _reference_nll(logits, labels):
    """Per-sample lists of -log p(label_t | <t) by explicit loops over positions."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                row.append(-torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item())
        out.append(row)
    return out


@pytest.mark.parametrize("reduction", ["token", "sample", "sum"])
def test_answer_nll_reductions_by_value(reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.full((3, 6), -100)
    labels[0, 2:5] = torch.tensor([1, 2, 3])  # 3 answer tokens
    labels[1, 5] = 7  # 1 answer token
    labels[2, 1:6] = torch.tensor([4, 4, 0, 10, 9])  # 5 answer tokens
    per = _reference_nll(logits, labels)
    expected = {"token": sum(map(sum, per)) / sum(map(len, per)),
                "sample": sum(sum(r) / len(r) for r in per) / 3,
                "sum": sum(map(sum, per)) / 3}[reduction]
    assert answer_nll(logits, labels, reduction).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        answer_nll(logits, labels, "mean")


def test_embedding_rms_by_value_and_of_an_empty_table():
    table = nn.Embedding(2, 2)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert embedding_rms(table) == pytest.approx((math.sqrt(12.5) + math.sqrt(2.0)) / 2)
    assert embedding_rms(nn.Embedding(0, 4)) == 1.0


@pytest.mark.parametrize(("n_items", "batch"), [(10, 4), (7, 3), (5, 5), (3, 8)])
def test_global_batches_walk_whole_epochs_without_repeats(n_items, batch):
    """Laid end to end, the global batches are one permutation of the data per epoch, whatever the batch size
    (a batch may straddle two epochs), and the same (seed, step) always gives the same batch."""
    steps = 3 * n_items  # 3·batch epochs' worth of items
    stream = [i for step in range(steps) for i in trainer.global_batch_indices(n_items, batch, step, seed=4)]
    for epoch in range(len(stream) // n_items):
        assert sorted(stream[epoch * n_items:(epoch + 1) * n_items]) == list(range(n_items)), epoch
    assert trainer.global_batch_indices(n_items, batch, 5, seed=4) == stream[5 * batch:6 * batch]
    assert stream[:n_items] != list(range(n_items)) or n_items < 4  # shuffled


def test_rank_slices_partition_the_global_batch_and_refuse_uneven_splits():
    indices = [9, 3, 7, 1, 5, 0]
    parts = [trainer.rank_slice(indices, rank, 3) for rank in range(3)]
    assert parts == [[9, 3], [7, 1], [5, 0]]
    with pytest.raises(ValueError, match="global batch 6 is not divisible by 4 processes"):
        trainer.rank_slice(indices, 0, 4)


def test_loading_a_checkpoint_of_other_parameters_names_them():
    module = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['other'\]"):
        trainer.load_trainable_state(module, {"weight": torch.zeros(2, 2), "other": torch.zeros(1)})
    weights = {"weight": torch.ones(2, 2), "bias": torch.full((2,), 3.0)}
    trainer.load_trainable_state(module, weights)
    assert torch.equal(module.weight, weights["weight"]) and torch.equal(module.bias, weights["bias"])


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "3"])
def test_check_positive_refuses_by_name(value):
    class Config:
        lr = 1e-3
        batch_size = value

    with pytest.raises(ValueError, match=r"^batch_size must be a number > 0"):
        trainer.check_positive(Config(), ("lr", "batch_size"))


def test_sincos_2d_positions_by_value():
    """Row-major (y, x) cells; [sin(y·f), cos(y·f), sin(x·f), cos(x·f)] with f_k = 10000^(−k/(dim/4)), zero-padded."""
    from medsynapse.model.memory import sincos_2d

    h, w, dim = 2, 3, 10  # quarter = 2, two padding columns
    pos = sincos_2d((h, w), dim)
    assert pos.shape == (h * w, dim)
    for y in range(h):
        for x in range(w):
            row = []
            for coord in (y, x):
                freqs = [10000 ** (-k / 2) for k in range(2)]
                row += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
            expected = torch.tensor(row + [0.0, 0.0])
            torch.testing.assert_close(pos[y * w + x], expected, atol=1e-6, rtol=0)


def test_step_errors_say_what_zero_means():
    with pytest.raises(ValueError, match=r"^max_steps must be an integer >= 0 \(0: use epochs\), got -1$"):
        trainer.check_steps(-1)
    with pytest.raises(ValueError, match=r"^max_steps must be an integer >= 1, got 0$"):
        trainer.check_steps(0, minimum=1)
