"""Each Stage II option changes what it should, seen from inside the recipe.

A probe wraps the recipe's own calls (the counterfactual scoring, the causal reward, the policy loss) and records
their inputs and outputs at every step; runs that differ in one option share seed, data and rollout keys, so
the first step's rollouts are the same and the option's effect can be checked by value.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import completion_logprobs
from medsynapse.recipes import stage2_ccr
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

PROBED = ("factual_and_counterfactual_logprobs", "causal_rewards", "clipped_policy_loss", "group_advantages")


@pytest.fixture(scope="module")
def stage1_dir(tiny_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                              output_dir=str(out), n_memory=4, sampler_width=32, batch_size=4, max_steps=4, lr=1e-2,
                              answer_types=["yes_no", "multiple_choice", "open"]))
    return out


def probe_run(tiny_env, stage1_dir, out, **overrides) -> dict[str, list]:
    """Train Stage II with `overrides` and return every probed call as (args, kwargs, result), in call order."""
    calls: dict[str, list] = defaultdict(list)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in PROBED:
            original = getattr(stage2_ccr, name)

            def recorded(*args, _original=original, _name=name, **kwargs):
                result = _original(*args, **kwargs)
                calls[_name].append((args, kwargs, result))
                return result

            monkeypatch.setattr(stage2_ccr, name, recorded)
        settings = dict(model=str(stage1_dir), train_file=str(tiny_env.train_file), output_dir=str(out), lora_r=4,
                        lora_alpha=8, group_size=4, batch_size=2, max_steps=1, save_every=100, lr=1e-3,
                        max_new_tokens=6, temperature=1.0, top_p=1.0, log_every=1)
        train_stage2(Stage2Config(**{**settings, **overrides}))
    return calls


def first_scoring(calls):
    args, _, result = calls["factual_and_counterfactual_logprobs"][0]
    policy, batch, memory, memory_cf, rollouts = args[:5]
    return memory, memory_cf, rollouts, result


def test_intervention_changes_only_the_counterfactual_memory(tiny_env, stage1_dir, tmp_path):
    runs = {name: probe_run(tiny_env, stage1_dir, tmp_path / name, intervention=name)
            for name in ("zero", "drop", "inpaint")}
    scored = {name: first_scoring(calls) for name, calls in runs.items()}
    memory, _, rollouts, logprobs = scored["zero"]
    for name in ("drop", "inpaint"):
        other_memory, other_cf, other_rollouts, other_logprobs = scored[name]
        assert torch.equal(other_memory, memory)  # M is the same memory whatever the intervention
        assert torch.equal(other_rollouts.tokens, rollouts.tokens)  # and so are the rollouts
        torch.testing.assert_close(other_logprobs.factual, logprobs.factual, atol=1e-6, rtol=0)
        assert (other_cf - scored["zero"][1]).abs().max() > 1e-5, name  # M' is not (equal would be exact)
        assert (other_logprobs.counterfactual - logprobs.counterfactual).abs().max() > 1e-5, name
    assert (scored["drop"][1] - scored["inpaint"][1]).abs().max() > 1e-5


def test_causal_reduction_mean_is_the_sum_over_the_completion_length(tiny_env, stage1_dir, tmp_path):
    summed = probe_run(tiny_env, stage1_dir, tmp_path / "sum", causal_reduction="sum")
    mean = probe_run(tiny_env, stage1_dir, tmp_path / "mean", causal_reduction="mean")
    r_sum, r_mean = summed["causal_rewards"][0][2], mean["causal_rewards"][0][2]
    lengths = first_scoring(summed)[2].mask.sum(-1).to(r_sum.dtype)
    assert lengths.min() >= 1 and lengths.max() > 1  # lengths differ from 1, so sum and mean differ
    torch.testing.assert_close(r_mean * lengths, r_sum, atol=1e-6, rtol=1e-5)
    assert (r_mean - r_sum).abs().max() > 1e-4


def test_causal_clip_bounds_r_causal_and_leaves_the_rest(tiny_env, stage1_dir, tmp_path):
    plain = probe_run(tiny_env, stage1_dir, tmp_path / "plain")["causal_rewards"][0][2]
    bound = float(plain.abs().max()) / 2
    assert bound > 0
    clipped = probe_run(tiny_env, stage1_dir, tmp_path / "clip", causal_clip=bound)["causal_rewards"][0][2]
    torch.testing.assert_close(clipped, plain.clamp(-bound, bound), atol=1e-6, rtol=0)
    assert (clipped != plain).any() and (clipped.abs() <= bound + 1e-6).all()


def test_dapo_aggregates_over_tokens_not_sequences(tiny_env, stage1_dir, tmp_path):
    calls = probe_run(tiny_env, stage1_dir, tmp_path / "dapo", loss_type="dapo")
    args, kwargs, result = calls["clipped_policy_loss"][0]
    logp, old, advantages, mask = args[:4]
    assert args[6] == "dapo" and (advantages != 0).any()
    per_token = -torch.min(torch.exp(logp - old) * advantages[:, None],
                           torch.exp(logp - old).clamp(0.8, 1.2) * advantages[:, None])
    expected = (per_token * mask).sum() / mask.sum()  # dapo: one mean over every completion token
    torch.testing.assert_close(result.loss, expected, atol=1e-6, rtol=1e-6)
    # (with sequences of unequal length dapo and grpo weigh tokens differently: tests/test_grpo.py, against TRL; the
    # tiny model's rollouts all run to max_new_tokens, where the two coincide, so the option is checked as passed)


def test_beta_penalises_distance_to_the_adapter_disabled_model(tiny_env, stage1_dir, tmp_path):
    off = probe_run(tiny_env, stage1_dir, tmp_path / "off", max_steps=3, lr=2e-2)
    assert all(args[9] is None and result.kl == 0.0 for args, _, result in off["clipped_policy_loss"])
    on = probe_run(tiny_env, stage1_dir, tmp_path / "on", max_steps=3, lr=2e-2, beta=0.5)
    losses = on["clipped_policy_loss"]
    assert losses[0][2].kl < 1e-9  # LoRA B starts at zero: the policy is the reference
    assert losses[-1][2].kl > 1e-5  # after two updates it is not, and the KL term sees it
    # the reference is the Stage I model itself (adapter disabled), recomputed here independently
    args, _, _ = losses[-1]
    ref_logp = args[9]
    scoring_args = on["factual_and_counterfactual_logprobs"][-1][0]
    _, batch, memory, _, rollouts, features = scoring_args[:6]
    base = MedSynapseV.from_pretrained(stage1_dir)
    with torch.no_grad():
        expected = completion_logprobs(base.vlm, batch, memory, rollouts.tokens, rollouts.mask, base.latent_id,
                                       features, 1.0)
    torch.testing.assert_close(ref_logp, expected, atol=1e-5, rtol=1e-5)
    assert (args[0] - ref_logp).abs().max() > 1e-4  # and the trained policy differs from it


def test_reasoning_format_reaches_the_prompts_and_the_reward(tiny_env, stage1_dir, tmp_path, monkeypatch):
    from medsynapse.answers import REASONING_INSTRUCTION

    seen = {}
    original = stage2_ccr.accuracy_rewards

    def recorded(texts, samples, answer_format="direct"):
        seen.update(answer_format=answer_format, prompts=[s.model_prompt for s in samples])
        return original(texts, samples, answer_format)

    monkeypatch.setattr(stage2_ccr, "accuracy_rewards", recorded)
    probe_run(tiny_env, stage1_dir, tmp_path / "reasoning", answer_format="reasoning")
    assert seen["answer_format"] == "reasoning"
    assert seen["prompts"] and all(p.endswith("\n" + REASONING_INSTRUCTION) for p in seen["prompts"])
    with pytest.raises(ValueError, match="answer_format"):
        train_stage2(Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file),
                                  output_dir=str(tmp_path / "bad"), answer_format="essay"))
