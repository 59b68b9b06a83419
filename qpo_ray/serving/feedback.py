"""What serving remembers so that outcomes can flow back into training: a record of every
served request, and the feedback given on them. Free of Ray: the replicas write it, the
`qpo serve report` / `qpo serve feedback-dataset` commands read it.

Layout under `serve.feedback_dir` (default `<workdir>/serving`):

    requests/<replica>.jsonl   one JSON line per served request, appended and flushed
                               before the response leaves (a replica that dies loses
                               none); each replica process writes its own file
    feedback/part-*.parquet    one Parquet part per accepted feedback, written to a
                               temporary file, fsynced and renamed (qpo_ray.common.atomic):
                               the request's record joined with the outcome

Any replica answers feedback for any request: an id it did not serve is looked up in
the other replicas' journals (read incrementally), so a restarted replica (or one on
another node sharing the directory) still knows every request served before.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.common.atomic import replace_file
from qpo_ray.config import Config

REQUESTS_DIR = "requests"
FEEDBACK_DIR = "feedback"

# A served request's record (the journal's JSON keys), then the feedback's own columns.
RECORD_FIELDS: dict[str, pa.DataType] = {
    "request_id": pa.string(),
    "served_at_unix_s": pa.float64(),
    "route": pa.string(),            # "prompt" | "answer" | "chat"
    "arm": pa.string(),              # "a" | "b"
    "policy_version": pa.string(),
    "query": pa.string(),            # normalised, as the policy saw it
    "prompt": pa.string(),
    "target_reward": pa.float64(),
    "cached": pa.bool_(),
    "target_label": pa.string(),     # /v1/answer, label tasks: the target's label word
    "answer": pa.string(),           # /v1/answer: the target's text
}
FEEDBACK_SCHEMA = pa.schema([*RECORD_FIELDS.items(),
                             ("correct", pa.bool_()),
                             ("reward", pa.float64()),         # 0-100, the caller's
                             ("gold_label", pa.string()),      # label word or answer
                             ("feedback_source", pa.string()),  # "client" | "answer-gold"
                             ("feedback_at_unix_s", pa.float64())])


def feedback_root(cfg: Config) -> Path:
    return Path(cfg.serve.feedback_dir or Path(cfg.workdir) / "serving").expanduser().resolve()


class UnknownRequest(KeyError):
    """No served request has this id (in any replica's journal)."""


class DuplicateFeedback(ValueError):
    """This request already has feedback."""


class RequestLog:
    """The journals: this process appends to its own file and reads everyone's."""

    def __init__(self, root: Path, writer_id: str) -> None:
        self._dir = root / REQUESTS_DIR
        self._dir.mkdir(parents=True, exist_ok=True)
        self._path = self._dir / f"{writer_id}.jsonl"
        self._file = open(self._path, "ab")
        # request_id -> (journal, byte offset of its line); how far each journal is read.
        self._index: dict[str, tuple[Path, int]] = {}
        self._read_to: dict[Path, int] = {}
        self._scan_lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        offset = self._file.tell()
        self._file.write(line)
        self._file.flush()  # in the kernel now: survives this process dying
        self._index[record["request_id"]] = (self._path, offset)

    def lookup(self, request_id: str) -> dict[str, Any]:
        if request_id not in self._index:
            self._scan()
        if request_id not in self._index:
            raise UnknownRequest(request_id)
        path, offset = self._index[request_id]
        with open(path, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def _scan(self) -> None:
        """Index what was appended to any journal since the last scan (complete lines
        only: a line being written, or cut short by a crash, is left for later)."""
        with self._scan_lock:
            for path in sorted(self._dir.glob("*.jsonl")):
                start = self._read_to.get(path, 0)
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
                end = data.rfind(b"\n") + 1
                offset = start
                for line in data[:end].splitlines(keepends=True):
                    try:
                        self._index[json.loads(line)["request_id"]] = (path, offset)
                    except (ValueError, KeyError):
                        pass  # a torn line from a crash: not a request
                    offset += len(line)
                self._read_to[path] = start + end

    def close(self) -> None:
        self._file.close()


class FeedbackStore:
    """Records requests and turns feedback on them into durable Parquet parts."""

    def __init__(self, root: str | Path, writer_id: str) -> None:
        self.root = Path(root)
        self.requests = RequestLog(self.root, writer_id)
        self._dir = self.root / FEEDBACK_DIR
        self._dir.mkdir(parents=True, exist_ok=True)
        frame = read_feedback(self.root, dedupe=False)
        # Ids with feedback, this replica's and any written before it started; an id
        # is added before its part is written, so two concurrent posts cannot both pass.
        self._given: set[str] = set(frame["request_id"]) if len(frame) else set()
        self._lock = threading.Lock()

    def record(self, record: dict[str, Any]) -> None:
        self.requests.append({k: record.get(k) for k in RECORD_FIELDS})

    def add(self, request_id: str, correct: Optional[bool], reward: Optional[float],
            gold_label: Optional[str], source: str) -> dict[str, Any]:
        """Store the outcome of a served request; UnknownRequest / DuplicateFeedback."""
        record = self.requests.lookup(request_id)
        with self._lock:
            if request_id in self._given:
                raise DuplicateFeedback(request_id)
            self._given.add(request_id)
        row = {**record, "correct": correct, "reward": reward, "gold_label": gold_label,
               "feedback_source": source, "feedback_at_unix_s": time.time()}
        try:
            _write_part(self._dir, [row])
        except BaseException:
            self._given.discard(request_id)
            raise
        return row


def _write_part(directory: Path, rows: list[dict[str, Any]]) -> Path:
    table = pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)
    final = directory / f"part-{time.time_ns()}-{os.getpid()}-{rows[0]['request_id']}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        replace_file(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def read_feedback(root: str | Path, dedupe: bool = True) -> pd.DataFrame:
    """Every feedback row; with `dedupe`, the latest per request id (two replicas may
    both have accepted one before seeing the other's part)."""
    parts = sorted((Path(root) / FEEDBACK_DIR).glob("part-*.parquet"))
    if not parts:
        return FEEDBACK_SCHEMA.empty_table().to_pandas()
    frame = pa.concat_tables([pq.read_table(p, schema=FEEDBACK_SCHEMA) for p in parts]
                             ).to_pandas()
    if dedupe:
        frame = (frame.sort_values("feedback_at_unix_s", kind="stable")
                 .drop_duplicates("request_id", keep="last").reset_index(drop=True))
    return frame


def read_requests(root: str | Path) -> pd.DataFrame:
    """Every served request's record (torn lines from a crash are skipped)."""
    rows = []
    for path in sorted((Path(root) / REQUESTS_DIR).glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return pd.DataFrame(rows, columns=list(RECORD_FIELDS))
