"""Figures of a QPO run (matplotlib, headless Agg backend): rewards per loop, test
accuracy per loop against the baselines."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

BASELINES = ("manual", "best_single", "best_single_oracle", "nearest_neighbour", "sft",
             "qpo_no_mla")


def reward_histogram(frame: pd.DataFrame, loop: int):
    """Distribution of the training set's rewards, Step-0 rows vs augmented rows."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i * 5 for i in range(21)]
    for is_aug, part in frame.groupby(frame["loop"] > 0):
        ax.hist(part["reward"].clip(0, 100), bins=bins, alpha=0.6,
                label="augmented" if is_aug else "step 0")
    ax.set_xlabel("reward (0-100, Step-0 scale)")
    ax.set_ylabel("pairs")
    ax.set_title(f"training set of loop {loop} ({len(frame)} pairs)")
    ax.legend()
    plt.close(fig)
    return fig


def accuracy_per_loop(results: pd.DataFrame, shots: int = 0):
    """Test accuracy of each loop's policy (qpo_loop<t>, qpo = last loop) with 95%
    intervals, and the query-agnostic baselines as horizontal lines."""
    rows = results[results["shots"] == shots]
    loops = rows[rows["method"].str.match(r"^qpo_loop\d+$")].copy()
    loops["loop"] = loops["method"].str.removeprefix("qpo_loop").astype(int)
    loops = loops.sort_values("loop")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(loops):
        ax.errorbar(loops["loop"], loops["accuracy"],
                    yerr=[loops["accuracy"] - loops["ci_low"], loops["ci_high"] - loops["accuracy"]],
                    marker="o", capsize=3, label="QPO policy")
    for i, method in enumerate(BASELINES):
        hit = rows[rows["method"] == method]
        if len(hit):
            ax.axhline(float(hit["accuracy"].iloc[0]), linestyle="--", linewidth=1,
                       label=method, color=f"C{i + 1}")
    ax.set_xlabel("loop")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{shots}-shot test accuracy per loop")
    ax.legend(fontsize=8)
    plt.close(fig)
    return fig
