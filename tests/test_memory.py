"""The Diagnostic Memory Sampler and the counterfactual branch."""

from __future__ import annotations

import torch

from medsynapse.model.encoders import PriorOutput
from medsynapse.model.memory import DiagnosticMemorySampler, SamplerConfig


def _sampler(**kw):
    torch.manual_seed(0)
    config = SamplerConfig(prior_dim=6, hidden_size=24, n_memory=5, width=16, embed_rms=0.3, **kw)
    return DiagnosticMemorySampler(config)


def test_shapes_and_initial_scale():
    sampler = _sampler()
    memory = sampler(torch.randn(2, 9, 6), (3, 3))
    assert memory.shape == (2, 5, 24)
    rms = memory.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.3), atol=1e-3, rtol=1e-3)


def test_positions_matter():
    sampler = _sampler()
    tokens = torch.zeros(1, 9, 6)
    tokens[0, 0] = torch.arange(6.0)
    moved = torch.zeros(1, 9, 6)
    moved[0, 8] = torch.arange(6.0)
    assert not torch.allclose(sampler(tokens, (3, 3)), sampler(moved, (3, 3)))


def test_drop_removes_tokens_and_never_nans():
    sampler = _sampler()
    tokens = torch.randn(2, 9, 6)
    drop = torch.zeros(2, 9, dtype=torch.bool)
    drop[0, :4] = True
    drop[1] = True  # everything dropped: falls back to keeping the row whole
    out = sampler(tokens, (3, 3), drop=drop)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], sampler(tokens[1:], (3, 3))[0])
    assert not torch.allclose(out[0], sampler(tokens[:1], (3, 3))[0])


def test_counterfactual_branches(model):
    prior = PriorOutput(torch.randn(2, 64, model.encoder.feature_dim), (8, 8), torch.zeros(2, 64, dtype=torch.bool))
    prior.region_mask[:, :5] = True
    factual = model.memory(prior)
    zeroed = model.memory(prior, "counterfactual", "zero")
    manual = model.sampler(prior.tokens * (~prior.region_mask).unsqueeze(-1), prior.grid)
    torch.testing.assert_close(zeroed, manual)
    dropped = model.memory(prior, "counterfactual", "drop")
    assert not torch.allclose(factual, zeroed) and not torch.allclose(factual, dropped)
