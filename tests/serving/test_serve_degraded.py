"""Serving through failures, on real components: a real `mlflow server` on 127.0.0.1 as
the registry (stopped mid-test), and a real TargetServer whose OpenAI-compatible endpoint
refuses connections. What can still be served is served; the rest answers 503 with a
reason; /healthz reports the registry's staleness."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from qpo_ray.config import load_config

from tests.mlflow_server import MlflowServer
from tests.mlflow_server import free_port as unused_port

MODEL_NAME = "qpo-degraded-test"
QUERY = {"query": "a gripping, funny film"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow server; yields (url, stop) where stop() kills it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-degraded"))
    try:
        yield server.url, server.stop
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(ray_cluster, registry, tmp_path_factory, tiny_model_dir, tiny_policy,
           free_port):
    from ray import serve

    from qpo_ray.policy import QPOPolicy
    from qpo_ray.serving import run_serve
    from qpo_ray.run.tracking import Tracker

    url, _stop = registry
    dead_port = unused_port()  # nothing listens there: the target endpoint is down
    workdir = tmp_path_factory.mktemp("serve-degraded")
    cfg = load_config("cpu-demo", [
        f"workdir={workdir}", f"tracking.uri={url}",
        f"tracking.registered_model_name={MODEL_NAME}",
        *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=8",
        "target.backend=openai", f"target.base_url=http://127.0.0.1:{dead_port}/v1",
        f"target.model={tiny_model_dir}", "target.max_retries=0",
        "target.request_timeout_s=5",
        f"serve.port={free_port}", "serve.num_cpus_per_replica=0.25",
        "evaluation.num_cpus_per_actor=0.25",
        "serve.registry_poll_interval_s=1", "serve.registry_stale_after_s=4",
        "serve.target_timeout_s=60", f"serve.last_good_dir={workdir / 'last-good'}",
        "serve.target_timeout_s=60", f"serve.policy_uri=models:/{MODEL_NAME}@latest",
    ])
    policy_dir = tmp_path_factory.mktemp("policy-degraded")
    QPOPolicy.from_backbone(cfg.policy).save(policy_dir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    assert Tracker(cfg, workdir).register_policy(1, policy_dir) == "1"
    base = run_serve(cfg, blocking=False)
    with httpx.Client(base_url=base, timeout=120) as client:
        client.cfg = cfg  # for the test that redeploys
        yield client
    serve.shutdown()


def test_answer_is_503_with_a_reason_when_the_target_fails(server):
    response = server.post("/v1/answer", json=QUERY)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "target LLM unavailable"
    assert "EndpointError" in body["reason"] or "failed" in body["reason"]
    # The policy's part was served and is handed back.
    assert body["policy_version"] == f"models:/{MODEL_NAME}/1"
    assert isinstance(body["prompt"], str)
    assert response.headers.get("retry-after")
    # Everything that does not need the target keeps answering.
    prompt = server.post("/v1/prompt", json=QUERY)
    assert prompt.status_code == 200 and prompt.json()["prompt"] == body["prompt"]
    health = server.get("/healthz").json()
    assert health["status"] == "ok" and health["registry"]["stale"] is False


def test_unreachable_registry_keeps_serving_and_shows_on_healthz(server, registry):
    _url, stop = registry
    before = server.post("/v1/prompt", json=QUERY).json()
    stop()
    deadline = time.monotonic() + 120
    while True:
        health = server.get("/healthz")
        assert health.status_code == 200
        body = health.json()
        if body["status"] == "stale":
            break
        # Requests keep being served by the policy the replica has.
        response = server.post("/v1/prompt", json=QUERY)
        assert response.status_code == 200, response.text
        assert served(response.json()) == served(before)
        assert time.monotonic() < deadline, f"never reported stale: {body}"
        time.sleep(1)
    registry_health = body["registry"]
    assert registry_health["stale"] is True
    assert registry_health["seconds_since_ok"] > registry_health["stale_after_s"] == 4
    assert body["policy_version"] == f"models:/{MODEL_NAME}/1"
    assert served(server.post("/v1/prompt", json=QUERY).json()) == served(before)


def served(body: dict) -> tuple[str, str]:
    return body["prompt"], body["policy_version"]


def test_a_replica_started_while_the_registry_is_down_serves_the_last_good_copy(
        server, registry, tmp_path_factory):
    """Runs after the registry was stopped (above): a fresh deployment (new replicas,
    nothing in memory) starts from the copy the first replicas kept on local disk, and
    /healthz says stale without showing paths or error texts."""
    from ray import serve

    from qpo_ray.serving import APP_NAME, run_serve

    before = server.post("/v1/prompt", json=QUERY).json()
    replica = server.get("/v1/version").json()["replica_id"]
    serve.delete(APP_NAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        run_serve(server.cfg, blocking=False)
    version = server.get("/v1/version").json()
    assert version["replica_id"] != replica
    assert served(server.post("/v1/prompt", json=QUERY).json()) == served(before)
    health = server.get("/healthz")
    body = health.json()
    assert health.status_code == 200 and body["status"] == "stale"
    assert body["registry"]["from_local_copy"] is True
    assert "last_error" not in body["registry"] and "uri" not in body["registry"]
