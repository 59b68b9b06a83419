"""Who may call the Serve app, and how much they may send: the bearer token (where it
comes from, when it is required), the request-size limit and body-read deadline, the
per-client rate limit and /v1/answer budget (serving.limits), all checked before
FastAPI reads or parses a body. Free of Ray, like schemas.py.

The rule (fail closed): a proxy bound to anything but a loopback address needs a token,
unless the user set `serve.insecure: true` (`qpo serve --insecure`) in so many words.
The address checked is the one Serve's proxy really binds (its http_options.host, see
serving.app), and each replica applies the rule again per request: with no token and
no serve.insecure, a caller from a non-loopback address gets 503 (a pod whose
environment lacks the token serves nobody but itself).
The token itself is never part of the deployment: each replica reads it, per request,
from its own environment (`serve.auth_token_env`) or from a file (`serve.auth_token_file`,
e.g. a mounted secret), so it appears neither in `serve status`, the Serve config, nor
the dashboard.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from qpo_ray.config import ConfigError, ServeConfig
from qpo_ray.serving.limits import (Budget, RateLimiter, client_id, retry_after,
                                    set_current_client)

logger = logging.getLogger("ray.serve")

# Paths that answer without a token: liveness probes (Kubernetes, RayService) carry none.
OPEN_PATHS = frozenset({"/healthz"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
UNAUTHENTICATED_WARNING = (
    "qpo serve: requests are UNAUTHENTICATED: serve.insecure is true and no token is set "
    "(serve.auth_token_env / serve.auth_token_file); anyone who can reach {host}:{port} "
    "can use the policy and the target LLM")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; every other address (0.0.0.0 included) and
    every other name is treated as reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenUnavailable(Exception):
    """A token file is configured but cannot be read: requests must be refused."""


def read_token(serve_cfg: ServeConfig) -> Optional[str]:
    """The configured token, read now: the file if one is configured (it wins), else the
    environment variable; None when neither is configured or set."""
    if serve_cfg.auth_token_file:
        path = Path(serve_cfg.auth_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TokenUnavailable(f"serve.auth_token_file {path}: {exc.strerror}") from exc
        if not token:
            raise TokenUnavailable(f"serve.auth_token_file {path} is empty")
        return token
    return os.environ.get(serve_cfg.auth_token_env) or None


def check_auth_setup(serve_cfg: ServeConfig, host: Optional[str] = None) -> bool:
    """Before anything starts: refuse a non-loopback `host` (default serve.host) without a
    token unless serve.insecure. Returns True when requests will be unauthenticated
    (after logging that loudly), False when a token protects them or the host is loopback."""
    host = serve_cfg.host if host is None else host
    try:
        token = read_token(serve_cfg)
    except TokenUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    if token:
        return False
    if is_loopback(host):
        return False
    if not serve_cfg.insecure:
        raise ConfigError(
            f"serve.host: {host} is reachable from the network and no token is set "
            f"(export {serve_cfg.auth_token_env}=<token> or set serve.auth_token_file); "
            "refusing to serve unauthenticated. Pass --insecure (serve.insecure: true) "
            "to do it anyway")
    logger.warning(UNAUTHENTICATED_WARNING.format(host=host, port=serve_cfg.port))
    return True


def presented_token(authorization: Optional[str]) -> Optional[str]:
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def bearer_token_ok(authorization: Optional[str], expected: Optional[str]) -> bool:
    """True when no token is expected, or the header carries exactly that token. The
    scheme name is case-insensitive (RFC 7235 section 2.1: "bearer", "BEARER")."""
    if not expected:
        return True
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), expected.encode())


@dataclass
class GuardSettings:
    """What a replica's guard checks; filled in by the replica that owns the app."""

    serve_cfg: Optional[ServeConfig] = None
    rate: Optional[RateLimiter] = None
    answer_budget: Optional[Budget] = None

    def configure(self, serve_cfg: ServeConfig) -> None:
        self.serve_cfg = serve_cfg
        self.rate = RateLimiter(serve_cfg.rate_limit_per_s, serve_cfg.rate_limit_burst)
        self.answer_budget = Budget(serve_cfg.answer_budget, serve_cfg.answer_budget_window_s)

    def insecure(self) -> bool:
        return bool(self.serve_cfg is not None and self.serve_cfg.insecure)

    def expected_token(self) -> Optional[str]:
        return read_token(self.serve_cfg) if self.serve_cfg is not None else None

    def max_request_bytes(self) -> Optional[int]:
        return self.serve_cfg.max_request_bytes if self.serve_cfg is not None else None


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: Optional[dict[str, str]] = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


class RequestGuard:
    """Pure ASGI middleware, outside FastAPI's routing: 401 without the token (before the
    body is read), 413 for a body over the limit (before it is parsed: a declared
    Content-Length is refused at once, a chunked body once the limit is passed), else the
    buffered body is replayed to the app. Bodies are small (a query), so buffering them
    costs nothing measurable and keeps the app unaware of the limit."""

    def __init__(self, app, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        path = scope.get("path")
        caller = (scope.get("client") or ("", 0))[0] or ""
        if path not in OPEN_PATHS:
            try:
                expected = self.settings.expected_token()
            except TokenUnavailable as exc:
                # Fail closed: a configured but unreadable token file opens nothing.
                logger.error("refusing requests: %s", exc)
                await _reply(send, 503, {"error": "server auth misconfigured",
                                         "reason": "the token file cannot be read"})
                return
            if expected is None and not self.settings.insecure() and not is_loopback(caller):
                # Fail closed: no token reached this replica and nobody said insecure.
                await _reply(send, 503, {"error": "server auth misconfigured",
                                         "reason": "no bearer token is configured on this "
                                                   "replica; only loopback callers are served"})
                return
            if not bearer_token_ok(headers.get("authorization"), expected):
                await _reply(send, 401, {"error": "missing or wrong bearer token"},
                             {"WWW-Authenticate": "Bearer"})
                return
            who = client_id(expected and presented_token(headers.get("authorization")), caller)
            set_current_client(who)
            refused = self._over_limit(who, path)
            if refused is not None:
                await _reply(send, 429, refused[0], {"Retry-After": refused[1]})
                return
        limit = self.settings.max_request_bytes()
        if limit is None or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = {"error": "request body too large",
                     "reason": f"the limit is {limit} bytes (serve.max_request_bytes)"}
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _reply(send, 413, too_large, {"Connection": "close"})
            return
        chunks: list[bytes] = []
        deadline = self.settings.serve_cfg.body_read_timeout_s
        try:
            async with asyncio.timeout(deadline):
                size = 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await _reply(send, 413, too_large, {"Connection": "close"})
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _reply(send, 408, {"error": "request body too slow", "reason":
                                     f"the body must arrive within {deadline:g} s "
                                     "(serve.body_read_timeout_s)"}, {"Connection": "close"})
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _over_limit(self, who: str, path: Optional[str]) -> Optional[tuple[dict[str, Any], str]]:
        """(body, Retry-After) for a client over its rate or /v1/answer budget, else None."""
        rate, budget = self.settings.rate, self.settings.answer_budget
        wait = rate.acquire(who) if rate is not None else 0.0
        if wait:
            return ({"error": "too many requests", "reason": "over the per-client rate "
                     f"limit of {rate.per_s:g}/s (serve.rate_limit_per_s)"}, retry_after(wait))
        # Both routes that call the target spend its budget.
        wait = (budget.spend(who) if budget is not None
                and path in ("/v1/answer", "/v1/chat/completions") else 0.0)
        if wait:
            return ({"error": "answer budget spent", "reason": f"{budget.limit} /v1/answer "
                     f"calls per {budget.window_s:g} s per client (serve.answer_budget)"},
                    retry_after(wait))
        return None
