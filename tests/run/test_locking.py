"""Every command that writes into a run directory holds its lock (.qpo.lock): with a
real process holding it (as a running `qpo run` does), each `qpo` command, the job
scripts and the Python API fail at once naming the holder, and write nothing there."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpo_ray.run.rundir import RunDirBusy

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

HOLDER = """
import sys, time
from qpo_ray.run.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def _manifest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".qpo.lock"}


@pytest.fixture
def held_run(tmp_path):
    """A run directory (config.yaml, stages.json, a dataset) whose lock another process
    holds; yields (directory, holder pid)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text("seed: 0\n")
    (workdir / "stages.json").write_text("{}")
    (workdir / "dataset_1.parquet").write_bytes(b"not read: the lock comes first")
    holder = subprocess.Popen([PY, "-c", HOLDER, str(workdir)], env=_env(),
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"held"
        yield workdir, holder.pid
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def _commands(w: Path) -> dict[str, list[str]]:
    qpo = ["-m", "qpo_ray.cli"]
    return {
        "evaluate --run-dir": [*qpo, "evaluate", "--run-dir", str(w), "--add", "manual"],
        "evaluate --policy": [*qpo, "evaluate", "--workdir", str(w), "--policy", str(w)],
        "dataset build": [*qpo, "dataset", "build", "--workdir", str(w)],
        "dataset build --out": [*qpo, "dataset", "build", "--out", str(w / "d0.parquet")],
        "train": [*qpo, "train", "--dataset", str(w / "dataset_1.parquet"),
                  "--out", str(w / "loop1")],
        "augment": [*qpo, "augment", "--policy", str(w / "loop1"), "--dataset",
                    str(w / "dataset_1.parquet"), "--out", str(w / "dataset_2.parquet")],
        "serve feedback-dataset": [*qpo, "serve", "feedback-dataset", "--out",
                                   str(w / "dataset_2.parquet"), "--into",
                                   str(w / "dataset_1.parquet")],
        "jobs/evaluate.py": ["jobs/evaluate.py", "--run-dir", str(w)],
        "jobs/train.py": ["jobs/train.py", "--dataset", str(w / "dataset_1.parquet"),
                          "--out", str(w / "loop2")],
    }


def test_every_writing_command_refuses_a_held_run_dir_naming_the_holder(held_run):
    workdir, pid = held_run
    before = _manifest(workdir)
    for name, args in _commands(workdir).items():
        start = time.monotonic()
        proc = subprocess.run([PY, *args, "--profile", "cpu-demo"], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        assert f"is in use by pid {pid} on host" in proc.stderr, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, name
        assert time.monotonic() - start < 120, name
    assert _manifest(workdir) == before  # nothing was written there
    assert sorted(p.name for p in workdir.iterdir()) == [
        ".qpo.lock", "config.yaml", "dataset_1.parquet", "stages.json"]


def test_python_api_refuses_a_held_run_dir(held_run, tiny_policy):
    from qpo_ray.config import load_config
    from qpo_ray.run.loop import (augment_round, build_initial_dataset, evaluate,
                                  evaluate_tracked, run_qpo)

    workdir, pid = held_run
    cfg = load_config("cpu-demo", [f"workdir={workdir}", *tiny_policy])
    calls = {
        "run_qpo": lambda: run_qpo(cfg),
        "run_qpo resume": lambda: run_qpo(None, resume_dir=str(workdir)),
        "evaluate": lambda: evaluate(cfg, run_dir=str(workdir)),
        "evaluate_tracked": lambda: evaluate_tracked(cfg, policy_dir=str(workdir)),
        "build_initial_dataset": lambda: build_initial_dataset(cfg),
        "augment_round": lambda: augment_round(cfg, workdir, workdir / "dataset_1.parquet", 1,
                                               workdir / "dataset_2.parquet"),
    }
    for name, call in calls.items():
        with pytest.raises(RunDirBusy, match=f"in use by pid {pid} on host"):
            call()
