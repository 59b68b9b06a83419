"""The run directory of one QPO run: its saved config, its stage markers, its files.

Layout (``cfg.workdir``)::

    config.yaml                    resolved config, written once at the start
    stages.json                    finished stages -> their outputs (atomic rewrite)
    tracking.json                  MLflow run ids (see qpo_ray.run.tracking)
    dataset_loop0.parquet          Step 0: every scored (query, prompt) pair + scale
    dataset_loop0.usage.json       target-LLM cost of Step 0
    dataset_1.parquet              D_0: Step 0 after the expert filter (trains loop 1)
    loop<t>/                       training output of loop t (checkpoint, metrics.json)
    dataset_<t+1>.parquet          D_t = D_{t-1} + D_A of round t (trains loop t+1)
    dataset_<t+1>.rows.parquet     round t's scored rows before the filter
    dataset_<t+1>.round.json       round t's R_task, cost, accept rate
    report/                        test phase: report.md, results.csv, plots

A stage counts as finished only once its name is in ``stages.json``; that file is
rewritten with ``os.replace`` (fsynced) after the stage's outputs exist, so a crash or
Ctrl-C at any moment leaves either the old or the new list, never a half-written one.
Paths in it are relative to the run directory, so a copied or moved run directory can
be resumed, evaluated and served; absolute paths written by older versions are still
read (rebased onto the directory's new place when it moved).

One process at a time writes a directory: every command that writes into one (``qpo
run``, ``evaluate``, ``dataset build``, ``train``, ``augment``, ``serve feedback-dataset``,
the jobs, and the ``run_qpo`` / ``evaluate*`` / ``build_initial_dataset`` /
``augment_round`` Python API) holds ``.qpo.lock`` (an flock the kernel drops when the
process dies, however it dies); a second writer fails at once naming the holder
(docs/safety.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from qpo_ray.common.atomic import write_json_atomic, write_text_atomic
from qpo_ray.common.layout import RunFiles, RunLayout, read_json
from qpo_ray.config import Config, ConfigError, config_from_dict
from qpo_ray.run.pipeline import Stage, plan

CONFIG_FILE = "config.yaml"
STAGES_FILE = "stages.json"
LOCK_FILE = ".qpo.lock"
# A folder holding one of these is a run directory (lock_outputs looks for them).
RUN_DIR_MARKERS = (CONFIG_FILE, STAGES_FILE, LOCK_FILE)
# Per stage in stages.json: which of its outputs are paths relative to the run directory.
_RELATIVE_KEY = "_relative_paths"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


# Locks this process holds: root -> [owning thread id, depth]. The CLI and the Python
# API it calls both lock; one flock per process (a second open file would block itself).
_HELD: dict[Path, list[int]] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the block; fail at once (RunDirBusy, naming
    the holder's pid, host and start time) if another process, or another thread of this
    one, holds it; the same thread may nest it. An flock: the kernel releases it when the
    holder exits or is killed, so it never goes stale (on NFS it needs a server with lock
    support, as NFSv4 has)."""
    root = Path(path).resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(root)
        if held is not None and held[0] == me:
            held[1] += 1
            nested = True
        elif held is not None:
            raise RunDirBusy(f"{root} is in use by another thread of this process (pid "
                             f"{os.getpid()}); one writer at a time per run directory")
        else:
            nested = False
    if nested:
        try:
            yield root
        finally:
            with _HELD_GUARD:
                _HELD[root][1] -= 1
        return
    with _flock(root):
        with _HELD_GUARD:
            _HELD[root] = [me, 1]
        try:
            yield root
        finally:
            with _HELD_GUARD:
                del _HELD[root]


@contextlib.contextmanager
def _flock(root: Path) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                info = json.loads(holder)
                who = (f"pid {info['pid']} on host {info['host']}, started "
                       f"{info['started']}")
            except (ValueError, KeyError, TypeError):
                who = "another process (holder unknown)"
            raise RunDirBusy(f"{root} is in use by {who} ({lock_path}); wait for that "
                             "run to end or stop it, or pick another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the flock


def enclosing_run_dir(path: str | Path) -> Optional[Path]:
    """The run directory an output path lies in: the path itself or one of its two
    parent folders (<run>/loop1/checkpoint at most) holding a RUN_DIR_MARKERS file;
    None for an output outside any run directory."""
    p = Path(path).resolve()
    for folder in [p, *p.parents][:3]:
        if folder.is_dir() and any((folder / m).exists() for m in RUN_DIR_MARKERS):
            return folder
    return None


@contextlib.contextmanager
def lock_outputs(*outputs: Optional[str | Path],
                 workdir: Optional[str | Path] = None) -> Iterator[list[Path]]:
    """Lock `workdir` (when given) and the run directory each output path lies in (when
    one does): what a single command (`qpo train --out <run>/loop2`, ...) holds while it
    writes. Locked in sorted order; RunDirBusy as lock_run_dir."""
    roots = {Path(workdir).resolve()} if workdir is not None else set()
    roots |= {r for o in outputs if o is not None and (r := enclosing_run_dir(o)) is not None}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(lock_run_dir(root)) for root in sorted(roots)]


def stage_names(cfg: Config) -> list[str]:
    """Every stage of a run, in order, by name (qpo_ray.run.stages.plan)."""
    return [stage.name for stage in plan(cfg.loop.num_loops)]


class RunDir(RunLayout):
    """A run directory: its file names (RunLayout), saved config and stage markers."""

    # -- creation and resume ----------------------------------------------------------

    @classmethod
    def create(cls, cfg: Config) -> "RunDir":
        """Start a run in ``cfg.workdir``; an existing run there continues only if it
        was started with the same config (else the user meant another directory)."""
        run = cls(cfg.workdir)
        run.path.mkdir(parents=True, exist_ok=True)
        config_path = run.path / CONFIG_FILE
        if config_path.exists():
            saved = config_from_dict(yaml.safe_load(config_path.read_text())).to_dict()
            if saved != cfg.to_dict():
                raise ConfigError(
                    f"{config_path}: a run with a different config already lives in "
                    f"{run.path}; pick another --workdir, or continue it with "
                    f"`qpo run --resume {run.path}`")
        else:
            write_text_atomic(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return run

    @classmethod
    def load(cls, path: str | Path) -> tuple["RunDir", Config]:
        """Reopen a run directory and its saved config (for --resume)."""
        run = cls(path)
        config_path = run.path / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: {run.path} is not a run directory")
        data = yaml.safe_load(config_path.read_text())
        try:
            # The saved workdir may be relative to where the run started.
            cfg = config_from_dict({**data, "workdir": str(run.path)})
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: {exc}") from exc
        return run, cfg

    # -- stage markers ----------------------------------------------------------------

    def stages(self) -> dict[str, dict[str, Any]]:
        """Finished stages -> their outputs, with paths absolute under this directory."""
        path = self.path / STAGES_FILE
        raw = read_json(path) if path.exists() else {}
        return {name: self._absolute(outputs) for name, outputs in raw.items()}

    def is_done(self, stage: str) -> bool:
        return stage in self.stages()

    def outputs(self, stage: str) -> dict[str, Any]:
        return self.stages()[stage]

    def mark_done(self, stage: str, outputs: Optional[dict[str, Any]] = None) -> None:
        path = self.path / STAGES_FILE
        stages = read_json(path) if path.exists() else {}
        stages[stage] = self._relative(outputs or {})
        write_json_atomic(path, stages)

    def _relative(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """Paths inside the run directory as relative POSIX strings (listed under
        _RELATIVE_KEY so that reading them back never guesses)."""
        out: dict[str, Any] = {}
        relative = []
        for key, value in outputs.items():
            if isinstance(value, (str, Path)) and Path(value).is_absolute():
                try:
                    value = Path(value).resolve().relative_to(self.path).as_posix()
                    relative.append(key)
                except ValueError:
                    value = str(value)  # outside the run directory: kept as given
            out[key] = str(value) if isinstance(value, Path) else value
        if relative:
            out[_RELATIVE_KEY] = relative
        return out

    def _absolute(self, outputs: dict[str, Any]) -> dict[str, Any]:
        out = dict(outputs)
        relative = out.pop(_RELATIVE_KEY, [])
        for key in relative:
            out[key] = str(self.path / out[key])
        for key, value in out.items():
            if key in relative:
                continue
            if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
                out[key] = str(self._rebase(Path(value)))
        return out

    def _rebase(self, old: Path) -> Path:
        """An absolute path from an older stages.json whose run directory has moved: the
        longest tail of it that exists under this directory (else the path unchanged)."""
        parts = old.parts[1:]
        for start in range(len(parts)):
            candidate = self.path.joinpath(*parts[start:])
            if candidate.exists():
                return candidate
        return old

    # -- file names (the rest in RunLayout) -----------------------------------------

    def final_dataset_path(self, cfg: Config) -> Path:
        return self.dataset_path(cfg.loop.num_loops)

    def policy_dir(self, loop: Optional[int] = None) -> Path:
        """The checkpoint of loop `loop` (default: the last finished one)."""
        trained = self.trained_loops()
        if not trained:
            raise FileNotFoundError(f"{self.path}: no finished training stage (stages.json)")
        loop = trained[-1] if loop is None else loop
        return Path(self.outputs(Stage("train", loop).name)["checkpoint_dir"])

    def trained_loops(self) -> list[int]:
        stages = [Stage.parse(name) for name in self.stages()]
        return sorted(s.loop for s in stages if s.kind == "train")

    def files(self) -> RunFiles:
        """What the parts below the plumbing read of this run (qpo_ray.common.layout)."""
        return RunFiles(self.path, {t: self.policy_dir(t) for t in self.trained_loops()})

