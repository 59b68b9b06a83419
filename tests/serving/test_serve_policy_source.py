"""Where the served policy comes from, without Serve: a directory, or a version the
loop's tracker registered in a real (sqlite) MLflow registry."""

from __future__ import annotations

import pytest

from qpo_ray.config import load_config
from qpo_ray.serving import policy_source


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_policy):
    from qpo_ray.policy import QPOPolicy

    cfg = load_config("cpu-demo", [
        f"workdir={tmp_path_factory.mktemp('run')}", "tracking.registered_model_name=ps-test",
        *tiny_policy,
    ])
    policy_dir = tmp_path_factory.mktemp("policy")
    policy = QPOPolicy.from_backbone(cfg.policy)
    policy.save(policy_dir)
    return cfg, policy, policy_dir


def test_directory_resolves_to_its_absolute_path(saved, monkeypatch):
    _cfg, _policy, policy_dir = saved
    monkeypatch.chdir(policy_dir.parent)
    ref = policy_source.resolve(policy_dir.name, None)
    assert ref.version == str(policy_dir.resolve()) and ref.registry is None


def test_bad_uris_fail_naming_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="serve.policy_uri"):
        policy_source.resolve(str(tmp_path / "missing"), None)
    with pytest.raises(ValueError, match="serve.policy_uri"):
        policy_source.resolve("models:/name/not-a-version", None)


def test_registry_alias_follows_the_newest_registered_version(saved):
    import torch

    from qpo_ray.run.tracking import Tracker

    cfg, policy, policy_dir = saved
    tracking_uri = cfg.tracking_uri()
    tracker = Tracker(cfg, cfg.workdir)
    assert tracker.register_policy(1, policy_dir) == "1"
    ref = policy_source.resolve("models:/ps-test@latest", tracking_uri)
    assert ref.version == "models:/ps-test/1" and ref.registry == ("ps-test", "1")
    loaded = policy_source.load_policy(ref, tracking_uri)
    for key, value in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    tracker.register_policy(2, policy_dir)
    assert policy_source.resolve("models:/ps-test@latest", tracking_uri).version == \
        "models:/ps-test/2"
    # A pinned version stays pinned.
    pinned = policy_source.resolve("models:/ps-test/1", tracking_uri)
    assert (pinned.version, pinned.registry) == (ref.version, ref.registry)


def test_versions_from_another_experiment_are_refused(saved, tmp_path):
    """Whoever registers a version under the model name moves @latest to it; Serve only
    accepts versions whose run is in its own tracking.experiment."""
    from dataclasses import replace

    from qpo_ray.run.tracking import Tracker

    cfg, _policy, policy_dir = saved
    tracking_uri = cfg.tracking_uri()
    ours = Tracker(cfg, cfg.workdir)
    mine = ours.register_policy(3, policy_dir)
    ref = policy_source.resolve("models:/ps-test@latest", tracking_uri, cfg.tracking.experiment)
    assert ref.registry == ("ps-test", mine)
    # Someone else's run, in another experiment of the same store, same model name.
    other_cfg = replace(cfg, tracking=replace(cfg.tracking, experiment="someone-else"))
    (tmp_path / "other").mkdir()
    foreign = Tracker(other_cfg, tmp_path / "other").register_policy(1, policy_dir)
    assert int(foreign) > int(mine)
    assert policy_source.resolve("models:/ps-test@latest", tracking_uri).registry[1] == foreign
    with pytest.raises(PermissionError, match="someone-else"):
        policy_source.resolve("models:/ps-test@latest", tracking_uri, cfg.tracking.experiment)
    with pytest.raises(PermissionError, match="tracking.experiment"):
        policy_source.resolve(f"models:/ps-test/{foreign}", tracking_uri, cfg.tracking.experiment)


def test_a_registered_tree_without_a_policy_is_refused(tmp_path):
    (tmp_path / "nested").mkdir()
    with pytest.raises(FileNotFoundError, match="qpo_policy.json"):
        policy_source.find_policy_dir(tmp_path)


def test_run_serve_refuses_a_missing_policy_before_starting(saved, tmp_path):
    from qpo_ray.serving import run_serve

    cfg, _policy, _dir = saved
    with pytest.raises(FileNotFoundError, match="serve.policy_uri"):
        run_serve(cfg, blocking=False, policy_uri=str(tmp_path / "no-policy-here"))
    with pytest.raises(FileNotFoundError, match="never-registered"):
        run_serve(cfg, blocking=False, policy_uri="models:/never-registered@latest")
