"""Any OpenAI-compatible HTTP endpoint as the target LLM (`vllm serve`, TGI, a hosted API).

Label scoring uses the completions API with `echo` + `logprobs` (the server returns the
log-prob of every prompt token with its character offset), one request per prefix
carrying all candidates as a prompt list. Generation uses chat completions when the
chat template is on (the server applies it), plain completions otherwise. Requests run
on a bounded thread pool and are retried with exponential backoff on timeouts,
connection errors, 429 and 5xx. The API key is read from the environment variable named
by `target.api_key_env` and never logged.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import httpx

from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend
from qpo_ray.backends.text import PromptEncoder, candidate_text
from qpo_ray.common.errors import ConfigError
from qpo_ray.backends.preflight import api_root, auth_headers, load_tokenizer

T = TypeVar("T")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused a request for good, or kept failing past the retries."""


class OpenAIBackend(TargetBackend):
    def __init__(self, target_config) -> None:
        super().__init__()
        if not target_config.base_url:
            raise ConfigError("target.base_url is required for target.backend=openai")
        self.config = target_config
        # With or without the SDK's /v1 suffix: requests name /v1/... themselves.
        self.base_url = api_root(target_config.base_url)
        headers = {"Content-Type": "application/json", **auth_headers(target_config)}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=target_config.request_timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=max(1, target_config.max_concurrent_requests))
        self._encoder: PromptEncoder | None = None

    # -- HTTP ----------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; only the status and path go into errors (never headers)."""
        attempts = self.config.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                response = self.client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response.json()
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUS:
                    raise EndpointError(f"{self.base_url}{path}: {last}")
            if attempt + 1 < attempts:
                time.sleep(min(8.0, 0.25 * 2 ** attempt))
        raise EndpointError(f"{self.base_url}{path}: failed after {attempts} attempts ({last})")

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        with self._timed():
            return list(self.pool.map(fn, items))

    @property
    def encoder(self) -> PromptEncoder:
        """The model's tokenizer renders the chat template for scoring: the completions
        API (the only one that echoes prompt log-probs) takes raw text."""
        if self._encoder is None:
            # target.tokenizer, else target.model (a served name may not be a hub id)
            self._encoder = PromptEncoder(load_tokenizer(self.config),
                                          self.config.use_chat_template)
        return self._encoder

    # -- label scoring -------------------------------------------------------------

    def score_continuations(
        self, prefixes: Sequence[str], candidates: Sequence[str]
    ) -> list[list[ContinuationScore]]:
        texts = [candidate_text(c, self.config.use_chat_template) for c in candidates]
        wrapped = ([self.encoder.wrap(p) for p in prefixes] if self.config.use_chat_template
                   else list(prefixes))
        rows = self._map(lambda prefix: self._score_one(prefix, texts), wrapped)
        return self._counted_scores(rows)

    def _score_one(self, prefix: str, candidates: list[str]) -> list[ContinuationScore]:
        body = {"model": self.config.model, "prompt": [prefix + c for c in candidates],
                "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
        choices = sorted(self._post("/v1/completions", body)["choices"],
                         key=lambda c: c["index"])
        if len(choices) != len(candidates):
            raise EndpointError(f"{self.base_url}/v1/completions answered {len(choices)} "
                                f"choices for {len(candidates)} prompts")
        out = []
        for choice, cand in zip(choices, candidates):
            lp = choice.get("logprobs") or {}
            offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
            if offsets is None or values is None:
                raise EndpointError(f"{self.base_url} does not return echoed prompt logprobs; "
                                    "label scoring needs a server that supports "
                                    "echo + logprobs on /v1/completions (e.g. vllm serve)")
            end = len(prefix) + len(cand)
            picked = [v for o, v in zip(offsets, values) if len(prefix) <= o < end]
            n_prefix = sum(1 for o in offsets if o < len(prefix))
            out.append(ContinuationScore(float(sum(picked)), len(picked), n_prefix))
        return out

    # -- generation ----------------------------------------------------------------

    def generate(self, prefixes: Sequence[str], max_new_tokens: int) -> list[Generation]:
        gens = self._map(lambda p: self._generate_one(p, max_new_tokens), prefixes)
        return self._counted_generations(gens)

    def _generate_one(self, prefix: str, max_new_tokens: int) -> Generation:
        common = {"model": self.config.model, "max_tokens": max_new_tokens, "temperature": 0.0}
        if self.config.use_chat_template:
            body = {**common, "messages": [{"role": "user", "content": prefix}],
                    "logprobs": True}
            answer = self._post("/v1/chat/completions", body)
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
            lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        else:
            answer = self._post("/v1/completions", {**common, "prompt": prefix, "logprobs": 0})
            choice = answer["choices"][0]
            text = choice["text"]
            lps = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
        prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens", 0))
        return Generation(text, [float(v) for v in lps], prompt_tokens)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
