"""A dataset at a glance: what `qpo dataset stats` prints and the loop logs."""

from __future__ import annotations

from typing import Any

import pandas as pd

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def dataset_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Rows, distinct queries and prompts, reward min/max/mean/quantiles (when the
    frame has rewards), rows per loop and per prompt source."""
    stats: dict[str, Any] = {
        "rows": int(len(df)),
        "queries": int(df["query_id"].nunique()) if "query_id" in df else None,
        "prompts": int(df["prompt_id"].nunique()) if "prompt_id" in df else None,
    }
    if "reward" in df and len(df):
        reward = df["reward"].astype(float)
        stats["reward"] = {
            "min": float(reward.min()), "max": float(reward.max()),
            "mean": float(reward.mean()),
            "quantiles": {str(q): float(reward.quantile(q)) for q in QUANTILES},
        }
    if "correct" in df and df["correct"].notna().any():
        stats["accuracy"] = float(df["correct"].dropna().astype(float).mean())
    if "loop" in df:
        stats["rows_per_loop"] = {int(k): int(v) for k, v in
                                  df["loop"].value_counts().sort_index().items()}
    if "source" in df:
        stats["rows_per_source"] = {str(k): int(v) for k, v in
                                    df["source"].value_counts().items()}
    return stats
