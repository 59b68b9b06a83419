"""The test-phase arithmetic: Wilson intervals and the results table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from qpo_ray.report import _table, wilson_interval


@pytest.mark.parametrize("successes,n,low,high", [
    # Reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson")).
    (8, 10, 0.4901625, 0.9433178),
    (0, 10, 0.0, 0.2775328),
    (10, 10, 0.7224672, 1.0),
    (50, 100, 0.4038315, 0.5961685),
])
def test_wilson_interval_matches_reference_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_of_nothing_is_undefined():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_table_picks_best_single_by_step0_and_reports_the_test_oracle_apart():
    # Prompt a was best in Step 0 but b is better on the test set: best_single must stay
    # a (chosen without the test set), best_single_oracle is b.
    scored = pd.DataFrame({
        "shots": [0] * 10,
        "method": ["qpo"] * 2 + ["manual"] * 2 + ["single:a"] * 3 + ["single:b"] * 3,
        "accuracy": [1, 1, 0, 1, 1, 0, 0, 1, 1, 1],
    })
    table = _table(scored, step0_best="a").set_index("method")
    assert table.loc["best_single", "prompt_id"] == "a"
    assert table.loc["best_single", "accuracy"] == pytest.approx(1 / 3)
    assert table.loc["best_single_oracle", "prompt_id"] == "b"
    assert table.loc["best_single_oracle", "accuracy"] == 1.0
    assert table.loc["qpo", "n"] == 2 and table.loc["single:b", "n"] == 3
    assert list(table.index[:4]) == ["qpo", "manual", "best_single", "best_single_oracle"]


def test_table_without_step0_data_has_only_the_oracle():
    scored = pd.DataFrame({"shots": [0, 0], "method": ["single:a", "single:b"],
                           "accuracy": [0.0, 1.0]})
    methods = set(_table(scored, step0_best=None)["method"])
    assert "best_single" not in methods and "best_single_oracle" in methods
