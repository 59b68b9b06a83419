"""Run directories that survive crashes, copies and concurrent use, on real processes
and files: a policy save killed at random moments leaves a whole policy, a second
`qpo run` on a locked directory fails at once naming the holder, and a run directory
copied elsewhere still finds its outputs (stages.json paths are relative)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qpo_ray.run.rundir import RunDir, RunDirBusy, lock_run_dir

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
QPO = str(Path(sys.executable).parent / "qpo")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _manifest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- atomic policy saves ------------------------------------------------------------------

SAVER = """
import sys, torch
from qpo_ray.config import PolicyConfig
from qpo_ray.policy import QPOPolicy
backbone, target, ref_a, ref_b = sys.argv[1:5]
torch.manual_seed(0)
a = QPOPolicy.from_backbone(PolicyConfig(backbone=backbone, backbone_num_layers=1, max_prompt_tokens=8))
torch.manual_seed(1)
b = QPOPolicy.from_backbone(PolicyConfig(backbone=backbone, backbone_num_layers=1, max_prompt_tokens=9))
a.save(ref_a); b.save(ref_b); a.save(target)
print("saving", flush=True)
while True:
    b.save(target)
    a.save(target)
"""


def test_a_policy_save_killed_anywhere_leaves_a_whole_policy(tmp_path, tiny_model_dir):
    """A process rewrites one policy directory with two different policies in turn and
    is SIGKILLed at several moments: the directory must always hold exactly one of
    the two, byte for byte (in-place writes leave a mixture or a truncated file)."""
    from qpo_ray.policy import QPOPolicy

    target, ref_a, ref_b = tmp_path / "policy", tmp_path / "a", tmp_path / "b"
    for delay in (0.2, 1.0):  # inside the first save, and some saves later
        proc = subprocess.Popen([PY, "-c", SAVER, str(tiny_model_dir), str(target), str(ref_a),
                                 str(ref_b)], env=_env(), stdout=subprocess.PIPE,
                                start_new_session=True)
        try:
            for line in proc.stdout:  # libraries print too
                if line.strip() == b"saving":
                    break
            else:
                pytest.fail("the saver never started")
            time.sleep(delay)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started
            proc.wait()
        got = _manifest(target)
        assert got in (_manifest(ref_a), _manifest(ref_b)), f"mixed policy after {delay} s"
    QPOPolicy.load(target)  # and it loads


def test_save_refuses_to_replace_a_directory_that_is_not_a_policy(tmp_path, tiny_model_dir):
    from qpo_ray.config import PolicyConfig
    from qpo_ray.policy import QPOPolicy

    (tmp_path / "notes.txt").write_text("mine")
    policy = QPOPolicy.from_backbone(PolicyConfig(backbone=str(tiny_model_dir),
                                                  backbone_num_layers=1))
    with pytest.raises(ValueError, match="not a policy directory"):
        policy.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- one process per run directory -----------------------------------------------------

HOLDER = """
import sys, time
from qpo_ray.run.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([PY, "-c", HOLDER, str(workdir)], env=_env(),
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"held"
        for args in (["run", "--workdir", str(workdir)], ["run", "--resume", str(workdir)]):
            start = time.monotonic()
            proc = subprocess.run([QPO, *args], env=_env(), capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert f"pid {holder.pid}" in proc.stderr and "host" in proc.stderr
            assert "started 20" in proc.stderr  # the holder's start time
            assert time.monotonic() - start < 60
        # Nothing was started in the directory by the refused runs.
        assert sorted(p.name for p in workdir.iterdir()) == [".qpo.lock"]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory is free again.
    with lock_run_dir(workdir):
        with lock_run_dir(workdir):  # the same thread nests (the CLI, then the API it calls)
            pass
        errors = []

        def other_thread():
            try:
                with lock_run_dir(workdir):
                    pass
            except RunDirBusy as exc:
                errors.append(str(exc))
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert errors and "another thread" in errors[0]  # a second writer is refused
    with lock_run_dir(workdir):  # the nested exit did not keep it
        pass


# -- stages.json paths relative to the run directory -----------------------------------

def _fake_run(root: Path, tiny_policy: list[str]) -> RunDir:
    from qpo_ray.config import load_config
    from qpo_ray.policy import QPOPolicy

    cfg = load_config("cpu-demo", [f"workdir={root}", *tiny_policy])
    run = RunDir.create(cfg)
    QPOPolicy.from_backbone(cfg.policy).save(run.train_dir(1) / "policy")
    (run.train_dir(1) / "metrics.json").write_text("[]")
    run.mark_done("train_1", {"checkpoint_dir": str(run.train_dir(1) / "policy"),
                              "metrics": str(run.train_dir(1) / "metrics.json"),
                              "outside": "/etc/hostname", "wall_s": 1.5})
    return run


def test_a_copied_run_directory_finds_its_own_outputs(tmp_path, tiny_policy):
    from qpo_ray.policy import QPOPolicy

    run = _fake_run(tmp_path / "here", tiny_policy)
    saved = json.loads((run.path / "stages.json").read_text())["train_1"]
    assert saved["checkpoint_dir"] == "loop1/policy" and saved["metrics"] == "loop1/metrics.json"
    assert saved["outside"] == "/etc/hostname" and saved["wall_s"] == 1.5

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run.path, moved)
    shutil.rmtree(run.path)  # the original is gone: nothing may point into it
    copy = RunDir(moved)
    assert copy.policy_dir() == moved / "loop1" / "policy"
    assert copy.outputs("train_1")["metrics"] == str(moved / "loop1" / "metrics.json")
    assert copy.outputs("train_1")["outside"] == "/etc/hostname"
    QPOPolicy.load(copy.policy_dir())


def test_old_absolute_stages_json_is_still_read_and_rebased(tmp_path, tiny_policy):
    run = _fake_run(tmp_path / "old", tiny_policy)
    # What earlier versions wrote: absolute paths.
    (run.path / "stages.json").write_text(json.dumps({"train_1": {
        "checkpoint_dir": str(run.path / "loop1" / "policy"),
        "metrics": str(run.path / "loop1" / "metrics.json")}}))
    assert RunDir(run.path).policy_dir() == run.path / "loop1" / "policy"
    moved = tmp_path / "new-place"
    shutil.move(str(run.path), moved)
    assert RunDir(moved).policy_dir() == moved / "loop1" / "policy"
