"""The optional bearer token: with `serve.auth_token_env` set, every route but /healthz
answers 401 without the exact token. Its own Serve instance (policy from a directory, no
target deployment, so /v1/answer says it is off)."""

from __future__ import annotations


import httpx
import pytest

from qpo_ray.config import load_config

TOKEN_ENV = "QPO_SERVE_TEST_TOKEN"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, tiny_model_dir, free_port):
    from ray import serve

    from qpo_ray.policy import QPOPolicy
    from qpo_ray.serving import run_serve

    cfg = load_config("cpu-demo", [
        f"workdir={tmp_path_factory.mktemp('serve-auth')}",
        f"policy.backbone={tiny_model_dir}", "policy.backbone_num_layers=1",
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=8",
        f"serve.port={free_port}", f"serve.auth_token_env={TOKEN_ENV}",
        "serve.num_cpus_per_replica=0.25",
    ])
    policy_dir = tmp_path_factory.mktemp("policy")
    QPOPolicy.from_backbone(cfg.policy).save(policy_dir)
    with pytest.MonkeyPatch.context() as mp:
        # Set where the app is built: run_serve hands it to the replicas' environment.
        mp.setenv(TOKEN_ENV, TOKEN)
        url = run_serve(cfg, blocking=False, policy_uri=str(policy_dir), with_target=False)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    serve.shutdown()


QUERY = {"query": "a gripping, funny film"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": TOKEN},  # no "Bearer " scheme
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
], ids=["no header", "wrong token", "no scheme", "basic scheme", "token plus suffix"])
def test_requests_without_the_token_are_refused(server, headers):
    for method, path in [("POST", "/v1/prompt"), ("POST", "/v1/answer"), ("GET", "/v1/version")]:
        response = server.request(method, path, json=QUERY, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_token_opens_the_api(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = server.post("/v1/prompt", json=QUERY, headers=auth).json()
    assert isinstance(body["prompt"], str) and body["target_reward"] == 100.0
    assert server.get("/v1/version", headers=auth).json()["policy_version"] == body["policy_version"]
    # Validation still runs behind the token.
    assert server.post("/v1/prompt", json={"query": ""}, headers=auth).status_code == 422
    off = server.post("/v1/answer", json=QUERY, headers=auth)
    assert off.status_code == 404 and "target" in off.json()["error"]


def test_healthz_needs_no_token(server):
    # Liveness probes (Kubernetes, RayService) carry no credentials.
    assert server.get("/healthz").json()["status"] == "ok"
