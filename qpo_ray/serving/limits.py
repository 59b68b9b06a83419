"""How much one client may ask of a replica: a token-bucket request rate
(serve.rate_limit_per_s, serve.rate_limit_burst) and a /v1/answer budget per window
(serve.answer_budget, serve.answer_budget_window_s), both keyed by the client's
identity. Free of Ray.

A client is the hash of its bearer token (what a per-client token names; the token
itself is never stored), or its address where no token is configured. The limits are
per replica (no shared state between replicas, so nothing to fail or to wait on): with
N replicas a client gets up to N times the configured rate. Serve's own queue cap
(serve.max_queued_requests) bounds the total.

Written here rather than taken from a library: the two counters are a few lines, and
the rate-limiting packages on PyPI are either Redis-backed or per-route decorators that
cannot see the identity the guard establishes.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import threading
import time
from collections import OrderedDict
from typing import Optional

# The identity of the request being handled, set by the guard (serving.guard) before the
# app runs; read by the routes to store it with each request (serving.feedback).
CLIENT_ID: contextvars.ContextVar[str] = contextvars.ContextVar("qpo_client_id", default="")



def current_client() -> str:
    """The identity of the request being handled ("" outside a request). A function, so
    that code pickled by value (Serve's ingress routes) refers to it, not to the
    unpicklable ContextVar."""
    return CLIENT_ID.get()


def set_current_client(client: str) -> None:
    CLIENT_ID.set(client)


# Clients remembered per replica; the least recently seen are forgotten beyond it (a
# forgotten client starts again with a full bucket: bounded memory over fairness).
MAX_CLIENTS = 10_000


def client_id(token: Optional[str], address: str) -> str:
    """"t:" + 16 hex of sha256(token), or "a:<address>" when the request has no token."""
    if token:
        return "t:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]
    return f"a:{address}"


class _PerClient:
    def __init__(self) -> None:
        self._state: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, client: str, fresh: list[float]) -> list[float]:
        state = self._state.get(client)
        if state is None:
            state = self._state[client] = fresh
            while len(self._state) > MAX_CLIENTS:
                self._state.popitem(last=False)
        self._state.move_to_end(client)
        return state


class RateLimiter(_PerClient):
    """Token bucket: `burst` requests at once, refilled at `per_s`; 0 = no limit."""

    def __init__(self, per_s: float, burst: int) -> None:
        super().__init__()
        self.per_s, self.burst = per_s, burst

    def acquire(self, client: str, now: Optional[float] = None) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        if self.per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            state = self._get(client, [float(self.burst), now])
            tokens = min(float(self.burst), state[0] + (now - state[1]) * self.per_s)
            state[1] = now
            if tokens >= 1.0:
                state[0] = tokens - 1.0
                return 0.0
            state[0] = tokens
            return (1.0 - tokens) / self.per_s


class Budget(_PerClient):
    """At most `limit` uses per client in each fixed window of `window_s`; 0 = none."""

    def __init__(self, limit: int, window_s: float) -> None:
        super().__init__()
        self.limit, self.window_s = limit, window_s

    def spend(self, client: str, now: Optional[float] = None) -> float:
        """0 when spent, else the seconds until the client's window renews."""
        if self.limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            state = self._get(client, [0.0, now])
            if now - state[1] >= self.window_s:
                state[0], state[1] = 0.0, now
            if state[0] >= self.limit:
                return max(state[1] + self.window_s - now, 0.001)
            state[0] += 1
            return 0.0


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
