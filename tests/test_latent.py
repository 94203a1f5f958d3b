"""The latent-loop engine (model/latent.py) and Coconut† (recipes/coconut.py): thoughts are the hidden states they
claim to be, the cached batched loop equals the uncached recompute and per-sample runs, gradients reach the model
through the thoughts, and the curriculum trains, saves and answers through `eval`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medsynapse.cli import main
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.latent import latent_thoughts, latent_thoughts_uncached
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import PromptBuilder, forward_with_memory
from medsynapse.recipes.coconut import stage_of, stage_samples

K = 3


@pytest.fixture(scope="module")
def setup(tiny_env):
    torch.manual_seed(0)
    model = MedSynapseV.from_pretrained(str(tiny_env.vlm), dtype="float32")
    prompts = PromptBuilder(model.processor, K)
    samples = read_samples(tiny_env.train_file)[:5]  # different prompt lengths: a padded batch
    items = [prompts.encode([load_image(s.images[0], s)], s.question) for s in samples]
    return model, prompts, items


def test_each_thought_is_the_last_hidden_state_of_the_position_before_its_slot(setup):
    model, prompts, items = setup
    batch = prompts.collate(items, with_answers=False)
    with torch.no_grad():
        thoughts = latent_thoughts(model.vlm, batch, K, prompts.latent_id)
        # one plain forward with the thoughts in their slots: the hidden state before slot j is thought j
        hidden = forward_with_memory(model.vlm, batch, thoughts, prompts.latent_id, output_hidden_states=True,
                                     logits_to_keep=1).hidden_states[-1]
    start = batch.input_ids.shape[1] - K
    for j in range(K):
        assert torch.allclose(thoughts[:, j], hidden[:, start - 1 + j], atol=1e-5), j
    assert thoughts[:, 0].sub(thoughts[:, 1]).abs().max() > 1e-3  # the thoughts differ: each step saw the last


def test_the_cached_loop_equals_the_uncached_recompute_and_per_sample_runs(setup):
    model, prompts, items = setup
    batch = prompts.collate(items, with_answers=False)
    assert len({int(m.sum()) for m in batch.attention_mask}) > 1  # really padded
    with torch.no_grad():
        cached = latent_thoughts(model.vlm, batch, K, prompts.latent_id)
        uncached = latent_thoughts_uncached(model.vlm, batch, K, prompts.latent_id)
        assert (cached - uncached).abs().max() < 1e-5 and cached.abs().mean() > 0.1
        for row, item in enumerate(items):
            alone = latent_thoughts(model.vlm, prompts.collate([item], with_answers=False), K, prompts.latent_id)
            assert (alone[0] - cached[row]).abs().max() < 1e-5, row
        transformed = latent_thoughts(model.vlm, batch, K, prompts.latent_id, transform=lambda h: 0.5 * h)
        assert torch.allclose(transformed[:, 0], 0.5 * cached[:, 0], atol=1e-6)  # transform feeds the next step
        assert (transformed[:, 1] - 0.5 * cached[:, 1]).abs().max() > 1e-4


def test_the_loop_refuses_prompts_without_their_slots(setup):
    from PIL import Image

    model, prompts, _ = setup
    two = PromptBuilder(model.processor, 2)
    short = two.collate([two.encode([Image.new("RGB", (64, 64), (120, 80, 40))], "question")], with_answers=False)
    with pytest.raises(ValueError, match="must end with its 3 latent slots"):
        latent_thoughts(model.vlm, short, K, prompts.latent_id)
    with pytest.raises(ValueError, match="more than 1 latent slots"):
        latent_thoughts(model.vlm, short, 1, prompts.latent_id)


def test_gradients_reach_the_model_through_the_thoughts(tiny_env, setup):
    from medsynapse.recipes.trainer import answer_loss

    model = MedSynapseV.from_pretrained(str(tiny_env.vlm), dtype="float32")
    model.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    torch.manual_seed(1)
    for name, param in model.vlm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # non-zero B: the LoRA changes the forward
    prompts = PromptBuilder(model.processor, K)
    samples = read_samples(tiny_env.train_file)[:2]
    items = [prompts.encode([load_image(s.images[0], s)], s.question, s.answer) for s in samples]
    thoughts = latent_thoughts(model.vlm, prompts.collate(items, with_answers=False), K, prompts.latent_id)
    # the loss through the thoughts only (their slots' gradient), against the same loss with the thoughts detached
    loss = answer_loss(model.vlm, prompts.collate(items, with_answers=True), thoughts, prompts.latent_id)
    grads = torch.autograd.grad(loss, [p for p in model.vlm.parameters() if p.requires_grad])
    detached = answer_loss(model.vlm, prompts.collate(items, with_answers=True), thoughts.detach(), prompts.latent_id)
    grads_detached = torch.autograd.grad(detached, [p for p in model.vlm.parameters() if p.requires_grad])
    assert torch.isclose(loss, detached)
    gap = max(float((a - b).abs().max()) for a, b in zip(grads, grads_detached))
    assert gap > 1e-6  # the chain of thoughts carries gradient back into the LoRA


def test_the_curriculum_replaces_steps_stage_by_stage():
    from medsynapse.data.schema import Sample

    sample = Sample(id="x", images=["i"], question="q", answer="yes", answer_type="yes_no",
                    rationale=["A CT image of the abdomen.", "There is one lesion."])
    texts = [stage_samples([sample], s, 3)[0].answer for s in range(5)]
    assert texts == ["A CT image of the abdomen. There is one lesion. <answer>yes</answer>",
                     "There is one lesion. <answer>yes</answer>", "<answer>yes</answer>", "<answer>yes</answer>",
                     "<answer>yes</answer>"]
    assert [stage_of(step, 5, 3) for step in (0, 4, 5, 14, 15, 19, 20, 25)] == [0, 0, 1, 2, 3, 3, 4, 4]
    assert [stage_of(step, 5, 3, final_stage=False) for step in (19, 20, 25)] == [3, 3, 3]


def _baseline_run(tiny_env, tmp_path, method: str, steps: int = 3, batch: int = 2, **settings) -> str:
    """A run file for one baseline on the tiny environment (Stage I's budget: `steps` x `batch`)."""
    run = {"output": str(tmp_path / "run"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": steps, "batch_size": batch, "lr": 5e-3, "answer_types": ["yes_no"],
                      "save_every": 100},
           "baselines": {method: settings}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def _run_file(tiny_env, tmp_path, **coconut) -> str:
    # 8 steps: 2 per stage whether the budget is split over 3 stages (0-2) or 4 (0-2 + the final phase)
    return _baseline_run(tiny_env, tmp_path, "coconut", steps=8, batch=4, max_latent_stage=2, thoughts_per_step=1,
                         **coconut)


def test_coconut_trains_by_stage_resumes_exactly_and_answers_through_eval(tiny_env, tmp_path, monkeypatch):
    from conftest import Interrupted

    from medsynapse.recipes import coconut
    from medsynapse.recipes.coconut import train_coconut
    from medsynapse.runconfig import read_run_config, resolve_baseline

    config = resolve_baseline(read_run_config(_run_file(tiny_env, tmp_path)), "coconut")
    assert (config.steps_per_stage, config.max_latent_stage, config.batch_size) == (2, 2, 4)
    assert config.final_stage
    # what each step trains on: the stages whose data are built, the thoughts of every latent pass, the texts learned
    stages, thoughts, texts = [], [], []
    stage_dataset, latent_thoughts = coconut.stage_dataset, coconut.latent_thoughts

    def recorded_dataset(plain, stage, config):
        dataset = stage_dataset(plain, stage, config)
        stages.append(stage)
        texts.append([s.answer for s in dataset.samples])
        return dataset

    def recorded_thoughts(model, batch, k, latent_id, features=None):
        thoughts.append(k)
        return latent_thoughts(model, batch, k, latent_id, features)
    monkeypatch.setattr(coconut, "stage_dataset", recorded_dataset)
    monkeypatch.setattr(coconut, "latent_thoughts", recorded_thoughts)
    assert main(["train", "baseline", "--method", "coconut", "--config", _run_file(tiny_env, tmp_path)]) == 0
    # stages 0, 1, 2 then the final phase (3), 2 steps each; the final phase keeps stage 2's 2 thoughts and learns
    # the tagged answer alone (SynthMed's chains have 2-3 steps: stage 2 still writes a third step where there is one)
    assert stages == [0, 1, 2, 3] and thoughts == [1, 1, 2, 2, 2, 2]
    assert all(t.startswith("<answer>") for t in texts[3]) and not all(t.startswith("<answer>") for t in texts[2])
    monkeypatch.undo()
    folder = tmp_path / "run" / "coconut"
    manifest = json.loads((folder / "medsynapse.json").read_text())
    assert manifest["latent"] == {"method": "coconut", "thoughts": 2} and manifest["answer_format"] == "reasoning"
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 1e-4 for k, v in weights.items() if "lora_B" in k)
    # killed after step 3 (inside stage 1: the optimiser's state must come back), resumed, killed after step 4 (at the
    # boundary of stages 1 and 2: the run would start stage 2 with a fresh optimiser and schedule, not stage 1's),
    # resumed, killed after step 7 (inside the final phase), resumed: the same weights as the uninterrupted run
    other = _run_file(tiny_env, tmp_path / "b")
    killed = resolve_baseline(read_run_config(other, ["baselines.coconut.save_every=1"]), "coconut")

    def kill_at(step):
        def kill(done):
            if done == step:
                raise Interrupted("killed")
        return kill
    with pytest.raises(Interrupted):
        train_coconut(killed, on_step=kill_at(3))
    with pytest.raises(Interrupted):
        train_coconut(dataclasses.replace(killed, resume=True), on_step=kill_at(4))
    with pytest.raises(Interrupted):
        train_coconut(dataclasses.replace(killed, resume=True), on_step=kill_at(7))
    train_coconut(dataclasses.replace(killed, resume=True))
    resumed = load_file(str(tmp_path / "b" / "run" / "coconut" / "adapter" / "adapter_model.safetensors"))
    assert weights.keys() == resumed.keys() and all(torch.allclose(weights[k], resumed[k], atol=1e-6)
                                                    for k in weights)
    # the folder answers through the latent loop, scored by eval on the SynthMed split in its reasoning format
    model = MedSynapseV.from_pretrained(str(folder), merge_adapter=True)
    assert model.n_memory == 2 and model.prompts.n_memory == 2
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--benchmarks", "synthmed", "--path",
                 f"synthmed={tiny_env.test_file.parent}", "--output", str(out), "--limit", "2",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads((out / "synthmed" / "run.json").read_text())["answer_format"] == "reasoning"


def test_mcout_thoughts_attend_over_the_image_and_the_answer_loss_trains_the_module(tiny_env, setup):
    from medsynapse.model.latent import (
        LatentAttentionConfig,
        MultimodalLatentAttention,
        mcout_thoughts,
        mixed_embeddings,
    )
    from medsynapse.recipes.trainer import answer_loss

    model, prompts, items = setup
    torch.manual_seed(0)
    module = MultimodalLatentAttention(LatentAttentionConfig(hidden_size=128, attention_dim=32, heads=4))
    batch = prompts.collate(items[:2], with_answers=False)
    context, valid = mixed_embeddings(model.vlm, batch, prompts.latent_id)
    image_token = model.vlm.config.image_token_id
    assert not valid[batch.input_ids == prompts.latent_id].any() and not valid[batch.attention_mask == 0].any()
    plain = model.vlm.get_input_embeddings()(batch.input_ids)
    is_image = batch.input_ids == image_token
    assert (context[is_image] - plain[is_image]).abs().max() > 1e-3  # image rows hold the vision features
    assert torch.equal(context[~is_image], plain[~is_image])
    # the same thoughts as the generic loop with the module as its transform; a different image changes them
    thoughts = mcout_thoughts(model.vlm, module, batch, K, prompts.latent_id)
    by_hand = latent_thoughts(model.vlm, batch, K, prompts.latent_id, transform=lambda h: module(h, context, valid))
    assert torch.allclose(thoughts, by_hand, atol=1e-6)
    # thoughts sit between the prompt and the answer, so the answer loss reaches the module (the reference's
    # thoughts-after-the-answer layout would give it none)
    samples = read_samples(tiny_env.train_file)[:2]
    with_answers = prompts.collate([prompts.encode([load_image(s.images[0], s)], s.question, s.answer)
                                    for s in samples], with_answers=True)
    loss = answer_loss(model.vlm, with_answers, thoughts, prompts.latent_id)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_mcout_loss_adds_mu_times_each_auxiliary_answer_loss(tiny_env, setup):
    from medsynapse.model.latent import LatentAttentionConfig, MultimodalLatentAttention, mcout_thoughts
    from medsynapse.recipes.mcout import mcout_loss
    from medsynapse.recipes.trainer import answer_loss

    model, _, _ = setup
    torch.manual_seed(0)
    module = MultimodalLatentAttention(LatentAttentionConfig(hidden_size=128, attention_dim=32, heads=4))
    samples = read_samples(tiny_env.train_file)[:2]
    builders = [PromptBuilder(model.processor, t) for t in range(3)]
    items = [[b.encode([load_image(s.images[0], s)], s.question, s.answer) for s in samples] for b in builders]
    with torch.no_grad():
        total, final = mcout_loss(model, module, builders[2], items[2], 2, 0.3, None, "token")
        thoughts = mcout_thoughts(model.vlm, module, builders[2].collate(items[2], with_answers=False), 2,
                                  model.latent_id)
        ce = [answer_loss(model.vlm, builders[t].collate(items[t], with_answers=True), thoughts[:, :t],
                          model.latent_id) for t in (1, 2)]
    assert torch.isclose(final, ce[1], atol=1e-6)
    assert torch.isclose(total, ce[1] + 0.3 * (ce[0] + ce[1]), atol=1e-5)


def test_mcout_trains_saves_and_answers_through_eval(tiny_env, tmp_path):
    path = _baseline_run(tiny_env, tmp_path, "mcout", thoughts=2, attention_dim=32, attention_heads=4)
    assert main(["train", "baseline", "--method", "mcout", "--config", path]) == 0
    folder = tmp_path / "run" / "mcout"
    manifest = json.loads((folder / "medsynapse.json").read_text())
    assert manifest["latent"]["method"] == "mcout" and manifest["latent"]["thoughts"] == 2
    assert manifest["answer_format"] == "direct"
    loaded = MedSynapseV.from_pretrained(str(folder), merge_adapter=True)
    saved = load_file(str(folder / "latent_attention.safetensors"))
    assert all(torch.equal(loaded.latent_module.state_dict()[k], v) for k, v in saved.items())
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--benchmarks", "synthmed", "--path",
                 f"synthmed={tiny_env.test_file.parent}", "--output", str(out), "--limit", "2"]) == 0
    assert json.loads((out / "synthmed" / "metrics.json").read_text())["n"] == 2


def test_ivt_lr_chooses_the_patches_that_layers_attention_ranks_first(tiny_env, setup):
    from medsynapse.model.latent import ivt_latents, mixed_embeddings

    model = MedSynapseV.from_pretrained(str(tiny_env.vlm), dtype="float32")
    steps, patches, layer = 2, 2, 1
    prompts = PromptBuilder(model.processor, steps * (1 + patches))
    samples = read_samples(tiny_env.train_file)[:3]
    batch = prompts.collate([prompts.encode([load_image(s.images[0], s)], s.question) for s in samples],
                            with_answers=False)
    with torch.no_grad():
        vectors, chosen = ivt_latents(model.vlm, batch, steps, patches, layer, prompts.latent_id)
        context, _ = mixed_embeddings(model.vlm, batch, prompts.latent_id)
    # an independent reference: eager attention weights of the whole sequence (returned by output_attentions),
    # the latent position's row at that layer averaged over heads, top-K over the image tokens not yet chosen
    model.vlm.set_attn_implementation("eager")
    with torch.no_grad():
        out = forward_with_memory(model.vlm, batch, vectors, prompts.latent_id, output_attentions=True,
                                  output_hidden_states=True, logits_to_keep=1)
    attention = out.attentions[layer].mean(1)
    start = batch.input_ids.shape[1] - steps * (1 + patches)
    image = batch.input_ids[:, :start] == model.vlm.config.image_token_id
    taken = torch.zeros_like(image)
    for step in range(steps):
        column = start + step * (1 + patches)
        weights = attention[:, column, :start].masked_fill(~image | taken, float("-inf"))
        expected = weights.topk(patches, -1).indices.sort(-1).values
        taken.scatter_(1, expected, True)
        assert torch.equal(chosen[:, step], expected), step
        # the slot holds the thought (the hidden state before it) and then the chosen tokens' vision features
        assert torch.allclose(vectors[:, column - start], out.hidden_states[-1][:, column - 1], atol=1e-5)
        got = vectors[:, column - start + 1:column - start + 1 + patches]
        assert torch.equal(got, context.gather(1, expected[..., None].expand(-1, -1, context.shape[-1])))
    assert len({tuple(row) for row in chosen.flatten(1).tolist()}) > 1  # choices depend on the image
    with pytest.raises(ValueError, match="exceed an image's 4 merged tokens"):
        ivt_latents(model.vlm, PromptBuilder(model.processor, 3 * 3).collate(
            [PromptBuilder(model.processor, 9).encode([load_image(samples[0].images[0], samples[0])], "q")],
            with_answers=False), 3, 2, layer, prompts.latent_id)


def test_ivt_lr_trains_saves_and_answers_through_eval(tiny_env, tmp_path):
    # 4 steps: 1 per stage over 3 stages or 4 (with the final phase)
    path = _baseline_run(tiny_env, tmp_path, "ivt-lr", steps=4, max_latent_stage=2, thoughts_per_step=1,
                         patches_per_step=2)
    assert main(["train", "baseline", "--method", "ivt-lr", "--config", path]) == 0
    folder = tmp_path / "run" / "ivt_lr"
    latent = json.loads((folder / "medsynapse.json").read_text())["latent"]
    assert latent == {"method": "ivt-lr", "thoughts": 6, "steps": 2, "patches": 2, "layer": 1}
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--benchmarks", "synthmed", "--path",
                 f"synthmed={tiny_env.test_file.parent}", "--output", str(out), "--limit", "2",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads((out / "synthmed" / "metrics.json").read_text())["n"] == 2


def test_the_last_query_hook_reproduces_that_layers_attention_row(tiny_env, setup):
    """The hook's weights (rotated query x cached keys, GQA, padding masked, mean over heads) equal the eager
    attention of the last position at that layer, for every key, not only in their top-K order."""
    from transformers import DynamicCache

    from medsynapse.model.latent import LastQueryHook
    from medsynapse.model.vlm import core_vlm, position_ids_for, splice_memory

    model = MedSynapseV.from_pretrained(str(tiny_env.vlm), dtype="float32")
    model.vlm.set_attn_implementation("eager")
    _, prompts, items = setup
    batch = prompts.collate(items, with_answers=False)  # padded rows
    core = core_vlm(model.vlm)
    for layer in range(core.config.text_config.num_hidden_layers):
        hook = LastQueryHook(core.model.language_model.layers[layer].self_attn)
        cache = DynamicCache(config=core.config)
        with torch.no_grad():
            out = model.vlm(inputs_embeds=splice_memory(model.vlm, batch.input_ids, None, prompts.latent_id),
                            attention_mask=batch.attention_mask, position_ids=position_ids_for(model.vlm, batch),
                            pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, cache=cache,
                            use_cache=True, output_attentions=True, logits_to_keep=1)
            weights = hook.weights(cache.layers[layer].keys, batch.attention_mask)
        hook.remove()
        expected = out.attentions[layer][:, :, -1].mean(1)
        assert torch.allclose(weights, expected, atol=1e-5), layer
        assert float(weights[batch.attention_mask == 0].abs().max()) == 0.0  # padding gets no weight


def test_a_multi_process_launch_of_a_latent_baseline_is_refused_in_one_line(tiny_env, tmp_path, monkeypatch,
                                                                             capsys):
    from medsynapse.recipes import trainer

    real = trainer.make_accelerator

    def two_processes(output_dir, report_to="tensorboard"):
        accelerator = real(output_dir, report_to)
        monkeypatch.setattr(type(accelerator), "num_processes", property(lambda self: 2))
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", two_processes)
    for method in ("coconut", "mcout"):
        path = _baseline_run(tiny_env, tmp_path / method, method)
        assert main(["train", "baseline", "--method", method, "--config", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trains in one process under DDP" in err[0]
        assert ("distributed: fsdp" in err[0]) == (method == "coconut")  # Coconut's way out; MCOUT has none


def test_with_slots_equals_encoding_with_that_many_slots(setup, tiny_env):
    from medsynapse.model.vlm import with_slots

    model, _, _ = setup
    sample = read_samples(tiny_env.train_file)[0]
    image = load_image(sample.images[0], sample)
    encoded = {n: PromptBuilder(model.processor, n).encode([image], sample.question, sample.answer) for n in range(5)}
    for have in (0, 3):
        for want in range(5):
            got = with_slots(encoded[have], want, model.latent_id)
            assert torch.equal(got.input_ids, encoded[want].input_ids), (have, want)
            assert torch.equal(got.mm_token_type_ids, encoded[want].mm_token_type_ids)
            assert torch.equal(got.answer_ids, encoded[want].answer_ids)
