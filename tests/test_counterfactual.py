"""Counterfactual prior tokens (model/counterfactual.py): the region is removed without leaving a marker of where it
was (inpaint, reference), while the paper's literal zeroing leaves one; the reference bank and nearest reference by
value; A_psi's attention pooling is content-selective."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynapse.model.counterfactual import (
    counterfactual_tokens,
    dilate_region,
    harmonic_fill,
    nearest_reference,
    reference_bank,
)
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    count_parameters,
)

GRID = (8, 8)


def region_at(cells: list[tuple[int, int]], batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, GRID[0] * GRID[1], dtype=torch.bool)
    for y, x in cells:
        mask[:, y * GRID[1] + x] = True
    return mask


def test_dilation_grows_by_one_token_and_stops_at_the_border():
    grown = dilate_region(region_at([(4, 4)]), GRID, 1).view(*GRID)
    assert grown.sum() == 9 and grown[3:6, 3:6].all()
    corner = dilate_region(region_at([(0, 0)]), GRID, 1).view(*GRID)
    assert corner.sum() == 4 and corner[:2, :2].all()
    assert torch.equal(dilate_region(region_at([(2, 5)]), GRID, 0), region_at([(2, 5)]))


def test_harmonic_fill_keeps_kept_tokens_and_reproduces_a_linear_field_inside():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    field = torch.stack([2 * ys + 0.5 * xs + 1, -xs + 3], -1).view(1, 64, 2)  # harmonic (linear) in both channels
    region = region_at([(3, 3), (3, 4), (4, 3), (4, 4), (5, 4)])
    filled = harmonic_fill(field.clone().masked_fill(region.unsqueeze(-1), 99.0), GRID, region, iterations=400)
    assert torch.equal(filled[~region], field[~region])  # kept tokens untouched, exactly
    assert torch.allclose(filled[region], field[region], atol=1e-4)  # the hole is interpolated from its rim


@pytest.mark.parametrize("intervention", ["inpaint", "reference", "zero"])
def test_counterfactual_on_uniform_background_does_not_say_where_the_region_was(intervention):
    """Same background, region (and its content) in two different places: inpaint and reference give identical
    tokens, hence an identical M'; the paper's zeroing gives tokens that differ by where the region was (the leak)."""
    torch.manual_seed(0)
    background = torch.randn(1, 1, 6).expand(1, 64, 6).clone()
    lesion = torch.randn(6) * 5
    first, second = region_at([(1, 1), (1, 2)]), region_at([(6, 5), (6, 6)])
    tokens_a, tokens_b = background.clone(), background.clone()
    tokens_a[first] = lesion
    tokens_b[second] = lesion
    others = torch.randn(3, 64, 6, generator=torch.Generator().manual_seed(1))
    bank = torch.cat([others, background + 0.1])  # the background's nearest entry: the last one
    cf_a, drop_a = counterfactual_tokens(tokens_a, GRID, first, intervention, bank=bank)
    cf_b, drop_b = counterfactual_tokens(tokens_b, GRID, second, intervention, bank=bank)
    assert drop_a is None and drop_b is None
    sampler = DiagnosticMemorySampler(SamplerConfig(prior_dim=6, hidden_size=16, n_memory=4, width=16, heads=2))
    with torch.no_grad():
        memory_a, memory_b = sampler(cf_a, GRID), sampler(cf_b, GRID)
        factual_a, factual_b = sampler(tokens_a, GRID), sampler(tokens_b, GRID)
    assert (factual_a - factual_b).abs().max() > 1e-2  # the factual memory does see where the lesion is
    gap = (memory_a - memory_b).abs().max()
    if intervention == "reference":
        assert torch.equal(cf_a, bank[3:]) and torch.equal(cf_b, bank[3:])
    if intervention in ("inpaint", "reference"):
        assert gap < 1e-5
    else:
        assert gap > 1e-2


def test_inpaint_removes_the_region_content_including_its_rim():
    """Two images that differ only inside the region or in the one-token ring around it get the same tokens."""
    torch.manual_seed(1)
    tokens = torch.randn(1, 64, 5)
    region = region_at([(4, 4)])
    ring = dilate_region(region, GRID, 1)
    other = tokens.clone()
    other[ring] = torch.randn(int(ring.sum()), 5) * 3
    same_a, _ = counterfactual_tokens(tokens, GRID, region, "inpaint")
    same_b, _ = counterfactual_tokens(other, GRID, region, "inpaint")
    assert torch.equal(same_a, same_b)
    undilated, _ = counterfactual_tokens(other, GRID, region, "inpaint", dilation=0)
    assert not torch.allclose(undilated, same_a)  # without the ring the edge tokens would leak


def test_reference_is_the_nearest_bank_entry_whatever_the_region_and_its_rim_hold():
    torch.manual_seed(2)
    bank = torch.randn(5, 64, 6)
    region = region_at([(3, 3), (3, 4)], batch=2)
    query = bank[[1, 3]].clone()
    ring = dilate_region(region, GRID, 1)
    query[ring] = torch.randn(int(ring.sum()), 6) * 10  # the finding and its rim: far from every bank entry
    out, drop = counterfactual_tokens(query, GRID, region, "reference", finding=torch.tensor([True, True]), bank=bank)
    assert drop is None and torch.equal(out, bank[[1, 3]])


def test_an_image_without_a_finding_is_its_own_reference():
    torch.manual_seed(3)
    bank, tokens = torch.randn(4, 64, 3), torch.randn(2, 64, 3)
    region = region_at([(0, 0)], batch=2)
    out = nearest_reference(tokens, GRID, region, torch.tensor([False, True]), bank)
    assert torch.equal(out[0], tokens[0]) and any(torch.equal(out[1], b) for b in bank)
    every = nearest_reference(tokens, GRID, region, None, bank)  # no finding flags: every image is replaced
    assert any(torch.equal(every[0], b) for b in bank)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cells=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1,
                                                   max_size=10), dilation=st.integers(0, 2))
def test_reference_distance_equals_the_brute_force_masked_distance(seed, cells, dilation):
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(7, 64, 4, generator=generator, dtype=torch.float64)
    tokens = torch.randn(3, 64, 4, generator=generator, dtype=torch.float64)
    region = region_at(cells, batch=3)
    keep = ~dilate_region(region, GRID, dilation)
    brute = (((tokens[:, None] - bank[None]) ** 2).sum(-1) * keep[:, None]).sum(-1)  # (B, K), a (B, K, M, d) tensor
    chosen = nearest_reference(tokens, GRID, region, None, bank, dilation)
    assert torch.equal(chosen, bank[brute.argmin(1)])


def test_reference_bank_keeps_images_without_a_finding_evenly_spaced():
    tokens = torch.arange(10.0).view(10, 1, 1).expand(10, 4, 2)
    finding = torch.tensor([True, False, False, True, False, False, False, True, False, False])
    assert reference_bank(tokens, finding, 100)[:, 0, 0].tolist() == [1, 2, 4, 5, 6, 8, 9]
    assert reference_bank(tokens, finding, 3)[:, 0, 0].tolist() == [1, 5, 9]  # first, middle, last healthy
    with pytest.raises(ValueError, match="no per-image finding flag"):
        reference_bank(tokens, None, 3)
    with pytest.raises(ValueError, match="free of findings"):
        reference_bank(tokens, torch.ones(10, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="at least 1"):
        reference_bank(tokens, finding, 0)
    with pytest.raises(ValueError, match="reference_bank.safetensors"):
        counterfactual_tokens(tokens, (2, 2), torch.zeros(10, 4, dtype=torch.bool), "reference")


def test_unknown_intervention_names_the_choices():
    with pytest.raises(ValueError, match="inpaint"):
        counterfactual_tokens(torch.zeros(1, 64, 2), GRID, region_at([(0, 0)]), "blur")


def test_attention_pooling_selects_content_and_batches_mixed_image_counts_exactly():
    torch.manual_seed(0)
    module = AutonomousMemoryModule(AutonomousConfig(hidden_size=12, n_memory=4, pooling="attention",
                                                     attention_dim=8)).eval()
    images = [torch.randn(16, 12), torch.randn(4, 12), torch.randn(16, 12)]
    grids = [(4, 4), (2, 2), (4, 4)]
    with torch.no_grad():
        batched = module(images, grids, images_per_sample=[2, 1])
        alone = [module(images[:2], grids[:2], [2]), module(images[2:], grids[2:], [1])]
        _, weights, padding = module.attend(images, grids, [2, 1])
    assert torch.allclose(batched, torch.cat(alone), atol=1e-6)
    assert padding.tolist()[1][:16] == [False] * 16 and all(padding[1, 16:])
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4)) and (weights[1, :, 16:] == 0).all()
    # A token that stands out in key space draws a query's attention to it, wherever it is.
    query_direction = module.queries[0].detach()
    for where in (3, 12):
        tokens = torch.zeros(16, 12)
        with torch.no_grad():
            module.key_proj.weight.zero_()
            module.key_proj.weight[:, 0] = query_direction * 50
            tokens[where, 0] = 1.0
            _, weights, _ = module.attend([tokens], [(4, 4)], [1])
        assert int(weights[0, 0].argmax()) == where


def test_attention_pooling_size_at_qwen3_vl_8b_width():
    with torch.device("meta"):
        module = AutonomousMemoryModule(AutonomousConfig(hidden_size=4096, n_memory=16, pooling="attention"))
    extra = 2 * 4096 + 4096 * 256 + 256 + 16 * 256  # key LayerNorm, key projection, queries
    assert count_parameters(module) == 2 * 4096 * 4096 + 2 * 4096 + 16 * 4096 + 2 * 4096 + 1 + extra
    with pytest.raises(ValueError, match="pooling"):
        AutonomousMemoryModule(AutonomousConfig(hidden_size=8, pooling="max"))
