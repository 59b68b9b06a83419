"""The multi-loop QPO run end to end on real components (Ray, Ray Data, Ray Train, the
embedded target on transformers, MLflow's sqlite store), at tiny sizes, through the
`qpo` CLI in subprocesses: one uninterrupted run (its console: progress lines, Ray's
logs in the run directory), and one SIGKILLed at every stage boundary and inside the
longest stages, resumed each time (once with a `--set`), which must end with the same
dataset and MLflow state."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qpo_ray.config import load_config
from qpo_ray.data.io import read_dataset
from qpo_ray.common.faults import FAULT_ENV
from qpo_ray.policy.model import POLICY_FILE
from qpo_ray.prompts import load_collection
from qpo_ray.run.stages.test import report_dir
from qpo_ray.run.rundir import RunDir, stage_names
from qpo_ray.run.tracking import TRACKING_FILE

from tests.tiny_run import REPO, qpo_cli, qpo_env

def console_lines_per_stage(stdout: str) -> dict[str, int]:
    """Lines printed from a stage's start line to its done line."""
    counts: dict[str, int] = {}
    stage = None
    for line in stdout.splitlines():
        if m := re.match(r"\[qpo\] stage (\S+) \.\.\.$", line):
            stage = m.group(1)
        if stage is not None:
            counts[stage] = counts.get(stage, 0) + 1
        if re.match(r"\[qpo\] stage \S+ done in", line):
            stage = None
    return counts


def test_console_shows_progress_per_stage_and_keeps_ray_logs_in_the_run_dir(finished_run,
                                                                            profile):
    """stdout is a pipe here, as in a log file: progress comes as lines, a few per stage."""
    workdir, stdout, stderr = finished_run
    cfg = load_config(str(profile), [f"workdir={workdir}"])
    counts = console_lines_per_stage(stdout)
    print("console lines per stage:", counts, "stderr lines:", len(stderr.splitlines()))
    assert list(counts) == stage_names(cfg)
    assert max(counts.values()) <= 25, counts  # a screenful per stage at most
    # Training: steps, loss, samples/s (and ETA while it runs) in a non-terminal log.
    for loop in (1, 2):
        assert re.search(rf"^\[qpo\] train_{loop}: \d+/3 steps, loss \d[\d.e+-]*, "
                         r"samples/s \d[\d.e+-]*, ", stdout, re.M), stdout
    assert re.search(r"^\[qpo\] augment_1: generating: 5/5 prompts", stdout, re.M)
    # ... and what the pass paid to start its engines (they stop when it ends).
    assert re.search(r"^\[qpo\] step0: scoring: 21/21 pairs, engines [12] started in "
                     r"<= \d+ s, ", stdout, re.M), stdout
    # The target's dtype and the training precision (results differ between dtypes).
    assert "[qpo] target smollm2-135m-instruct on transformers in float32\n" in stdout
    assert "[qpo] policy training in float32\n" in stdout  # the profile's default: no
    # Target engines start once per scoring stage and stop when it ends (training or the
    # end of the run comes next); the test phase's dev and test calls share them.
    assert "[qpo] step0: target engines stopped (started once, 1 scoring call)\n" in stdout
    assert "[qpo] augment_1: target engines stopped (started once, 1 scoring call)\n" in stdout
    assert "[qpo] test: target engines stopped (started once, 2 scoring calls)\n" in stdout
    assert not re.search(r"^\[qpo\] train_\d: target engines", stdout, re.M)
    # Ray's own progress blocks and logs are in the run directory, not on the console.
    assert "logging_progress" not in stderr + stdout
    library_log = (workdir / "logs" / "libraries.log").read_text()
    assert "Started a local Ray instance" in library_log
    # The scoring actors asked Ray for memory: no "consider setting memory=" warning.
    assert "consider setting `memory=" not in library_log + stderr


def test_run_goes_through_every_stage_and_prints_the_report(finished_run, profile):
    workdir, stdout, _ = finished_run
    run = RunDir(workdir)
    cfg = load_config(str(profile), [f"workdir={workdir}"])
    assert list(run.stages()) == stage_names(cfg)
    assert "| qpo |" in stdout and "| manual |" in stdout and "best_single" in stdout
    assert f"run directory: {run.path}" in stdout

    step0, scale = read_dataset(run.step0_path())
    assert len(step0) == 7 * 3 and scale is not None
    d1, scale1 = read_dataset(run.dataset_path(1))
    # The expert filter keeps the top third of the reward range, never everything.
    assert 0 < len(d1) < len(step0)
    assert (d1["reward"] >= 100 * cfg.dataset.expert_fraction - 1e-9).all()

    # Round 1: queries sampled with repeats, prompts from the policy, R_task = the mean
    # accuracy of the round, rewards on the STORED Step-0 scale, expert cut applied.
    rows, rows_scale = read_dataset(run.dataset_path(2).with_name("dataset_2.rows.parquet"))
    assert rows_scale == scale
    assert len(rows) == cfg.loop.augment_queries_per_round
    assert (rows["loop"] == 1).all() and (rows["source"] == "policy").all()
    assert np.allclose(rows["r_task"], rows["correct"].astype(float).mean())
    expected = ((rows["r_raw"] - scale.min) / (scale.max - scale.min) * 100).clip(0, 100)
    assert np.allclose(rows["reward"], expected)
    d2, scale2 = read_dataset(run.dataset_path(2))
    kept = rows[rows["reward"] >= 100 * cfg.dataset.expert_fraction]
    assert scale2 == scale1 and len(d2) == len(d1) + len(kept)
    pd.testing.assert_frame_equal(d2.iloc[: len(d1)].reset_index(drop=True), d1)
    info = json.loads(run.dataset_path(2).with_name("dataset_2.round.json").read_text())
    assert info["rows_added"] == len(kept) and info["usage"]["calls"] > 0

    # Loop 2 continued from loop 1's checkpoint; both are loadable policy directories.
    assert (run.policy_dir(1) / POLICY_FILE).exists()
    assert (run.policy_dir(2) / POLICY_FILE).exists()

    results = pd.read_csv(report_dir(cfg, run) / "results.csv")
    methods = set(results["method"])
    assert {"qpo", "qpo_loop1", "qpo_loop2", "qpo_greedy", "manual", "best_single", "router",
            "best_single_oracle", "nearest_neighbour"} <= methods
    assert (results["n"] == 6).all()
    assert ((results["ci_low"] <= results["accuracy"]) &
            (results["accuracy"] <= results["ci_high"])).all()
    table = results.set_index("method")
    singles = results[results["method"].str.startswith("single:")]
    assert table.loc["best_single_oracle", "accuracy"] == singles["accuracy"].max()
    assert len(singles) == 7
    # best_single is the best Step-0 prompt (all prompts scored on the same queries)
    r_task = step0.groupby("prompt_id")["r_task"].first()
    assert r_task[table.loc["best_single", "prompt_id"]] == r_task.max()
    assert step0.groupby("prompt_id")["query_id"].apply(frozenset).nunique() == 1
    assert not np.isnan(table.loc["qpo", "diff_vs_manual"])
    assert "vs best_single" in stdout and "p=" in stdout and "upper bound" in stdout

    # The loop and decoding were chosen on the dev split, never on test queries.
    selection = json.loads((report_dir(cfg, run) / "selection.json").read_text())
    assert selection["loop"] in (1, 2) and selection["chosen_decoding"] in ("greedy", "rank")
    assert set(selection["dev_accuracy"]) == {f"qpo_loop{t}/{d}" for t in (1, 2)
                                              for d in ("greedy", "rank")}
    pred = pd.read_parquet(report_dir(cfg, run) / "predictions.parquet")
    assert {"split", "method", "query_id", "prompt", "prediction", "correct"} <= set(pred.columns)
    dev_ids, test_ids = (set(pred[pred["split"] == s]["query_id"]) for s in ("dev", "test"))
    assert len(dev_ids) == 4 and len(test_ids) == 6 and not dev_ids & test_ids
    assert not dev_ids & set(step0["query_id"]) and not dev_ids & set(rows["query_id"])
    assert len(pred[(pred["split"] == "test") & (pred["method"] == "qpo")]) == 6
    assert (report_dir(cfg, run) / "plots" / "accuracy_per_loop.png").stat().st_size > 0
    # Fixed prompts are shown with their text beside their id.
    manual = table.loc["manual"]
    assert f"| {manual['prompt'][:60]}" in stdout and f"({manual['prompt_id']}) |" in stdout


def test_mlflow_store_has_parent_nested_runs_datasets_and_model_versions(finished_run):
    from mlflow import MlflowClient

    workdir = finished_run[0]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qpo")
    assert exp.artifact_location.startswith((workdir / "mlartifacts").as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[workdir.name]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test/0shot/qpo/n"] == 6
    for loop in (1, 2):
        run = runs[f"loop-{loop}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.inputs.dataset_inputs[0].dataset.name == f"dataset_{loop}"
        assert {"train/loss", "data/rows", "data/reward/mean", "filter/accept_rate",
                "target/calls", "target/engine_seconds"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"policy", "plots"} <= artifacts
    assert "augment/r_task" in runs["loop-2"].data.metrics
    final = client.get_model_version_by_alias("qpo-policy", "final")
    assert final.run_id == runs["loop-2"].info.run_id
    assert client.get_model_version_by_alias("qpo-policy", "latest").version == final.version
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report", "config.yaml"}
    # The test stage's dev choice is the champion, tagged with how it was decoded.
    selection = json.loads((workdir / "report" / "selection.json").read_text())
    champion = client.get_model_version_by_alias("qpo-policy", "champion")
    assert champion.run_id == runs[f"loop-{selection['loop']}"].info.run_id
    assert champion.tags["qpo.decoding"] == selection["chosen_decoding"]
    assert champion.tags["qpo.run_id"] == parent.info.run_id
    assert float(champion.tags["qpo.dev_accuracy"]) == pytest.approx(
        selection["dev_accuracy"][f"qpo_loop{selection['loop']}/{selection['chosen_decoding']}"])


# Where the resume tests SIGKILL `qpo run` (QPO_FAULT_AT, see qpo_ray.common.faults), in order,
# each resumed run killed at the next point. Every stage boundary: after the stage is
# marked done but before MLflow logged it ("done"), or after MLflow logged it (and for
# train_<t> registered its version, for test promoted the champion) but before
# tracking.json says so ("logged").
# (Both kinds of boundary, in Step 0, a training stage, the augmentation and the test;
# the filter's and train_2's boundaries are the same code paths, killed in ANYWHERE.)
BOUNDARIES = ["step0:done", "train_1:logged", "augment_1:done", "test:done", "test:logged"]
# The same, plus inside the three longest stages ("score": a batch scored but not yet
# received; "train": mid-epoch). Each of these redoes most of a stage: selected only with
# `-m crash_mid_stage` (conftest.py), as CI's time budget has no room for it.
ANYWHERE = ["step0:score", "step0:done", "filter:logged", "train_1:train", "train_1:logged",
            "augment_1:score", "augment_1:done", "train_2:logged", "test:done", "test:logged"]


def _content_hash(frame: pd.DataFrame) -> str:
    # str() of a float is its shortest exact repr; lists become their repr too.
    return hashlib.sha256(frame.astype(str).to_csv(index=False).encode()).hexdigest()


def _run_until_killed(args: list[str], point: str, workdir: Path) -> None:
    # Output to a file, not a pipe: Ray processes that outlive the driver would hold a
    # pipe open.
    log = workdir.with_name(f"killed-at-{point.replace(':', '-')}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(qpo_cli(*args), env={**qpo_env(), FAULT_ENV: point}, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group this test started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, \
        f"{point}: rc {proc.returncode}\n{log.read_text()[-4000:]}"
    stage, where = point.split(":")
    done = RunDir(workdir).stages()
    logged = json.loads((workdir / TRACKING_FILE).read_text()).get("logged_stages", [])
    # Killed exactly where asked: inside the stage, or between its marker and MLflow.
    assert (stage in done) == (where in ("done", "logged")), (point, list(done))
    assert stage not in logged, (point, logged)


def _check_resume_set_is_refused(workdir: Path) -> None:
    """--set on resume: a change contradicting finished stages is refused, naming them."""
    start = time.perf_counter()
    refused = subprocess.run(qpo_cli("run", "--resume", str(workdir), "--set",
                                  "dataset.expert_fraction=0.5"), env=qpo_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and time.perf_counter() - start < 30
    assert "dataset.expert_fraction" in refused.stderr
    assert "'filter', 'train_1'" in refused.stderr, refused.stderr


@pytest.mark.timeout(2400)  # a whole run in up to ten processes, each starting Ray
@pytest.mark.parametrize("kill_points", [
    pytest.param(BOUNDARIES, id="boundaries"),
    pytest.param(ANYWHERE, id="anywhere", marks=pytest.mark.crash_mid_stage)])
def test_killed_run_resumes_to_the_same_dataset_and_mlflow(finished_run, profile, tmp_path,
                                                          kill_points):
    """`qpo run` SIGKILLed at each of `kill_points` in turn, each time continued with
    `qpo run --resume`: the same final dataset as the uninterrupted run, and in MLflow one
    parent run, one nested run and one model version per loop, no metric point twice."""
    from mlflow import MlflowClient

    workdir = tmp_path / "run"
    args = ["run", "--profile", str(profile), "--workdir", str(workdir)]
    for point in kill_points:
        _run_until_killed(args, point, workdir)
        args = ["run", "--resume", str(workdir)]
        if point == "train_1:logged":
            _check_resume_set_is_refused(workdir)
            # ... one for a stage still to run (the test's manual prompt, by index) is applied.
            args += ["--set", "prompts.manual_prompt_id=1"]
    resumed = subprocess.run(qpo_cli(*args), env=qpo_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "resuming" in resumed.stdout
    assert list(RunDir(workdir).stages()) == list(RunDir(finished_run[0]).stages())
    logs = "".join(p.read_text() for p in workdir.parent.glob("killed-at-*.log"))
    assert "[qpo] resume: prompts.manual_prompt_id: None -> 1" in logs
    _, saved = RunDir.load(workdir)
    assert saved.prompts.manual_prompt_id == 1
    results = pd.read_csv(workdir / "report" / "results.csv").set_index("method")
    collection = load_collection(saved.prompts, "rotten_tomatoes")
    assert results.loc["manual", "prompt_id"] == collection[1].id != collection[0].id

    expected, expected_scale = read_dataset(RunDir(finished_run[0]).dataset_path(2))
    got, got_scale = read_dataset(RunDir(workdir).dataset_path(2))
    assert got_scale == expected_scale
    pd.testing.assert_frame_equal(got, expected)
    assert len(got) == len(expected) and _content_hash(got) == _content_hash(expected)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qpo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    loop_runs = {r.data.tags["qpo.loop"]: r.info.run_id for r in runs
                 if "mlflow.parentRunId" in r.data.tags}
    assert len(runs) == 3 and sorted(loop_runs) == ["1", "2"], [r.info.run_name for r in runs]
    versions = {v.tags["qpo.loop"]: v for v in client.search_model_versions("name = 'qpo-policy'")}
    assert len(client.search_model_versions("name = 'qpo-policy'")) == 2
    assert {t: versions[t].run_id for t in versions} == loop_runs
    assert client.get_model_version_by_alias("qpo-policy", "latest").version == \
        client.get_model_version_by_alias("qpo-policy", "final").version == versions["2"].version
    chosen = json.loads((workdir / "report" / "selection.json").read_text())["loop"]
    assert client.get_model_version_by_alias("qpo-policy", "champion").version == \
        versions[str(chosen)].version
    assert json.loads((workdir / TRACKING_FILE).read_text())["champion_version"] == \
        str(versions[str(chosen)].version)
    for run in runs:
        for key in run.data.metrics:
            steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert max(steps.values()) == 1, (run.info.run_name, key, steps)


def test_run_refuses_a_workdir_holding_another_config(finished_run, profile):
    workdir = finished_run[0]
    proc = subprocess.run(qpo_cli("run", "--profile", str(profile), "--workdir", str(workdir),
                               "--set", "seed=99"),
                          env=qpo_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "--resume" in proc.stderr
