"""GRPO maths against TRL (test-only dependency): TRL's own `_compute_loss` runs on fixed log-probs as the oracle."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from medsynapse.objectives.grpo import clipped_policy_loss, group_advantages
from medsynapse.objectives.rewards import causal_rewards

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


class _IdentityAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logp, old_logp, advantages, mask, loss_type, epsilon=0.2, beta=0.0, ref_logp=None, max_len=None):
    """Call TRL's GRPOTrainer._compute_loss with the policy forward replaced by fixed per-token log-probs."""
    n, t = logp.shape
    fake = SimpleNamespace(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, use_adaptive_entropy=False,
        accelerator=_IdentityAccelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
        max_completion_length=max_len)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
              "num_items_in_batch": mask.sum()}
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


class _OneProcess(_IdentityAccelerator):
    process_index = 0
    device = torch.device("cpu")


def trl_advantages(rewards, group):
    """Run TRL's own `_generate_and_score_completions` on a fake trainer whose generation returns one-token
    completions and whose single reward function returns `rewards`: the advantages are TRL's, not a re-typed copy."""
    n = rewards.numel()
    fake = SimpleNamespace(
        accelerator=_OneProcess(), model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, tools=None, environments=None,
        _generate=lambda prompts: ([[1]] * n, [[2]] * n, None, ["c"] * n, None, None, None, None),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None),
        num_iterations=1, use_vllm=False, vllm_importance_sampling_correction=False, beta=0.0,
        _calculate_rewards=lambda *a: rewards.view(-1, 1).clone(), num_generations=group,
        multi_objective_aggregation="sum_then_normalize", scale_rewards="group", reward_weights=torch.ones(1),
        reward_func_names=["r"], _metrics=defaultdict(lambda: defaultdict(list)),
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False, _is_vlm=False)
    return trl_grpo.GRPOTrainer._generate_and_score_completions(fake, [{"prompt": "p"}] * n)["advantages"]


def _fixed(seed=0, n=6, t=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + (torch.rand(n, t, generator=g) - 0.5) * 0.8  # ratios well outside [0.8, 1.2]: the clip is active
    mask = (torch.rand(n, t, generator=g) > 0.25).long()
    mask[:, 0] = 1
    adv = torch.randn(n, generator=g)
    ref = logp + (torch.rand(n, t, generator=g) - 0.5) * 0.3
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("group", [2, 4, 6])
def test_group_advantages_equal_trl(group):
    g = torch.Generator().manual_seed(group)
    rewards = torch.cat([torch.rand(group * 3, generator=g), torch.full((group,), 3.0)])  # last group: zero std
    rewards[1] = float("nan")  # an unscorable rollout
    torch.testing.assert_close(group_advantages(rewards, group), trl_advantages(rewards, group), atol=0, rtol=1e-6)


def test_zero_std_group_gets_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[5] > 0 > adv[4]
    nan_group = torch.tensor([float("nan"), 1.0, 0.0, 1.0])  # a rollout without a reward
    torch.testing.assert_close(group_advantages(nan_group, 4), trl_advantages(nan_group, 4))
    assert torch.isfinite(group_advantages(torch.tensor([2.0]), 1)).all()  # a group of one: 0, not NaN


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_clipped_loss_equals_trl(loss_type, beta):
    logp, old, adv, mask, ref = _fixed()
    ours = clipped_policy_loss(logp, old, adv, mask, 0.2, None, loss_type, max_completion_length=5, beta=beta,
                               ref_logp=ref if beta else None)
    theirs = trl_loss(logp, old, adv, mask, loss_type, beta=beta, ref_logp=ref if beta else None, max_len=5)
    torch.testing.assert_close(ours.loss, theirs)
    assert 0 < ours.clip_fraction < 1


def test_gradients_equal_trl():
    logp, old, adv, mask, _ = _fixed(1)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    clipped_policy_loss(a, old, adv, mask).loss.backward()
    trl_loss(b, old, adv, mask, "grpo").backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_on_policy_ratio_is_one_and_clip_inert():
    logp, _, adv, mask, _ = _fixed(2)
    result = clipped_policy_loss(logp, logp.clone(), adv, mask)
    assert result.clip_fraction == 0.0 and abs(result.ratio_mean - 1.0) < 1e-6


def test_causal_reward_sum_mean_clip():
    f = torch.tensor([[-0.1, -0.2, -5.0], [-1.0, -1.0, -1.0]])
    cf = torch.tensor([[-2.1, -0.7, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(causal_rewards(f, cf, mask), torch.tensor([2.5, 0.0]))
    torch.testing.assert_close(causal_rewards(f, cf, mask, "mean"), torch.tensor([1.25, 0.0]))
    torch.testing.assert_close(causal_rewards(f, cf, mask, clip=1.0), torch.tensor([1.0, 0.0]))
    assert torch.equal(causal_rewards(f, f, mask), torch.zeros(2))  # M' = M gives exactly 0
