"""Figures of a QPO run (matplotlib, headless Agg backend): rewards per loop, test
accuracy per loop against the baselines (with the reward distribution per loop beside)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from typing import Optional, Sequence  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

BASELINES = ("manual", "best_single", "router", "nearest_neighbour", "qpo_greedy", "sft",
             "qpo_no_mla", "best_single_oracle")


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


def accuracy_per_loop(results: pd.DataFrame, shots: int = 0,
                      rewards: Optional[dict[str, Sequence[float]]] = None):
    """Test accuracy of every loop's policy (qpo_loop<t>) with 95% intervals, QPO's
    chosen policy marked, and every baseline as a labelled horizontal line (lines
    that coincide share one label, so none hides another); beside it, when given, the
    reward distribution per loop (`rewards`: label -> the rewards of that loop's pairs)."""
    rows = results[results["shots"] == shots]
    loops = rows[rows["method"].str.match(r"^qpo_loop\d+$")].copy()
    loops["loop"] = loops["method"].str.removeprefix("qpo_loop").astype(int)
    loops = loops.sort_values("loop")
    if rewards:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 4),
                                        gridspec_kw={"width_ratios": [7, 5]})
        _reward_boxes(right, rewards)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if len(loops):
        ax.errorbar(loops["loop"], loops["accuracy"],
                    yerr=[loops["accuracy"] - loops["ci_low"], loops["ci_high"] - loops["accuracy"]],
                    marker="o", capsize=3, color="C0", label="QPO policy per loop (95% CI)")
        chosen = rows[rows["method"] == "qpo"]
        match = loops[loops["accuracy"] == float(chosen["accuracy"].iloc[0])] if len(chosen) else []
        if len(match):
            ax.plot(match["loop"].iloc[-1], match["accuracy"].iloc[-1], marker="*",
                    markersize=14, color="C0", linestyle="none", label="qpo (chosen on dev)")
        ax.set_xticks(loops["loop"].tolist())
        ax.set_xlim(loops["loop"].min() - 0.5, loops["loop"].max() + 0.5)
    lines: dict[float, list[str]] = {}
    for method in BASELINES:
        hit = rows[rows["method"] == method]
        if len(hit):
            lines.setdefault(round(float(hit["accuracy"].iloc[0]), 4), []).append(method)
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]
    for i, (value, names) in enumerate(sorted(lines.items())):
        ax.axhline(value, linestyle=styles[i % len(styles)], linewidth=1.2, color=f"C{i + 1}",
                   label=f"{' = '.join(names)} ({100 * value:.1f})")
    ax.set_xlabel("loop")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{shots}-shot test accuracy per loop")
    if rewards:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    plt.close(fig)
    return fig


def _reward_boxes(ax, rewards: dict[str, Sequence[float]]) -> None:
    """One box (quartiles, whiskers at 1.5 IQR) per loop, its mean as a dot, n below."""
    labels = list(rewards)
    data = [list(rewards[k]) for k in labels]
    ax.boxplot(data, showmeans=True, meanprops={"marker": "o", "markerfacecolor": "C0"})
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels([f"{k}\n(n={len(v)})" for k, v in zip(labels, data)], fontsize=8)
    ax.set_ylabel("reward (0-100, Step-0 scale)")
    ax.set_ylim(-5, 105)
    ax.set_title("reward of the pairs each loop scored")
