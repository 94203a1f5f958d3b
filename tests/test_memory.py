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


def kept_only(sampler: DiagnosticMemorySampler, tokens: torch.Tensor, grid, keep: torch.Tensor) -> torch.Tensor:
    """P_phi on one sample as if only the `keep` tokens existed, each at its own position: every layer's
    cross-attention gets the kept rows of the context as keys and values, and no mask (softmax over the kept keys)."""
    def only_kept(module, args, kwargs):
        query, key, value = args
        return (query, key[:, keep], value[:, keep]), kwargs

    hooks = [block.cross_attn.register_forward_pre_hook(only_kept, with_kwargs=True) for block in sampler.blocks]
    try:
        return sampler(tokens, grid)
    finally:
        for hook in hooks:
            hook.remove()


def test_drop_reads_only_the_kept_tokens_at_their_positions_and_never_nans():
    sampler = _sampler().double().eval()
    tokens = torch.randn(3, 9, 6, dtype=torch.float64)
    drop = torch.zeros(3, 9, dtype=torch.bool)
    drop[0, [0, 4, 5]] = True
    drop[1, :8] = True  # one token left
    drop[2] = True  # everything dropped: falls back to zeroing the row (attention over nothing is NaN)
    out = sampler(tokens, (3, 3), drop=drop)
    assert torch.isfinite(out).all()
    for row in range(2):
        reference = kept_only(sampler, tokens[row:row + 1], (3, 3), ~drop[row])
        torch.testing.assert_close(out[row:row + 1], reference, atol=1e-12, rtol=0)
        assert (out[row] - sampler(tokens[row:row + 1], (3, 3))[0]).abs().max() > 1e-6  # not a no-op (noise ~1e-15)
    torch.testing.assert_close(out[2:], sampler(torch.zeros_like(tokens[2:]), (3, 3)), atol=1e-12, rtol=0)


def _prior(model, dtype=torch.float64):
    """Random prior tokens on the model's encoder grid; sample 0 has a 5-token region, sample 1 none."""
    torch.manual_seed(1)
    region = torch.zeros(2, 64, dtype=torch.bool)
    region[0, [9, 10, 17, 18, 27]] = True
    return PriorOutput(torch.randn(2, 64, model.encoder.feature_dim, dtype=dtype), (8, 8), region)


def test_counterfactual_memory_against_independent_constructions(model):
    """M' = P_phi(S ⊙ ¬B) built by assigning zeros in place; M' with drop = P_phi reading only the kept tokens; both
    ignore whatever the region holds, and equal M for a sample without a region."""
    sampler = model.sampler.double().eval()
    prior = _prior(model)
    factual = model.memory(prior)

    blanked = prior.tokens.clone()
    blanked[prior.region_mask] = 0.0
    zeroed = model.memory(prior, "counterfactual", "zero")
    assert torch.equal(zeroed, sampler(blanked, prior.grid))
    dropped = model.memory(prior, "counterfactual", "drop")
    reference = kept_only(sampler, prior.tokens[:1], prior.grid, ~prior.region_mask[0])
    torch.testing.assert_close(dropped[:1], reference, atol=1e-12, rtol=0)

    garbage = prior.tokens.clone()
    garbage[prior.region_mask] = 1e3 * torch.randn(int(prior.region_mask.sum()), garbage.shape[-1],
                                                   dtype=garbage.dtype)
    other = PriorOutput(garbage, prior.grid, prior.region_mask)
    # float64: "differs" below means by more than 1e-6, where float noise is ~1e-15 (memory entries are ~3e-2)
    assert (model.memory(other)[0] - factual[0]).abs().max() > 1e-6  # the region does matter to M
    for intervention, counterfactual in (("zero", zeroed), ("drop", dropped)):
        torch.testing.assert_close(model.memory(other, "counterfactual", intervention), counterfactual,
                                   atol=1e-12, rtol=0)
        assert torch.equal(counterfactual[1], factual[1])  # nothing to remove
        assert (counterfactual[0] - factual[0]).abs().max() > 1e-6
    assert (zeroed[0] - dropped[0]).abs().max() > 1e-6  # two different interventions


def test_counterfactual_branch_changes_the_answers_log_probabilities(tiny_env, model):
    """End to end through `memory_for` (the one path of answer / evaluate / the runner): the counterfactual branch
    hands the VLM M' for the requested intervention, which changes the answer tokens' log-probabilities of every
    sample, while no position before the memory slots changes (memory enters the sequence at the slots)."""
    from medsynapse.data.dataset import VQADataset
    from medsynapse.data.schema import read_samples
    from medsynapse.model.vlm import vision_features

    samples = read_samples(tiny_env.test_file)[:2]
    dataset = VQADataset(samples, model.prompts, with_answers=True)
    batch = model.prompts.collate([dataset.encoded(i) for i in range(2)], with_answers=True)
    images = [dataset.images(i)[0] for i in range(2)]
    prior = model.prior(images)
    assert prior.region_mask.any(1).all()
    first_slot = int((batch.input_ids == model.latent_id).float().argmax(1).min())
    answers = batch.labels[:, 1:] != -100
    with torch.no_grad():
        features = vision_features(model.vlm, batch)
        runs = {}
        for branch, intervention in (("privileged", "zero"), ("counterfactual", "zero"), ("counterfactual", "drop"),
                                     ("counterfactual", "inpaint")):
            memory = model.memory_for(batch, images, features, branch, intervention)
            assert torch.equal(memory, model.memory(prior, branch, intervention))
            logits = model.forward(batch, memory, features=features, labels=None).logits
            logp = logits[:, :-1].log_softmax(-1).gather(2, batch.labels[:, 1:].clamp(min=0).unsqueeze(-1))[..., 0]
            runs[intervention if branch == "counterfactual" else branch] = (logits, (logp * answers).sum(1))
    logits, logp = runs.pop("privileged")
    for intervention, (cf_logits, cf_logp) in runs.items():
        assert ((cf_logp - logp).abs() > 1e-5).all(), f"{intervention}: {cf_logp - logp}"
        torch.testing.assert_close(cf_logits[:, :first_slot], logits[:, :first_slot], atol=1e-5, rtol=0)
