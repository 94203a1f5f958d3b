"""Seed-aware comparisons (eval/stats.py): the hierarchical bootstrap against the exact enumeration of every
seed-and-question resample, an interval that widens with seed variance where the question-only one does not, the
seed-level t, the multiplicity corrections and the t-interval over seeds, all by value."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medsynapse.eval.report import mean_sd_ci
from medsynapse.eval.stats import (
    adjust_family,
    adjust_p_values,
    compare,
    hierarchical_bootstrap,
    hierarchical_deltas,
    paired_bootstrap,
    seed_deltas,
    seed_t_test,
)


def test_hierarchical_resamples_follow_the_exact_distribution_over_every_seed_and_question_draw():
    row = [[1, 0, 1], [1, 1, 0]]
    reference = [[0, 0, 1], [1, 0, 0]]
    d = np.subtract(row, reference).astype(float)  # [[1, 0, 0], [0, 1, 0]]
    exact: dict[float, float] = {}
    draws = list(itertools.product(range(2), repeat=2)), list(itertools.product(range(3), repeat=3))
    for seeds in draws[0]:
        for questions in draws[1]:
            value = round(float(np.mean([[d[s, q] for q in questions] for s in seeds])), 9)
            exact[value] = exact.get(value, 0) + 1 / (len(draws[0]) * len(draws[1]))
    sampled = np.round(hierarchical_deltas(row, reference, resamples=200_000, seed=1), 9)
    assert set(np.unique(sampled)) <= set(exact)
    for value, probability in exact.items():  # binomial sd <= 0.0011 at 200,000 resamples
        assert np.mean(sampled == value) == pytest.approx(probability, abs=0.005)
    below = sum(p for value, p in exact.items() if value <= 0)
    above = sum(p for value, p in exact.items() if value >= 0)
    assert hierarchical_bootstrap(row, reference, 200_000, seed=1)["p_value"] == pytest.approx(
        2 * min(below, above), abs=0.01)


def test_question_resampling_is_stratified_by_benchmark_and_the_statistic_averages_benchmarks():
    row = [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    reference = [[0] * 6, [0] * 6]
    groups = ["a", "a", "b", "b", "b", "b"]
    assert seed_deltas(row, reference, groups).tolist() == pytest.approx([0.5, (1 + 0.25) / 2])
    test = hierarchical_bootstrap(row, reference, 2000, groups=groups)
    assert test["delta"] == pytest.approx((0.5 + 0.625) / 2) and test["groups"] == 2 and test["n_seeds"] == 2
    # benchmark a's two questions are both right under every draw: its mean is always 1; only b's and the seeds vary
    deltas = hierarchical_deltas(row, reference, 2000, groups=groups)
    assert deltas.min() >= 0.5 - 1e-12 and deltas.max() <= 1 + 1e-12  # b in [0, 1]: never below a/2 = 0.5


def _seed_heavy_study(offsets: list[float], questions: int = 400) -> tuple[list[list[int]], list[list[int]]]:
    """The reference answers nothing; the row answers the first offset·Q questions right under its seed: a large
    difference between training seeds and a small one between questions."""
    row = [[1 if q < round(offset * questions) else 0 for q in range(questions)] for offset in offsets]
    return row, [[0] * questions for _ in offsets]


def test_the_primary_interval_carries_seed_variance_that_the_question_only_interval_misses():
    offsets = [0.2, 0.0, 0.15, 0.01, 0.05]
    row, reference = _seed_heavy_study(offsets)
    result = compare(row, reference, resamples=4000)
    width = result["ci95"][1] - result["ci95"][0]
    questions_only = result["questions_only"]["ci95"][1] - result["questions_only"]["ci95"][0]
    normal_theory = 2 * 1.96 * np.std(offsets, ddof=1) / math.sqrt(len(offsets))
    assert questions_only < 0.45 * normal_theory  # conditional on the trained models: too narrow here
    assert width > 0.7 * normal_theory  # the bootstrap's (S-1)/S variance shrinks it a little, no more
    assert result["seed_t"]["ci95"][1] - result["seed_t"]["ci95"][0] > width  # t with 4 df is wider still
    assert result["delta"] == pytest.approx(np.mean(offsets)) == result["seed_t"]["delta"]
    # with no seed variance, the two bootstraps agree closely
    row, reference = _seed_heavy_study([0.1] * 5)
    steady = compare(row, reference, resamples=4000)
    assert steady["ci95"][1] - steady["ci95"][0] == pytest.approx(
        steady["questions_only"]["ci95"][1] - steady["questions_only"]["ci95"][0], rel=0.15)


T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # Student t quantiles in closed form: df 2 ...
T_975_DF1 = math.tan(math.pi * (0.975 - 0.5))  # ... and df 1 (Cauchy)


def test_seed_t_test_by_value():
    result = seed_t_test([0.1, 0.2, 0.3])
    t = 0.2 / (0.1 / math.sqrt(3))
    assert result["delta"] == pytest.approx(0.2) and result["sd"] == pytest.approx(0.1) and result["df"] == 2
    assert result["p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)  # Student t, 2 df, closed form
    assert result["ci95"] == pytest.approx([0.2 - T_975_DF2 * 0.1 / math.sqrt(3),
                                            0.2 + T_975_DF2 * 0.1 / math.sqrt(3)], abs=1e-12)
    assert seed_t_test([0.3])["ci95"] is None and seed_t_test([0.0, 0.0])["p_value"] == 1.0


def test_mean_sd_ci_by_value_including_its_degrees_of_freedom():
    three = mean_sd_ci([0.5, 0.6, 0.7])
    assert three["mean"] == pytest.approx(0.6) and three["sd"] == pytest.approx(0.1)
    half = T_975_DF2 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert three["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-12)
    two = mean_sd_ci([0.4, 0.6])
    half = T_975_DF1 * math.sqrt(0.02) / math.sqrt(2)  # t_{0.975, 1}
    assert two["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-12)
    assert mean_sd_ci([0.3])["ci95"] is None


def test_holm_and_benjamini_hochberg_by_value():
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert adjust_p_values(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02], abs=1e-15)
    assert adjust_p_values([0.6, 0.9], "holm") == [1.0, 1.0]
    assert adjust_p_values([], "holm") == []
    with pytest.raises(ValueError, match="unknown correction"):
        adjust_p_values(p, "bonferonni")
    family = {"a": {"p_value": 0.01}, "b": {"p_value": 0.04}}
    adjust_family(family)
    assert family["a"]["p_adjusted"] == pytest.approx(0.02) and family["b"]["p_adjusted"] == pytest.approx(0.04)
    assert family["a"]["correction"] == {"method": "holm", "family_size": 2}


def test_a_row_against_itself_has_no_difference_and_the_largest_p():
    row, _ = _seed_heavy_study([0.2, 0.1, 0.3], questions=50)
    same = compare(row, row, resamples=500)
    assert same["delta"] == 0 and same["ci95"] == [0, 0] and same["p_value"] == 1.0
    assert same["seed_t"]["p_value"] == 1.0
    assert paired_bootstrap(row, row, 500)["p_value"] == 1.0
