"""The test-phase arithmetic: Wilson intervals, the results table with its paired
differences, the upper bound kept apart, well-formed prompts."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from qpo_ray.testphase.render import results_table, well_formed
from qpo_ray.testphase.stats import wilson_interval


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


def _predictions(rows: dict[str, list[int]], prompts: dict[str, str] | None = None):
    frames = []
    for method, correct in rows.items():
        frames.append(pd.DataFrame({
            "shots": 0, "method": method, "query_id": [f"q{i}" for i in range(len(correct))],
            "accuracy": [float(c) for c in correct], "prompt_id": f"id-{method}",
            "prompt": (prompts or {}).get(method, f"prompt of {method}")}))
    return pd.concat(frames, ignore_index=True)


def test_results_table_pairs_every_method_with_manual_and_best_single():
    pred = _predictions({
        "qpo":         [1, 1, 1, 1, 0, 1],
        "manual":      [1, 0, 0, 1, 0, 1],
        "best_single": [1, 1, 0, 1, 0, 0],
        "single:a":    [0, 0, 0, 0, 0, 0],
        "single:b":    [1, 1, 1, 1, 1, 0],
    }, prompts={"qpo": "Say positive or negative, please."})
    table = results_table(pred, ("negative", "positive")).set_index("method")
    assert table.loc["qpo", "accuracy"] == pytest.approx(5 / 6)
    assert table.loc["qpo", "diff_vs_manual"] == pytest.approx(2 / 6)
    # qpo right where manual is wrong on 2 queries, never the other way round
    assert table.loc["qpo", "p_value_vs_manual"] == pytest.approx(0.5)
    assert table.loc["qpo", "diff_vs_best_single"] == pytest.approx(2 / 6)
    assert pd.isna(table.loc["manual", "diff_vs_manual"])
    assert table.loc["qpo", "well_formed"] == 1.0 and pd.isna(table.loc["manual", "well_formed"])
    # the best prompt on the test set is an upper bound derived from the single rows
    assert table.loc["best_single_oracle", "prompt_id"] == "id-single:b"
    assert table.loc["best_single_oracle", "accuracy"] == pytest.approx(5 / 6)
    order = list(table.index)
    assert order.index("qpo") < order.index("manual") < order.index("best_single") \
        < order.index("best_single_oracle")


def test_well_formed_prompts_are_readable_and_name_every_label():
    labels = ("negative", "positive")
    assert well_formed("Is this review positive or negative?", labels)
    assert not well_formed("Label: positive.", labels)
    assert not well_formed("As an expert inelli-  we '时, androg positive negative 时时时", labels)
    assert not well_formed("positive negative", labels)
