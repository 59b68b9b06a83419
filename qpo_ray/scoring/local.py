"""Scoring (query, prompt) pairs on a target backend: fills the dataset's SCORE_COLUMNS.

No Ray here: `score_batch` is the unit of work that `LocalScorer` runs in-process and
the Ray Data actors of `qpo_ray.scoring.ray_data` run on their shards.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import pandas as pd

from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend, Usage
from qpo_ray.data.schema import SCORE_COLUMNS
from qpo_ray.tasks.base import Example, Task

REQUIRED_COLUMNS = ("pair_id", "query_id", "query", "prompt", "label", "demo_ids")


def query_example(task: Task, row: Any) -> Example:
    """The pair's query as the task's Example (labels are stored as text)."""
    label: int | str = row.label
    if task.mode == "labels":
        try:
            label = int(row.label)
        except ValueError:
            raise ValueError(f"pair {row.pair_id}: label {row.label!r} is not a label index "
                             f"of task {task.name!r}") from None
    return Example(id=str(row.query_id), text=str(row.query), label=label)


def demo_sets(row: Any, demo_lookup: dict[str, Example]) -> list[list[Example]]:
    """The pair's demonstration sets; one empty set for zero-shot."""
    raw = row.demo_ids
    sets = [list(s) for s in raw] if raw is not None and len(raw) else []
    if not sets:
        return [[]]
    try:
        return [[demo_lookup[str(d)] for d in s] for s in sets]
    except KeyError as exc:
        raise ValueError(f"pair {row.pair_id}: demonstration id {exc.args[0]!r} is not in the "
                         f"demo pool") from None


def _answer_stats(logprob_sum: float, num_tokens: int) -> dict[str, float]:
    nll = -logprob_sum / num_tokens if num_tokens else 0.0
    return {"answer_logprob": logprob_sum, "answer_num_tokens": num_tokens,
            "answer_nll": nll, "answer_ppl": math.exp(nll)}


def _read_labels(scores: list[ContinuationScore]) -> tuple[int, dict[str, Any], int, int]:
    """argmax over candidates -> (prediction, answer stats of the predicted label's tokens
    plus every label's log-likelihood, prompt tokens, tokens scored)."""
    best = max(range(len(scores)), key=lambda j: scores[j].logprob_sum)
    chosen = scores[best]
    stats: dict[str, Any] = _answer_stats(chosen.logprob_sum, chosen.num_tokens)
    stats["label_logprobs"] = [float(s.logprob_sum) for s in scores]
    return (best, stats, chosen.num_prompt_tokens, sum(s.num_tokens for s in scores))


def _read_generation(task: Task, gen: Generation) -> tuple[str, dict[str, Any], int, int]:
    n = len(gen.token_logprobs)
    stats: dict[str, Any] = _answer_stats(float(sum(gen.token_logprobs)), n)
    stats["label_logprobs"] = []
    return task.parse(gen.text), stats, gen.num_prompt_tokens, n


def score_batch(task: Task, backend: TargetBackend, pairs_df: pd.DataFrame,
                demo_lookup: dict[str, Example], max_new_tokens: int) -> pd.DataFrame:
    """Score every pair (every demonstration set of it, for few-shot) in one backend call.

    prediction/correct/answer_* describe the first demonstration set (the only one,
    zero-shot); demo_correct lists correctness per set (few-shot) or is empty.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in pairs_df.columns]
    if missing:
        raise ValueError(f"pairs are missing columns {missing}")
    rows = list(pairs_df.itertuples(index=False))
    queries = [query_example(task, r) for r in rows]
    sets_per_row = [demo_sets(r, demo_lookup) for r in rows]
    prefixes = [task.format(r.prompt, q, demos)
                for r, q, sets in zip(rows, queries, sets_per_row) for demos in sets]
    if not prefixes:
        results: Sequence[Any] = []
    elif task.mode == "labels":
        scored = backend.score_continuations(prefixes, task.continuations())
        results = [_read_labels(s) for s in scored]
    else:
        results = [_read_generation(task, g) for g in backend.generate(prefixes, max_new_tokens)]

    records = []
    at = 0
    for r, q, sets in zip(rows, queries, sets_per_row):
        per_set = results[at:at + len(sets)]
        at += len(sets)
        correct = [bool(task.is_correct(q, pred)) for pred, *_ in per_set]
        prediction, stats, _, _ = per_set[0]
        records.append({
            "prediction": str(prediction),
            "correct": correct[0],
            "demo_correct": correct if sets[0] else [],
            **stats,
            "prompt_tokens": int(sum(p for _, _, p, _ in per_set)),
            "completion_tokens": int(sum(c for _, _, _, c in per_set)),
        })
    scores = pd.DataFrame.from_records(records, columns=list(SCORE_COLUMNS))
    scores.index = pairs_df.index
    return pd.concat([pairs_df.drop(columns=list(SCORE_COLUMNS), errors="ignore"), scores],
                     axis=1)


class PairScorer(ABC):
    """Scores pairs: every input row exactly once, in the input order."""

    usage: Usage
    # names the scoring pass on the console's progress line (scorers that show one)
    label: str = "scoring"

    @abstractmethod
    def score(self, pairs_df: pd.DataFrame) -> pd.DataFrame:
        """`pairs_df` with SCORE_COLUMNS added."""

    def close(self) -> None:
        """Release engines."""


class LocalScorer(PairScorer):
    """One backend in this process (tests, small runs, the single-process baseline)."""

    def __init__(self, task: Task, backend: TargetBackend, demo_pool: Sequence[Example],
                 max_new_tokens: int = 16) -> None:
        self.task = task
        self.backend = backend
        self.demo_lookup = {d.id: d for d in demo_pool}
        self.max_new_tokens = max_new_tokens

    @property
    def usage(self) -> Usage:  # type: ignore[override]
        return self.backend.usage

    def score(self, pairs_df: pd.DataFrame) -> pd.DataFrame:
        return score_batch(self.task, self.backend, pairs_df, self.demo_lookup,
                           self.max_new_tokens)

    def close(self) -> None:
        self.backend.close()
