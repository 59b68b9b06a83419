"""The report's statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpo_ray.testphase.stats import across_seeds, mcnemar_exact, paired_difference


def test_mcnemar_exact_on_a_hand_computed_table():
    # 2x2 table of (a right?, b right?): 50 both, 8 only a, 2 only b, 40 neither.
    # H0: discordant queries split 1/2 : 1/2 -> p = 2 * P(Bin(10, .5) <= 2) = 112 / 1024.
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_mcnemar_exact_past_the_float_range():
    # Pooled over seeds the discordant count passes 1,024, where 2**n is no float. The
    # normal approximation (continuity-corrected) is within a few percent there.
    p = mcnemar_exact(700, 600)
    z = (abs(700 - 600) - 1) / math.sqrt(1300)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.05)
    assert 0.005 < p < 0.01
    assert mcnemar_exact(650, 650) == 1.0
    assert 0.0 <= mcnemar_exact(3000, 0) < 1e-300


def test_paired_difference_on_the_same_table():
    a = np.array([1] * 50 + [1] * 8 + [0] * 2 + [0] * 40)
    b = np.array([1] * 50 + [0] * 8 + [1] * 2 + [0] * 40)
    d = paired_difference([(a, b)], n_boot=4000, seed=1)
    assert d.diff == pytest.approx(0.06)
    assert (d.only_a, d.only_b, d.n, d.seeds) == (8, 2, 100, 1)
    assert d.p_value == pytest.approx(112 / 1024)
    # the bootstrap interval of a mean of 100 differences (sd ~ 0.31): ~ +-0.06
    assert d.ci_low < 0.06 < d.ci_high and 0.08 < d.ci_high - d.ci_low < 0.16
    # a paired CI is narrower than what two independent proportions would give
    independent = 1.96 * math.sqrt(0.58 * 0.42 / 100 + 0.52 * 0.48 / 100)
    assert (d.ci_high - d.ci_low) / 2 < independent


def test_paired_difference_over_seeds_is_the_mean_of_the_seeds():
    a1, b1 = np.ones(20), np.zeros(20)          # +1.0
    a2, b2 = np.zeros(10), np.zeros(10)         # +0.0
    d = paired_difference([(a1, b1), (a2, b2)], n_boot=500)
    assert d.diff == pytest.approx(0.5) and d.seeds == 2 and d.n == 30
    assert d.ci_low == pytest.approx(0.5) and d.ci_high == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal"):
        paired_difference([(np.ones(3), np.ones(4))])


def test_across_seeds_is_a_t_interval_over_the_seeds():
    # The benchmark's three seeds of qpo - manual: +8.3, +0.6, +0.2 points. By hand:
    # mean 3.033, sd sqrt(((5.267)^2 + (2.433)^2 + (2.833)^2) / 2) = 4.566,
    # se 4.566 / sqrt(3) = 2.636, t(2 df) = 4.303 -> [-8.31, +14.38].
    d = across_seeds([0.083, 0.006, 0.002])
    assert d.diff == pytest.approx(0.030333, abs=1e-5)
    assert d.std_error == pytest.approx(0.02636, abs=1e-4)
    assert d.ci_low == pytest.approx(-0.0831, abs=5e-4)
    assert d.ci_high == pytest.approx(0.1438, abs=5e-4)
    assert d.seeds == 3 and "over 3 seeds" in d.in_points()
    # one seed: the mean, no interval
    one = across_seeds([0.05])
    assert one.diff == 0.05 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert "no interval" in one.in_points()
    # 20 seeds: t(19 df) = 2.093; beyond the table (> 31 seeds) 2.0
    twenty = across_seeds([0.01, 0.03] * 10)
    assert twenty.ci_high - twenty.diff == pytest.approx(2.093 * twenty.std_error)
    many = across_seeds([0.01, 0.03] * 20)
    assert many.ci_high - many.diff == pytest.approx(2.0 * many.std_error)
    with pytest.raises(ValueError, match="non-empty"):
        across_seeds([])


def test_newcombe_difference_matches_the_published_example():
    # Newcombe (1998), Stat. Med. 17:873, table II example (e): 56/70 vs 48/80,
    # method 10 (hybrid score): 0.2000 [0.0524, 0.3339].
    from qpo_ray.testphase.stats import newcombe_difference

    diff, low, high = newcombe_difference(56, 70, 48, 80)
    assert (round(diff, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    assert all(math.isnan(x) for x in newcombe_difference(1, 0, 1, 2))
