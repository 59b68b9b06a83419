"""The report's figures (qpo_ray.testphase.plots)."""

from __future__ import annotations
import pandas as pd


def test_accuracy_plot_has_the_reward_distribution_per_loop_beside_it():
    from qpo_ray.testphase.plots import accuracy_per_loop

    results = pd.DataFrame({
        "shots": [0] * 4, "method": ["qpo_loop1", "qpo_loop2", "qpo", "manual"],
        "accuracy": [0.6, 0.7, 0.7, 0.65], "ci_low": [0.5, 0.6, 0.6, 0.55],
        "ci_high": [0.7, 0.8, 0.8, 0.75]})
    rewards = {"0 (step 0)": [10.0, 50.0, 90.0], "1 (policy 1)": [40.0, 60.0, 80.0, 95.0]}
    fig = accuracy_per_loop(results, 0, rewards)
    left, right = fig.axes
    assert left.get_xticks().tolist() == [1, 2]
    assert [t.get_text() for t in right.get_xticklabels()] == ["0 (step 0)\n(n=3)",
                                                               "1 (policy 1)\n(n=4)"]
    assert len(accuracy_per_loop(results, 0).axes) == 1
