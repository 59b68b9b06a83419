"""The run context: what every stage of one run needs, built once by the loop (or by a
single command such as `qpo evaluate`) and handed down. Stages read from it; nothing
in it reaches back into the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import pandas as pd

from qpo_ray.config import Config
from qpo_ray.backends.base import Usage
from qpo_ray.common.local_ray import init_ray
from qpo_ray.scoring.ray_data import make_scorer
from qpo_ray.run.rundir import RunDir
from qpo_ray.scoring.local import PairScorer
from qpo_ray.tasks import task_and_splits
from qpo_ray.tasks.base import Example, Splits, Task

if TYPE_CHECKING:  # only for the annotation: MLflow loads when a Tracker is made
    from qpo_ray.run.tracking import Tracker

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
    # (qpo_ray.scoring.ray_data.make_scorer, with a progress line).
    scorer_factory: Optional[ScorerFactory] = None
    # The stage's scorer: its engines start on the first call and serve every later one
    # until `release_engines` (the loop calls it when a stage ends).
    _scorer: Optional[PairScorer] = field(default=None, init=False, repr=False)
    _calls: int = field(default=0, init=False, repr=False)

    @cached_property
    def _task_and_splits(self) -> tuple[Task, Splits]:
        # Loaded on first use: a stage that imports its data never reads the task.
        return task_and_splits(self.cfg.task, self.cfg.seed)

    @property
    def task(self) -> Task:
        return self._task_and_splits[0]

    @property
    def splits(self) -> Splits:
        """The seeded splits, the same in every stage and process of the run."""
        return self._task_and_splits[1]

    def score(self, pairs: pd.DataFrame, label: str = "scoring") -> tuple[pd.DataFrame, dict]:
        """Score (query, prompt) pairs on the target; returns (scored rows, this call's
        usage). `label` names the pass on the console's progress line."""
        if self._scorer is None:
            init_ray(self.cfg.ray_address)
            self._scorer = (make_scorer(self.cfg.target, self.cfg.evaluation, self.task,
                                        self.splits.demo_pool, ray_address=self.cfg.ray_address)
                            if self.scorer_factory is None else
                            self.scorer_factory(self.cfg, self.task, self.splits.demo_pool))
        self._scorer.label = label
        before = Usage().add(self._scorer.usage)  # a copy: a backend's usage grows in place
        scored = self._scorer.score(pairs)
        self._calls += 1
        return scored, self._scorer.usage.minus(before).as_dict()

    def release_engines(self) -> int:
        """Stop the target engines this context started; how many scoring calls they
        served (0: none were started)."""
        scorer, calls, self._scorer, self._calls = self._scorer, self._calls, None, 0
        if scorer is not None:
            scorer.close()
        return calls
