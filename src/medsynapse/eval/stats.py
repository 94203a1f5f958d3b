"""Paired comparison of two models on the same questions. `compare` is what every table reports: the hierarchical
bootstrap over training seeds and questions (primary), the seed-level paired t, and the question-only bootstrap
below, which is conditional on the trained models (section "seed-aware comparisons"); `adjust_family` adds Holm's
(or Benjamini-Hochberg's) adjusted p-values over a table's comparisons.

The question-only bootstrap:

Each question q has, per training seed s, a correctness a[s, q] for the row and b[s, q] for the reference (the same
question set for both, every seed), d_q = mean_s (a[s, q] − b[s, q]). With one group (one benchmark) the statistic
is delta = mean_q d_q, the difference of the two rows' accuracies averaged over seeds; with `groups` (the benchmark
of each question) it is the mean over groups of each group's mean d_q, the difference of the rows' benchmark-averaged
accuracies (a study's "accuracy" column). A bootstrap sample redraws each group's questions with replacement (a
drawn question brings its seeds along: the pairing is kept; the trained models themselves are fixed, so the
interval is over questions, given these seeds) and recomputes delta. Reported: delta, the 95 % percentile interval
of the bootstrap deltas, and a two-sided p-value for "no difference",
p = min(1, 2 · min(k_le + 1, k_ge + 1) / (B + 1)), k_le and k_ge the resamples with delta* <= 0 and >= 0 out of B:
the percentile test (Efron & Tibshirani 1993, ch. 15) with the +1 that keeps a Monte Carlo p above 0 (Davison &
Hinkley 1997, 4.2). The resamples come from numpy's Generator with a fixed seed: a study's table is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def per_question_differences(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> np.ndarray:
    """d_q = mean over seeds of row − reference; both are (seeds, questions) in the same question order."""
    a, b = np.asarray(row, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"row and reference must both be (seeds, questions); got {a.shape} and {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("no questions to compare")
    return (a - b).mean(axis=0)


def bootstrap_deltas(differences: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The statistic on each resample: `indices` is (resamples, n) question indices."""
    return differences[indices].mean(axis=1)


def percentile_test(delta: float, deltas: np.ndarray, confidence: float = 0.95) -> dict:
    """Interval and two-sided p-value (module docstring) from the bootstrap deltas of the statistic `delta`."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    below, above = int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0))
    p = min(1.0, 2 * (min(below, above) + 1) / (len(deltas) + 1))
    return {"delta": float(delta), "ci95": [float(low), float(high)], "p_value": p, "resamples": int(len(deltas))}


def paired_bootstrap(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], resamples: int = 10_000,
                     seed: int = 0, chunk: int = 1000, groups: Sequence[str] | None = None) -> dict:
    """The paired bootstrap of the module docstring; `groups` (one label per question): resampled within each
    group, the statistic the mean of the group means. Returns {delta, ci95, p_value, resamples, n_questions,
    n_seeds, groups}."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    differences = per_question_differences(row, reference)
    labels = np.asarray(groups if groups is not None else [""] * len(differences))
    if len(labels) != len(differences):
        raise ValueError(f"{len(labels)} group labels for {len(differences)} questions")
    members = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
    generator = np.random.default_rng(seed)
    parts = []
    for left in range(resamples, 0, -chunk):
        size = min(chunk, left)
        draws = [generator.integers(0, len(index), size=(size, len(index))) for index in members]
        parts.append(np.mean([bootstrap_deltas(differences[index], draw) for index, draw in zip(members, draws)],
                             axis=0))
    deltas = np.concatenate(parts)
    result = percentile_test(float(np.mean([differences[index].mean() for index in members])), deltas)
    return {**result, "n_questions": len(differences), "n_seeds": len(row), "groups": len(members)}


# --- seed-aware comparisons ----------------------------------------------------------------------------------------
#
# The bootstrap above is conditional on the trained models: it answers "would these models differ on other
# questions", not "would the method differ if trained again". A comparison of methods needs both sources of variance
# (training seeds and questions), so every table reports, per paired comparison:
# - the hierarchical bootstrap (the primary interval and p): each resample draws the training seeds with replacement
#   and, independently, each benchmark's questions with replacement, and recomputes the statistic on the drawn seeds
#   and questions (seeds and questions are crossed, not nested: every seed answers the same questions, so a drawn
#   question brings its answers under every drawn seed along, keeping the pairing). Drawn counts come from multinomial
#   draws, so the statistic of a resample is sum_s w_s · sum_q v_q · d[s, q] with w, v the normalised counts.
# - the seed-level paired t: per seed s the statistic delta_s (benchmark-averaged accuracy difference of the two rows
#   trained with seed s), its mean, a Student-t interval with S − 1 degrees of freedom and the t-test's p-value. With
#   few seeds the bootstrap's seed draw is coarse (3 seeds: 10 distinct multisets) and too narrow by about
#   sqrt((S − 1) / S); the t-interval is wide (t_{0.975, 2} = 4.30): read the two together.
# - p-values adjusted for the number of comparisons in the family (a table) by Holm's step-down method (strong control
#   of the family-wise error rate; Holm 1979), or Benjamini-Hochberg (false discovery rate) when asked.


def seed_deltas(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]],
                groups: Sequence[str] | None = None) -> np.ndarray:
    """delta_s per training seed: the difference of the two rows' benchmark-averaged accuracies for seed s."""
    a, b = np.asarray(row, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"row and reference must both be (seeds, questions); got {a.shape} and {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("no questions to compare")
    members = _members(groups, a.shape[1])
    difference = a - b
    return np.mean([difference[:, index].mean(axis=1) for index in members], axis=0)


def _members(groups: Sequence[str] | None, n: int) -> list[np.ndarray]:
    labels = np.asarray(groups if groups is not None else [""] * n)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} group labels for {n} questions")
    return [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]


def hierarchical_deltas(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]],
                        resamples: int = 10_000, seed: int = 0, chunk: int = 500,
                        groups: Sequence[str] | None = None) -> np.ndarray:
    """The statistic on each of `resamples` seed-and-question resamples (the comment above)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    seed_deltas(row, reference, groups)  # checks the shapes and labels
    difference = np.asarray(row, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    members = _members(groups, difference.shape[1])
    n_seeds = difference.shape[0]
    generator = np.random.default_rng(seed)
    parts = []
    for left in range(resamples, 0, -chunk):
        size = min(chunk, left)
        seed_weights = generator.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size) / n_seeds
        per_group = []
        for index in members:
            question_weights = generator.multinomial(len(index), np.full(len(index), 1 / len(index)),
                                                     size=size) / len(index)
            per_seed = question_weights @ difference[:, index].T  # (size, seeds): each seed on the drawn questions
            per_group.append(np.sum(per_seed * seed_weights, axis=1))
        parts.append(np.mean(per_group, axis=0))
    return np.concatenate(parts)


def hierarchical_bootstrap(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]],
                           resamples: int = 10_000, seed: int = 0, groups: Sequence[str] | None = None) -> dict:
    """The seed-and-question bootstrap of the comment above. Returns {delta, ci95, p_value, resamples, n_questions,
    n_seeds, groups}; delta is the same statistic as `paired_bootstrap`'s (mean over seeds and benchmarks)."""
    delta = seed_deltas(row, reference, groups)
    deltas = hierarchical_deltas(row, reference, resamples, seed, groups=groups)
    shape = np.shape(row)
    return {**percentile_test(float(delta.mean()), deltas), "n_questions": int(shape[1]), "n_seeds": int(shape[0]),
            "groups": len(_members(groups, shape[1]))}


def seed_t_test(deltas: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict:
    """Mean of the per-seed deltas, sample sd, Student-t interval (S − 1 degrees of freedom) and the two-sided
    one-sample t-test's p-value; interval and p None for one seed (p 1.0 when every delta is 0, NaN-free)."""
    from scipy import stats

    values = np.asarray(deltas, dtype=np.float64)
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return {"delta": mean, "sd": None, "ci95": None, "p_value": None, "df": 0, "per_seed": values.tolist()}
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / n ** 0.5
    p = (1.0 if mean == 0 else 0.0) if sd == 0 else float(2 * stats.t.sf(abs(mean) / (sd / n ** 0.5), n - 1))
    return {"delta": mean, "sd": sd, "ci95": [mean - half, mean + half], "p_value": p, "df": n - 1,
            "per_seed": values.tolist()}


def adjust_p_values(p_values: Sequence[float], method: str = "holm") -> list[float]:
    """Multiplicity-adjusted p-values of one family: Holm's step-down (family-wise error) or Benjamini-Hochberg's
    step-up (false discovery rate); each adjusted p is >= its raw p and capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    if method == "holm":
        adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    elif method in ("bh", "benjamini-hochberg"):
        adjusted = np.minimum.accumulate(m / np.arange(m, 0, -1) * p[order][::-1])[::-1]
    else:
        raise ValueError(f"unknown correction {method!r}; expected 'holm' or 'bh'")
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


def compare(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], resamples: int = 10_000,
            seed: int = 0, groups: Sequence[str] | None = None) -> dict:
    """One paired comparison as every table reports it: the hierarchical bootstrap (primary), the seed-level t and,
    labelled as conditional on the trained models, the question-only bootstrap. The family's adjusted p is added by
    `adjust_family`."""
    hierarchical = hierarchical_bootstrap(row, reference, resamples, seed, groups=groups)
    return {**hierarchical, "seed_t": seed_t_test(seed_deltas(row, reference, groups)),
            "questions_only": paired_bootstrap(row, reference, resamples, seed, groups=groups)}


def adjust_family(comparisons: dict[str, dict], method: str = "holm") -> None:
    """Adds `p_adjusted` (of the hierarchical bootstrap's p) and `correction` to each comparison of one family."""
    names = list(comparisons)
    adjusted = adjust_p_values([comparisons[n]["p_value"] for n in names], method)
    for name, value in zip(names, adjusted):
        comparisons[name]["p_adjusted"] = value
        comparisons[name]["correction"] = {"method": method, "family_size": len(names)}
