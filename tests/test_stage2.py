"""Stage II: batched causal reward vs a per-sample reference, LoRA-only training, exact resume, safe generation."""

from __future__ import annotations

import pytest
import torch
from conftest import Interrupted, crash_at
from safetensors.torch import load_file

from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import completion_logprobs, completion_mask, select_features, vision_features
from medsynapse.objectives.rewards import causal_rewards
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
from medsynapse.recipes.stage2_ccr import Rollouts, Stage2Config, factual_and_counterfactual_logprobs, train_stage2


@pytest.fixture(scope="module")
def stage1_dir(tiny_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                              output_dir=str(out), n_memory=4, sampler_width=32, batch_size=4, max_steps=2,
                              answer_types=["yes_no", "multiple_choice", "open"]))
    return out


def _stage2_config(tiny_env, stage1_dir, out, **kw):
    base = dict(model=str(stage1_dir), train_file=str(tiny_env.train_file), output_dir=str(out), lora_r=4,
                lora_alpha=8, group_size=2, batch_size=2, max_steps=4, save_every=2, lr=1e-3, max_new_tokens=4,
                temperature=1.0, top_p=1.0, num_iterations=2, log_every=1)
    base.update(kw)
    return Stage2Config(**base)


def test_batched_causal_reward_equals_per_sample_reference(tiny_env, stage1_dir):
    model = MedSynapseV.from_pretrained(stage1_dir)
    model.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    model.eval()
    samples = [s for s in read_samples(tiny_env.train_file) if s.answer_type != "caption"][:3]
    images = [load_image(s.images[0], s) for s in samples]
    prompts = model.prompts.collate([model.prompts.encode([im], s.question) for im, s in zip(images, samples)])
    prior = model.prior(images)
    with torch.no_grad():
        memory, memory_cf = model.memory(prior), model.memory(prior, "counterfactual")
        features = vision_features(model.vlm, prompts)
        rows = [0, 0, 1, 1, 2, 2]
        batch = prompts.select(rows)
        torch.manual_seed(0)
        tokens = model.generate(batch, memory[rows], max_new_tokens=5, min_new_tokens=2, do_sample=True,
                                features=select_features(features, prompts.image_rows(rows)))
    mask = completion_mask(tokens, model.prompts.eos_id)
    rollouts = Rollouts(tokens, mask, [], 0.0)
    scored = factual_and_counterfactual_logprobs(
        model.vlm, batch, memory[rows], memory_cf[rows], rollouts, select_features(features, prompts.image_rows(rows)),
        model.latent_id, temperature=1.0)
    assert torch.equal(scored.old, scored.factual)  # at T = 1 the ratio's old log-probs are r_causal's factual ones
    batched = causal_rewards(scored.factual, scored.counterfactual, mask)

    slow = []
    with torch.no_grad():
        for i, row in enumerate(rows):  # one trajectory at a time, pixels re-encoded, each condition separately
            single = prompts.select([row])
            lf = completion_logprobs(model.vlm, single, memory[row:row + 1], tokens[i:i + 1], mask[i:i + 1],
                                     model.latent_id)
            lc = completion_logprobs(model.vlm, single, memory_cf[row:row + 1], tokens[i:i + 1], mask[i:i + 1],
                                     model.latent_id)
            slow.append(float(((lf - lc) * mask[i:i + 1]).sum()))
    # r_causal here is as small as 6.8e-4 nats (a 1e-4 tolerance would pass a 15 % error). It sums differences of
    # log-probabilities of a few nats each, batched and padded against one row at a time, which differ by float32
    # rounding: measured 4.8e-7 = 2^-21, one float32 ulp of a log-probability of 4-8 nats; allowed 4 such ulps.
    torch.testing.assert_close(batched, torch.tensor(slow), atol=4 * 2 ** -21, rtol=0)
    assert batched.abs().sum() > 0


def test_generation_never_emits_structural_tokens(tiny_env, stage1_dir):
    model = MedSynapseV.from_pretrained(stage1_dir)
    samples = read_samples(tiny_env.train_file)[:4]
    images = [load_image(s.images[0], s) for s in samples]
    batch = model.prompts.collate([model.prompts.encode([im], s.question) for im, s in zip(images, samples)])
    # make the structural tokens the most likely ones: they must still never come out
    with torch.no_grad():
        model.vlm.lm_head.weight[model.prompts.suppressed_ids] *= 50
    torch.manual_seed(0)
    tokens = model.generate(batch, model.memory(model.prior(images)), max_new_tokens=8, do_sample=True)
    assert not torch.isin(tokens, torch.tensor(model.prompts.suppressed_ids)).any()


def test_stage2_trains_lora_only_and_resumes_exactly(tiny_env, stage1_dir, tmp_path):
    straight = train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "a"))
    weights_a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))

    with pytest.raises(Interrupted):
        train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "b"), on_step=crash_at(3))
    resumed = train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "b", resume=True))
    weights_b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert all("lora" in name for name in weights_a)

    loaded = MedSynapseV.from_pretrained(straight)
    original = MedSynapseV.from_pretrained(stage1_dir)
    for a, b in zip(loaded.sampler.state_dict().values(), original.sampler.state_dict().values()):
        assert torch.equal(a, b)  # the sampler is frozen in Stage II
    assert loaded.has_adapter
    assert any(float(w.abs().sum()) > 0 for n, w in weights_a.items() if "lora_B" in n)  # LoRA B moved off zero
    assert (straight / "causal_reward_summary.json").is_file()


def test_stage2_with_kl_drop_intervention_and_dapo_runs_and_logs(tiny_env, stage1_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "kl", beta=0.1, intervention="drop",
                                      loss_type="dapo", causal_reduction="mean", causal_clip=2.0, max_steps=2,
                                      num_iterations=1))
    # the scalars' event file sits directly in the run folder; a sub-folder holds the hparams (accelerate)
    events = next(p for p in (out / "stage2").iterdir() if p.is_file() and p.name.startswith("events"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"reward_mean", "reward_std", "r_acc", "r_causal", "zero_std_groups", "clip_fraction", "kl",
            "generated_tokens_per_s"} <= tags
    assert all(event.value >= 0 for event in accumulator.Scalars("kl"))


def test_memory_off_needs_lambda_causal_zero(tiny_env, stage1_dir, tmp_path):
    with pytest.raises(ValueError, match="lambda_causal"):
        train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "off", use_memory=False))


def test_stage2_ranked_form_with_floor_and_temperature_runs_and_logs(tiny_env, stage1_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_stage2(_stage2_config(tiny_env, stage1_dir, tmp_path / "ranked", causal_form="ranked",
                                      advantage_std_floor=0.1, temperature=0.7, max_steps=2, num_iterations=1))
    events = next(p for p in (out / "stage2").iterdir() if p.is_file() and p.name.startswith("events"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"inverted_groups", "advantage_abs_mean"} <= set(accumulator.Tags()["scalars"])
    assert all(event.value == 0.0 for event in accumulator.Scalars("inverted_groups"))
