"""Tracking survives a crash at any point of a stage's logging, on a real MLflow sqlite
store: the disk state a crash leaves (tracking.json as last saved, the MLflow store as
last written) is reproduced exactly, then a resumed process logs the stages again. It
must find the runs and the model version it had made instead of making new ones, and
log no metric twice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from qpo_ray.config import load_config
from qpo_ray.run.loop import log_stage
from qpo_ray.common.atomic import write_json_atomic
from qpo_ray.run.rundir import RunDir
from qpo_ray.run.tracking import TRACKING_FILE, Tracker

MODEL = "qpo-resume-test"


def _run(tmp_path: Path):
    cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", "loop.num_loops=1",
                                   "tracking.experiment=qpo-resume",
                                   f"tracking.registered_model_name={MODEL}"])
    run = RunDir.create(cfg)
    usage = run.path / "dataset_loop0.usage.json"
    write_json_atomic(usage, {"calls": 12, "engine_seconds": 3.5})
    run.mark_done("step0", {"usage": str(usage)})
    ckpt = run.train_dir(1) / "policy"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(ckpt / "heads.safetensors"))
    (ckpt / "policy.json").write_text('{"format_version": 1}')
    metrics = run.train_dir(1) / "metrics.json"
    write_json_atomic(metrics, [{"epoch": 0, "loss": 3.0}, {"epoch": 1, "loss": 2.0}])
    run.mark_done("train_1", {"checkpoint_dir": str(ckpt), "metrics": str(metrics)})
    return cfg, run


def _forget(run: RunDir, *keys: str) -> None:
    """tracking.json as it was before the process saved `keys`: what a crash right
    after the MLflow call (create_run / create_model_version) and before _save_state
    leaves behind."""
    path = run.path / TRACKING_FILE
    state = json.loads(path.read_text())
    for key in keys:
        state.pop(key, None)
    path.write_text(json.dumps(state))


def test_resume_after_a_crash_anywhere_in_logging_duplicates_nothing(tmp_path):
    cfg, run = _run(tmp_path)
    first = Tracker(cfg, run.path)
    first.parent_run_id()
    for stage in ("step0", "train_1"):
        log_stage(first, cfg, run, stage)
    # Crash before mark_logged of either stage, and before tracking.json recorded the
    # parent run, the loop run and the model version.
    _forget(run, "parent_run_id", "loop_run_ids", "model_versions", "logged_stages")

    resumed = Tracker(cfg, run.path)
    assert resumed.parent_run_id() == first.state["parent_run_id"]
    for stage in ("step0", "train_1"):
        log_stage(resumed, cfg, run, stage)
        resumed.mark_logged(stage)
    # And once more, as if the crash came after mark_logged's MLflow calls only.
    again = Tracker(cfg, run.path)
    for stage in ("step0", "train_1"):
        log_stage(again, cfg, run, stage)
    again.finish()

    client = again.client
    exp = client.get_experiment_by_name("qpo-resume")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2, [r.info.run_name for r in runs]  # the parent + loop 1
    loop_runs = [r for r in runs if r.data.tags.get("qpo.loop") == "1"]
    assert len(loop_runs) == 1
    loop_run = loop_runs[0].info.run_id
    assert loop_run == first.state["loop_run_ids"]["1"]

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "latest").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "final").version) == "1"

    for key in client.get_run(loop_run).data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(loop_run, key))
        assert max(steps.values()) == 1, (key, steps)
    loss = client.get_metric_history(loop_run, "train/loss")
    assert sorted((m.step, m.value) for m in loss) == [(0, 3.0), (1, 2.0)]
    assert client.get_metric_history(loop_run, "target/calls")[0].value == 12.0


def _finish_test_stage(run: RunDir, selection: dict) -> None:
    """The files the test stage leaves (report/results.csv, selection.json), marked done."""
    report = run.path / "report"
    report.mkdir()
    (report / "results.csv").write_text("shots,method,accuracy,ci_low,ci_high,n\n"
                                        "0,qpo,0.75,0.4,0.9,8\n")
    write_json_atomic(report / "selection.json", selection)
    (report / "report.md").write_text("# report\n")
    run.mark_done("test", {"report": str(report / "report.md")})


def test_champion_is_promoted_once_with_its_tags_across_crashes(tmp_path):
    """The test stage's log points `champion` at the chosen loop's version, tagged with
    how the test phase decoded it; logged again after a crash before tracking.json (or
    before mark_logged) it makes no version and moves no alias, and a later run that took
    the alias meanwhile keeps it."""
    cfg, run = _run(tmp_path)
    _finish_test_stage(run, {"decoding": "dev", "loop": 1, "chosen_decoding": "mbr",
                             "mbr_temperature": 2.0, "dev_queries": 8,
                             "dev_accuracy": {"qpo_loop1/greedy": 0.5, "qpo_loop1/mbr": 0.625}})
    first = Tracker(cfg, run.path)
    for stage in ("step0", "train_1", "test"):
        log_stage(first, cfg, run, stage)
    client = first.client
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    tags = champion.tags
    assert tags["qpo.loop"] == "1" and tags["qpo.decoding"] == "mbr"
    assert float(tags["qpo.mbr_temperature"]) == 2.0
    assert float(tags["qpo.target_reward"]) == cfg.loop.target_reward
    assert float(tags["qpo.dev_accuracy"]) == 0.625
    assert tags["qpo.run_id"] == first.state["parent_run_id"]
    assert tags["qpo.chosen_on"] == "dev (8 queries)"

    # Crash after the alias was set, before tracking.json said so: found, not redone.
    _forget(run, "champion_version", "model_versions", "logged_stages")
    resumed = Tracker(cfg, run.path)
    log_stage(resumed, cfg, run, "test")
    assert resumed.state["champion_version"] == "1"
    # Another run directory's test stage promotes its own version 2 meanwhile ...
    other_cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'other'}", "loop.num_loops=1",
                                         "tracking.experiment=qpo-resume",
                                         f"tracking.uri={cfg.tracking_uri()}",
                                         f"tracking.registered_model_name={MODEL}"])
    other_run = RunDir.create(other_cfg)
    other = Tracker(other_cfg, other_run.path)
    assert other.register_policy(1, run.train_dir(1) / "policy") == "2"
    other.promote_champion(1, {"qpo.decoding": "greedy"})
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    # ... and this one's test stage is logged once more (crash before mark_logged): the
    # alias stays where the later run put it.
    again = Tracker(cfg, run.path)
    log_stage(again, cfg, run, "test")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")
            if v.run_id == first.state["loop_run_ids"]["1"]] == ["1"]
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2


def test_without_a_dev_choice_the_last_loop_is_champion_at_the_configured_decoding(tmp_path):
    cfg, run = _run(tmp_path)
    _finish_test_stage(run, {"decoding": "greedy"})
    tracker = Tracker(cfg, run.path)
    for stage in ("step0", "train_1", "test"):
        log_stage(tracker, cfg, run, stage)
    champion = tracker.client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.tags["qpo.decoding"] == "greedy"
    assert "qpo.mbr_temperature" not in champion.tags and "qpo.dev_accuracy" not in champion.tags
    assert champion.tags["qpo.chosen_on"] == "config (test.decoding)"
