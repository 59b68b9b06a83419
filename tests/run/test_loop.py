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
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qpo_ray.config import load_config
from qpo_ray.data.io import read_dataset
from qpo_ray.common.faults import FAULT_ENV
from qpo_ray.policy.model import POLICY_FILE
from qpo_ray.prompts import load_collection
from qpo_ray.run.stages.test import report_dir
from qpo_ray.run.rundir import RunDir, stage_names
from qpo_ray.run.tracking import TRACKING_FILE

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "seed": 3,
    "task": {"name": "rotten_tomatoes", "collection_fraction": 0.01, "max_test_queries": 6,
             "dev_queries": 4},
    "prompts": {"methods": ["manual", "generic"]},
    # float32 on every CI machine: `auto` would take bf16 where the CPU has it, and the
    # transformers backend's bf16 rounds near ties differently in other batches, so the
    # rows `qpo evaluate --add` redoes would not repeat the run's (tests/test_device.py
    # covers `auto`).
    "target": {"backend": "transformers", "model": "smollm2-135m-instruct", "batch_size": 16,
               "dtype": "float32"},
    "evaluation": {"num_actors": 1, "batch_size_pairs": 32},
    "dataset": {"prompts_per_group": 7, "queries_per_group": 3, "zero_shot_penalty": "nll",
                "query_reward": "gold"},
    "policy": {"backbone": "smollm2-135m-instruct", "backbone_num_layers": 1,
               "max_query_tokens": 24, "max_prompt_tokens": 10},
    "training": {"num_workers": 1, "batch_size_global": 4, "lr_first_loop": 1.0e-3,
                 "epochs_first_loop": 1, "epochs_later_loops": 1, "max_steps_per_loop": 3},
    "loop": {"num_loops": 2, "augment_queries_per_round": 5},
    "test": {"methods": ["qpo", "qpo_greedy", "manual", "best_single", "router",
                         "nearest_neighbour", "best_single_oracle"],
             "decoding": "dev", "rank_collection_prompts": 3, "rank_samples": 1,
             "num_example_prompts": 2},
}


def _env() -> dict[str, str]:
    # QPO_PROGRESS_EVERY_S=0: a progress line per update (the test reads them back).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0",
               TOKENIZERS_PARALLELISM="false", QPO_PROGRESS_EVERY_S="0")
    env.pop("RAY_ADDRESS", None)  # a private local cluster per run
    return env


def _qpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "qpo_ray.cli", *args]


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def finished_run(profile, tmp_path_factory) -> tuple[Path, str, str]:
    """One uninterrupted `qpo run` (the README's main command) on the tiny profile."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run(_qpo("run", "--profile", str(profile), "--workdir", str(workdir)),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return workdir, proc.stdout, proc.stderr


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
        proc = subprocess.Popen(_qpo(*args), env={**_env(), FAULT_ENV: point}, cwd=REPO,
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
    refused = subprocess.run(_qpo("run", "--resume", str(workdir), "--set",
                                  "dataset.expert_fraction=0.5"), env=_env(), cwd=REPO,
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
    resumed = subprocess.run(_qpo(*args), env=_env(), cwd=REPO, capture_output=True,
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
    proc = subprocess.run(_qpo("run", "--profile", str(profile), "--workdir", str(workdir),
                               "--set", "seed=99"),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "--resume" in proc.stderr


def test_evaluate_trains_the_ablations_and_labels_another_target(finished_run, profile,
                                                                ray_cluster, tiny_model_dir):
    """`qpo evaluate --target ...` with the SFT and no-MLA ablations (trained on D_0),
    logged to MLflow as a run nested under the evaluated run."""
    from mlflow import MlflowClient

    from qpo_ray.run.loop import evaluate_tracked
    from qpo_ray.policy import QPOPolicy

    workdir = finished_run[0]
    other_target = str(tiny_model_dir)  # same weights, another name: a different target
    cfg = load_config(str(profile), [f"workdir={workdir}", "test.methods=[sft, qpo_no_mla]",
                                     f"target.model={other_target}"])
    report, logged = evaluate_tracked(cfg, run_dir=str(workdir))
    assert f"target: {other_target}" in report
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = json.loads((workdir / "tracking.json").read_text())["parent_run_id"]
    nested = [r for r in client.search_runs([client.get_experiment_by_name("qpo").experiment_id])
              if r.data.tags.get("qpo.evaluation")]
    assert len(nested) == 1 and nested[0].data.tags["mlflow.parentRunId"] == parent
    assert f"nested run {nested[0].info.run_id}" in logged
    assert {"test/0shot/sft/accuracy", "test/0shot/qpo_no_mla/accuracy"} <= set(
        nested[0].data.metrics)
    out_dirs = [p for p in workdir.glob("report-*") if (p / "results.csv").exists()]
    assert len(out_dirs) == 1
    results = pd.read_csv(out_dirs[0] / "results.csv")
    assert set(results["method"]) == {"sft", "qpo_no_mla"} and (results["n"] == 6).all()

    marker = workdir / "baselines" / "sft" / "done.json"
    sft_dir = json.loads(marker.read_text())
    assert QPOPolicy.load(sft_dir["checkpoint_dir"]).config.mode == "sft"
    # Cached by the settings it was trained with: the same ones reuse it, untouched...
    from qpo_ray.testphase.methods import ablation_key, ablation_policy

    written = marker.stat().st_mtime_ns
    assert ablation_policy(cfg, RunDir(workdir), "sft") == sft_dir["checkpoint_dir"]
    assert marker.stat().st_mtime_ns == written
    # ...other training settings do not.
    other = load_config(str(profile), [f"workdir={workdir}", "training.lr_first_loop=0.5"])
    other.policy.mode = "sft"
    assert sft_dir["config_key"] != ablation_key(other, 1)
    # No multi-loop augmentation: the same number of training stages, all on D_0.
    no_mla = workdir / "baselines" / "qpo_no_mla"
    assert (no_mla / "loop1").is_dir() and (no_mla / "loop2").is_dir()
    # The loop's own report is untouched.
    assert set(pd.read_csv(workdir / "report" / "results.csv")["method"]) >= {"qpo", "manual"}


def test_evaluate_adds_methods_to_the_finished_report(finished_run, profile):
    """`qpo evaluate --add`: only the named methods are scored; their rows join the
    run's report (a redone method's rows are replaced, not doubled), every other row is
    kept as it was, and a config whose test split is not the report's is refused before
    anything is scored."""
    workdir = finished_run[0]
    report = workdir / "report"
    before = pd.read_parquet(report / "predictions.parquet")
    proc = subprocess.run(_qpo("evaluate", "--profile", str(profile), "--run-dir", str(workdir),
                               "--add", "sft", "manual"),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target cost of the methods added last (sft, manual)" in proc.stdout
    after = pd.read_parquet(report / "predictions.parquet")

    untouched = before[before["method"] != "manual"].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        after[after["method"].isin(set(untouched["method"]))].reset_index(drop=True), untouched)
    test_ids = set(before.loc[before["split"] == "test", "query_id"])
    old_manual = before[before["method"] == "manual"].set_index("query_id")
    new_manual = after[after["method"] == "manual"].set_index("query_id")
    assert len(new_manual) == len(old_manual) == len(test_ids)
    assert (new_manual.loc[old_manual.index, "prediction"] == old_manual["prediction"]).all()
    added = after[after["method"] == "sft"]
    assert set(added["query_id"]) == test_ids and len(added) == len(test_ids)
    assert added["prompt"].str.strip().str.len().gt(0).all()
    results = pd.read_csv(report / "results.csv")
    assert {"sft", "manual", "qpo", "best_single"} <= set(results["method"])
    assert (results.loc[results["method"] == "sft", "n"] == len(test_ids)).all()

    proc = subprocess.run(_qpo("evaluate", "--profile", str(profile), "--run-dir", str(workdir),
                               "--set", "seed=99", "--add", "manual"),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "test queries are not this config's test split" in proc.stderr
    assert "scoring" not in proc.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(report / "predictions.parquet"), after)


def test_split_dev_compares_the_methods_on_dev_and_leaves_the_test_report(finished_run, profile,
                                                                          ray_cluster):
    """`test.split: dev`: the methods are compared on the run's dev queries (none of them a
    test query) into report-dev/, logged under dev/ in MLflow; each loop's greedy prompts
    answer there exactly as in the run's own dev choice; the test report is untouched."""
    from mlflow.tracking import MlflowClient

    from qpo_ray.run.loop import evaluate_tracked
    from qpo_ray.tasks import task_and_splits

    workdir = finished_run[0]
    before = pd.read_parquet(workdir / "report" / "predictions.parquet")
    cfg = load_config(str(profile), [f"workdir={workdir}", "test.split=dev",
                                     "test.decoding=greedy", "test.methods=[qpo, manual, router]"])
    report, logged = evaluate_tracked(cfg, run_dir=str(workdir))

    pd.testing.assert_frame_equal(pd.read_parquet(workdir / "report" / "predictions.parquet"),
                                  before)
    dev = pd.read_parquet(workdir / "report-dev" / "predictions.parquet")
    _, splits = task_and_splits(cfg)
    dev_ids, test_ids = {q.id for q in splits.dev}, {q.id for q in splits.test}
    assert set(dev["split"]) == {"dev"} and set(dev["query_id"]) == dev_ids
    assert not dev_ids & test_ids
    assert set(dev["method"]) == {"qpo", "qpo_loop1", "qpo_loop2", "manual", "router"}
    assert "dev queries: 4;" in report and "0-shot dev accuracy" in report
    for loop in (1, 2):
        ours = dev[dev["method"] == f"qpo_loop{loop}"].set_index("query_id").sort_index()
        chosen = before[before["method"] == f"qpo_loop{loop}/greedy"].set_index("query_id")
        chosen = chosen.sort_index()
        assert (ours["prompt"] == chosen["prompt"]).all()
        assert (ours["prediction"] == chosen["prediction"]).all()

    run_id = re.search(r"nested run (\w+) \(evaluate-report-dev\)", logged).group(1)
    metrics = set(MlflowClient(cfg.tracking_uri()).get_run(run_id).data.metrics)
    assert "dev/0shot/qpo/accuracy" in metrics
    assert not any(key.startswith("test/") for key in metrics)


def test_dev_choice_tries_only_the_listed_decodings(finished_run, profile, ray_cluster,
                                                    tmp_path):
    """`test.dev_decodings: [greedy]`: the dev split picks among the loops' greedy prompts
    only (a small run skips ranking's cost), and `qpo` is the chosen one."""
    from qpo_ray.run.loop import evaluate_tracked

    workdir = finished_run[0]
    cfg = load_config(str(profile), [f"workdir={tmp_path}", "test.methods=[qpo]",
                                     "test.dev_decodings=[greedy]"])
    evaluate_tracked(cfg, policy_dir=str(RunDir(workdir).policy_dir(2)))
    selection = json.loads((tmp_path / "report" / "selection.json").read_text())
    assert set(selection["dev_accuracy"]) == {"qpo_loop1/greedy"}
    assert selection["chosen_decoding"] == "greedy" and selection["dev_queries"] == 4


def _evaluate_a_copy(run_dir: Path, profile: Path, tmp_path: Path,
                     overrides: list[str]) -> tuple:
    """The test phase again, with `overrides`, on a copy of a finished run (the run's own
    report stays as the other tests read it)."""
    import shutil

    from qpo_ray.run.loop import evaluate_tracked

    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir, ignore=shutil.ignore_patterns("mlartifacts"))
    cfg = load_config(str(profile), [f"workdir={workdir}", *overrides])
    evaluate_tracked(cfg, run_dir=str(workdir))
    return cfg, RunDir(workdir)


def test_dev_choice_reads_mbr_at_the_belief_temperature_it_fits_on_dev(
        finished_run, profile, ray_cluster, tmp_path):
    """`test.dev_decodings: [greedy, mbr]` on a copy of the finished run: every mbr
    candidate is scored on the 4 dev queries; each loop's temperature is the one under
    which its policy best predicts each dev query's best candidate (scored here again,
    ranked by the reward as the utilities are); the dev rows of mbr are the choices at
    that temperature; selection.json records it for Serve."""
    from qpo_ray.data.pairs import make_pairs
    from qpo_ray.data.rewards import compute_rewards
    from qpo_ray.scoring.ray_data import score_pairs
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.mbr import TEMPERATURES, belief, mbr_choice, utility_table
    from qpo_ray.policy.ranking import candidate_logprobs
    from qpo_ray.tasks import task_and_splits

    cfg, run = _evaluate_a_copy(finished_run[0], profile, tmp_path,
                                ["test.methods=[qpo]", "test.dev_decodings=[greedy, mbr]"])
    selection = json.loads((report_dir(cfg, run) / "selection.json").read_text())
    step0, _ = read_dataset(run.step0_path())
    table = utility_table(step0, "reward")
    task, splits = task_and_splits(cfg)
    assert selection["mbr_calibration"]["pairs"] == len(table.prompts) * 4
    fitted = {int(k): t for k, t in selection["mbr_temperatures"].items()}
    assert set(fitted) == {1, 2} and all(np.isclose(TEMPERATURES, t).any()
                                         for t in fitted.values())

    ids = step0.drop_duplicates("prompt").set_index("prompt")["prompt_id"]
    pairs = make_pairs([q for _ in table.prompts for q in splits.dev],
                       [(ids[p], p, "collection") for p in table.prompts for _ in splits.dev],
                       task, splits, cfg, loop=1, seed=cfg.seed)
    scored, _ = score_pairs(cfg, task, splits, pairs)
    r_task = step0.groupby("prompt_id")["r_task"].first().to_dict()
    rewards, _ = compute_rewards(scored, "nll", r_task=r_task, answer="gold")
    by_query = rewards.pivot_table(index="query_id", columns="prompt", values="reward")
    best = by_query.loc[[q.id for q in splits.dev], table.prompts].to_numpy().argmax(axis=1)
    dev = pd.read_parquet(report_dir(cfg, run) / "predictions.parquet").query("split == 'dev'")
    for loop, temperature in fitted.items():
        policy = QPOPolicy.load(str(run.policy_dir(loop)))
        logprobs = candidate_logprobs(policy, [q.text for q in splits.dev],
                                      [table.prompts] * 4, cfg.loop.target_reward)
        nll = [-np.log(belief(logprobs, t)[np.arange(4), best] + 1e-12).sum()
               for t in TEMPERATURES]
        assert np.isclose(temperature, TEMPERATURES[int(np.argmin(nll))])
        rows = dev[dev["method"] == f"qpo_loop{loop}/mbr"].set_index("query_id")
        expected = [table.prompts[i] for i in mbr_choice(logprobs, table.utility, temperature)]
        assert rows.loc[[q.id for q in splits.dev], "prompt"].tolist() == expected
    if selection["chosen_decoding"] == "mbr":
        assert selection["mbr_temperature"] == fitted[selection["loop"]]
    else:
        assert "mbr_temperature" not in selection


def test_mbr_decoding_picks_the_step0_prompt_the_policy_expects_to_be_right(
        finished_run, profile, ray_cluster, tmp_path):
    """`test.decoding: mbr` on a copy of the finished run: every qpo prompt is one of Step
    0's candidates, and each is the expected-correctness choice recomputed here from the
    loop's policy and the run's Step-0 table, query by query; the run saved that table
    beside each loop's policy."""
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.mbr import load_table, mbr_choice, utility_table
    from qpo_ray.policy.ranking import candidate_logprobs

    cfg, run = _evaluate_a_copy(finished_run[0], profile, tmp_path,
                                ["test.decoding=mbr", "test.methods=[qpo]"])
    # A fixed mbr decoding reads the belief at test.mbr_temperature (1: as it is).
    assert json.loads((report_dir(cfg, run) / "selection.json").read_text()) == {
        "decoding": "mbr", "mbr_temperature": 1.0}
    pred = pd.read_parquet(report_dir(cfg, run) / "predictions.parquet")
    qpo = pred[pred["method"] == "qpo_loop2"].sort_values("query_id")
    step0, _ = read_dataset(run.step0_path())
    table = utility_table(step0, "reward")  # the tiny profile trains no summary part
    assert len(table.prompts) == 7 and set(qpo["prompt"]) <= set(table.prompts)
    # The train stage saved the same table beside each loop's policy (Serve reads it).
    for loop in (1, 2):
        saved = load_table(run.policy_dir(loop))
        assert saved.prompts == table.prompts and saved.num_queries == table.num_queries
        np.testing.assert_allclose(saved.utility, table.utility)
    policy = QPOPolicy.load(str(run.policy_dir(2)))
    logprobs = candidate_logprobs(policy, qpo["query"].tolist(),
                                  [table.prompts] * len(qpo), cfg.loop.target_reward)
    expected = [table.prompts[i] for i in mbr_choice(logprobs, table.utility)]
    assert qpo["prompt"].tolist() == expected
    assert (pred.loc[pred["method"] == "qpo", "prompt"].sort_values().tolist()
            == sorted(expected))
