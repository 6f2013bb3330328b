"""The statistics of comparisons: two runs on the same prompts (McNemar's exact test, a paired bootstrap), and
several judges on the same rollouts (Fleiss' kappa, Cohen's kappa, raw agreement). Pure functions of counts and
lists, checked against hand computations in the tests.

- **McNemar's exact test** (as `statsmodels.stats.contingency_tables.mcnemar(table, exact=True)`): of the pairs
  where the runs disagree, `b` went one way and `c` the other; under no difference each is a fair coin, so
  `p = min(1, 2 * P(X <= min(b, c)))` with `X ~ Binomial(b + c, 1/2)` (1 when they never disagree).
- **Paired bootstrap** (Koehn 2004; Efron and Tibshirani): the prompts are resampled with replacement, the same
  draw for both runs, `resamples` times from a seeded generator; the difference of means is reported with the
  2.5th and 97.5th percentiles of the resampled differences, and a two-sided p-value from the resampled
  differences shifted to a mean of zero (the null of no difference): the share at least as far from zero as the
  observed difference.
- **Fleiss' kappa** (Fleiss 1971; `statsmodels.stats.inter_rater.fleiss_kappa`): with N items, n raters each and
  `n_ij` raters putting item i in category j, `P_i = (sum_j n_ij^2 - n) / (n (n - 1))`, `P = mean P_i`,
  `p_j = sum_i n_ij / (N n)`, `P_e = sum_j p_j^2`, `kappa = (P - P_e) / (1 - P_e)`; undefined (NaN) when
  `P_e = 1` (every rater always said the same).
- **Cohen's kappa** for a pair: `(p_o - p_e) / (1 - p_e)`, `p_o` the share of agreement, `p_e = sum_c pA(c) pB(c)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for `b` and `c` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class BootstrapResult:
    """A paired bootstrap of the difference of means `a - b`: the observed difference, its 95% percentile interval,
    the two-sided p-value under no difference, and how it was drawn."""

    difference: float
    low: float
    high: float
    p_value: float
    resamples: int
    seed: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0) -> BootstrapResult:
    """The paired bootstrap of `mean(a) - mean(b)` over items paired by position (see the module docstring)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError("a paired bootstrap needs two equally long, non-empty lists")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    observed = float(differences.mean())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
    resampled = differences[draws].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    shifted = resampled - resampled.mean()
    p_value = float(np.mean(np.abs(shifted) >= abs(observed) - 1e-12))
    return BootstrapResult(observed, float(low), float(high), p_value, resamples, seed)


def fleiss_kappa(ratings: Sequence[Sequence[object]]) -> float:
    """Fleiss' kappa of items each rated by the same number of raters (`ratings[i]` the raters' categories for
    item i); NaN when undefined (fewer than two raters or items, or one category throughout)."""
    if not ratings or len(ratings[0]) < 2 or any(len(row) != len(ratings[0]) for row in ratings):
        return math.nan
    categories = sorted({value for row in ratings for value in row}, key=repr)
    n, items = len(ratings[0]), len(ratings)
    counts = [[row.count(category) for category in categories] for row in ratings]
    agreement = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts) / items
    shares = [sum(row[j] for row in counts) / (items * n) for j in range(len(categories))]
    expected = sum(p * p for p in shares)
    if math.isclose(expected, 1.0):
        return math.nan
    return (agreement - expected) / (1 - expected)


def cohen_kappa(a: Sequence[object], b: Sequence[object]) -> float:
    """Cohen's kappa of two raters over the same items; NaN when undefined (no items, or both always said the same
    one thing)."""
    if len(a) != len(b) or not a:
        return math.nan
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in set(a) | set(b))
    if math.isclose(expected, 1.0):
        return math.nan
    return (observed - expected) / (1 - expected)


def agreement(a: Sequence[object], b: Sequence[object]) -> float:
    """The share of items two raters put in the same category."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a) if a else math.nan
