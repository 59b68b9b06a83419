"""The openai backend against a real HTTP server on 127.0.0.1 that serves the
completions and chat APIs from the real tiny model (through the HF backend), with
injectable 5xx errors and delays."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from qpo_ray.backends import create_backend, validate_backend_config
from qpo_ray.backends.openai_backend import EndpointError
from qpo_ray.config import TargetConfig

PREFIXES = ["Review: a wonderful, moving film.\nAnswer:", "Review: dull.\nAnswer:"]
CANDIDATES = [" positive", " negative", " very mixed"]
SECRET = "sk-test-secret-value"


class ModelServer(ThreadingHTTPServer):
    """A minimal OpenAI-compatible server (the subset `vllm serve` offers that we use)."""

    def __init__(self, chat_backend, plain_backend):
        super().__init__(("127.0.0.1", 0), Handler)
        self.chat, self.plain = chat_backend, plain_backend
        self.lock = threading.Lock()
        self.fail_next = 0        # answer this many requests with HTTP 500
        self.delay_next_s = 0.0   # stall the next request this long, then drop it
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def echo(self, text: str) -> dict:
        tok, model = self.plain.tokenizer, self.plain.model
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([enc["input_ids"]])
        with torch.inference_mode():
            lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        values = [None] + [lp[i, t].item() for i, t in enumerate(enc["input_ids"][1:])]
        return {"tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
                "token_logprobs": values,
                "text_offset": [start for start, _ in enc["offset_mapping"]]}

    def answer(self, path: str, body: dict) -> dict:
        if path == "/v1/chat/completions":
            (gen,) = self.chat.generate([body["messages"][-1]["content"]], body["max_tokens"])
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                 "logprobs": {"content": [{"logprob": v}
                                                          for v in gen.token_logprobs]}}],
                    "usage": {"prompt_tokens": gen.num_prompt_tokens}}
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if body.get("echo"):
            choices = [{"index": i, "text": p, "logprobs": self.echo(p)}
                       for i, p in enumerate(prompts)]
            return {"choices": choices}
        gens = self.plain.generate(prompts, body["max_tokens"])
        return {"choices": [{"index": i, "text": g.text,
                             "logprobs": {"token_logprobs": g.token_logprobs}}
                            for i, g in enumerate(gens)],
                "usage": {"prompt_tokens": sum(g.num_prompt_tokens for g in gens)}}


class Handler(BaseHTTPRequestHandler):
    server: ModelServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _gate(self) -> bool:
        """Injected faults; True when the request was answered by one."""
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Authorization")))
        with srv.lock:
            delay, srv.delay_next_s = srv.delay_next_s, 0.0
            fail = srv.fail_next > 0
            srv.fail_next -= int(fail)
        if delay:  # outlive the client's timeout, then drop the request unanswered
            threading.Event().wait(delay)
            return True
        if fail:
            self._send(500, {"error": "injected"})
        return fail

    def do_GET(self) -> None:
        if not self._gate():
            self._send(200, {"object": "list", "data": [{"id": "tiny"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._gate():
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._send(404, {"error": "not found"})
            return
        with self.server.lock:
            self._send(200, self.server.answer(self.path, body))


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    make = lambda chat: create_backend(TargetConfig(  # noqa: E731
        backend="transformers", model=str(tiny_model_dir), dtype="float32",
        use_chat_template=chat))
    yield {True: make(True), False: make(False)}
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(backends):
    srv = ModelServer(backends[True], backends[False])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client(server, tiny_model_dir, **overrides):
    cfg = TargetConfig(**{"backend": "openai", "model": str(tiny_model_dir),
                          "base_url": server.url, "request_timeout_s": 30.0,
                          "max_retries": 3, **overrides})
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
    remote = client(server, tiny_model_dir, base_url=server.url + "/wrong")
    server.requests.clear()
    with pytest.raises(EndpointError, match="HTTP 404"):
        remote.generate(PREFIXES[:1], 3)
    assert len(server.requests) == 1
    remote.close()
