"""The cluster's MLflow server as cluster/aws/gpu-multinode.yaml starts it (basic auth,
its auth config rendered from the manifest's own command), run for real on 127.0.0.1:
without credentials nothing can be registered, with them the loop's Tracker can."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import yaml

from tests.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "a-generated-admin-password"


def _command() -> str:
    doc = yaml.safe_load((REPO / "cluster" / "aws" / "gpu-multinode.yaml").read_text())
    return next(c for c in doc["head_setup_commands"] if "mlflow server" in c)


def _auth_ini_from_manifest(auth_db: Path) -> str:
    """The [mlflow] auth config the launcher's head_setup_commands writes (printf)."""
    template = re.search(r"printf '([^']*)'", _command()).group(1)
    text = template.replace("\\n", "\n")
    return re.sub(r"database_uri = \S+", f"database_uri = sqlite:///{auth_db}", text)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "auth.ini"
    ini.write_text(_auth_ini_from_manifest(root / "auth.db"))
    # The environment the manifest's command gives the server.
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(re.findall(r"(MLFLOW_[A-Z_]+)=", _command()))
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-generated-secret-key"}
    server = MlflowServer(root, ("--app-name", "basic-auth"), env=env, start_timeout_s=180)
    try:
        yield server.url
    finally:
        server.stop()


def test_registry_needs_credentials(auth_server, tmp_path, monkeypatch):
    from qpo_ray.config import load_config
    from qpo_ray.policy import QPOPolicy  # noqa: F401 - the checkpoint layout below
    from qpo_ray.run.tracking import Tracker

    api = f"{auth_server}/api/2.0/mlflow"
    anonymous = httpx.post(f"{api}/registered-models/create", json={"name": "intruder"})
    assert anonymous.status_code == 401
    wrong = httpx.post(f"{api}/registered-models/create", json={"name": "intruder"},
                       auth=("admin", "not-the-password"))
    assert wrong.status_code == 401

    # The loop, given the credentials in its environment as the cluster README says.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    cfg = load_config("cpu-demo", [f"workdir={tmp_path / 'run'}", f"tracking.uri={auth_server}",
                                   "tracking.registered_model_name=qpo-auth-test"])
    (tmp_path / "run").mkdir()
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "qpo_policy.json").write_text('{"format_version": 1}')
    assert Tracker(cfg, tmp_path / "run").register_policy(1, policy) == "1"
    listed = httpx.get(f"{api}/registered-models/get", params={"name": "qpo-auth-test"},
                       auth=("admin", PASSWORD))
    assert listed.status_code == 200
    assert httpx.get(f"{api}/registered-models/get",
                     params={"name": "qpo-auth-test"}).status_code == 401
