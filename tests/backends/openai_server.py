"""A minimal OpenAI-compatible HTTP server on 127.0.0.1 (the subset of `vllm serve` the
openai backend uses: /v1/models, /v1/completions with echo + logprobs, /v1/chat/completions)
answering from the real tiny model through the transformers backend, with injectable 5xx
errors and delays. Shared by the backend, pre-run check and CLI tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class ModelServer(ThreadingHTTPServer):
    """A minimal OpenAI-compatible server (the subset `vllm serve` offers that we use)."""

    def __init__(self, chat_backend, plain_backend, served: tuple[str, ...] = ()):
        super().__init__(("127.0.0.1", 0), Handler)
        self.chat, self.plain = chat_backend, plain_backend
        self.served = list(served)  # the model names it answers to, as --served-model-name
        self.echo_supported = True  # False: refuse echo as a chat-only API does
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
        if self._gate():
            return
        if self.path != "/v1/models":
            self._send(404, {"error": "not found"})
            return
        self._send(200, {"object": "list", "data": [{"id": m} for m in self.server.served]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._gate():
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._send(404, {"error": "not found"})
            return
        if body.get("model") not in self.server.served:  # as vLLM answers
            self._send(404, {"error": f"The model `{body.get('model')}` does not exist."})
            return
        if body.get("echo") and not self.server.echo_supported:
            self._send(400, {"error": "echo is not supported"})
            return
        with self.server.lock:
            self._send(200, self.server.answer(self.path, body))


def start_server(chat_backend, plain_backend, served: tuple[str, ...]) -> ModelServer:
    srv = ModelServer(chat_backend, plain_backend, served)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop_server(srv: ModelServer) -> None:
    srv.shutdown()
    srv.server_close()
