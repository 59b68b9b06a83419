"""What serving remembers so that outcomes can flow back into training: a record of every
served request, and the feedback given on them. Free of Ray: the replicas write it, the
`qpo serve report` / `qpo serve feedback-dataset` commands read it.

Layout under `serve.feedback_dir` (default `<workdir>/serving`):

    requests/<replica>-<n>.jsonl  one JSON line per served request, appended and flushed
                               before the response leaves (a replica that dies loses
                               none); each replica process writes its own files, a new
                               one past serve.journal_max_bytes
    feedback/part-*.parquet    one Parquet part per accepted feedback, written to a
                               temporary file, fsynced and renamed (qpo_ray.common.atomic):
                               the request's record joined with the outcome
    feedback/claims/<id>       created with O_EXCL before a part is written: one outcome
                               per request, whichever replica is asked, even at once
    receipt.key                the secret receipts are HMACs with (created once, 0600)

Files older than serve.retention_days are deleted when a replica starts (journals,
parts and claims; 0 keeps everything). Parts are compacted into one once
serve.feedback_compact_parts of them accumulate (at replica start, then in the
background as feedback arrives): the latest answer per request, rows past the retention
dropped (`compact`).

Any replica answers feedback for any request: an id it did not serve is looked up in
the other replicas' journals (read incrementally), so a restarted replica (or one on
another node sharing the directory) still knows every request served before.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
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
CLAIMS_DIR = "claims"
RECEIPT_KEY_FILE = "receipt.key"
COMPACT_LOCK_FILE = ".compact.lock"

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
    "client_id": pa.string(),        # who asked: hash of the bearer token (serving.limits)
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

    def __init__(self, root: Path, writer_id: str, max_bytes: int = 64 << 20) -> None:
        self._dir = root / REQUESTS_DIR
        self._dir.mkdir(parents=True, exist_ok=True)
        self._writer, self._part, self._max_bytes = writer_id, 0, max_bytes
        self._path = self._dir / f"{writer_id}-0.jsonl"
        self._file = open(self._path, "ab")
        # request_id -> (journal, byte offset of its line); how far each journal is read.
        self._index: dict[str, tuple[Path, int]] = {}
        self._read_to: dict[Path, int] = {}
        self._scan_lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        offset = self._file.tell()
        if offset and offset + len(line) > self._max_bytes:
            self._file.close()
            self._part += 1
            self._path = self._dir / f"{self._writer}-{self._part}.jsonl"
            self._file, offset = open(self._path, "ab"), 0
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
            present = set(self._dir.glob("*.jsonl"))
            gone = set(self._read_to) - present
            if gone:  # swept by retention: forget their ids (the index stays bounded)
                self._index = {k: v for k, v in self._index.items() if v[0] not in gone}
                for path in gone:
                    del self._read_to[path]
            for path in sorted(present):
                start = self._read_to.get(path, 0)
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    continue  # deleted by another replica's retention sweep
                with f:
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

    def __init__(self, root: str | Path, writer_id: str, journal_max_bytes: int = 64 << 20,
                 retention_days: float = 0.0, compact_parts: int = 0) -> None:
        self.root = Path(root)
        self._dir = self.root / FEEDBACK_DIR
        self._claims = self._dir / CLAIMS_DIR
        self._claims.mkdir(parents=True, exist_ok=True)
        self._max_age_s = retention_days * 86400.0
        if retention_days > 0:
            sweep(self.root, self._max_age_s)
        self._compact_parts, self._written = compact_parts, 0
        if compact_parts:
            compact(self.root, self._max_age_s, min_parts=compact_parts)
        self.requests = RequestLog(self.root, writer_id, journal_max_bytes)
        self._receipt_key = receipt_key(self.root)

    def receipt(self, request_id: str) -> str:
        """What the response carries and feedback must present: HMAC-SHA256 of the id."""
        return hmac.new(self._receipt_key, request_id.encode(), hashlib.sha256).hexdigest()

    def receipt_ok(self, request_id: str, receipt: Optional[str]) -> bool:
        return bool(receipt) and hmac.compare_digest(self.receipt(request_id), receipt)

    def record(self, record: dict[str, Any]) -> None:
        self.requests.append({k: record.get(k) for k in RECORD_FIELDS})

    def add(self, request_id: str, correct: Optional[bool], reward: Optional[float],
            gold_label: Optional[str], source: str) -> dict[str, Any]:
        """Store the outcome of a served request; UnknownRequest / DuplicateFeedback."""
        record = self.requests.lookup(request_id)
        return self.add_to(record, correct, reward, gold_label, source)

    def add_to(self, record: dict[str, Any], correct: Optional[bool], reward: Optional[float],
               gold_label: Optional[str], source: str) -> dict[str, Any]:
        request_id = record["request_id"]
        claim = self._claims / request_id
        try:
            # The claim, not a per-process set: any replica, any restart, sees it.
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise DuplicateFeedback(request_id) from None
        row = {**record, "correct": correct, "reward": reward, "gold_label": gold_label,
               "feedback_source": source, "feedback_at_unix_s": time.time()}
        try:
            _write_part(self._dir, pa.Table.from_pylist([row], schema=FEEDBACK_SCHEMA),
                        request_id)
        except BaseException:
            claim.unlink(missing_ok=True)
            raise
        self._written += 1
        if self._compact_parts and self._written % self._compact_parts == 0:
            # Off the request's path: merging many parts takes seconds.
            threading.Thread(target=compact, args=(self.root, self._max_age_s),
                             kwargs={"min_parts": self._compact_parts}, daemon=True).start()
        return row


def receipt_key(root: Path) -> bytes:
    """The receipts' secret, shared by every replica through the feedback directory:
    created once (written aside, then hard-linked into place, so no replica reads a
    half-written key), readable by its owner only."""
    path = root / RECEIPT_KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".receipt-", dir=root)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another replica's key won
        finally:
            os.unlink(tmp)
    return path.read_bytes().strip()


def sweep(root: Path, max_age_s: float) -> int:
    """Delete journals, feedback parts and claims last written more than max_age_s ago
    (serve.retention_days); returns how many files went."""
    cutoff, gone = time.time() - max_age_s, 0
    for pattern in (f"{REQUESTS_DIR}/*.jsonl", f"{FEEDBACK_DIR}/part-*.parquet",
                    f"{FEEDBACK_DIR}/{CLAIMS_DIR}/*"):
        for path in root.glob(pattern):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
    return gone


def compact(root: str | Path, max_age_s: float = 0.0, min_parts: int = 2) -> int:
    """Merge the feedback parts into one: the latest answer per request, rows older than
    `max_age_s` (0: none) dropped. Returns the parts merged; 0 when fewer than
    `min_parts` exist or another process is compacting (a lock file, not waited for).
    The merged part is in place before its sources go: a crash in between, or a reader
    meanwhile, sees some rows twice, which `read_feedback` dedupes."""
    directory = Path(root) / FEEDBACK_DIR
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / COMPACT_LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        parts = sorted(directory.glob("part-*.parquet"))
        if len(parts) < max(1, min_parts):
            return 0
        table = pa.concat_tables([_read_part(p) for p in parts])
        keys = table.select(["request_id", "feedback_at_unix_s"]).to_pandas()
        keep = _latest(keys)
        if max_age_s > 0:
            keep = keep[keep["feedback_at_unix_s"] >= time.time() - max_age_s]
        if len(keep):
            _write_part(directory, table.take(pa.array(sorted(keep.index))), "compacted")
        for path in parts:
            path.unlink(missing_ok=True)
        return len(parts)


def _latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The latest feedback row per request id (two replicas may both have accepted one
    before the claims existed; a compaction's crash may leave a row twice)."""
    return (frame.sort_values("feedback_at_unix_s", kind="stable")
            .drop_duplicates("request_id", keep="last"))


def _write_part(directory: Path, table: pa.Table, tag: str) -> Path:
    final = directory / f"part-{time.time_ns()}-{os.getpid()}-{tag}.parquet"
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
    for _ in range(10):
        parts = sorted((Path(root) / FEEDBACK_DIR).glob("part-*.parquet"))
        try:
            tables = [_read_part(p) for p in parts]
            break
        except FileNotFoundError:
            continue  # a compaction merged a listed part meanwhile: list again
    else:
        raise RuntimeError(f"{root}: feedback parts kept vanishing while being read")
    if not tables:
        return FEEDBACK_SCHEMA.empty_table().to_pandas()
    frame = pa.concat_tables(tables).to_pandas()
    return _latest(frame).reset_index(drop=True) if dedupe else frame


def _read_part(path: Path) -> pa.Table:
    """A part, in today's schema: parts written before a column existed get it null."""
    table = pq.read_table(path)
    for name in FEEDBACK_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), FEEDBACK_SCHEMA.field(name).type))
    return table.select(FEEDBACK_SCHEMA.names).cast(FEEDBACK_SCHEMA)


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
