"""Stage II's reward forms: the ranked form's ordering guarantees (property tests), the advantage σ floor on tied
groups, the paper form = Eq. 5 exactly, and r_causal read at temperature 1 from the one scoring forward."""

from __future__ import annotations

import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynapse.objectives.grpo import group_advantages
from medsynapse.objectives.rewards import (
    RANKED_MARGIN,
    causal_rewards,
    centred_causal,
    composite_reward,
    ranked_reward,
    total_reward,
)
from medsynapse.recipes.stage2_ccr import (
    Stage2Config,
    check_config,
    inverted_group_fraction,
    rewards_and_advantages,
)

FLOOR = 0.1  # the recommended advantage_std_floor for the ranked form

# any float32-representable real, from the huge to the tiny, plus a small pool so that exact ties are common
_reals = st.floats(allow_nan=False, allow_infinity=False, width=32)  # up to ±3.4e38
_causal = st.one_of(_reals, st.sampled_from([0.0, -0.0, 1e-3, -1e-3, 0.5, 2.0, -7.0, 1e30, -1e30]))


@st.composite
def ranked_groups(draw):
    group = draw(st.integers(min_value=2, max_value=16))
    groups = draw(st.integers(min_value=1, max_value=3))
    n = group * groups
    r_acc = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)))
    r_causal = torch.tensor(draw(st.lists(_causal, min_size=n, max_size=n)), dtype=torch.float32)
    lambda_acc = draw(st.sampled_from([1.0, 0.1, 3.0, 10.0]))
    # include 2·λ_causal = λ_acc exactly (the boundary the validation still allows) and λ_causal = 0
    lambda_causal = lambda_acc * draw(st.sampled_from([0.5, 0.25, 0.0, 0.49999]))
    scale = draw(st.sampled_from([1.0, 1e-3, 0.3, 1e3]))
    floor = draw(st.sampled_from([0.0, FLOOR]))
    return group, r_acc, r_causal, lambda_acc, lambda_causal, scale, floor


def _assert_ranked_order(values: torch.Tensor, r_acc: torch.Tensor, r_causal: torch.Tensor, group: int) -> None:
    """Within each group: correct > wrong strictly; same correctness: never against the r_causal order, ties equal."""
    for v, a, c in zip(values.view(-1, group), r_acc.view(-1, group), r_causal.view(-1, group)):
        correct, wrong = v[a > 0], v[a == 0]
        if len(correct) and len(wrong):
            assert correct.min() > wrong.max()
        for cls in (a > 0, a == 0):
            vs, cs = v[cls], c[cls]
            less = cs[:, None] < cs[None, :]
            assert bool((vs[:, None] <= vs[None, :])[less].all())  # non-strict: tanh saturates, rounding merges
            same = cs[:, None] == cs[None, :]
            assert bool((vs[:, None] == vs[None, :])[same].all())


@settings(max_examples=examples(400), deadline=None, database=None)
@given(ranked_groups())
def test_ranked_reward_and_advantages_keep_correctness_first_and_causal_order(case):
    group, r_acc, r_causal, lambda_acc, lambda_causal, scale, floor = case
    rewards = ranked_reward(r_acc, r_causal, lambda_acc, lambda_causal, scale)
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    _assert_ranked_order(rewards, r_acc, r_causal, group)
    advantages = group_advantages(rewards, group, std_floor=floor)
    assert torch.isfinite(advantages).all()
    _assert_ranked_order(advantages, r_acc, r_causal, group)
    assert inverted_group_fraction(r_acc, rewards, group) == 0.0


@settings(max_examples=examples(200), deadline=None, database=None)
@given(st.lists(st.floats(min_value=-3, max_value=3), min_size=2, max_size=8, unique=True),
       st.sampled_from([0.0, 1.0]))
def test_ranked_order_is_strict_where_tanh_is_not_saturated(unscaled, acc):
    """|r_causal| ≤ 3·scale and differences ≥ 1e-3·scale: distinct r_causal give distinct, ordered R."""
    values = torch.tensor(sorted(round(u, 3) for u in unscaled), dtype=torch.float64)
    values = torch.unique(values)
    rewards = ranked_reward(torch.full_like(values, acc), values.float() * 2.0, 1.0, 0.5, scale=2.0)
    assert bool((rewards[1:] > rewards[:-1]).all())


def test_ranked_reward_formula_and_huge_values():
    r_acc = torch.tensor([1.0, 1.0, 0.0, 0.0])
    r_causal = torch.tensor([-1e30, 0.7, 1e30, 0.0])
    expected = torch.tensor([1.0 - 0.5 * (1 - RANKED_MARGIN), 1.0 + 0.5 * (1 - RANKED_MARGIN) * torch.tanh(
        torch.tensor(0.7 / 2.0, dtype=torch.float64)).item(), 0.5 * (1 - RANKED_MARGIN), 0.0])
    rewards = ranked_reward(r_acc, r_causal, 1.0, 0.5, scale=2.0)
    torch.testing.assert_close(rewards, expected)
    assert rewards[0] > rewards[2]  # saturated both ways at 2·λ_causal = λ_acc: still strictly ordered
    assert torch.equal(composite_reward(r_acc, r_causal, "ranked", 1.0, 0.5, scale=2.0), rewards)


@settings(max_examples=examples(200), deadline=None, database=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=1, max_value=9), st.integers(0, 2**31 - 1),
       st.sampled_from([(1.0, 0.5), (1.0, 0.0), (2.0, 3.0)]))
def test_paper_form_is_eq5_exactly(n, width, seed, lambdas):
    lambda_acc, lambda_causal = lambdas
    g = torch.Generator().manual_seed(seed)
    f, cf = -torch.rand(n, width, generator=g) * 8, -torch.rand(n, width, generator=g) * 8
    mask = (torch.rand(n, width, generator=g) > 0.3).long()
    r_acc = (torch.rand(n, generator=g) > 0.5).float()
    rewards = composite_reward(r_acc, causal_rewards(f, cf, mask), "paper", lambda_acc, lambda_causal)
    assert torch.equal(rewards, total_reward(r_acc, causal_rewards(f, cf, mask), lambda_acc, lambda_causal))
    assert torch.equal(rewards, lambda_acc * r_acc + lambda_causal * ((f - cf) * mask.float()).sum(-1))
    reference = [lambda_acc * float(r_acc[i]) + lambda_causal * sum(
        float(f[i, t]) - float(cf[i, t]) for t in range(width) if mask[i, t]) for i in range(n)]
    torch.testing.assert_close(rewards, torch.tensor(reference), atol=1e-5, rtol=1e-5)


def test_floor_keeps_near_ties_small_and_exact_ties_zero():
    r_acc = torch.ones(4)
    r_causal = torch.tensor([0.3, 0.301, 0.302, 0.303])  # all correct, differing by 1e-3 nats
    rewards = ranked_reward(r_acc, r_causal, 1.0, 0.5, scale=1.0)
    floored = group_advantages(rewards, 4, std_floor=FLOOR)
    assert floored.abs().max() <= 1e-2
    assert bool((floored[1:] >= floored[:-1]).all()) and floored[-1] > floored[0]  # the order survives
    assert group_advantages(rewards, 4).abs().max() > 0.5  # TRL's σ + 1e-4 stretches 1e-3 nats to about ±1
    g = torch.Generator().manual_seed(0)
    inexact = 0
    for size in (3, 5, 6, 7):  # sizes whose float mean of equal values is often not that value
        for _ in range(25):
            tied = ranked_reward(torch.ones(size), torch.full((size,), float(torch.randn(1, generator=g))), 1.0, 0.5)
            tied = tied * float(1 + torch.rand(1, generator=g))
            inexact += int(tied.mean() != tied[0])
            assert torch.equal(group_advantages(tied, size, std_floor=FLOOR), torch.zeros(size))
    assert inexact > 0  # the cases where (R − mean) alone would not be exactly 0 were exercised


def test_floor_leaves_mixed_groups_and_trl_behaviour_unchanged():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        r_acc = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
        rewards = ranked_reward(r_acc, torch.randn(8, generator=g) * 0.3, 1.0, 0.5)
        assert rewards.view(2, 4).std(dim=1).min() > FLOOR
        assert torch.equal(group_advantages(rewards, 4, std_floor=FLOOR), group_advantages(rewards, 4))
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.5, 0.2, 0.2, 0.2, 0.2, 3.0, 0.1, 0.3, 0.9])
    for off in (0.0, None):
        assert torch.equal(group_advantages(rewards, 4, std_floor=off), group_advantages(rewards, 4))
    near = torch.tensor([0.2, 0.2001, 0.2, 0.2])  # no floor: TRL's (R − mean) / (σ + 1e-4), about ±1
    for off in (0.0, None):
        expected = (near - near.mean()) / (near.std() + 1e-4)
        torch.testing.assert_close(group_advantages(near, 4, std_floor=off), expected)
    with pytest.raises(ValueError, match="std_floor"):
        group_advantages(rewards, 4, std_floor=-0.1)


def test_paper_form_can_invert_groups_ranked_cannot():
    r_acc = torch.tensor([1.0, 0.0, 1.0, 0.0])
    r_causal = torch.tensor([0.0, 5.4, 2.0, 0.1])  # docs/design.md: a wrong count earns r_causal ≈ 5.4
    assert inverted_group_fraction(r_acc, total_reward(r_acc, r_causal), 2) == 0.5
    assert inverted_group_fraction(r_acc, ranked_reward(r_acc, r_causal), 2) == 0.0


@st.composite
def centred_groups(draw):
    group = draw(st.integers(min_value=2, max_value=16))
    n = group * draw(st.integers(min_value=1, max_value=3))
    r_acc = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, float("nan")]), min_size=n, max_size=n)))
    finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
    pool = st.sampled_from([0.0, 1e-3, -1e-3, 0.5, 2.0, -7.0, 300.0])
    r_causal = torch.tensor(draw(st.lists(st.one_of(finite, pool), min_size=n, max_size=n)), dtype=torch.float32)
    lambda_causal = draw(st.sampled_from([0.0, 0.1, 0.5, 0.7]))  # < 1/√2: the validated bound with no floor
    scale = draw(st.sampled_from([1.0, 1e-3, 0.3, 10.0]))
    return group, r_acc, r_causal, lambda_causal, scale


@settings(max_examples=examples(400), deadline=None, database=None)
@given(centred_groups())
def test_centred_causal_is_bounded_sums_to_zero_per_class_and_keeps_correctness_first(case):
    group, r_acc, r_causal, lambda_causal, scale = case
    c = centred_causal(r_acc, r_causal, group, scale)
    assert c.shape == r_acc.shape and torch.isfinite(c).all() and c.abs().max() <= 1 + 1e-6
    config = Stage2Config(causal_form="centred", group_size=group, lambda_causal=lambda_causal, causal_scale=scale)
    check_config(config)
    rewards, advantages = rewards_and_advantages(r_acc, r_causal, config)
    plain = group_advantages(r_acc, group)  # λ_causal = 0: plain GRPO on accuracy
    for a, r, cc, adv, base in zip(r_acc.view(-1, group), r_causal.view(-1, group), c.view(-1, group),
                                   advantages.view(-1, group), plain.view(-1, group)):
        scored = ~torch.isnan(a)
        assert bool((cc[~scored] == 0).all())  # an unscorable rollout gets no causal credit
        correct, wrong = adv[a == 1], adv[a == 0]
        if len(correct) and len(wrong):
            assert correct.min() > wrong.max() + 1e-3  # a margin, not only an order
        for cls in (a == 1, a == 0):
            if cls.sum() == 0:
                continue
            assert abs(float(cc[cls].double().sum())) <= 1e-5 * max(1, int(cls.sum()))  # class mean untouched
            torch.testing.assert_close(adv[cls].double().mean(), base[cls].double().mean(), atol=1e-5, rtol=0)
            vs, rs = cc[cls], r[cls]
            assert bool((vs[:, None] <= vs[None, :])[rs[:, None] < rs[None, :]].all())  # r_causal order kept
            assert bool((vs[:, None] == vs[None, :])[rs[:, None] == rs[None, :]].all())  # ties tie
            if len(set(rs.tolist())) == 1:
                assert bool((vs == 0).all())  # tied class: exactly 0, however large the values


def test_centred_causal_by_value_and_the_sigma_floor():
    r_acc = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # correct class: r = 2, 4, 6 (mean 4, σ 2) -> z = -1, 0, 1, divided by (G - 1)/√G = 1.5
    c = centred_causal(r_acc, torch.tensor([2.0, 4.0, 6.0, 9.0]), group_size=4, scale=1.0)
    torch.testing.assert_close(c, torch.tensor([-1 / 1.5, 0.0, 1 / 1.5, 0.0]))
    tiny = centred_causal(r_acc, torch.tensor([0.0, 1e-3, 2e-3, 5.0]), group_size=4, scale=1.0)
    assert tiny.abs().max() < 1e-3  # rounding-level differences stay rounding-level (σ floored at 1 nat)
    unfloored = centred_causal(r_acc, torch.tensor([0.0, 1e-3, 2e-3, 5.0]), group_size=4, scale=1e-6)
    torch.testing.assert_close(unfloored, torch.tensor([-1 / 1.5, 0.0, 1 / 1.5, 0.0]))  # what the floor prevents


@st.composite
def separated_groups(draw):
    """Centred-form groups whose distinct r_causal values differ by ≥ 1 nat within a range of ±60, so that distinct
    values give distinct c even after float32 rounding (|Δc| ≥ 1 / (85·3.75) ≈ 3e-3, λ_causal·|Δc| ≥ 3e-4)."""
    group = draw(st.integers(min_value=2, max_value=16))
    n = group * draw(st.integers(min_value=1, max_value=3))
    r_acc = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 1.0, 0.0, float("nan")]), min_size=n, max_size=n)))
    r_causal = torch.tensor(draw(st.lists(st.integers(-60, 60), min_size=n, max_size=n)), dtype=torch.float32)
    lambda_acc = draw(st.sampled_from([1.0, 0.5, 3.0]))
    lambda_causal = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7]))
    scale = draw(st.sampled_from([1.0, 0.3, 10.0]))
    return group, r_acc, r_causal, lambda_acc, lambda_causal, scale


@settings(max_examples=examples(400), deadline=None, database=None)
@given(separated_groups())
def test_centred_advantage_follows_r_causal_within_each_class(case):
    """The point of the centred form: among rollouts of equal correctness, a higher r_causal (memory that mattered
    more) gets a strictly higher advantage when λ_causal > 0, and exactly the same advantage when λ_causal = 0 or the
    r_causal values are equal; across classes, correctness still comes first."""
    group, r_acc, r_causal, lambda_acc, lambda_causal, scale = case
    config = Stage2Config(causal_form="centred", group_size=group, lambda_acc=lambda_acc,
                          lambda_causal=lambda_causal, causal_scale=scale)
    check_config(config)
    rewards, advantages = rewards_and_advantages(r_acc, r_causal, config)
    assert torch.isfinite(advantages).all()
    for a, r, adv in zip(r_acc.view(-1, group), r_causal.view(-1, group), advantages.view(-1, group)):
        for cls in (a == 1, a == 0):
            vs, rs = adv[cls], r[cls]
            higher = rs[:, None] < rs[None, :]  # [i, j]: rollout j has the higher r_causal
            if lambda_causal > 0:
                assert bool((vs[:, None] < vs[None, :])[higher].all()), (rs.tolist(), vs.tolist())
            else:
                assert bool((vs[:, None] == vs[None, :]).all())  # plain GRPO: one advantage per class
            assert bool((vs[:, None] == vs[None, :])[rs[:, None] == rs[None, :]].all())
        correct, wrong = adv[a == 1], adv[a == 0]
        if len(correct) and len(wrong):
            assert correct.min() > wrong.max()


def test_centred_advantage_sign_by_value():
    """One group, G = 4, all correct except one: the correct rollout whose answer the counterfactual memory makes
    least likely (highest r_causal) gets the highest advantage, and the shift from plain GRPO is exactly λ_causal·c."""
    r_acc = torch.tensor([1.0, 1.0, 1.0, 0.0])
    r_causal = torch.tensor([2.0, 4.0, 6.0, 9.0])
    config = Stage2Config(causal_form="centred", group_size=4, lambda_causal=0.5, causal_scale=1.0)
    _, advantages = rewards_and_advantages(r_acc, r_causal, config)
    plain = group_advantages(r_acc, 4)
    # c = (-1, 0, 1) / 1.5 in the correct class (mean 4, σ 2, bound (G − 1)/√G = 1.5), 0 for the lone wrong one
    expected = plain + 0.5 * torch.tensor([-1 / 1.5, 0.0, 1 / 1.5, 0.0])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    assert advantages[2] > advantages[1] > advantages[0] > advantages[3]


def _centred_oracle(r_acc: list[float], r_causal: list[float], group: int, scale: float) -> list[float]:
    """c from its definition, with Python's statistics module (mean, unbiased stdev), class by class."""
    import math
    import statistics

    out = [0.0] * len(r_acc)
    for start in range(0, len(r_acc), group):
        rows = range(start, start + group)
        for correct in (True, False):
            members = [i for i in rows if not math.isnan(r_acc[i]) and (r_acc[i] > 0) == correct
                       and math.isfinite(r_causal[i])]
            values = [r_causal[i] for i in members]
            if len(values) < 2 or min(values) == max(values):
                continue
            mean, sd = statistics.fmean(values), statistics.stdev(values)
            for i in members:
                out[i] = (r_causal[i] - mean) / max(sd, scale) * math.sqrt(group) / (group - 1)
    return out


@settings(max_examples=examples(300), deadline=None, database=None)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=1, max_value=3), st.integers(0, 2**31 - 1),
       st.sampled_from([1.0, 0.3, 1e-3, 20.0]))
def test_centred_causal_equals_its_definition_zero_mean_and_bounded(group, groups, seed, scale):
    """c by value against an independent oracle (float64, 1e-12), each class's c sums to 0 (1e-12), |c| ≤ 1."""
    g = torch.Generator().manual_seed(seed)
    n = group * groups
    r_acc = torch.tensor([[0.0, 1.0, float("nan")][int(k)] for k in torch.randint(0, 3, (n,), generator=g)],
                         dtype=torch.float64)
    r_causal = torch.randn(n, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 10)
    r_causal[torch.rand(n, generator=g) < 0.2] = 1.5  # ties
    c = centred_causal(r_acc, r_causal, group, scale)
    assert c.dtype == torch.float64
    expected = torch.tensor(_centred_oracle(r_acc.tolist(), r_causal.tolist(), group, scale), dtype=torch.float64)
    torch.testing.assert_close(c, expected, atol=1e-12, rtol=1e-12)
    assert float(c.abs().max()) <= 1 + 1e-12
    for a, cc in zip(r_acc.view(-1, group), c.view(-1, group)):
        for cls in (a == 1, a == 0):
            assert abs(float(cc[cls].sum())) <= 1e-12


@pytest.mark.parametrize("group", [2, 3, 4, 8, 16])
def test_centred_causal_bound_is_attained_by_one_outlier(group):
    """|c| ≤ 1 is tight: one outlier among G rollouts of one class gets c = 1 exactly (z = (G − 1)/√G), the others
    −1/(G − 1), so the scale √G/(G − 1) is neither too small (|c| > 1) nor too large (the bound never reached)."""
    r_causal = torch.zeros(group, dtype=torch.float64)
    r_causal[-1] = 50.0  # σ = 50/√G ≥ 12.5 > scale: the floor is not in play
    for acc in (1.0, 0.0):
        c = centred_causal(torch.full((group,), acc, dtype=torch.float64), r_causal, group, scale=1.0)
        expected = torch.full((group,), -1 / (group - 1), dtype=torch.float64)
        expected[-1] = 1.0
        torch.testing.assert_close(c, expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"causal_form": "centred", "lambda_causal": 0.71}, "2·lambda_causal <"),
    ({"causal_form": "centred", "lambda_causal": 0.4, "advantage_std_floor": 2.0}, "2·lambda_causal <"),
    ({"causal_form": "centred", "causal_scale": 0.0}, "causal_scale"),
    ({"causal_form": "centred", "causal_gate": "correct"}, "causal_gate"),
    ({"causal_form": "ranked", "lambda_causal": 0.6}, "2·lambda_causal <= lambda_acc"),
    ({"causal_form": "ranked", "lambda_acc": 0.0, "lambda_causal": 0.0}, "lambda_acc > 0"),
    ({"causal_form": "ranked", "causal_scale": 0.0}, "causal_scale"),
    ({"causal_form": "ranked", "causal_scale": float("inf")}, "causal_scale"),
    ({"causal_form": "ranked", "causal_gate": "correct"}, "causal_gate"),
    ({"causal_form": "ranked", "causal_clip": 0.9}, "causal_clip"),
    ({"causal_form": "tanh"}, "causal_form"),
    ({"causal_gate": "wrong"}, "causal_gate"),
    ({"causal_reduction": "max"}, "causal_reduction"),
    ({"advantage_std_floor": -0.1}, "advantage_std_floor"),
    ({"advantage_std_floor": float("nan")}, "advantage_std_floor"),
    ({"temperature": 0.0}, "temperature"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(Stage2Config(**overrides))
    from medsynapse.recipes.stage2_ccr import train_stage2

    with pytest.raises(ValueError, match=message):  # before anything is loaded
        train_stage2(Stage2Config(output_dir="/nonexistent/never-created", **overrides))


def test_valid_configs_pass():
    check_config(Stage2Config())  # the paper's defaults
    check_config(Stage2Config(causal_form="ranked", lambda_acc=1.0, lambda_causal=0.5, advantage_std_floor=FLOOR))
    check_config(Stage2Config(causal_clip=0.9, causal_gate="correct"))  # the paper form's options still work
    check_config(Stage2Config(causal_form="centred", lambda_causal=0.7))


def test_causal_reward_reads_temperature_one_and_old_logprobs_the_sampling_temperature(model, tiny_env):
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.model.vlm import (
        append_completions,
        completion_logprobs,
        completion_mask,
        forward_with_memory,
        select_features,
        vision_features,
    )
    from medsynapse.recipes.stage2_ccr import Rollouts, factual_and_counterfactual_logprobs

    model.eval()
    samples = [s for s in read_samples(tiny_env.train_file) if s.answer_type != "caption"][:2]
    images = [load_image(s.images[0], s) for s in samples]
    prompts = model.prompts.collate([model.prompts.encode([im], s.question) for im, s in zip(images, samples)])
    rows = [0, 0, 1, 1]
    with torch.no_grad():
        prior = model.prior(images)
        memory, memory_cf = model.memory(prior)[rows], model.memory(prior, "counterfactual")[rows]
        features = vision_features(model.vlm, prompts)
        batch, batch_features = prompts.select(rows), select_features(features, prompts.image_rows(rows))
        torch.manual_seed(0)
        tokens = model.generate(batch, memory, max_new_tokens=5, min_new_tokens=3, do_sample=True,
                                features=batch_features)
    mask = completion_mask(tokens, model.prompts.eos_id)
    scored = factual_and_counterfactual_logprobs(model.vlm, batch, memory, memory_cf, Rollouts(tokens, mask, [], 0.0),
                                                 batch_features, model.latent_id, temperature=0.5)

    def plain_logprobs(mem, temperature):  # independent: a plain forward per condition, log-softmax, gather
        with torch.no_grad():
            logits = forward_with_memory(model.vlm, append_completions(batch, tokens, mask), mem,
                                         model.latent_id).logits[:, -tokens.shape[1] - 1:-1].float()
        logp = (logits / temperature).log_softmax(-1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
        return logp * mask

    f1, cf1 = plain_logprobs(memory, 1.0), plain_logprobs(memory_cf, 1.0)
    expected = ((f1 - cf1) * mask).sum(-1)
    r_causal = causal_rewards(scored.factual, scored.counterfactual, mask)
    # Exact: the scoring forward is the same computation as these plain forwards on the same batch (measured gaps 0
    # for r_causal and all three log-probabilities). A tolerance of 1e-4 would pass an error of 20 % here: r_causal
    # values are as small as 4.5e-4 nats.
    torch.testing.assert_close(r_causal, expected, atol=0, rtol=0)
    torch.testing.assert_close(scored.factual, f1, atol=0, rtol=0)
    torch.testing.assert_close(scored.counterfactual, cf1, atol=0, rtol=0)
    torch.testing.assert_close(scored.old, plain_logprobs(memory, 0.5), atol=0, rtol=0)
    # the temperature matters here, so the checks above can tell the two apart
    at_half = causal_rewards(scored.old, plain_logprobs(memory_cf, 0.5), mask)
    assert (at_half - expected).abs().max() > 1e-3
    assert (scored.old - scored.factual).abs().max() > 1e-3
    # the old log-probs are what the update pass computes at the sampling temperature
    with torch.no_grad():
        update = completion_logprobs(model.vlm, batch, memory, tokens, mask, model.latent_id, batch_features, 0.5)
    torch.testing.assert_close(scored.old, update, atol=1e-5, rtol=1e-5)
