"""Reading JSON Lines files (task data, prompt collections): one object per line, blank
lines skipped, every error naming the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path, error: type[Exception] = ValueError
               ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a bad line raises `error` (the caller's
    own error class, so that its exit code and message stay its own)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}: line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise error(f"{path}: line {number}: expected a JSON object")
            rows.append((number, row))
    return rows
