"""What a run shows on the console while a stage works: one progress bar per phase on a
terminal, redrawn in place; elsewhere (a log file, CI, `nohup`) one line every few
seconds (``QPO_PROGRESS_EVERY_S``, default 15; 0 = every update) but at most one per
fifth of the phase (or per minute), and a last line when the phase ends (a phase
shorter than `every_s`: only the last line). Each line carries the phase, done/total with its unit, ETA, and the
phase's own numbers (loss, samples/s).

Training reports from a Ray Train worker, another process: rank 0 writes its progress
to a small JSON file (`training_step_reporter`, through `write_progress_file`) and the
driver follows that file (`follow_progress_file`) while `trainer.fit()` blocks.

The libraries' own records (Ray's, Ray Data's progress blocks, MLflow's, Python
warnings) go to ``<run>/logs/libraries.log`` instead of the console and their progress
bars are off (`send_library_logs_to`); their errors still reach the console.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from qpo_ray.common.console import shows_info

EVERY_ENV = "QPO_PROGRESS_EVERY_S"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """The progress of one phase (`label`, e.g. "train_1") over `total` `unit`s."""

    def __init__(self, label: str, total: int, unit: str,
                 stream: Optional[TextIO] = None, every_s: Optional[float] = None):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = float(os.environ.get(EVERY_ENV, "15")) if every_s is None else every_s
        self.start = self._shown_at = time.perf_counter()
        self.done, self.fields = 0, {}
        self._shown: Optional[tuple] = None  # what the last line said
        self._closed = False

    def update(self, done: int, **fields: Any) -> None:
        """`done` units finished so far; `fields` ("loss": 2.31, "samples/s": 5.2) shown
        beside them."""
        self.done = min(int(done), self.total) if self.total else int(done)
        self.fields.update(fields)
        now = time.perf_counter()
        since = now - self._shown_at
        # Off a terminal: a line every `every_s`, but one per fifth of the way at most
        # (or one a minute), so that the test stage's ten phases stay within a screenful.
        advanced = self._shown is None or self.done - self._shown[0] >= self.total / 5
        if self.tty or (since >= self.every_s and (advanced or since >= 60)):
            self._show(now)

    def close(self) -> None:
        """The last line (or the finished bar), once; not again if the last line shown
        already said it."""
        if self._closed:
            return
        self._closed = True
        if self.tty or self._shown != (self.done, tuple(self.fields.items())):
            self._show(time.perf_counter(), final=True)

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        parts = [f"{self.done}/{self.total} {self.unit}" if self.total else
                 f"{self.done} {self.unit}"]
        for name, value in self.fields.items():
            parts.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {_duration(elapsed / self.done * (self.total - self.done))}")
        else:
            parts.append(f"{_duration(elapsed)}")
        return ", ".join(parts)

    def _show(self, now: float, final: bool = False) -> None:
        self._shown_at, self._shown = now, (self.done, tuple(self.fields.items()))
        if not shows_info():  # `qpo -q`, or the `qpo` logger quietened by a library user
            return
        if self.tty:
            share = self.done / self.total if self.total else 1.0
            bar = "#" * int(24 * share) + "-" * (24 - int(24 * share))
            end = "\n" if final else ""
            self.stream.write(f"\r\033[K[qpo] {self.label} [{bar}] {self.line(now)}{end}")
        else:
            self.stream.write(f"[qpo] {self.label}: {self.line(now)}\n")
        self.stream.flush()


def progress_callback(label: str, total: int, unit: str) -> tuple[Progress, Callable[[int], None]]:
    """A Progress and the `done -> None` callback that library loops take."""
    progress = Progress(label, total, unit)
    return progress, lambda done: progress.update(done)


# -- across processes (Ray Train workers -> the driver) --------------------------------

def write_progress_file(path: str | Path, state: dict[str, Any]) -> None:
    """Replace `path` with `state` as JSON (rename: a reader never sees half of it)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


class follow_progress_file:
    """While the block runs, show what `path` holds ({"done", "total", fields...}) on a
    Progress labelled `label`; a missing or unreadable file shows nothing."""

    def __init__(self, path: str | Path, label: str, unit: str, poll_s: float = 0.5):
        self.path, self.label, self.unit, self.poll_s = Path(path), label, unit, poll_s
        self.progress: Optional[Progress] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)

    def __enter__(self) -> "follow_progress_file":
        self.path.unlink(missing_ok=True)  # a previous attempt's numbers are not ours
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        if self.progress is not None and exc[0] is None:
            self.progress.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if self.progress is None:
            self.progress = Progress(self.label, int(state.get("total", 0)), self.unit)
        done = int(state.pop("done", 0))
        state.pop("total", None)
        self.progress.update(done, **state)


def training_step_reporter(path: str | None, steps_per_run: int, max_steps: int | None,
                           world: int) -> Optional[Callable[[int, int, Any], None]]:
    """Rank 0's step callback: the run's steps, loss and samples/s (this rank's samples
    times the world size) into `path` for the driver's progress line, at most twice a
    second (reading the loss, a torch scalar, synchronises a GPU)."""
    if path is None:
        return None
    total = min(steps_per_run, max_steps) if max_steps is not None else steps_per_run
    state = {"steps": 0, "samples": 0, "epoch_samples": 0, "written": 0.0,
             "start": time.perf_counter()}

    def report(epoch_steps: int, epoch_samples: int, loss: Any) -> None:
        # run_epoch counts within its epoch; a new epoch starts again at step 1.
        before = 0 if epoch_steps == 1 else state["epoch_samples"]
        state["samples"] += epoch_samples - before
        state["epoch_samples"] = epoch_samples
        state["steps"] += 1
        now = time.perf_counter()
        if now - state["written"] < 0.5 and state["steps"] < total:
            return
        state["written"] = now
        write_progress_file(path, {
            "done": state["steps"], "total": total, "loss": float(loss.detach()),
            "samples/s": world * state["samples"] / max(now - state["start"], 1e-9)})
    return report


# -- the libraries' logs ----------------------------------------------------------------

LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow",
                   "py.warnings")
LOG_FILE = "logs/libraries.log"
_HANDLER = "qpo-library-log"


class _NotSharded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The following layers were not sharded")


def send_library_logs_to(run_dir: str | Path) -> Path:
    """Route the libraries' log records to `<run_dir>/logs/libraries.log` (errors also
    to the console) and turn Ray Data's own progress output off (the stages show theirs).
    Idempotent; returns the log file."""
    # Both configure their loggers when imported: import them first, adjust afterwards.
    import mlflow  # noqa: F401
    import ray.data

    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # transformers' "Loading weights" bars: off here and in what is imported later.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    # MLflow's bars when a policy is fetched from the registry, read at each download.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # transformers 5 warns "layers were not sharded" at every load of a model class with
    # a tensor-parallel plan, TP in use or not; nothing here shards a model.
    tp_logger = logging.getLogger("transformers.distributed.tensor_parallel")
    if not any(isinstance(f, _NotSharded) for f in tp_logger.filters):
        tp_logger.addFilter(_NotSharded())
    logging.captureWarnings(True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.set_name(_HANDLER)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler.get_name() == _HANDLER:
                logger.removeHandler(handler)  # an earlier run in this process
            elif type(handler) is not logging.FileHandler and isinstance(
                    handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR)  # the library's own console handler
        if logger.propagate:
            # Records would reach the root logger's console: errors only, our handler.
            logger.propagate = False
            errors = logging.StreamHandler(sys.stderr)
            errors.setLevel(logging.ERROR)
            errors.set_name(_HANDLER)
            logger.addHandler(errors)
        logger.addHandler(to_file)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return path
