"""Stage II's rollouts, by value: drawn from the policy with its memory (transformers), or from an engine's
completions laid out as the loss reads them (`rollouts_from_engine`, here with a stand-in engine: its vLLM runs
are in tests/test_vllm_training.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import lora_teacher

from medsynapse.data.dataset import training_dataset
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.sampling import row_keys
from medsynapse.model.vlm import vision_features
from medsynapse.recipes.engine_rollouts import rollouts_from_engine
from medsynapse.recipes.stage2_ccr import Stage2Config, generate_rollouts


def _teacher_batch(tiny_env, tmp_path, rows: int = 4):
    model = MedSynapseV.from_pretrained(lora_teacher(tiny_env, tmp_path / "teacher"))
    dataset = training_dataset(str(tiny_env.train_file), model.prompts, ["lesion"], ["yes_no", "multiple_choice"],
                               with_answers=False)
    indices = list(range(rows))
    batch = model.prompts.collate([dataset.encoded(i) for i in indices], with_answers=False)
    images = [image for i in indices for image in dataset.images(i)]
    with torch.no_grad():
        memory = model.memory(model.prior(images))
    return model, dataset, indices, batch, memory


def test_rollouts_are_sampled_from_the_policy_with_its_memory(tiny_env, tmp_path):
    model, _, indices, batch, memory = _teacher_batch(tiny_env, tmp_path)
    config = Stage2Config(max_new_tokens=4, temperature=1.0, top_p=1.0)
    keys = row_keys(0, 0, indices)
    with torch.no_grad():
        features = vision_features(model.vlm, batch)
        drawn = generate_rollouts(model, batch, memory, features, config, keys)
        from medsynapse.model.sampling import sampling_kwargs

        kwargs = sampling_kwargs(keys, config.rollout_sampling, 1.0, 1.0)
        with_memory = model.generate(batch, memory, max_new_tokens=4, features=features, **kwargs)
        without = model.generate(batch, None, max_new_tokens=4, features=features, **kwargs)
    assert not torch.equal(with_memory, without)  # the memory changes these draws: the check below can tell
    assert torch.equal(drawn.tokens, with_memory)
    assert drawn.mask.shape == drawn.tokens.shape and len(drawn.texts) == len(indices)


def test_an_engines_completions_are_padded_with_eos_and_their_logprobs_kept_under_the_mask(tiny_env, tmp_path):
    model, dataset, indices, _, memory = _teacher_batch(tiny_env, tmp_path, rows=2)
    eos = model.prompts.eos_id
    calls = []

    class Engine:
        dtype = torch.float64

        def generate(self, images, prompts, max_new_tokens, **kwargs):
            calls.append(dict(images=images, prompts=prompts, max_new_tokens=max_new_tokens, **kwargs))
            lengths = [[3, 1], [2, 3]]  # per prompt, per draw (n=2)
            return [[SimpleNamespace(token_ids=[10 + p, 20 + d, 30][:n] if n < 3 else [10 + p, 20 + d, eos],
                                     logprobs=[-0.5 - p, -1.0 - d, -0.25][:n]) for d, n in enumerate(per)]
                    for p, per in enumerate(lengths)]

    keys = torch.tensor([2**62 + 5, 7])
    rollouts = rollouts_from_engine(Engine(), model, dataset, indices, memory, 2, 4, 1.0, 0.9, keys)
    (call,) = calls
    assert call["n"] == 2 and call["seed"] == [5, 7] and call["max_new_tokens"] == 4 and call["top_p"] == 0.9
    assert call["prompts"] == [dataset.samples[i].model_prompt for i in indices]
    assert call["systems"] == [dataset.samples[i].system for i in indices]
    assert all(torch.equal(m, memory[i].to(torch.float64)) for i, m in enumerate(call["memories"]))
    assert rollouts.tokens.tolist() == [[10, 20, eos], [10, eos, eos], [11, 20, eos], [11, 21, eos]]
    assert rollouts.mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]  # up to the first EOS
    assert torch.equal(rollouts.engine_logprobs, torch.tensor(
        [[-0.5, -1.0, -0.25], [-0.5, 0.0, 0.0], [-1.5, -1.0, 0.0], [-1.5, -2.0, -0.25]]))
    assert rollouts.texts == model.processor.tokenizer.batch_decode(
        rollouts.tokens * rollouts.mask + (1 - rollouts.mask) * eos, skip_special_tokens=True)
