"""Stage identity and order: the one parser of stage names, the plan the loop walks,
and typed outputs surviving the run directory's stages.json (relative paths)."""

from __future__ import annotations

import pytest

from qpo_ray.config import load_config
from qpo_ray.run.rundir import RunDir, stage_names
from qpo_ray.run.pipeline import PIPELINE, Stage, plan
from qpo_ray.run.stages.train import TrainOutputs


def test_plan_is_algorithm_1_and_names_parse_back():
    stages = plan(3)
    assert [s.name for s in stages] == ["step0", "filter", "train_1", "augment_1", "train_2",
                                        "augment_2", "train_3", "test"]
    assert [Stage.parse(s.name) for s in stages] == stages
    assert Stage.parse("train_12") == Stage("train", 12)
    for bad in ("train_0", "train_", "Train_1", "train_1_2", ""):
        with pytest.raises(ValueError):
            Stage.parse(bad)


def test_a_stage_is_its_module_plus_one_pipeline_line():
    from qpo_ray.run.loop import _module

    for kind, _ in PIPELINE:  # every listed kind has its module, which runs and logs
        module = _module(Stage(kind))
        assert callable(module.run) and callable(module.log), kind
    with_stats = PIPELINE[:-1] + (("stats", "once"),) + PIPELINE[-1:]
    assert [s.name for s in plan(2, with_stats)][-2:] == ["stats", "test"]
    per_loop = PIPELINE[:2] + (("check", "per_loop"),) + PIPELINE[2:]
    assert [s.name for s in plan(2, per_loop)][2:7] == ["check_1", "train_1", "check_2",
                                                        "augment_1", "train_2"]
    with pytest.raises(ValueError, match="contiguous"):
        plan(2, PIPELINE[:3] + (("stats", "once"),) + PIPELINE[3:])
    with pytest.raises(ValueError, match="repeat 'twice'"):
        plan(2, PIPELINE + (("stats", "twice"),))
    with pytest.raises(ValueError, match="unknown stage 'stats'"):
        _module(Stage("stats"))


def test_typed_outputs_round_trip_through_a_moved_run_directory(tmp_path):
    cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'a'}", "loop.num_loops=2"])
    run = RunDir.create(cfg)
    assert stage_names(cfg) == [s.name for s in plan(2)]
    ckpt = run.train_dir(2) / "policy"
    ckpt.mkdir(parents=True)
    out = TrainOutputs(checkpoint_dir=str(ckpt), metrics=str(run.train_dir(2) / "m.json"))
    run.mark_done(Stage("train", 2).name, {**out.to_dict(), "wall_s": 1.0})
    moved = RunDir(run.path.rename(tmp_path / "b"))
    back = TrainOutputs.from_dict(moved.outputs("train_2"))
    assert back == TrainOutputs(str(moved.path / "loop2" / "policy"),
                                str(moved.path / "loop2" / "m.json"))
    assert moved.trained_loops() == [2] and moved.policy_dir() == moved.path / "loop2" / "policy"
