"""The target-LLM backend interface. Backends know nothing of QPO: they turn text
into log-probabilities and generations, and count what that cost."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Sequence


@dataclass
class ContinuationScore:
    """Log-likelihood of one candidate continuation after a prefix."""

    logprob_sum: float
    num_tokens: int
    # Tokens of the (template-wrapped) prefix the candidate was scored after; the same
    # for every candidate of one prefix (read once for all of them).
    num_prompt_tokens: int = 0


@dataclass
class Generation:
    text: str
    token_logprobs: list[float]
    num_prompt_tokens: int


@dataclass
class Usage:
    """Cost accounting (paper Table 3): calls, tokens and engine-seconds."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    # Building the engines (model load, vLLM's profiling and KV-cache allocation), summed
    # over them: paid once per engine, apart from the per-call engine_seconds.
    engine_start_seconds: float = 0.0
    # Prompt tokens read from a cache instead of computed (a shared head computed once
    # for many prefixes, or vLLM's prefix-cache hits); prompt_tokens counts them too.
    cached_prompt_tokens: int = 0

    def add(self, other: "Usage") -> "Usage":
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.engine_seconds + other.engine_seconds,
            self.engine_start_seconds + other.engine_start_seconds,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
        )

    def minus(self, earlier: "Usage") -> "Usage":
        """What was spent since `earlier` (a copy taken then, e.g. `Usage().add(u)`)."""
        return Usage(*(getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "engine_seconds": self.engine_seconds,
            "engine_start_seconds": self.engine_start_seconds,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


class TargetBackend(ABC):
    """One engine holding one target LLM.

    `prefixes` are plain user texts; a backend configured with `use_chat_template`
    wraps each in the model's chat template (user turn + assistant start) itself, so
    callers never depend on the model family.
    """

    def __init__(self) -> None:
        self.usage = Usage()

    @abstractmethod
    def score_continuations(
        self, prefixes: Sequence[str], candidates: Sequence[str]
    ) -> list[list[ContinuationScore]]:
        """For every prefix, the log-likelihood of every candidate continuation
        (the same candidates for all prefixes): result[i][j] for prefix i, candidate j."""

    @abstractmethod
    def generate(self, prefixes: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy generation with the log-probability of each generated token."""

    def close(self) -> None:
        """Release the engine (GPU memory, worker processes)."""

    def _counted_scores(self, rows: list[list[ContinuationScore]]) -> list[list[ContinuationScore]]:
        """`rows` (one per prefix), after adding their cost to `usage`: every backend
        counts a call per prefix, its prefix tokens once and each candidate's tokens."""
        self.usage.calls += len(rows)
        self.usage.prompt_tokens += sum(row[0].num_prompt_tokens for row in rows if row)
        self.usage.completion_tokens += sum(s.num_tokens for row in rows for s in row)
        return rows

    def _counted_generations(self, gens: list[Generation]) -> list[Generation]:
        """`gens` (one per prefix), after adding their cost to `usage`."""
        self.usage.calls += len(gens)
        self.usage.prompt_tokens += sum(g.num_prompt_tokens for g in gens)
        self.usage.completion_tokens += sum(len(g.token_logprobs) for g in gens)
        return gens

    @contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.usage.engine_seconds += time.perf_counter() - start
