"""One bad request never fails another: a batched handler's work runs on the whole batch
first and, if that raises, again item by item, so only the items that fail on their
own get a `Failed` (answered 503 with a reason by the route); the rest are served.
Free of Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


@dataclass(frozen=True)
class Failed:
    """The result of an item that could not be served. `reason` is for the client: the
    kind of failure, never the error's text (which may hold paths or the input)."""

    reason: str


class PolicyFailed(Exception):
    """The policy could not write a prompt for this request (a 503 with the reason)."""


class TargetFailed(Exception):
    """The target LLM could not answer this request (a 503 with the reason)."""


def run_isolated(work: Callable[[Sequence[T]], Sequence[Any]], items: Sequence[T],
                 what: str) -> list[Any]:
    """work(items), or, when it raises, work([item]) per item with a Failed for each item
    that raises alone. One batch call in the normal case; a failing batch costs one
    call per item (the price of finding the culprit, paid only when something fails)."""
    try:
        results = list(work(items))
        if len(results) != len(items):
            raise RuntimeError(f"{what}: {len(results)} results for {len(items)} items")
        return results
    except Exception:  # noqa: BLE001 - retried per item below
        if len(items) == 1:
            logger.exception("%s failed for one request", what)
            return [Failed(f"{what} failed for this request (see the replica's log)")]
        logger.warning("%s failed for a batch of %d: retrying each request alone",
                       what, len(items))
    out: list[Any] = []
    for item in items:
        try:
            out.append(list(work([item]))[0])
        except Exception:  # noqa: BLE001 - this item alone fails
            logger.exception("%s failed for one request", what)
            out.append(Failed(f"{what} failed for this request (see the replica's log)"))
    return out
