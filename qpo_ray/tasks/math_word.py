"""Math word problems: the target generates, the last number in its output is the answer,
compared numerically with the reference (GSM8K, SVAMP; paper Table 2)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from qpo_ray.tasks.base import Example
from qpo_ray.tasks.common import DataTask, no_split
from qpo_ray.tasks.files import TaskDataError, carve, find_file, read_rows, require_columns

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
    """ "1,234.50" -> "1234.5", "$7" -> "7", "27.0" -> "27"; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value.is_integer():
        return str(int(value))
    return repr(round(value, 6))


def last_number(output: str) -> str:
    """The last number in a generated output, normalised ("" when there is none).

    Chain-of-thought outputs end with the result, direct ones contain only it, so the
    last number serves both."""
    found = [n for n in (normalize_number(m) for m in NUMBER.findall(output)) if n is not None]
    return found[-1] if found else ""


def same_answer(reference: str, prediction: str) -> bool:
    """Numeric equality when both sides are numbers, else trimmed case-insensitive text."""
    ref, pred = normalize_number(str(reference)), normalize_number(str(prediction))
    if ref is not None and pred is not None:
        return abs(float(ref) - float(pred)) < 1e-6
    return str(reference).strip().lower() == str(prediction).strip().lower()


class MathWordTask(DataTask):
    mode = "generate"
    input_label = "Question"

    def parse(self, output: str) -> str:
        return last_number(output)

    def is_correct(self, example: Example, prediction: int | str) -> bool:
        return same_answer(str(example.label), str(prediction))


def reference_answer(value: Any, where: str) -> str:
    answer = normalize_number(str(value))
    if answer is None:
        raise TaskDataError(f"{where}: reference answer {value!r} is not a number")
    return answer


class GSM8K(MathWordTask):
    """Grade-school math; the reference answer follows "#### " in the solution."""

    name = "gsm8k"
    hub_path = "openai/gsm8k"
    hub_name = "main"

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (openai/grade-school-math grade_school_math/data): {train,test}.jsonl.
        path = find_file(data_dir, [f"{split}.jsonl"])
        if path is None:
            raise no_split(self, split, data_dir, f"{split}.jsonl")
        rows = read_rows(path)
        require_columns(rows, ["question", "answer"], path)
        return [self.example(row, f"{split}-{i}") for i, row in enumerate(rows)]

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        solution = str(row["answer"])
        if "####" not in solution:
            raise TaskDataError(f"{example_id}: answer has no '#### <number>' final line")
        answer = reference_answer(solution.rsplit("####", 1)[1], example_id)
        return Example(example_id, str(row["question"]).strip(), answer)


class SVAMP(MathWordTask):
    """Varied one-step arithmetic word problems (Body + Question -> Answer)."""

    name = "svamp"
    hub_path = "ChilleD/SVAMP"

    def load_local(self, data_dir: Path, split: str) -> list[Example]:
        # Upstream (arkilpatel/SVAMP): one SVAMP.json; the hub copy's train/test tables
        # (same columns) are read when present.
        if split == "validation":
            raise no_split(self, split, data_dir, "no validation split upstream")
        path = find_file(data_dir, [f"{split}.json", f"{split}.jsonl", f"{split}.parquet"])
        if path is not None:
            return self._read(path)
        whole = find_file(data_dir, ["SVAMP.json", "svamp.json"])
        if whole is None:
            raise no_split(self, split, data_dir, f"SVAMP.json or {split}.json")
        return carve(self._read(whole), split, str(whole))

    def _read(self, path: Path) -> list[Example]:
        rows = read_rows(path)
        require_columns(rows, ["Body", "Question", "Answer"], path)
        return [self.example(row, f"{path.stem}-{i}") for i, row in enumerate(rows)]

    def example(self, row: dict[str, Any], example_id: str) -> Example:
        body, question = str(row["Body"]).strip(), str(row["Question"]).strip()
        # Some bodies end without a full stop before the question.
        joiner = " " if body.endswith((".", "?", "!")) else ". "
        return Example(example_id, f"{body}{joiner}{question}",
                       reference_answer(row["Answer"], example_id))
