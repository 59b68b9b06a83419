"""The test report is replaced whole: `qpo evaluate --add` killed (SIGKILL, no cleanup)
while it writes the new report's files leaves the earlier report byte for byte as it was,
and the next `--add` completes it. Real CLI processes, the embedded target on the
transformers backend, a real policy directory, rotten_tomatoes from the shared data."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from qpo_ray.common.faults import FAULT_ENV

REPO = Path(__file__).resolve().parents[2]

PROFILE = {
    "seed": 3,
    "task": {"name": "rotten_tomatoes", "collection_fraction": 0.01, "max_test_queries": 4,
             "dev_queries": 2},
    "prompts": {"methods": ["manual", "generic"]},
    "target": {"backend": "transformers", "model": "smollm2-135m-instruct", "batch_size": 16,
               "dtype": "float32"},
    "evaluation": {"num_actors": 1, "batch_size_pairs": 32},
    "test": {"methods": ["manual"], "decoding": "greedy"},
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("RAY_ADDRESS", None)  # a private local cluster per command
    return env


def _manifest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _evaluate(profile: Path, workdir: Path, policy: Path, *extra: str,
              **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qpo_ray.cli", "evaluate", "--profile",
                           str(profile), "--workdir", str(workdir), "--policy", str(policy),
                           *extra], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=900)


def test_evaluate_add_killed_mid_write_leaves_the_earlier_report_whole(tmp_path, tiny_policy):
    from qpo_ray.config import load_config
    from qpo_ray.policy import QPOPolicy

    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    workdir, policy = tmp_path / "run", tmp_path / "policy"
    QPOPolicy.from_backbone(load_config(str(profile), tiny_policy).policy).save(policy)

    first = _evaluate(profile, workdir, policy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = workdir / "report"
    before = _manifest(report)
    assert {"report.md", "results.csv", "predictions.parquet", "selection.json",
            "examples.csv", "plots/accuracy_per_loop.png"} <= set(before)

    # Killed after predictions.parquet of the new report is written, before the rest.
    killed = _evaluate(profile, workdir, policy, "--add", "manual", "qpo_greedy",
                       **{FAULT_ENV: "evaluate:write"})
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "target cost of the methods added last" not in killed.stdout  # it did die there
    assert _manifest(report) == before  # the old report, byte for byte
    strays = sorted(p.name for p in workdir.glob(".report.*.tmp"))  # the killed write's
    assert len(strays) <= 1

    done = _evaluate(profile, workdir, policy, "--add", "manual", "qpo_greedy")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = pd.read_csv(report / "results.csv")
    assert set(results["method"]) == {"manual", "qpo_greedy"}
    assert "qpo_greedy" in (report / "report.md").read_text()
    predictions = pd.read_parquet(report / "predictions.parquet")
    assert set(predictions["method"]) == set(results["method"])
    # A clean write leaves no temporary sibling of its own.
    assert sorted(p.name for p in workdir.glob(".report.*.tmp")) == strays
