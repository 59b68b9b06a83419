"""The OpenAI-compatible routes of the Serve app: `POST /v1/chat/completions` and
`GET /v1/models`, so an application that speaks the OpenAI API uses QPO by changing its
base URL (and model name) only.

A chat completion: the last user message is the query; the served policy writes its
prompt (the same path as /v1/prompt: A/B arm by the request's `user`, prompt cache,
batching, the version's decoding, at the version's recorded target reward); the target
gets the task's input for (prompt, query), formatted exactly as the test phase formats
it (TargetServer: `task.format`, on the target backend of `target`, which may itself be
an OpenAI-compatible upstream such as `vllm serve`: target.backend=openai). The reply is
a standard `chat.completion` whose message is the test phase's prediction (the label
word for label tasks, else the target's answer). Where the prompt came from:
headers `x-qpo-prompt` (percent-encoded UTF-8), `x-qpo-policy-version`, `x-qpo-decoding`,
`x-qpo-request-id`, and the extra body field `qpo` {prompt, policy_version, decoding,
mbr_temperature, arm, cached, request_id, target_reward, answer, label_logprobs}.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
same statuses as the other routes (the guard's 401/413 are reshaped by
`OpenAIErrorShape`). Ray's own `ray.serve.llm` is not used: it builds vLLM engines from
its own LLMConfig, while the target here is the project's backend interface.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal, Optional, Union
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from qpo_ray.serving.cache import normalise_query
from qpo_ray.serving.isolation import PolicyFailed
from qpo_ray.serving.schemas import ClientKey, PromptRequest
from qpo_ray.serving.textpolicy import text_problem

# `server` below is the PolicyServer replica that wires these routes in (not imported:
# the deployment imports this module).
PolicyServer = Any

# The model id clients name; GET /v1/models lists it.
MODEL_ID = "qpo"
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # Unknown message fields (name, tool_call_id, ...) are ignored, as OpenAI's are.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[_TextPart]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    # Sampling knobs OpenAI clients send (temperature, max_tokens, ...) are accepted and
    # ignored: the target answers greedily, as in the test phase.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    # A/B stickiness key, as client_key on /v1/prompt.
    user: Optional[ClientKey] = None
    stream: Optional[bool] = False
    n: Optional[int] = 1


def openai_error(status: int, message: str, kind: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None
                 ) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}})


def _invalid(message: str, param: Optional[str], code: str = "invalid_value") -> JSONResponse:
    return openai_error(400, message, "invalid_request_error", param, code)


def _parse(raw: bytes, max_chars: int) -> Union[ChatRequest, JSONResponse]:
    """The request, or the OpenAI-shaped 400 naming the parameter that is wrong."""
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        return _invalid(f"malformed JSON body: {exc}", None, "invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return _invalid(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)
    if req.stream:
        return _invalid("stream=true is not supported: this endpoint answers whole",
                        "stream", "unsupported_value")
    if req.n not in (None, 1):
        return _invalid("only n=1 is supported", "n", "unsupported_value")
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        return _invalid("messages: no user message (its text is the query)", "messages")
    query = req.messages[users[-1]].text()
    where = f"messages.{users[-1]}.content"
    if not query.strip():
        return _invalid(f"{where}: the last user message is empty", where)
    if (problem := text_problem(query)) is not None:  # the other routes' text policy
        return _invalid(f"{where}: {problem}", where)
    if len(query) > max_chars:
        return _invalid(f"{where}: the query is {len(query)} characters long; the limit is "
                        f"{max_chars} (serve.max_query_chars)", where, "string_too_long")
    return req


def _served_model_ids(server: PolicyServer) -> list[str]:
    return [MODEL_ID, f"{MODEL_ID}:{server._cfg.tracking.registered_model_name}"]


def list_models(server: PolicyServer) -> dict[str, Any]:
    arm = server._arms.arms["a"]
    return {"object": "list", "data": [
        {"id": model_id, "object": "model", "created": int(arm.loaded_at),
         "owned_by": "qpo", "qpo": {"policy_version": arm.version, "policy_uri": arm.uri,
                                    "target_model": server._cfg.target.model}}
        for model_id in _served_model_ids(server)]}


async def chat_completion(server: PolicyServer, request: Request) -> JSONResponse:
    serve_cfg = server._cfg.serve
    req = _parse(await request.body(), serve_cfg.max_query_chars)
    if isinstance(req, JSONResponse):
        return req
    if req.model not in _served_model_ids(server):
        return openai_error(404, f"model {req.model!r} is not served here (GET /v1/models: "
                                 f"{_served_model_ids(server)})", "invalid_request_error",
                            "model", "model_not_found")
    if server._target is None:
        return openai_error(404, "this deployment serves no target LLM (with_target=False)",
                            "invalid_request_error", None, "no_target")
    query = normalise_query(req.messages[_last_user(req)].text())
    arm = server._arms.pick(req.user)
    reward = arm.decoding.target_reward if arm.decoding else 100.0
    try:
        served = await server._generate(query, reward, req.user)
    except PolicyFailed as exc:  # this request alone: the batch's others were served
        return openai_error(503, f"policy unavailable: {exc}"[:400], "server_error", None,
                            "policy_unavailable", headers={"Retry-After": "5"})
    prompt, version, arm_name, cached = served
    decoding = server._decoding_of(version)
    body = PromptRequest(query=query, target_reward=reward, client_key=req.user)
    try:
        result = await asyncio.wait_for(server._ask_target(prompt, query),
                                        serve_cfg.target_timeout_s)
    except Exception as exc:  # noqa: BLE001 - the policy's part is in the headers
        reason = (f"no answer within {serve_cfg.target_timeout_s:g} s (serve.target_timeout_s)"
                  if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}")
        request_id, receipt = server._record("chat", body, served)
        return openai_error(503, f"target LLM unavailable: {reason[:300]}", "server_error",
                            None, "target_unavailable",
                            headers={"Retry-After": "5", **_headers(prompt, version, decoding,
                                                                    request_id)})
    request_id, receipt = server._record("chat", body, served, answer=result["answer"],
                                         target_label=result.get("label"))
    content = result.get("label") or result["answer"]
    qpo = {"prompt": prompt, "policy_version": version, **decoding, "arm": arm_name,
           "cached": cached, "request_id": request_id, "receipt": receipt,
           "target_reward": reward,
           "answer": result["answer"], "label_logprobs": result.get("label_logprobs")}
    return JSONResponse(headers=_headers(prompt, version, decoding, request_id), content={
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": req.model, "system_fingerprint": version,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "qpo": qpo})


def _last_user(req: ChatRequest) -> int:
    return max(i for i, m in enumerate(req.messages) if m.role == "user")


def _headers(prompt: str, version: str, decoding: dict[str, Any],
             request_id: str) -> dict[str, str]:
    # Header values are latin-1 on the wire: the prompt goes percent-encoded UTF-8.
    return {"x-qpo-prompt": quote(prompt, safe=" "), "x-qpo-policy-version": version,
            "x-qpo-decoding": str(decoding.get("decoding")), "x-qpo-request-id": request_id}


class OpenAIErrorShape:
    """ASGI middleware: an error answered on an OpenAI route by anything outside it (the
    guard's 401 / 413 / 503, FastAPI's 404 / 405) gets OpenAI's error body, so OpenAI
    clients raise their usual typed errors. Other routes pass through untouched."""

    _TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(OPENAI_PATHS):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    start["pass"] = True
                    await send(message)
                else:
                    start.update(message)
                return
            if start.get("pass"):
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                await self._reshape(start, b"".join(chunks), send)

        await self.app(scope, receive, capture)

    async def _reshape(self, start: dict[str, Any], raw: bytes, send) -> None:
        status = start["status"]
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"error": raw.decode("utf-8", "replace")}
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, dict) and "message" in error):
            message = error if isinstance(error, str) else body.get("detail", "error")
            if isinstance(body, dict) and body.get("reason"):
                message = f"{message}: {body['reason']}"
            kind = self._TYPES.get(status, "server_error" if status >= 500
                                   else "invalid_request_error")
            body = {"error": {"message": str(message), "type": kind, "param": None,
                              "code": None}}
        out = json.dumps(body).encode()
        headers = [(k, v) for k, v in start.get("headers", [])
                   if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})
