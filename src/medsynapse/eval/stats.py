"""Paired comparison of two models on the same questions: a bootstrap over questions, pooled over seeds.

Each question q has, per training seed s, a correctness a[s, q] for the row and b[s, q] for the reference (the same
question set for both, every seed). The statistic is the difference in mean accuracy over seeds and questions,
delta = mean_q d_q with d_q = mean_s (a[s, q] − b[s, q]). A bootstrap sample draws n questions with replacement
(the seeds of a drawn question come with it: the pairing is kept) and recomputes delta. Reported: delta, the 95 %
percentile interval of the bootstrap deltas, and a two-sided p-value for "no difference":
p = min(1, 2 · min(P*(delta* <= 0), P*(delta* >= 0))), the bootstrap's percentile test (Efron & Tibshirani 1993,
ch. 15; the interval excludes 0 at level alpha iff p < alpha, up to ties at 0).
The resamples are drawn from numpy's Generator with a fixed seed, so a study's table is reproducible.
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
    """Interval and two-sided p-value from the bootstrap distribution `deltas` of the statistic `delta`."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    p = min(1.0, 2 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return {"delta": float(delta), "ci95": [float(low), float(high)], "p_value": p, "resamples": int(len(deltas))}


def paired_bootstrap(row: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], resamples: int = 10_000,
                     seed: int = 0, chunk: int = 1000) -> dict:
    """The paired bootstrap of the module docstring; returns {delta, ci95, p_value, resamples, n_questions, n_seeds}."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    differences = per_question_differences(row, reference)
    n = len(differences)
    generator = np.random.default_rng(seed)
    deltas = np.concatenate([bootstrap_deltas(differences, generator.integers(0, n, size=(min(chunk, left), n)))
                             for left in range(resamples, 0, -chunk)])
    result = percentile_test(differences.mean(), deltas)
    return {**result, "n_questions": n, "n_seeds": len(row)}
