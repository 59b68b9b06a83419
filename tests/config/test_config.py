"""Typed config: profiles override the dataclass defaults; bad keys/values are named."""

from __future__ import annotations

import pytest

from qpo_ray.config import Config, ConfigError, config_from_dict, load_config, parse_override


def test_defaults_are_the_paper_table9():
    cfg = Config()
    assert (cfg.training.batch_size_global, cfg.training.lr_first_loop) == (128, 1e-3)
    assert (cfg.training.epochs_first_loop, cfg.training.epochs_later_loops) == (100, 20)
    assert cfg.policy.reward_loss_weight == 0.1
    assert (cfg.loop.num_loops, cfg.loop.top_k, cfg.loop.top_p) == (4, 2, 0.9)
    assert cfg.dataset.expert_fraction == 0.667


@pytest.mark.parametrize("name", ["cpu-demo", "v100", "cluster"])
def test_shipped_profiles_load(name):
    cfg = load_config(name)
    assert cfg.task.name
    assert cfg.loop.num_loops >= 2


def test_cpu_demo_is_the_embedded_default():
    cfg = load_config("cpu-demo")
    assert cfg.task.name == "rotten_tomatoes"
    assert cfg.target.model == "smollm2-135m-instruct"
    assert cfg.policy.backbone == "smollm2-135m-instruct"
    assert cfg.training.use_gpu is False


def test_paper_profile_uses_gpt2_and_table9():
    cfg = load_config("v100")
    assert cfg.policy.backbone == "gpt2"
    assert cfg.training.use_gpu and cfg.training.batch_size_global == 128
    assert cfg.training.lr_later_loops == 1e-4


def test_cluster_profile_uses_deepspeed():
    cfg = load_config("cluster")
    assert cfg.training.strategy == "deepspeed" and cfg.training.num_workers > 1


def test_overrides_take_precedence_and_are_typed():
    cfg = load_config("cpu-demo", ["loop.num_loops=3", "training.lr_first_loop=5e-4",
                                   "test.shots=[0, 3]", "task.max_test_queries=null"])
    assert cfg.loop.num_loops == 3
    assert cfg.training.lr_first_loop == 5e-4
    assert cfg.test.shots == [0, 3]
    assert cfg.task.max_test_queries is None


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load_config(None, {"loop": {"target_reward": 100}})
    assert isinstance(cfg.loop.target_reward, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.batchsize=4", "training.batchsize"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("loop.num_loops=two", "loop.num_loops"),
        ("training.use_gpu=3", "training.use_gpu"),
        ("policy.mode=rl", "policy.mode"),
        ("training.strategy=fsdp", "training.strategy"),
        ("target.backend=llamacpp", "target.backend"),
        ("task.collection_fraction=1.5", "task.collection_fraction"),
        ("loop.top_p=0", "loop.top_p"),
        ("test.shots=[0, x]", "test.shots[1]"),
        # checked by the section beside its fields, at load (not when training starts)
        ("training.mixed_precision=fp16", "training.mixed_precision"),
        ("training.mixed_precision=fp32", "training.mixed_precision"),
        ("training.epochs_later_loops=0", "training.epochs_later_loops"),
        ("target.batch_size=0", "target.batch_size"),
        ("dataset.wide.queries=0", "dataset.wide.prompts and dataset.wide.queries must be > 0"),
        ("dataset.wide.enable=maybe", "dataset.wide.enable"),
        ("dataset.wide.width=3", "dataset.wide.width"),
        ("policy.query_summary.dims=0", "policy.query_summary.dims"),
        ("training.summary.top_k=0", "training.summary.top_k"),
        ("policy.query_summary.enable=false", "training.summary.epochs > 0 needs a query summary"),
        ("test.dev_decodings=[beam]", "test.dev_decodings"),
        ("test.dev_decodings=[]", "test.dev_decodings"),
        ("test.mbr.calibration=test", "test.mbr.calibration"),
        ("test.mbr.temperature=0", "test.mbr.temperature"),
        ("test.rank.samples=-1", "test.rank.collection_prompts / test.rank.samples"),
        ("serve.mbr_temperature=-1", "serve.mbr_temperature"),
        ("training.summary.reward=best", "training.summary.reward"),
        ("training.summary.queries=some", "training.summary.queries"),
        ("test.split=holdout", "test.split"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config("cpu-demo", [override])


def test_summary_queries_unseen_needs_a_summary_part_and_wide_step0():
    assert load_config("cpu-demo", ["training.summary.queries=unseen"])
    for other in ("training.summary.epochs=0", "dataset.wide.enable=false",
                  "dataset.import_path=paper.json"):
        with pytest.raises(ConfigError, match="training.summary.queries: 'unseen' needs"):
            load_config("cpu-demo", ["training.summary.queries=unseen", other])


def test_split_dev_needs_a_dev_split_and_a_fixed_decoding():
    assert load_config("cpu-demo", ["test.split=dev", "test.decoding=greedy"]).test.split == "dev"
    for others in (["test.decoding=dev"], ["test.decoding=greedy", "task.dev_queries=0"]):
        with pytest.raises(ConfigError, match="test.split: 'dev' needs a dev split"):
            load_config("cpu-demo", ["test.split=dev", *others])


def test_section_given_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="training: expected a mapping"):
        load_config(None, {"training": 3})


def test_byo_task_needs_a_spec():
    with pytest.raises(ConfigError, match="task.spec_path"):
        load_config(None, ["task.name=byo"])


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cpu-demo"):
        load_config("no-such-profile")


def test_profile_file_with_an_unknown_key_names_it(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("policy:\n  backbone: gpt2\n  num_heads: 3\n")
    with pytest.raises(ConfigError, match="policy.num_heads"):
        load_config(str(path))


def test_profile_file_that_is_not_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(path))


def test_override_syntax_is_checked():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("loop.num_loops")
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


def test_round_trip_through_a_dict():
    cfg = load_config("cpu-demo", ["seed=7"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_tracking_uri_defaults_to_sqlite_in_the_workdir(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    cfg = load_config(None, ["tracking.uri=http://127.0.0.1:5000"])
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"


def test_ray_address_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert load_config(None).ray_address == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    assert load_config(None).ray_address is None


@pytest.mark.parametrize("overrides,named", [
    (["test.methods=[qpo, best_singel]"], "test.methods"),
    (["prompts.manual_prompt_id=p-000000000000"], "prompts.manual_prompt_id"),
    (["task.dev_queries=100000"], "task.dev_queries"),
    (["target.model=/nonexistent/model"], "target.model"),
    (["task.name=byo", "task.spec_path=/nonexistent/task.yaml"], "task.spec_path"),
    (["policy.query_summary.layers=31"], "policy.query_summary.layers=31: "),
])
def test_run_fails_before_any_work_naming_the_setting(tmp_path, overrides, named):
    """What the test stage needs is checked before Step 0 spends anything."""
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qpo_ray.cli", "run", "--profile", "cpu-demo",
         "--workdir", str(workdir)] + [arg for o in overrides for arg in ("--set", o)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr
    assert time.perf_counter() - start < 30
    assert not (workdir / "stages.json").exists()


LEGACY_PROFILE = """
dataset: {prompts_per_group: 0, wide_prompts: 8, wide_queries: 300, wide_selection: complementary}
policy: {query_summary_layers: 16, query_summary_dims: 64}
training: {summary_epochs: 5, summary_rank_by: r_query, summary_reward: target}
test: {mbr_calibration: none, mbr_temperature: 2.0, rank_collection_prompts: 8}
"""


def test_old_flat_keys_still_load_into_their_nested_place_with_a_warning(tmp_path, capsys):
    """A profile (or a saved run's config.yaml) of an older version: each flat research
    key lands in its nested section, sizes > 0 switch the feature on, one line each."""
    path = tmp_path / "old.yaml"
    path.write_text(LEGACY_PROFILE)
    cfg = load_config(str(path), ["test.rank_samples=2"])
    assert (cfg.dataset.wide.enable, cfg.dataset.wide.queries, cfg.dataset.wide.selection) == \
        (True, 300, "complementary")
    assert (cfg.policy.query_summary.num_layers, cfg.policy.query_summary.dims) == (16, 64)
    assert (cfg.training.summary.epochs, cfg.training.summary.rank_by) == (5, "r_query")
    assert (cfg.test.mbr.calibration, cfg.test.mbr.temperature) == ("none", 2.0)
    assert (cfg.test.rank.collection_prompts, cfg.test.rank.samples) == (8, 2)
    err = capsys.readouterr().out  # the qpo logger's line
    assert "'dataset.wide_queries' is now 'dataset.wide.queries'" in err
    assert "'test.rank_samples' is now 'test.rank.samples'" in err
    assert err.count("is now") == 12
    # Sizes of 0 meant "off" and still do.
    off = load_config(None, {"dataset": {"wide_prompts": 0, "wide_queries": 0},
                             "policy": {"query_summary_layers": 0}})
    assert not off.dataset.wide.enable and off.dataset.wide.num_queries == 0
    assert off.policy.query_summary.num_layers == 0


def test_an_old_run_directory_resumes_with_its_flat_config(tmp_path):
    """`qpo run --resume` of a run saved by an older version: its config.yaml loads."""
    import yaml

    from qpo_ray.run.rundir import RunDir

    data = load_config("cpu-demo", [f"workdir={tmp_path}"]).to_dict()
    wide = data["dataset"].pop("wide")
    data["dataset"].update(wide_prompts=wide["prompts"], wide_queries=wide["queries"],
                           wide_selection=wide["selection"])
    summary = data["training"].pop("summary")
    summary.pop("holdout")  # newer than the flat keys: an old config has none
    data["training"].update({f"summary_{k}": v for k, v in summary.items()})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    _, cfg = RunDir.load(tmp_path)
    assert cfg.to_dict() == load_config("cpu-demo", [f"workdir={tmp_path}"]).to_dict()


def test_config_is_frozen_after_load_and_changed_only_into_a_new_config():
    import dataclasses

    cfg = load_config("cpu-demo")
    with pytest.raises(dataclasses.FrozenInstanceError, match="frozen after load"):
        cfg.task.num_shots = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dataset.wide.queries = 1
    shots = cfg.with_changes({"task": {"num_shots": 3}})
    assert shots.task.num_shots == 3 and cfg.task.num_shots == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        shots.workdir = "elsewhere"
    with pytest.raises(ConfigError, match="task.num_shots"):
        cfg.with_changes({"task": {"num_shots": "three"}})
