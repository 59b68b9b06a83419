"""Statistics of the test report: a proportion's interval, and the paired comparison of
two methods on the same queries.

Two prompting methods tested on the same queries are compared query by query: their
accuracies are far more correlated than two independent samples, so the difference
gets a paired interval (bootstrap over queries) and a paired test (McNemar's exact
test on the discordant queries), never two overlapping Wilson intervals.
Several seeds: the difference is the mean of the per-seed differences, the bootstrap
resamples queries within each seed (stratified), and McNemar pools the discordant
counts (queries of different seeds counted as separate observations). That interval
carries the query-to-query noise only; `across_seeds` gives the one that carries the
seed-to-seed spread too (a t-interval over the per-seed differences), which is the one
that says whether a method wins *reliably* when only a few seeds ran.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959964
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy needed);
# more seeds than that use 2.0 (the quantile at 60 df; 1.96 at infinity).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike +-1.96 se)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under H0 each discordant query is equally likely
    to favour either method, so min(only_a, only_b) is Binomial(only_a + only_b, 1/2)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    # Integer over integer: exact, where a float of either side overflows past n ~ 1,020
    # discordant queries (five seeds of 1,000 test queries reach that).
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class PairedDifference:
    """accuracy(a) - accuracy(b) on the same queries."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float  # McNemar exact, two-sided
    only_a: int     # queries a answered right and b wrong
    only_b: int
    n: int          # paired queries (summed over seeds)
    seeds: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def in_points(self) -> str:
        """"+1.2 [ -0.4,  +2.8] p=0.15": the difference and its CI in accuracy points."""
        return (f"{100 * self.diff:+5.1f} [{100 * self.ci_low:+5.1f}, "
                f"{100 * self.ci_high:+5.1f}] p={self.p_value:.2g}")


def paired_difference(groups: Sequence[tuple[Sequence[float], Sequence[float]]],
                      n_boot: int = 10_000, seed: int = 0) -> PairedDifference:
    """Compare a with b over one (a_correct, b_correct) pair of aligned arrays per seed."""
    if not groups:
        raise ValueError("paired_difference: no groups")
    diffs, only_a, only_b = [], 0, 0
    for a, b in groups:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape or a.ndim != 1 or a.size == 0:
            raise ValueError(f"paired_difference: need two equal, non-empty 1-d arrays, got "
                             f"shapes {a.shape} and {b.shape}")
        diffs.append(a - b)
        only_a += int(((a == 1) & (b == 0)).sum())
        only_b += int(((a == 0) & (b == 1)).sum())
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for d in diffs:
        picks = rng.integers(0, d.size, size=(n_boot, d.size))
        boot += d[picks].mean(axis=1)
    boot /= len(diffs)
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(
        diff=float(np.mean([d.mean() for d in diffs])), ci_low=float(low), ci_high=float(high),
        p_value=mcnemar_exact(only_a, only_b), only_a=only_a, only_b=only_b,
        n=int(sum(d.size for d in diffs)), seeds=len(diffs))


@dataclass(frozen=True)
class SeedDifference:
    """The mean of per-seed differences, with a t-interval over seeds."""

    diff: float
    ci_low: float   # nan with one seed: a single seed says nothing of the spread
    ci_high: float
    std_error: float
    seeds: int

    def in_points(self) -> str:
        if self.seeds == 1:
            return f"{100 * self.diff:+5.1f} (one seed: no interval)"
        return (f"{100 * self.diff:+5.1f} [{100 * self.ci_low:+5.1f}, "
                f"{100 * self.ci_high:+5.1f}] over {self.seeds} seeds")


def across_seeds(per_seed: Sequence[float]) -> SeedDifference:
    """t-interval of the mean of per-seed differences (each seed's accuracy difference,
    as a fraction), treating seeds as the unit of replication."""
    d = np.asarray(per_seed, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"across_seeds: need a non-empty list of differences, got {per_seed!r}")
    mean = float(d.mean())
    if d.size == 1:
        return SeedDifference(mean, float("nan"), float("nan"), float("nan"), 1)
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    t = T95[d.size - 2] if d.size - 1 <= len(T95) else 2.0
    return SeedDifference(mean, mean - t * se, mean + t * se, se, int(d.size))


def newcombe_difference(successes_a: float, n_a: int, successes_b: float, n_b: int,
                        z: float = Z95) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) of two *independent* samples (an A/B test's two arms)
    with Newcombe's hybrid score interval, built from the two Wilson intervals."""
    if n_a == 0 or n_b == 0:
        return (float("nan"), float("nan"), float("nan"))
    p_a, p_b = successes_a / n_a, successes_b / n_b
    (low_a, high_a), (low_b, high_b) = wilson_interval(successes_a, n_a, z), \
        wilson_interval(successes_b, n_b, z)
    diff = p_a - p_b
    return (diff, diff - math.hypot(p_a - low_a, high_b - p_b),
            diff + math.hypot(high_a - p_a, p_b - low_b))
