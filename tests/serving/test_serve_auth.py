"""Who may call the Serve app and how much they may send, on a real Serve instance on
127.0.0.1 (policy from a directory, no target deployment, so /v1/answer says it is off):
the bearer token (from a file the replicas read, never from the deployment config),
the size limit (413 before parsing), and the fail-closed start on a non-loopback host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from qpo_ray.config import ConfigError, load_config

TOKEN_ENV = "QPO_SERVE_TEST_TOKEN"
TOKEN = "s3cret-token-for-tests"
MAX_REQUEST_BYTES = 16384


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "serve-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def deployed(ray_cluster, tmp_path_factory, tiny_policy, free_port, token_file):
    from ray import serve

    from qpo_ray.policy import QPOPolicy
    from qpo_ray.serving import run_serve

    cfg = load_config("cpu-demo", [
        f"workdir={tmp_path_factory.mktemp('serve-auth')}",
        *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=8",
        f"serve.port={free_port}", f"serve.auth_token_env={TOKEN_ENV}",
        f"serve.auth_token_file={token_file}", f"serve.max_request_bytes={MAX_REQUEST_BYTES}",
        "serve.num_cpus_per_replica=0.25",
    ])
    policy_dir = tmp_path_factory.mktemp("policy")
    QPOPolicy.from_backbone(cfg.policy).save(policy_dir)
    with pytest.MonkeyPatch.context() as mp:
        # Also in the driver's environment where the app is built: the old code copied
        # it from there into the replicas' runtime_env, i.e. into the deployment config.
        mp.setenv(TOKEN_ENV, TOKEN)
        url = run_serve(cfg, blocking=False, policy_uri=str(policy_dir), with_target=False)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def server(deployed):
    return deployed[0]


QUERY = {"query": "a gripping, funny film"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": TOKEN},  # no "Bearer " scheme
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer"},
], ids=["no header", "wrong token", "no scheme", "basic scheme", "token plus suffix",
        "scheme only"])
def test_requests_without_the_token_are_refused(server, headers):
    for method, path in [("POST", "/v1/prompt"), ("POST", "/v1/answer"), ("GET", "/v1/version")]:
        response = server.request(method, path, json=QUERY, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_token_opens_the_api(server):
    body = server.post("/v1/prompt", json=QUERY, headers=AUTH).json()
    assert isinstance(body["prompt"], str) and body["target_reward"] == 100.0
    assert server.get("/v1/version", headers=AUTH).json()["policy_version"] == body["policy_version"]
    # Validation still runs behind the token.
    assert server.post("/v1/prompt", json={"query": ""}, headers=AUTH).status_code == 422
    off = server.post("/v1/answer", json=QUERY, headers=AUTH)
    assert off.status_code == 404 and "target" in off.json()["error"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_the_scheme_name_is_case_insensitive(server, scheme):
    # RFC 7235 section 2.1 / RFC 6750: auth-scheme names are case-insensitive.
    response = server.post("/v1/prompt", json=QUERY, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200, response.text


def test_healthz_needs_no_token(server):
    # Liveness probes (Kubernetes, RayService) carry no credentials.
    assert server.get("/healthz").json()["status"] == "ok"


def test_the_token_is_nowhere_in_the_deployment(deployed):
    """What `serve status`, `serve config` and the dashboard show comes from the
    controller: the status and the full application details (deployment configs,
    ray_actor_options, runtime_env, args)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    assert details["applications"], details
    dumped = json.dumps(details, default=str)
    assert TOKEN not in dumped
    assert TOKEN not in str(serve.status())


def test_oversized_bodies_are_refused_before_parsing(server):
    big = json.dumps({"query": "x" * (MAX_REQUEST_BYTES + 10)})
    # Declared with Content-Length: refused on the header alone.
    response = server.post("/v1/prompt", content=big, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "serve.max_request_bytes" in response.json()["reason"]
    # Not valid JSON either: a 413 proves the body was never parsed (that would be 400).
    response = server.post("/v1/prompt", content="{" * (MAX_REQUEST_BYTES + 1),
                           headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413

    # Chunked (no Content-Length): refused once the limit is passed.
    def chunks():
        for _ in range(8):
            yield b"x" * (MAX_REQUEST_BYTES // 4)

    response = server.post("/v1/prompt", content=chunks(),
                           headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    # Without the token even a huge body is a 401 (auth comes first).
    assert server.post("/v1/prompt", content=big).status_code == 401
    # A body under the limit is still parsed and validated as before.
    ok = server.post("/v1/prompt", json=QUERY, headers=AUTH)
    assert ok.status_code == 200


def test_token_file_is_read_per_request_and_fails_closed(server, token_file):
    try:
        token_file.write_text("rotated-token")
        assert server.post("/v1/prompt", json=QUERY, headers=AUTH).status_code == 401
        rotated = {"Authorization": "Bearer rotated-token"}
        assert server.post("/v1/prompt", json=QUERY, headers=rotated).status_code == 200
        # A configured token that cannot be read opens nothing.
        token_file.unlink()
        for headers in ({}, AUTH):
            response = server.post("/v1/prompt", json=QUERY, headers=headers)
            assert response.status_code == 503, response.text
        assert server.get("/healthz").status_code == 200
    finally:
        token_file.write_text(TOKEN)
    assert server.post("/v1/prompt", json=QUERY, headers=AUTH).status_code == 200


# -- refusing to start ------------------------------------------------------------------

def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_host_without_token_refuses_to_start(ray_cluster, tmp_path, monkeypatch):
    from qpo_ray.serving import run_serve

    monkeypatch.delenv("QPO_SERVE_TOKEN", raising=False)
    port = _free_port()
    cfg = load_config("cpu-demo", [f"workdir={tmp_path}", "serve.host=0.0.0.0",
                                   f"serve.port={port}", f"serve.policy_uri={tmp_path}"])
    with pytest.raises(ConfigError, match="insecure"):
        run_serve(cfg, blocking=False, with_target=False)
    assert not _port_open(port)
    # A token file that is configured but missing refuses too (even on loopback).
    cfg = load_config("cpu-demo", [f"workdir={tmp_path}", f"serve.port={port}",
                                   f"serve.auth_token_file={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="auth_token_file"):
        run_serve(cfg, blocking=False, with_target=False)


def test_insecure_is_explicit_and_logged(caplog):
    from qpo_ray.serving.guard import check_auth_setup

    cfg = load_config("cpu-demo", ["serve.host=10.1.2.3", "serve.insecure=true",
                                   "serve.auth_token_env=QPO_UNSET_TOKEN_VAR"])
    with caplog.at_level("WARNING", logger="ray.serve"):
        assert check_auth_setup(cfg.serve) is True
    assert "UNAUTHENTICATED" in caplog.text
    # Loopback needs neither; a token makes any host fine.
    assert check_auth_setup(load_config("cpu-demo", ["serve.auth_token_env=QPO_UNSET_TOKEN_VAR"]).serve) is False


def test_cli_refuses_without_insecure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QPO_SERVE_TOKEN"}
    qpo = str(Path(sys.executable).parent / "qpo")
    proc = subprocess.run([qpo, "serve", "--workdir", str(tmp_path), "--set", "serve.host=0.0.0.0",
                           "--policy", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--insecure" in proc.stderr and "QPO_SERVE_TOKEN" in proc.stderr


@pytest.mark.parametrize("override,key", [
    ("serve.port=0", "serve.port"), ("serve.port=70000", "serve.port"),
    ("serve.host=", "serve.host"), ("serve.num_replicas=0", "serve.num_replicas"),
    ("serve.num_cpus_per_replica=-1", "serve.num_cpus_per_replica"),
    ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("serve.batch_wait_timeout_s=-0.1", "serve.batch_wait_timeout_s"),
    ("serve.max_query_chars=0", "serve.max_query_chars"),
    ("serve.max_request_bytes=100", "serve.max_request_bytes"),
    ("serve.auth_token_env=not a name", "serve.auth_token_env"),
    ("serve.registry_poll_interval_s=-1", "serve.registry_poll_interval_s"),
    ("serve.registry_stale_after_s=.nan", "serve.registry_stale_after_s"),
    ("serve.target_timeout_s=0", "serve.target_timeout_s"),
    ("serve.insecure=maybe", "serve.insecure"),
    ("serve.prompt_cache_entries=-1", "serve.prompt_cache_entries"),
    ("serve.ab_policy_uri=' '", "serve.ab_policy_uri"),
    ("serve.ab_traffic_percent=100.5", "serve.ab_traffic_percent"),
    ("serve.ab_traffic_percent=.nan", "serve.ab_traffic_percent"),
    ("serve.feedback=sometimes", "serve.feedback"),
    ("serve.feedback_dir=''", "serve.feedback_dir"),
])
def test_every_serve_field_is_validated_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("cpu-demo", [override])
