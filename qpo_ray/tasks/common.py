"""What every data-backed task shares: the config it was built from, a cache of loaded
splits, and the routing between a local copy (``task.data_dir``) and the default source
(the Hugging Face hub through ``datasets``, or an embedded file)."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Optional

from qpo_ray.config import TaskConfig
from qpo_ray.tasks.base import Example, Task
from qpo_ray.tasks.files import TaskDataError, find_file, load_hub, read_rows, require_columns

SPLITS = ("train", "validation", "test")


class DataTask(Task):
    """A built-in task whose examples come from files or the hub."""

    #: Hugging Face hub dataset path and config name (the default source).
    hub_path: str = ""
    hub_name: Optional[str] = None
    #: our split name -> the hub's split name (test = the official labelled test/dev split)
    hub_splits: dict[str, str] = {"train": "train", "test": "test"}
    #: how the query is introduced to the target (after the prompt, before "Answer:")
    input_label: str = "Input"

    def __init__(self, cfg: Optional[TaskConfig] = None):
        self.cfg = cfg or TaskConfig(name=self.name)
        self._cache: dict[str, list[Example]] = {}

    def load_split(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"task {self.name}: unknown split {split!r} (known: {SPLITS})")
        if split not in self._cache:
            if self.cfg.data_dir:
                data_dir = Path(self.cfg.data_dir).expanduser()
                if not data_dir.is_dir():
                    raise TaskDataError(f"task.data_dir {data_dir}: not a directory")
                examples = self.load_local(data_dir, split)
            else:
                examples = self.load_default(split)
            if not examples:
                raise TaskDataError(f"task {self.name}: split {split!r} has no examples")
            self._cache[split] = examples
        return list(self._cache[split])

    def load_default(self, split: str) -> list[Example]:
        """The hub copy of a split (needs `pip install datasets`)."""
        if split not in self.hub_splits:
            raise TaskDataError(f"task {self.name}: the hub copy has no {split!r} split")
        try:
            rows = load_hub(self.hub_path, self.hub_name, self.hub_splits[split])
        except TaskDataError as exc:
            raise TaskDataError(f"task {self.name}: {exc} (task.data_dir: a directory "
                                "in the dataset's upstream file layout)") from None
        return [self.example(row, f"{split}-{i}") for i, row in enumerate(rows)]

    @abstractmethod
    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        """A split read from `data_dir` in the dataset's upstream file layout."""

    @abstractmethod
    def example(self, row: dict[str, Any], example_id: str) -> Example:
        """One hub row (or a local row in the hub's column names) as an Example."""

    def load_named_file(self, data_dir: Path, split: str, names: dict[str, list[str]],
                        columns: list[str]) -> list[Example]:
        """A split stored as one file (the first of `names[split]` found) whose rows use
        the hub's column names, so `example` reads both sources."""
        path = find_file(data_dir, names.get(split, []))
        if path is None:
            raise no_split(self, split, data_dir, " or ".join(names.get(split, ["-"])))
        rows = read_rows(path)
        require_columns(rows, columns, path)
        return [self.example(row, f"{path.stem}-{i}") for i, row in enumerate(rows)]

    def format_query(self, query: Example) -> str:
        return f"{self.input_label}: {query.text}\nAnswer:"


def no_split(task: Task, split: str, data_dir: Path, expected: str) -> TaskDataError:
    """The error for a local copy that lacks a split's files."""
    return TaskDataError(f"task {task.name}: no {split!r} data in {data_dir} "
                         f"(expected {expected})")
