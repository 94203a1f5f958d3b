"""`MedSynapseV.memory_maps`: the sampler's cross-attention per probe and layer (and the encoder's region), A_psi's
attention pooling for a student; what the app draws, computed in the model package."""

from __future__ import annotations

import pytest
import torch

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.memory import sampler_attention


def test_sampler_maps_are_the_cross_attention_that_makes_the_memory(tiny_env, model):
    sample = read_samples(tiny_env.test_file)[0]
    image = load_image(sample.images[0])
    maps = model.memory_maps(image)
    prior = model.prior([image])
    layers, n = model.sampler.config.layers, model.n_memory
    assert maps["probes"].shape == (layers, n, *prior.grid) and maps["region"].shape == prior.grid
    sums = maps["probes"].sum(dim=(-2, -1))
    torch.testing.assert_close(sums, torch.ones_like(sums))  # each map is a distribution over the prior tokens
    assert maps["region"].sum() >= 1  # the region is never empty
    # the maps belong to the memory: the pass that records the weights gives the same memory (within 1e-6: asking
    # for the weights takes PyTorch's unfused attention path)
    memory = model.sampler(prior.tokens, prior.grid)
    recorded: list[torch.Tensor] = []
    torch.testing.assert_close(model.sampler(prior.tokens, prior.grid, None, recorded), memory, atol=1e-6, rtol=0)
    # dropping the region's tokens (the `drop` counterfactual) leaves them no attention
    drop = prior.region_mask.bool()
    dropped = sampler_attention(model.sampler, prior.tokens, prior.grid, drop)[0]
    assert float(dropped[..., drop[0].reshape(prior.grid)].abs().max()) == 0.0
    # different probes look at different places (a trained or untrained sampler alike: random probes differ)
    assert not torch.allclose(maps["probes"][0, 0], maps["probes"][0, 1])


def test_a_plain_vlm_has_no_maps(tiny_env):
    from medsynapse.model.medsynapse import MedSynapseV

    plain = MedSynapseV.from_pretrained(tiny_env.vlm)
    assert plain.memory_maps(load_image(read_samples(tiny_env.test_file)[0].images[0])) is None


@pytest.mark.parametrize("pooling", ["attention", "grid"])
def test_student_maps_are_a_psi_attention_pooling(tiny_env, model, pooling):
    from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule
    from medsynapse.model.vlm import core_vlm

    hidden = core_vlm(model.vlm).config.text_config.hidden_size
    torch.manual_seed(0)
    model.autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=model.n_memory,
                                                               pooling=pooling))
    model.sampler = None  # the student: A_psi only
    maps = model.memory_maps(load_image(read_samples(tiny_env.test_file)[0].images[0]))
    if pooling == "grid":
        assert maps is None
        return
    probes = maps["probes"]
    assert probes.shape[:2] == (1, model.n_memory) and "region" not in maps
    torch.testing.assert_close(probes.sum(dim=(-2, -1)), torch.ones(1, model.n_memory))


def test_counterfactual_check_scores_the_answer_under_both_memories(tiny_env, model):
    from medsynapse.model.vlm import completion_logprobs, completion_mask, vision_features

    sample = read_samples(tiny_env.test_file)[0]
    image = load_image(sample.images[0])
    check = model.counterfactual_check(image, sample.question, max_new_tokens=4, intervention="zero")
    assert check["answer"] == model.answer([image], [sample.question], max_new_tokens=4)[0]  # the usual answer
    batch = model.prompts.collate([model.prompts.encode([image], sample.question)], with_answers=False)
    features = vision_features(model.vlm, batch)
    prior = model.prior([image])
    tokens = model.generate(batch, model.memory(prior), max_new_tokens=4, features=features)
    mask = completion_mask(tokens, model.prompts.eos_id)
    direct = {branch: float(completion_logprobs(model.vlm, batch, model.memory(prior, branch, "zero"), tokens, mask,
                                                model.latent_id, features).sum())
              for branch in ("privileged", "counterfactual")}
    assert check["logprob"] == pytest.approx(direct["privileged"], abs=1e-6)
    assert check["logprob_without_region"] == pytest.approx(direct["counterfactual"], abs=1e-6)
    assert check["logprob_shift"] == pytest.approx(direct["privileged"] - direct["counterfactual"], abs=1e-6)
    assert check["logprob_shift"] != 0  # the region changes the memory, so the answer's probability moves
