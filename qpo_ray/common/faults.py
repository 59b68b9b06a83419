"""Fault injection for the crash-anywhere tests (tests/run/test_loop.py,
tests/testphase/test_report_atomic.py): with
``QPO_FAULT_AT=<stage>:<point>`` in its environment, `qpo run` SIGKILLs its own driver
process at that point, the way `kill -9`, the OOM killer or a lost head node would: no
`finally`, no atexit, no flush. Unset (always, outside that test), nothing happens.

    <stage>:done     the stage's outputs are written and marked in stages.json; MLflow
                     has not logged them yet
    <stage>:logged   MLflow holds the stage's metrics (and, for train_<t>, the model
                     version); tracking.json does not yet say so
    <stage>:score    mid-scoring (Step 0, an augmentation round, the test phase): a
                     scoring actor has scored a batch the driver has not received
    <stage>:train    mid-epoch: the training worker has taken its first optimizer step
    <stage>:write    mid-write of the test report (`test`, or `evaluate` for `qpo
                     evaluate`): some of its files are written, others not yet

The loop names the stage it is in (`enter_stage`); a point reached inside a Ray worker
is armed on the driver, which hands the worker its own pid to kill. That only works
where driver and worker share a machine (the test's single-machine Ray).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

FAULT_ENV = "QPO_FAULT_AT"
POINTS = ("done", "logged", "score", "train", "write")

_stage: Optional[str] = None  # the stage the driver is running or logging


def _target() -> Optional[tuple[str, str]]:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    stage, _, point = spec.rpartition(":")
    if not stage or point not in POINTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>:<point>, the point one "
                         f"of {', '.join(POINTS)}")
    return stage, point


def enter_stage(name: str) -> None:
    """The loop is at stage `name` now (a bad QPO_FAULT_AT fails here, before any work)."""
    global _stage
    _target()
    _stage = name


def armed_pid(point: str) -> Optional[int]:
    """This (driver) process's pid when QPO_FAULT_AT names the current stage and `point`;
    None otherwise. Given to a worker, which calls `kill` with it."""
    return os.getpid() if _target() == (_stage, point) else None


def at(point: str) -> None:
    """Driver side: die here if QPO_FAULT_AT names the current stage and `point`."""
    kill(armed_pid(point))


def kill(pid: Optional[int]) -> None:
    """SIGKILL `pid` (None: do nothing); a process killing itself never returns."""
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL)
    if pid == os.getpid():
        time.sleep(60)  # the signal is delivered before this returns; never reached
