"""Paired comparison of two models on the same questions: a bootstrap over questions, pooled over seeds.

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
