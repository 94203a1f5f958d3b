"""Scoring of generated completions (model/vlm.py) against a plain full forward, indexed by absolute position.

`completion_logprobs`, `completion_logprobs_at` and `completion_outputs` keep only the completion's logits
(`logits_to_keep`) and slice them; an off-by-one there would corrupt the causal reward, the GRPO ratio and the JSD
targets at once. The reference runs the VLM over prompt + completion with every position's logits and picks, for the
completion token at absolute position p, the logits at p - 1.
"""

from __future__ import annotations

import torch

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.vlm import (
    PromptBatch,
    completion_logprobs,
    completion_logprobs_at,
    completion_mask,
    completion_outputs,
    core_vlm,
    forward_with_memory,
    vision_features,
)


def _setup(model, tiny_env):
    model.eval()
    samples = [s for s in read_samples(tiny_env.train_file) if s.answer_type != "caption"]
    samples = [samples[0], max(samples[1:], key=lambda s: len(s.question))]  # different prompt lengths: left padding
    images = [load_image(s.images[0], s) for s in samples]
    batch = model.prompts.collate([model.prompts.encode([im], s.question) for im, s in zip(images, samples)])
    assert (batch.attention_mask[:, 0] == 0).any()  # one prompt is really left-padded
    g = torch.Generator().manual_seed(0)
    vocab = core_vlm(model.vlm).config.text_config.vocab_size
    tokens = torch.randint(10, min(vocab, 500), (2, 5), generator=g)
    tokens[0, 2] = model.prompts.eos_id  # row 0 stops after 3 tokens: the rest is masked
    mask = completion_mask(tokens, model.prompts.eos_id)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with torch.no_grad():
        memory = model.memory(model.prior(images))
        features = vision_features(model.vlm, batch)
    return batch, memory, features, tokens, mask


def _full_logits(model, batch, memory, features, tokens, mask):
    """Every position's logits for prompt + completion (no logits_to_keep), and each completion token's position."""
    width = batch.input_ids.shape[1]
    full = PromptBatch(torch.cat([batch.input_ids, tokens], 1), torch.cat([batch.attention_mask, mask], 1),
                       torch.cat([batch.mm_token_type_ids, torch.zeros_like(tokens)], 1), batch.pixel_values,
                       batch.image_grid_thw, None, batch.images_per_sample)
    with torch.no_grad():
        out = forward_with_memory(model.vlm, full, memory, model.latent_id, features=features,
                                  output_hidden_states=True)
    predicting = torch.arange(tokens.shape[1]) + width - 1  # logits at p - 1 predict the token at p
    return out.logits[:, predicting], out.hidden_states[-1][:, predicting]


def test_completion_scores_equal_a_plain_forward_at_the_predicting_positions(model, tiny_env):
    batch, memory, features, tokens, mask = _setup(model, tiny_env)
    logits, hidden = _full_logits(model, batch, memory, features, tokens, mask)
    with torch.no_grad():
        kept = completion_outputs(model.vlm, batch, memory, tokens, mask, model.latent_id, features)
        kept_hidden = completion_outputs(model.vlm, batch, memory, tokens, mask, model.latent_id, features, hidden=True)
        scored = {t: completion_logprobs(model.vlm, batch, memory, tokens, mask, model.latent_id, features, t)
                  for t in (1.0, 0.5)}
        at = completion_logprobs_at(model.vlm, batch, memory, tokens, mask, model.latent_id, features, (0.5, 1.0))
    torch.testing.assert_close(kept, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept_hidden, hidden, atol=1e-5, rtol=1e-5)
    for temperature, got in scored.items():
        expected = torch.stack([torch.stack([(logits[n, t] / temperature).log_softmax(-1)[tokens[n, t]] * mask[n, t]
                                             for t in range(tokens.shape[1])]) for n in range(2)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at[(0.5, 1.0).index(temperature)], expected, atol=1e-5, rtol=1e-5)
    assert (scored[1.0][0, 3:] == 0).all() and (scored[1.0][:, :3] < 0).all()
    # the positions matter: scoring with the logits one position off gives clearly different values
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], 1).log_softmax(-1).gather(2, tokens.unsqueeze(-1))[..., 0]
    assert ((shifted - scored[1.0]) * mask).abs().max() > 1e-2
