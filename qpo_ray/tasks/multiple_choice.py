"""Multiple-choice tasks: the options are written into the query text as lettered lines
and the label words are the letters, so they are answered by label scoring like any
classification task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from qpo_ray.tasks.base import Example
from qpo_ray.tasks.classification import label_index
from qpo_ray.tasks.common import DataTask, no_split
from qpo_ray.tasks.files import TaskDataError, carve, find_file, read_rows, require_columns

LETTERS = ("A", "B", "C", "D")


def with_options(stem: str, options: Sequence[Any], where: str) -> str:
    """`stem` followed by one "A. option" line per option."""
    if len(options) != len(LETTERS):
        raise TaskDataError(f"{where}: expected {len(LETTERS)} options, got {len(options)}")
    lines = [f"{letter}. {str(option).strip()}" for letter, option in zip(LETTERS, options)]
    return stem + "\nOptions:\n" + "\n".join(lines)


class MultipleChoiceTask(DataTask):
    label_words = LETTERS

    def format_query(self, query: Example) -> str:
        return f"{query.text}\nAnswer:"


class CosmosQA(MultipleChoiceTask):
    """Commonsense reading comprehension; test = the official validation split (the test
    split's labels are hidden)."""

    name = "cosmos_qa"
    hub_path = "allenai/cosmos_qa"
    hub_splits = {"train": "train", "test": "validation"}
    COLUMNS = ("context", "question", "answer0", "answer1", "answer2", "answer3", "label")

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (wilburOne/cosmosqa data/): train.csv, valid.csv (+ unlabelled test).
        train = find_file(data_dir, ["train.csv", "train.jsonl"])
        valid = find_file(data_dir, ["valid.csv", "valid.jsonl", "validation.csv"])
        if split == "validation" or (train is None and valid is None):
            raise no_split(self, split, data_dir, "train.csv and/or valid.csv")
        if train is not None and valid is not None:
            return self._read(train if split == "train" else valid)
        # One file only (the shared copy has valid.csv): both splits are carved from it.
        only = train or valid
        assert only is not None
        return carve(self._read(only), split, str(only))

    def _read(self, path: Path) -> list[Example]:
        rows = read_rows(path)
        require_columns(rows, self.COLUMNS, path)
        return [self.example(row, f"{path.stem}-{i}") for i, row in enumerate(rows)]

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        stem = f"Context: {str(row['context']).strip()}\nQuestion: {str(row['question']).strip()}"
        options = [row[f"answer{i}"] for i in range(4)]
        return Example(example_id, with_options(stem, options, example_id),
                       label_index(row["label"], 4, example_id))


class HellaSwag(MultipleChoiceTask):
    """Pick the most plausible continuation; test = the official validation split."""

    name = "hellaswag"
    hub_path = "Rowan/hellaswag"
    hub_splits = {"train": "train", "test": "validation"}

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (rowanz/hellaswag data/): hellaswag_{train,val,test}.jsonl; test unlabelled.
        names = {"train": ["hellaswag_train.jsonl"], "test": ["hellaswag_val.jsonl"]}
        return self.load_named_file(data_dir, split, names, ["ctx", "endings", "label"])

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        stem = f"Context: {str(row['ctx']).strip()}\nWhich ending is most plausible?"
        return Example(example_id, with_options(stem, list(row["endings"]), example_id),
                       label_index(row["label"], 4, example_id))
