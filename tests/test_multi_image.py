"""Memory from every image of a question: P_phi and A_psi read all images (each tagged by its index when the module
tells images apart), the counterfactual removes each image's own region, padded batches of mixed image counts equal
per-question runs, Stage I trains the image-index embedding, and eval records what each image gave the memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stage1_config
from PIL import Image

from medsynapse.data.schema import read_samples
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    pack_images,
    sampler_attention,
)

GRID = (3, 4)


def sampler(max_images: int) -> DiagnosticMemorySampler:
    torch.manual_seed(0)
    module = DiagnosticMemorySampler(SamplerConfig(prior_dim=8, hidden_size=16, n_memory=4, width=32,
                                                   max_images=max_images)).eval()
    if module.image_embed is not None:  # a trained embedding is not zero: give it values that matter
        module.image_embed.data.normal_()
    return module


def per_question(module, tokens, counts, drop=None):
    """Each question alone: the single-image computation for one image, the packed one for several."""
    out, start = [], 0
    for count in counts:
        part_drop = None if drop is None else drop[start:start + count]
        part = module(tokens[start:start + count], GRID, part_drop, images_per_sample=[count])
        out.append(part)
        start += count
    return torch.cat(out)


def test_pack_images_lays_each_question_out_with_its_image_index_and_padding():
    tokens = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)  # 3 images of 2 tokens
    packed, drop, index, padding = pack_images(tokens, torch.tensor([[True, False]] * 3), [2, 1])
    assert packed[..., 0].tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]
    assert index.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert padding.tolist() == [[False] * 4, [False, False, True, True]]
    assert drop.tolist() == [[True, False, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="summing to the 3 images"):
        pack_images(tokens, None, [1, 1])


def test_one_image_per_question_is_exactly_the_single_image_computation():
    tagged, tokens = sampler(3), torch.randn(3, 12, 8)
    assert torch.equal(tagged(tokens, GRID, images_per_sample=[1, 1, 1]), tagged(tokens, GRID))
    plain = sampler(1)  # the same weights without the embedding: a single image never reads it
    plain.load_state_dict({k: v for k, v in tagged.state_dict().items() if k != "image_embed"})
    assert torch.equal(plain(tokens, GRID), tagged(tokens, GRID))


def test_the_image_embedding_takes_part_in_every_single_image_graph_with_a_zero_gradient():
    """DDP wants every parameter in each backward: a single-image batch adds 0 x the embedding (a zero gradient)."""
    module = sampler(3)
    module(torch.randn(2, 12, 8), GRID).sum().backward()
    assert module.image_embed.grad is not None and float(module.image_embed.grad.abs().max()) == 0.0
    pooling = autonomous(3)
    pooling([torch.randn(6, 16), torch.randn(6, 16)], [(2, 3)] * 2, [1, 1]).sum().backward()
    assert pooling.image_embed.grad is not None and float(pooling.image_embed.grad.abs().max()) == 0.0


@pytest.mark.parametrize("max_images", [1, 3])
def test_a_padded_batch_of_mixed_image_counts_equals_per_question_runs(max_images):
    module, counts = sampler(max_images), [2, 1, 3, 2, 1]
    tokens = torch.randn(sum(counts), 12, 8)
    drop = torch.rand(sum(counts), 12) < 0.3
    drop[6:8] = True  # the 4th question: every token of both images dropped (its tokens are zeroed instead)
    drop[8] = True  # the 5th, one image: every token dropped too
    for mask in (None, drop):
        batched = module(tokens, GRID, mask, images_per_sample=torch.tensor(counts))  # counts as a tensor too
        alone = per_question(module, tokens, counts, mask)
        assert batched.shape == (5, 4, 16)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        assert (batched[0] - batched[1]).abs().max() > 0.1  # the tolerance is far below what tells questions apart


def test_image_order_matters_only_when_the_module_tells_images_apart():
    tokens = torch.randn(2, 12, 8)
    untagged, tagged = sampler(1), sampler(2)
    swapped = tokens[[1, 0]]
    torch.testing.assert_close(untagged(tokens, GRID, images_per_sample=[2]),
                               untagged(swapped, GRID, images_per_sample=[2]), atol=1e-5, rtol=1e-5)
    difference = tagged(tokens, GRID, images_per_sample=[2]) - tagged(swapped, GRID, images_per_sample=[2])
    assert difference.abs().max() > 1e-2
    with pytest.raises(ValueError, match="3 images; this memory module tells at most 2 apart"):
        tagged(torch.randn(3, 12, 8), GRID, images_per_sample=[3])


def test_probe_maps_cover_every_image_of_a_question():
    maps = sampler_attention(sampler(3), torch.randn(3, 12, 8), GRID, images_per_sample=[2, 1])
    assert maps.shape == (2, 2, 4, 2, *GRID)  # questions, layers, probes, images, grid
    torch.testing.assert_close(maps.sum((-3, -2, -1)), torch.ones(2, 2, 4))
    assert float(maps[1, :, :, 1].abs().max()) == 0.0  # the second question's padding image gets no attention


def autonomous(max_images: int) -> AutonomousMemoryModule:
    torch.manual_seed(0)
    module = AutonomousMemoryModule(AutonomousConfig(hidden_size=16, n_memory=4, pooling="attention", attention_dim=8,
                                                     max_images=max_images)).eval()
    if module.image_embed is not None:
        module.image_embed.data.normal_()
    return module


def test_autonomous_memory_of_mixed_image_counts_equals_per_question_runs_and_tells_images_apart():
    counts, grids = [2, 1, 3], [(2, 3)] * 6
    tokens = [torch.randn(6, 16) for _ in range(6)]
    for module in (autonomous(1), autonomous(3)):
        batched = module(tokens, grids, counts)
        alone, start = [], 0
        for count in counts:
            alone.append(module(tokens[start:start + count], grids[start:start + count], [count]))
            start += count
        torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)
    swapped = [tokens[1], tokens[0]]
    plain, tagged = autonomous(1), autonomous(3)
    torch.testing.assert_close(plain(tokens[:2], grids[:2], [2]), plain(swapped, grids[:2], [2]), atol=1e-5, rtol=1e-5)
    assert (tagged(tokens[:2], grids[:2], [2]) - tagged(swapped, grids[:2], [2])).abs().max() > 1e-2
    single = autonomous(3)(tokens[:3], grids[:3], [1, 1, 1])
    untagged = autonomous(1)
    untagged.load_state_dict({k: v for k, v in autonomous(3).state_dict().items() if k != "image_embed"})
    assert torch.equal(single, untagged(tokens[:3], grids[:3], [1, 1, 1]))  # + 0 for every first image


def lesion_and_healthy(tiny_env) -> tuple[Image.Image, Image.Image]:
    samples = [s for s in read_samples(tiny_env.train_file) if s.question_type == "presence"]
    lesion = next(s for s in samples if s.answer.lower() == "yes")
    healthy = next(s for s in samples if s.answer.lower() == "no")
    return Image.open(lesion.images[0]).convert("RGB"), Image.open(healthy.images[0]).convert("RGB")


@torch.no_grad()
def test_a_lesion_in_the_second_image_reaches_the_memory_and_its_region_is_removed_from_that_image(model, tiny_env):
    lesion, healthy = lesion_and_healthy(tiny_env)
    blank = Image.new("RGB", lesion.size)
    question = "Is there a lesion?"
    batch = model.prompts.collate([model.prompts.encode([healthy, lesion], question),
                                   model.prompts.encode([healthy, blank], question)], with_answers=False)
    images = [healthy, lesion, healthy, blank]
    memory = model.memory_for(batch, images, None)
    assert memory.shape == (2, model.n_memory, model.sampler.config.hidden_size)
    # the first image alone would give both questions the same memory
    assert float((memory[0] - memory[1]).norm() / memory[0].norm()) > 0.05
    with pytest.raises(ValueError, match="show 4 images, but 2 were given"):
        model.memory_for(batch, [healthy, healthy], None)

    # M': each image loses its own region (zeroed), then the probes read both images
    prior = model.prior(images)
    assert not torch.equal(prior.region_mask[0], prior.region_mask[1])  # per-image regions, not one shared mask
    counterfactual = model.memory_for(batch, images, None, "counterfactual", "zero")
    own = model.sampler(prior.tokens * (~prior.region_mask).unsqueeze(-1), prior.grid, images_per_sample=[2, 2])
    assert torch.equal(counterfactual, own)
    first_mask = prior.region_mask[[0, 0, 2, 2]]  # the first image's region applied to both: another memory
    other = model.sampler(prior.tokens * (~first_mask).unsqueeze(-1), prior.grid, images_per_sample=[2, 2])
    assert float((other[0] - counterfactual[0]).norm() / counterfactual[0].norm()) > 1e-3


@torch.no_grad()
def test_a_padded_prompt_batch_of_mixed_image_counts_gives_each_question_its_own_memory(model, tiny_env):
    lesion, healthy = lesion_and_healthy(tiny_env)
    per_item = [[lesion], [healthy, lesion], [lesion, healthy, healthy]]
    items = [model.prompts.encode(imgs, "Where is the lesion?") for imgs in per_item]
    batch = model.prompts.collate(items, with_answers=False)
    together = model.memory_for(batch, [img for imgs in per_item for img in imgs], None)
    for row, (item, imgs) in enumerate(zip(items, per_item)):
        alone = model.memory_for(model.prompts.collate([item], with_answers=False), imgs, None)
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_stage1_on_multi_image_questions_trains_the_image_index_embedding(tiny_env, tmp_path):
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.recipes.stage1_warmup import train_stage1

    records = [json.loads(line) for line in tiny_env.train_file.read_text().splitlines() if line.strip()]
    images = sorted({path for r in records for path in r["images"]})
    for record in records:  # every question now shows a second image before its own
        record["images"] = [images[(images.index(record["images"][0]) + 1) % len(images)], record["images"][0]]
    data = tiny_env.train_file.parent / "train_two_images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = train_stage1(stage1_config(tiny_env, tmp_path / "s1", train_file=str(data), max_images=2, max_steps=4,
                                     save_every=4))
    model = MedSynapseV.from_pretrained(out)
    assert model.sampler.config.max_images == 2
    assert float(model.sampler.image_embed.abs().max()) > 1e-4  # it moved from its zero start
    shown = [Image.open(data.parent / path).convert("RGB") for path in records[0]["images"]]
    assert len(model.answer_encoded([model.prompts.encode(shown, "Is there a lesion?")], shown, 2)) == 1


def test_prior_table_has_a_row_per_distinct_image_and_each_sample_its_images_in_order(tiny_env):
    from medsynapse.data.dataset import VQADataset
    from medsynapse.model.encoders import load_encoder
    from medsynapse.recipes.priors import prior_table, select_priors

    samples = read_samples(tiny_env.train_file)
    a, b, c = sorted({s.images[0] for s in samples})[:3]
    samples = samples[:3]
    samples[0].images, samples[1].images, samples[2].images = [a], [b, a], [c, b, a]
    table, rows = prior_table(load_encoder(tiny_env.encoder).encode, None, VQADataset(samples, prompts=None))
    assert table.tokens.shape[0] == 3 and rows == [[0], [1, 0], [2, 1, 0]]
    prior, counts = select_priors(table, rows, [2, 0])
    assert counts == [3, 1] and torch.equal(prior.tokens, table.tokens[[2, 1, 0, 0]])
    assert select_priors(table, [[0], [1], [2]], [2, 1])[1] is None  # one image each: the unchanged path


def test_eval_on_multi_image_benchmarks_records_what_every_image_gave_the_memory(tiny_env, tmp_path):
    from medsynapse.data.sources.fixtures import write_fixtures
    from medsynapse.eval.runner import PREDICTIONS, EvalSettings, evaluate_benchmarks, read_predictions
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, max_images=8).save_pretrained(
        folder)
    data_root = write_fixtures(tmp_path / "data")
    evaluate_benchmarks(str(folder), ["mmmu-med", "medxpertqa-mm"], data_root, tmp_path / "eval",
                        EvalSettings(batch_size=4, max_new_tokens=2))
    for name in ("mmmu-med", "medxpertqa-mm"):
        lines = read_predictions(tmp_path / "eval" / name / PREDICTIONS)
        shown = [line for line in lines if "memory_inputs" in line]
        assert shown, f"{name}: no multi-image question recorded"
        for line in shown:
            assert line["n_images"] == len(line["memory_inputs"]) > 1 and line["prompt"]
            for part in line["memory_inputs"]:
                assert part["tokens"] == part["grid"][0] * part["grid"][1] and part["region_tokens"] >= 1
                assert part["token_rms"] > 0
