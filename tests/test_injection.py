"""Memory injection into Qwen3-VL: the four properties docs/design.md, decision 1 asks to prove."""

from __future__ import annotations

import torch

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.vlm import position_ids_for, splice_memory, vision_features


def _batch(model, tiny_env, n=3, with_answers=False, start=0):
    samples = read_samples(tiny_env.train_file)[start:start + n]
    images = [load_image(s.images[0], s) for s in samples]
    items = [model.prompts.encode([img], s.question, s.answer if with_answers else None)
             for img, s in zip(images, samples)]
    return model.prompts.collate(items, with_answers=with_answers), images


def _placeholder_memory(model, batch_size):
    row = model.vlm.get_input_embeddings().weight[model.latent_id].detach()
    return row.expand(batch_size, model.n_memory, -1).clone()


def test_placeholder_memory_equals_plain_forward(model, tiny_env):
    """(a) memory = the placeholder's own embedding gives exactly the logits of the plain input_ids forward."""
    batch, _ = _batch(model, tiny_env)
    model.vlm.eval()
    with torch.no_grad():
        plain = model.vlm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          mm_token_type_ids=batch.mm_token_type_ids, pixel_values=batch.pixel_values,
                          image_grid_thw=batch.image_grid_thw).logits
        model.vlm.model.rope_deltas = None
        memory = _placeholder_memory(model, 3)
        spliced = model.forward(batch, memory, labels=None).logits
        cached = model.forward(batch, memory, features=vision_features(model.vlm, batch), labels=None).logits
    assert torch.equal(plain, spliced)
    assert torch.equal(plain, cached)  # reused vision features change nothing


def test_memory_changes_logits_only_after_the_slots(model, tiny_env):
    batch, images = _batch(model, tiny_env)
    with torch.no_grad():
        base = model.forward(batch, _placeholder_memory(model, 3), labels=None).logits
        memory = model.memory(model.prior(images))
        out = model.forward(batch, memory, labels=None).logits
    first_slot = int((batch.input_ids[0] == model.latent_id).nonzero()[0])
    assert torch.equal(base[0, :first_slot], out[0, :first_slot])  # causal: nothing before the memory moves
    assert not torch.allclose(base[0, first_slot:], out[0, first_slot:])


def test_left_padded_batch_equals_per_sample_runs(model, tiny_env):
    """(b) each row of a left-padded batch matches the same sample run alone (with real memory)."""
    batch, images = _batch(model, tiny_env, n=3, with_answers=True, start=5)
    assert (batch.attention_mask == 0).any(), "fixture should produce padding"
    with torch.no_grad():
        memory = model.memory(model.prior(images))
        together = model.forward(batch, memory, labels=None).logits
        for row in range(3):
            single, _ = _batch(model, tiny_env, n=1, with_answers=True, start=5 + row)
            alone = model.forward(single, memory[row:row + 1], labels=None).logits[0]
            valid = batch.attention_mask[row].bool()
            torch.testing.assert_close(together[row, valid], alone, atol=1e-5, rtol=1e-5)


def _reference_greedy(model, batch, memory, steps):
    """No-cache loop: the full sequence is re-run every step with freshly computed 4-row positions."""
    ids, mask, types = batch.input_ids, batch.attention_mask, batch.mm_token_type_ids
    eos = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for _ in range(steps):
        step_batch = type(batch)(ids, mask, types, batch.pixel_values, batch.image_grid_thw)
        embeds = splice_memory(model.vlm, ids, memory, model.latent_id)
        positions = position_ids_for(model.vlm, step_batch)
        logits = model.vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw).logits[:, -1]
        logits[:, [model.latent_id, eos]] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        types = torch.cat([types, torch.zeros_like(token)], 1)
    return torch.cat(out, 1)


def test_cached_generate_with_memory_equals_no_cache_loop(model, tiny_env):
    """(c) KV-cached generate from spliced embeddings = the reference loop, token for token, in a padded batch."""
    batch, images = _batch(model, tiny_env, n=3, start=5)
    model.vlm.eval()
    with torch.no_grad():
        memory = model.memory(model.prior(images)) * 5  # large memory: it must visibly steer the continuation
        generated = model.generate(batch, memory, max_new_tokens=6, min_new_tokens=6)
        reference = _reference_greedy(model, batch, memory, 6)
        plain = model.generate(batch, _placeholder_memory(model, 3), max_new_tokens=6, min_new_tokens=6)
    assert generated.shape == (3, 6)
    assert torch.equal(generated, reference)
    assert not torch.equal(generated, plain)


def test_gradients_reach_the_sampler_only(model, tiny_env):
    """(d) with the VLM and encoder frozen, the next-token loss trains P_phi and nothing else."""
    model.vlm.requires_grad_(False)
    batch, images = _batch(model, tiny_env, with_answers=True)
    prior = model.prior(images)
    loss = model.forward(batch, model.memory(prior)).loss
    loss.backward()
    sampler_grads = [p.grad for p in model.sampler.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in sampler_grads)
    assert sum(float(g.abs().sum()) for g in sampler_grads) > 0
    assert all(p.grad is None for p in model.vlm.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not prior.tokens.requires_grad
