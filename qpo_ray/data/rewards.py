"""The QPO rewards (paper section 2.2, eq. 2-4) and the expert filter.

- eq. 2, task level: R_task(p) = the prompt's mean correctness over the queries it was
  evaluated on in this frame (few-shot: over every demonstration set of every query).
  Augmentation rounds pass `r_task` instead: the mean accuracy of all prompts the policy
  generated in that round (`round_accuracy` of the round's scored frame), one value for
  every row.
- eq. 3, query level, zero-shot: R_query = correct - PPL(answer) / 10 (``penalty="ppl"``,
  the paper) or correct - mean NLL(answer) / 10 (``penalty="nll"``, the reference code;
  NLL = log PPL, so it punishes unsure answers less steeply). The answer is the
  target's prediction (``answer="predicted"``) or, for label-scored tasks, the gold
  label (``answer="gold"``, as the reference code does), whose likelihood is first
  normalised over the label words: p(gold) / sum of p(label), from `label_logprobs`.
  With a small target the predicted label's NLL ranks the target's confidence, right or
  wrong, and favours prompts that push one label; the gold label's normalised NLL ranks
  how far the prompt moves the target towards the right answer. Few-shot: R_query =
  the mean correctness over the K demonstration sets (``demo_correct``).
- eq. 4: R = R_query + R_task, min-max scaled to 0-100. The scale (min, max of R) is
  fitted once, on the Step 0 data, stored with the dataset and reused by every later
  loop, so that "reward 100" means the same thing in every loop. A later row outside the
  stored range is clipped to [0, 100]: the policy is conditioned on rewards in 0-100 and
  asked for 100 when generating, so "better than the best Step 0 pair" is read as 100
  (r_raw keeps the unclipped value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import numpy as np
import pandas as pd

from qpo_ray.data.schema import REWARD_COLUMNS


@dataclass(frozen=True)
class RewardScale:
    """The min and max of R = R_query + R_task that map to rewards 0 and 100."""

    min: float
    max: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min) and np.isfinite(self.max)) or self.max < self.min:
            raise ValueError(f"RewardScale: need finite min <= max, got {self.min}, {self.max}")

    def to_dict(self) -> dict[str, float]:
        return {"min": float(self.min), "max": float(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RewardScale":
        try:
            return cls(min=float(data["min"]), max=float(data["max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"RewardScale: expected {{'min': x, 'max': y}}, got {data!r}") \
                from exc

    @classmethod
    def fit(cls, r_raw: pd.Series) -> "RewardScale":
        values = r_raw.to_numpy(dtype=float)
        if len(values) == 0 or not np.isfinite(values).all():
            raise ValueError("RewardScale.fit: rewards must be non-empty and finite")
        return cls(min=float(values.min()), max=float(values.max()))

    def apply(self, r_raw: pd.Series) -> pd.Series:
        """R -> 0-100, clipped; a degenerate scale (min == max) maps everything to 100."""
        span = self.max - self.min
        if span == 0:
            return pd.Series(100.0, index=r_raw.index)
        return ((r_raw.astype(float) - self.min) / span * 100.0).clip(0.0, 100.0)


def _require(df: pd.DataFrame, columns: list[str], why: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"compute_rewards: {why} needs column(s) {missing}")


def answer_counts(scored_df: pd.DataFrame, few_shot: bool) -> tuple[pd.Series, pd.Series]:
    """Per row: correct answers and answers given (zero-shot 1; few-shot one per demo set)."""
    if not few_shot:
        _require(scored_df, ["correct"], "zero-shot")
        return scored_df["correct"].astype(float), pd.Series(1.0, index=scored_df.index)
    _require(scored_df, ["demo_correct"], "few-shot")

    def count(sets: Any) -> tuple[float, int]:
        if sets is None or len(sets) == 0:
            raise ValueError("compute_rewards: few-shot rows need a non-empty demo_correct")
        return float(np.sum(np.asarray(sets, dtype=float))), len(sets)
    pairs = scored_df["demo_correct"].map(count)
    return pairs.map(lambda p: p[0]), pairs.map(lambda p: p[1]).astype(float)


def pair_accuracy(scored: pd.DataFrame) -> pd.Series:
    """Per-pair accuracy: the mean over demonstration sets in few-shot, else `correct`."""
    def one(row) -> float:
        demo = row.get("demo_correct")
        if demo is not None and len(demo) > 0:
            return float(sum(bool(x) for x in demo)) / len(demo)
        return float(bool(row["correct"]))
    return scored.apply(one, axis=1).astype(float)


def round_accuracy(scored_df: pd.DataFrame, few_shot: bool) -> float:
    """The mean accuracy over every answer in a scored frame: R_task of an augmentation
    round (the policy's overall ability in that loop), to pass as `r_task`."""
    hits, answers = answer_counts(scored_df, few_shot)
    return float(hits.sum() / answers.sum())


def gold_label_nll(df: pd.DataFrame) -> pd.Series:
    """-log of the gold label's likelihood normalised over the label words, per row."""
    _require(df, ["label_logprobs", "label"], "answer='gold'")

    def one(row) -> float:
        logprobs = np.asarray(row["label_logprobs"], dtype=float)
        if logprobs.size == 0:
            raise ValueError(f"compute_rewards: answer='gold' needs label log-probs (label-"
                             f"scored tasks); pair {row.get('pair_id', '?')} has none")
        gold = int(row["label"])
        top = logprobs.max()
        return float(top + np.log(np.exp(logprobs - top).sum()) - logprobs[gold])
    return df.apply(one, axis=1).astype(float)


def answer_penalty(df: pd.DataFrame, penalty: str, answer: str) -> pd.Series:
    """The zero-shot penalty term (before the /10): PPL or NLL of the predicted answer,
    or of the gold label normalised over the label words."""
    if penalty not in ("ppl", "nll"):
        raise ValueError(f"compute_rewards: penalty must be 'ppl' or 'nll', got {penalty!r}")
    if answer == "gold":
        nll = gold_label_nll(df)
        return np.exp(nll) if penalty == "ppl" else nll
    if answer != "predicted":
        raise ValueError(f"compute_rewards: answer must be 'predicted' or 'gold', got {answer!r}")
    column = "answer_ppl" if penalty == "ppl" else "answer_nll"
    _require(df, [column], f"zero-shot penalty {penalty!r}")
    if df[column].isna().any():
        raise ValueError(f"compute_rewards: {column} has missing values")
    return df[column].astype(float)


def compute_rewards(scored_df: pd.DataFrame, penalty: Literal["ppl", "nll"] = "ppl",
                    few_shot: bool = False, scale: Optional[RewardScale] = None,
                    r_task: Optional[float | Mapping[str, float]] = None,
                    answer: Literal["predicted", "gold"] = "predicted",
                    ) -> tuple[pd.DataFrame, RewardScale]:
    """`scored_df` plus REWARD_COLUMNS, and the scale used (fitted here when none given)."""
    if len(scored_df) == 0:
        raise ValueError("compute_rewards: no rows")
    df = scored_df.copy()
    hits, answers = answer_counts(df, few_shot)
    if few_shot:
        df["r_query"] = hits / answers
    else:
        df["r_query"] = hits - answer_penalty(df, penalty, answer) / 10.0
    if r_task is None:
        # The prompt's accuracy over every answer it got (few-shot: every demo set).
        _require(df, ["prompt_id"], "R_task per prompt")
        by_prompt = df["prompt_id"]
        df["r_task"] = (hits.groupby(by_prompt).transform("sum")
                        / answers.groupby(by_prompt).transform("sum"))
    elif isinstance(r_task, Mapping):
        # Given per prompt (wide Step 0: R_task from the shared queries only).
        _require(df, ["prompt_id"], "R_task per prompt")
        df["r_task"] = df["prompt_id"].map(r_task)
        if df["r_task"].isna().any():
            missing = sorted(set(df.loc[df["r_task"].isna(), "prompt_id"]))
            raise ValueError(f"compute_rewards: no R_task given for prompts {missing[:3]}")
    else:
        df["r_task"] = float(r_task)
    df["r_raw"] = df["r_query"] + df["r_task"]
    scale = scale or RewardScale.fit(df["r_raw"])
    df["reward"] = scale.apply(df["r_raw"])
    assert set(REWARD_COLUMNS) <= set(df.columns)
    return df, scale


def expert_threshold(rewards: pd.Series, fraction: float = 0.667) -> float:
    """min + fraction * (max - min) of the rewards' *range* (paper appendix B.2)."""
    return float(rewards.min() + fraction * (rewards.max() - rewards.min()))


def expert_filter(df: pd.DataFrame, fraction: float = 0.667) -> pd.DataFrame:
    """Keep the pairs whose reward is at least `expert_threshold` (a range cut, not a
    row quantile: a skewed reward distribution keeps more or fewer than a third)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"expert_filter: fraction must be in [0, 1), got {fraction}")
    if "reward" not in df.columns:
        raise ValueError("expert_filter: the frame has no 'reward' column")
    if len(df) == 0:
        return df.copy()
    keep = df["reward"] >= expert_threshold(df["reward"], fraction)
    return df[keep].reset_index(drop=True)
