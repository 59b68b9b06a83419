"""The openai backend against a real HTTP server on 127.0.0.1 that serves the
completions and chat APIs from the real tiny model (through the HF backend), with
injectable 5xx errors and delays."""

from __future__ import annotations

import pytest

from qpo_ray.backends import create_backend, validate_backend_config
from qpo_ray.backends.openai_backend import EndpointError
from qpo_ray.config import TargetConfig

PREFIXES = ["Review: a wonderful, moving film.\nAnswer:", "Review: dull.\nAnswer:"]
CANDIDATES = [" positive", " negative", " very mixed"]
SECRET = "sk-test-secret-value"


def client(server, tiny_model_dir, validate=True, **overrides):
    cfg = TargetConfig(**{"backend": "openai", "model": str(tiny_model_dir),
                          "base_url": server.url, "request_timeout_s": 30.0,
                          "max_retries": 3, **overrides})
    if validate:
        validate_backend_config(cfg)
    return create_backend(cfg)


@pytest.mark.parametrize("chat", [True, False])
def test_scores_match_the_local_model(server, backends, tiny_model_dir, chat):
    remote = client(server, tiny_model_dir, use_chat_template=chat)
    got = remote.score_continuations(PREFIXES, CANDIDATES)
    want = backends[chat].score_continuations(PREFIXES, CANDIDATES)
    for got_row, want_row in zip(got, want):
        assert [s.num_tokens for s in got_row] == [s.num_tokens for s in want_row]
        assert [s.num_prompt_tokens for s in got_row] == [s.num_prompt_tokens for s in want_row]
        assert [s.logprob_sum for s in got_row] == pytest.approx(
            [s.logprob_sum for s in want_row], abs=2e-3)
    assert remote.usage.calls == len(PREFIXES) and remote.usage.engine_seconds > 0
    remote.close()


@pytest.mark.parametrize("chat", [True, False])
def test_generation_matches_the_local_model(server, backends, tiny_model_dir, chat):
    remote = client(server, tiny_model_dir, use_chat_template=chat)
    got = remote.generate(PREFIXES, 5)
    want = backends[chat].generate(PREFIXES, 5)
    assert [g.text for g in got] == [g.text for g in want]
    assert got[0].token_logprobs == pytest.approx(want[0].token_logprobs, abs=2e-3)
    assert remote.usage.completion_tokens == sum(len(g.token_logprobs) for g in want)
    remote.close()


def test_retries_5xx_and_sends_the_key(server, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QPO_TEST_KEY", SECRET)
    remote = client(server, tiny_model_dir, api_key_env="QPO_TEST_KEY",
                    max_concurrent_requests=1)
    server.requests.clear()
    server.fail_next = 2
    (row,) = remote.score_continuations(PREFIXES[:1], CANDIDATES)
    assert len(row) == len(CANDIDATES)
    assert [p for p, _ in server.requests] == ["/v1/completions"] * 3  # 2 failures + 1
    assert all(auth == f"Bearer {SECRET}" for _, auth in server.requests)
    remote.close()


def test_retries_a_timed_out_request(server, tiny_model_dir):
    remote = client(server, tiny_model_dir, request_timeout_s=5.0)
    server.requests.clear()
    server.delay_next_s = 7.0
    (gen,) = remote.generate(PREFIXES[:1], 3)
    assert gen.token_logprobs
    assert len(server.requests) == 2
    remote.close()


def test_gives_up_after_retries_without_leaking_the_key(server, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QPO_TEST_KEY", SECRET)
    remote = client(server, tiny_model_dir, api_key_env="QPO_TEST_KEY", max_retries=1)
    server.fail_next = 2
    with pytest.raises(EndpointError, match="failed after 2 attempts") as info:
        remote.generate(PREFIXES[:1], 3)
    assert SECRET not in str(info.value)
    server.fail_next = 0
    remote.close()


def test_client_errors_are_not_retried(server, tiny_model_dir):
    remote = client(server, tiny_model_dir, validate=False, base_url=server.url + "/wrong")
    server.requests.clear()
    with pytest.raises(EndpointError, match="HTTP 404"):
        remote.generate(PREFIXES[:1], 3)
    assert len(server.requests) == 1
    remote.close()
