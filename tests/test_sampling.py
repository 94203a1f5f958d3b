"""Keyed sampling: exact categorical draws, top-p, and rows independent of batch layout."""

from __future__ import annotations

import pytest
import torch

from medsynapse.model.sampling import KeyedSampler, keyed_uniform, row_keys, top_p_filter


def draw(logits: torch.Tensor, keys: torch.Tensor, position: int = 0, temperature: float = 1.0, top_p: float = 1.0):
    ids = torch.zeros(len(keys), position, dtype=torch.long)
    return KeyedSampler(keys, temperature, top_p)(ids, logits).argmax(-1)


def test_frequencies_match_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40_000
    keys = torch.arange(n, dtype=torch.long)
    tokens = draw(logits.expand(n, -1), keys, temperature=0.7)
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = (logits / 0.7).double().softmax(-1)
    # 4 standard errors of a binomial proportion at n = 40k is at most 0.01
    assert torch.all((freq - expected).abs() < 4 * (expected * (1 - expected) / n).sqrt() + 1e-4), (freq, expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    n = 5000
    tokens = draw(probs.log().expand(n, -1), torch.arange(n), top_p=0.8)
    assert set(tokens.tolist()) == {0, 1}


def test_a_row_depends_only_on_its_key_not_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    keys = row_keys(seed=3, step=7, positions=[0, 1, 2], group_size=2)
    full = draw(logits, keys, position=4, top_p=0.9)
    halves = torch.cat([draw(logits[:3], keys[:3], 4, top_p=0.9), draw(logits[3:], keys[3:], 4, top_p=0.9)])
    shuffled = draw(logits[[5, 0, 3]], keys[[5, 0, 3]], 4, top_p=0.9)
    assert torch.equal(full, halves) and torch.equal(shuffled, full[[5, 0, 3]])
    torch.manual_seed(123)  # the process RNG plays no part
    assert torch.equal(draw(logits, keys, 4, top_p=0.9), full)


def test_keys_and_positions_give_distinct_noise_in_the_open_interval():
    keys = row_keys(0, 0, list(range(8)), group_size=4)
    assert len(set(keys.tolist())) == 32
    u = keyed_uniform(keys, 0, 1000)
    assert (u > 0).all() and (u < 1).all()
    assert not torch.equal(u, keyed_uniform(keys, 1, 1000))
    assert len({tuple(r.tolist()) for r in u}) == 32


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        KeyedSampler(torch.arange(2), temperature=0.0)
    with pytest.raises(ValueError, match="rows but"):
        KeyedSampler(torch.arange(2))(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 5))


@pytest.mark.slow
def test_noise_never_reaches_one_and_masked_tokens_stay_masked():
    """At a real vocabulary size some hashes hit the top of the range: u must still be < 1 (no +inf noise) and a
    suppressed (-inf) token must never win."""
    vocab, keys = 151_936, torch.arange(64)
    scores = torch.zeros(64, vocab)
    scores[:, ::2] = float("-inf")  # every even token suppressed
    worst = 0.0
    for position in range(12):
        u = keyed_uniform(keys, position, vocab)
        worst = max(worst, float(u.max()))
        out = KeyedSampler(keys)(torch.zeros(64, position, dtype=torch.long), scores)
        assert torch.isneginf(out[:, ::2]).all() and torch.isfinite(out[:, 1::2]).all()
        assert (out.argmax(-1) % 2 == 1).all()
    assert worst < 1.0
