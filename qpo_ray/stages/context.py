"""The run context: what every stage of one run needs, built once by the loop (or by a
single command such as `qpo evaluate`) and handed down. Stages read from it; nothing
in it reaches back into the loop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import pandas as pd

from qpo_ray.config import Config
from qpo_ray.evaluation import score_pairs
from qpo_ray.rundir import RunDir
from qpo_ray.scoring import PairScorer
from qpo_ray.tasks import task_and_splits
from qpo_ray.tasks.base import Example, Splits, Task

if TYPE_CHECKING:  # only for the annotation: MLflow loads when a Tracker is made
    from qpo_ray.tracking import Tracker

ScorerFactory = Callable[[Config, Task, Sequence[Example]], PairScorer]


@dataclass
class RunContext:
    cfg: Config
    # The run directory; None for commands that work outside one (`qpo dataset build`,
    # `qpo evaluate --policy DIR`).
    run: Optional[RunDir] = None
    # MLflow tracking of the run; None outside `qpo run`.
    tracker: Optional["Tracker"] = None
    # Builds the scorer of each scoring pass; None = Ray Data over an actor pool
    # (evaluation.make_scorer, with a progress line).
    scorer_factory: Optional[ScorerFactory] = None

    @cached_property
    def _task_and_splits(self) -> tuple[Task, Splits]:
        # Loaded on first use: a stage that imports its data never reads the task.
        return task_and_splits(self.cfg)

    @property
    def task(self) -> Task:
        return self._task_and_splits[0]

    @property
    def splits(self) -> Splits:
        """The seeded splits, the same in every stage and process of the run."""
        return self._task_and_splits[1]

    def score(self, pairs: pd.DataFrame, label: str = "scoring") -> tuple[pd.DataFrame, dict]:
        """Score (query, prompt) pairs on the target; returns (scored rows, usage).
        `label` names the pass on the console's progress line."""
        return score_pairs(self.cfg, self.task, self.splits, pairs, self.scorer_factory,
                           label=label)
