"""MLflow tracking through a real `mlflow server` on 127.0.0.1, checked via its REST API."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from qpo_ray.config import load_config
from qpo_ray.run.tracking import POLICY_ARTIFACT_PATH, Tracker

from tests.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server with its own sqlite store and served artifacts."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.url
    finally:
        server.stop()


def _policy_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path / "heads.safetensors"))
    (path / "policy.json").write_text('{"format_version": 1}')
    return path


def test_tracker_logs_runs_datasets_metrics_and_registers_through_server(mlflow_server, tmp_path):
    cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", f"tracking.uri={mlflow_server}",
                                   "tracking.experiment=qpo-test", "loop.num_loops=2"])
    run_dir = Path(cfg.workdir)
    run_dir.mkdir(parents=True)
    frame = pd.DataFrame({"query": ["a", "b", "c"], "prompt": ["p", "p", "q"],
                          "reward": [10.0, 80.0, 95.0], "demo_ids": [[], [], []]})
    data_path = run_dir / "dataset_1.parquet"
    frame.to_parquet(data_path)

    tracker = Tracker(cfg, run_dir)
    parent = tracker.parent_run_id()
    tracker.log_dataset(1, frame, data_path, name="dataset_1")
    tracker.log_training_curves(1, [{"epoch": 0, "loss": 3.0}, {"epoch": 1, "loss": 2.5}])
    v1 = tracker.register_policy(1, _policy_dir(tmp_path / "ckpt1"))
    tracker.finish_loop(1)

    # A resumed process reopens the same parent run and does not re-register loop 1.
    resumed = Tracker(cfg, run_dir)
    assert resumed.parent_run_id() == parent
    assert resumed.register_policy(1, tmp_path / "ckpt1") == v1
    v2 = resumed.register_policy(2, _policy_dir(tmp_path / "ckpt2"), final=True)
    resumed.finish()
    assert int(v2) == int(v1) + 1

    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = httpx.get(f"{api}/experiments/get-by-name",
                    params={"experiment_name": "qpo-test"}).json()["experiment"]
    runs = httpx.post(f"{api}/runs/search",
                      json={"experiment_ids": [exp["experiment_id"]]}).json()["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    assert set(by_id) == {parent, *resumed.state["loop_run_ids"].values()}
    assert by_id[parent]["info"]["status"] == "FINISHED"
    loop1 = by_id[tracker.loop_run_id(1)]
    tags = {t["key"]: t["value"] for t in loop1["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent
    history = httpx.get(f"{api}/metrics/get-history",
                        params={"run_id": loop1["info"]["run_id"], "metric_key": "train/loss"}
                        ).json()["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(0, 3.0), (1, 2.5)]
    inputs = loop1["inputs"]["dataset_inputs"]
    assert inputs[0]["dataset"]["name"] == "dataset_1"
    assert str(data_path.resolve()) in inputs[0]["dataset"]["source"]
    assert "demo_ids" not in inputs[0]["dataset"]["schema"]
    params = {p["key"]: p["value"] for p in by_id[parent]["data"]["params"]}
    assert params["loop.num_loops"] == "2"

    alias = httpx.get(f"{api}/registered-models/alias",
                      params={"name": cfg.tracking.registered_model_name, "alias": "final"}
                      ).json()["model_version"]
    assert alias["version"] == v2 and alias["run_id"] == resumed.loop_run_id(2)

    # What the Serve app does: resolve models:/<name>@latest and download its files.
    import mlflow
    from mlflow import MlflowClient

    latest = MlflowClient(mlflow_server).get_model_version_by_alias(
        cfg.tracking.registered_model_name, "latest")
    assert latest.version == v2
    assert latest.source.endswith(f"/{POLICY_ARTIFACT_PATH}")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{cfg.tracking.registered_model_name}@latest",
        dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)
    # An MLflow pyfunc model holding the checkpoint's files as they were saved.
    assert "MLmodel" in os.listdir(local)
    held = [p for p in Path(local).rglob("*") if p.name in ("heads.safetensors", "policy.json")]
    assert sorted(p.name for p in held) == ["heads.safetensors", "policy.json"]
    assert len({p.parent for p in held}) == 1


def test_a_transient_registry_error_never_creates_a_second_version(mlflow_server, tmp_path,
                                                                   monkeypatch):
    """A resumed loop looks its model version up before creating one. Through a proxy
    that fails that lookup (a 503, then a dropped connection) the tracker asks again and
    finds the version; a registry that stays down is an error naming it; neither makes a
    second version of the loop."""
    import json

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from qpo_ray.run import tracking
    from tests.mlflow_server import FlakyProxy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's own retries
    monkeypatch.setattr(tracking, "FIND_BACKOFF_S", 0.1)
    proxy = FlakyProxy(mlflow_server, "model-versions/search")
    try:
        cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", f"tracking.uri={proxy.url}",
                                       "tracking.experiment=qpo-flaky",
                                       "tracking.registered_model_name=qpo-flaky-policy"])
        run_dir = Path(cfg.workdir)
        run_dir.mkdir(parents=True)
        v1 = Tracker(cfg, run_dir).register_policy(1, _policy_dir(tmp_path / "ckpt1"))

        def forget_version() -> None:  # a crash after create_model_version, before saving
            path = run_dir / tracking.TRACKING_FILE
            state = json.loads(path.read_text())
            state.pop("model_versions")
            path.write_text(json.dumps(state))

        forget_version()
        proxy.fail_next = 2
        assert Tracker(cfg, run_dir).register_policy(1, tmp_path / "ckpt1") == v1
        assert proxy.failed == 2 and proxy.fail_next == 0

        forget_version()
        proxy.fail_next = tracking.FIND_TRIES
        with pytest.raises(MlflowException, match="could not look up loop 1's model version"):
            Tracker(cfg, run_dir).register_policy(1, tmp_path / "ckpt1")
        assert proxy.failed == 2 + tracking.FIND_TRIES
    finally:
        proxy.stop()
    versions = MlflowClient(mlflow_server).search_model_versions("name = 'qpo-flaky-policy'")
    assert [v.version for v in versions] == [v1]


def test_an_explicit_sqlite_store_keeps_artifacts_beside_it_not_in_the_cwd(tmp_path,
                                                                           monkeypatch):
    """`--tracking-uri sqlite:///...` (the KubeRay job's) used to create its experiment
    with no artifact location: MLflow then wrote every artifact to ./mlruns in whatever
    directory the process ran in. (A file store keeps artifacts in its own root, and
    MLflow 3.17 refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set.)"""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'run'}",
                                   f"tracking.uri=sqlite:///{store_dir / 'mlflow.db'}",
                                   "tracking.experiment=explicit"])
    run_dir = Path(cfg.workdir)
    run_dir.mkdir(parents=True)
    tracker = Tracker(cfg, run_dir)
    tracker.register_policy(1, _policy_dir(tmp_path / "ckpt"))
    tracker.finish()
    assert list(cwd.iterdir()) == []  # no ./mlruns
    (logged,) = store_dir.rglob("heads.safetensors")
    assert logged.is_relative_to(store_dir / "mlartifacts")
    experiment = tracker.client.get_experiment_by_name("explicit")
    assert experiment.artifact_location == (store_dir / "mlartifacts").as_uri()
