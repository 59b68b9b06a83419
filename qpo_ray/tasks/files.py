"""Reading task data: local files (CSV/TSV, JSON, JSONL, Parquet), the Hugging Face hub
(``datasets``, imported lazily) and carving a train/test split out of a single file.

Every reader returns plain ``list[dict]`` rows so that task loaders stay small and a bad
file fails here with its path and line.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence, TypeVar

from qpo_ray.common import jsonl

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seed used when a task has only one labelled split and a test part is carved out of it.
#: Fixed (not cfg.seed) so that the test set is the same across runs and seeds.
CARVE_SEED = 20240817
#: Share of a single split kept as the test part when carving.
CARVE_TEST_FRACTION = 0.2


class TaskDataError(ValueError):
    """A task's data file is missing, malformed or lacks a column."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped; errors name file and line."""
    return [row for _number, row in jsonl.read_jsonl(path, TaskDataError)]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header required), JSON list, JSONL or Parquet file."""
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".bz2", ".gz") else path.suffix
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TaskDataError(f"{path}: expected a JSON list of objects")
        return data
    import pandas as pd

    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix.startswith((".csv", ".tsv")):
        try:
            frame = pd.read_csv(path, sep="\t" if suffix.startswith(".tsv") else ",",
                                keep_default_na=False, dtype=str)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise TaskDataError(f"{path}: not a readable CSV ({exc})") from exc
    else:
        raise TaskDataError(f"{path}: unsupported file type {suffix!r} "
                            "(use .csv, .tsv, .json, .jsonl or .parquet)")
    return frame.to_dict(orient="records")


def read_text_and_labels(text_path: str | Path, label_path: str | Path) -> list[dict[str, Any]]:
    """The one-example-per-line layout: line N of `text_path` is an example, line N of
    `label_path` its label. Rows {"text", "label", "_where_text", "_where_label"} (the
    last two say "file: line N" for errors). Trailing blank lines are ignored."""
    lines = {}
    for key, path in (("text", Path(text_path)), ("label", Path(label_path))):
        if not path.exists():
            raise TaskDataError(f"{path}: file not found")
        try:
            content = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise TaskDataError(f"{path}: not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start})") from None
        while content and not content[-1].strip():
            content.pop()
        lines[key] = (path, content)
    (tpath, texts), (lpath, labels) = lines["text"], lines["label"]
    if len(texts) != len(labels):
        short, line = (lpath, len(labels) + 1) if len(labels) < len(texts) else \
            (tpath, len(texts) + 1)
        raise TaskDataError(f"{short}: line {line}: missing ({tpath} has {len(texts)} lines, "
                            f"{lpath} has {len(labels)}; line N of one is the label of line "
                            "N of the other)")
    return [{"text": text.strip(), "label": label.strip(),
             "_where_text": f"{tpath}: line {n}", "_where_label": f"{lpath}: line {n}"}
            for n, (text, label) in enumerate(zip(texts, labels), start=1)]


def require_columns(rows: list[dict[str, Any]], columns: Sequence[str], path: str | Path,
                    where: str = "") -> None:
    """Fail naming the file and the first missing column (and `where` it was asked for)."""
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    for column in columns:
        if column not in rows[0]:
            asked = f" (asked for by {where})" if where else ""
            raise TaskDataError(f"{path}: no column {column!r}{asked}; "
                                f"columns are {sorted(rows[0])}")


def find_file(data_dir: str | Path, names: Sequence[str]) -> Path | None:
    """The first of `names` that exists in `data_dir` (None if none does)."""
    for name in names:
        candidate = Path(data_dir) / name
        if candidate.exists():
            return candidate
    return None


_CARVED: set[str] = set()


def carve(examples: Sequence[T], split: str, source: str,
          test_fraction: float = CARVE_TEST_FRACTION, warn: bool = True) -> list[T]:
    """The `split` ("train" or "test") part of a seeded split of a single labelled file.

    Used when a local copy has only one split (e.g. AG News test.csv, CosmosQA valid.csv):
    the same fixed seed always gives the same disjoint parts. `warn=False` for sources
    documented to have one split (the embedded Rotten Tomatoes corpus).
    """
    order = list(range(len(examples)))
    random.Random(CARVE_SEED).shuffle(order)
    n_test = max(1, int(round(test_fraction * len(examples))))
    if source not in _CARVED:  # said once a process: a run loads its splits several times
        _CARVED.add(source)
        log = logger.warning if warn else logger.info
        log("%s is the only labelled split found: carving a seeded %d/%d train/test split "
            "from it (seed %d)", source, len(examples) - n_test, n_test, CARVE_SEED)
    picked = order[:n_test] if split == "test" else order[n_test:]
    return [examples[i] for i in sorted(picked)]


def load_hub(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset split, through the optional `datasets` package."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only for hub loading
    except ImportError as exc:
        raise TaskDataError(
            f"loading {path!r} from the Hugging Face hub needs the `datasets` package: "
            "`pip install datasets`, or set task.data_dir to a local copy of the files"
        ) from exc
    return list(datasets.load_dataset(path, name, split=split))
