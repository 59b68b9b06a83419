"""`PolicyServer`: the Serve deployment that is the HTTP ingress, holding the policy, with
dynamic request batching (the target LLM behind /v1/answer is `TargetServer`, in
qpo_ray.serving.target_server).

The policy is swapped without downtime: a registry URI (`models:/<name>@champion`, moved
by the test stage; `@latest`, moved by each loop) is polled, so a version is picked up
on its own, decoded as its tags say; a new `user_config`
in a Serve config file's `deployments` section reconfigures replicas in place (the
policy, the A/B arm and split, the cache size); a `serve.run` with another
`policy_uri` rolls the replicas (old ones serve until their replacements are ready).
How arms load and swap: qpo_ray.serving.arms; the prompt cache: serving.cache; the
request records and feedback: serving.feedback.

What cannot be served answers 503 with a reason and nothing else does: a failed or slow
target makes /v1/answer a 503 (carrying the policy's prompt) while /v1/prompt keeps
answering; an unreachable registry keeps the current policy serving and shows up as
"stale" on /healthz.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from qpo_ray.config import Config
from qpo_ray.serving import openai_route
from qpo_ray.serving.arms import Arm, PolicyArms
from qpo_ray.serving.cache import PromptCache, normalise_query
from qpo_ray.serving.feedback import DuplicateFeedback, FeedbackStore, UnknownRequest
from qpo_ray.serving.isolation import Failed, PolicyFailed, TargetFailed, run_isolated
from qpo_ray.serving.limits import current_client
from qpo_ray.serving.guard import (
    UNAUTHENTICATED_WARNING,
    GuardSettings,
    RequestGuard,
    TokenUnavailable,
    read_token,
)
from qpo_ray.serving.schemas import (
    AnswerRequest,
    AnswerResponse,
    FeedbackRequest,
    FeedbackResponse,
    PromptRequest,
    PromptResponse,
    VersionResponse,
    check_feedback,
    check_label,
    check_query_length,
    validation_error_handler,
)

logger = logging.getLogger("ray.serve")

# The replica's guard settings (each replica is its own process, so one per replica),
# filled in by PolicyServer.__init__ before the first request.
_GUARD = GuardSettings()

api = FastAPI(title="qpo-ray", description="Query-dependent prompts from the latest QPO policy")
api.add_exception_handler(RequestValidationError, validation_error_handler)
# Outermost: auth and the size limit run before FastAPI reads or parses anything.
api.add_middleware(RequestGuard, settings=_GUARD)
# Outside the guard: its 401/413 on the OpenAI routes come out in OpenAI's error shape.
api.add_middleware(openai_route.OpenAIErrorShape)


def _unavailable(error: str, reason: str, **extra: Any) -> JSONResponse:
    """503 for the part that cannot be served right now, saying why; the client may
    retry (the rest of the API keeps answering)."""
    return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                        content={"error": error, "reason": reason, **extra})


def _public(version: str) -> str:
    """A version as /healthz (unauthenticated) shows it: a directory by its name only."""
    return version if version.startswith("models:/") else version.rstrip("/").rsplit("/", 1)[-1]


def _refused(status: int, error: str, field: str, message: str) -> JSONResponse:
    """A 4xx about one field's value that is well-formed but not acceptable now."""
    return JSONResponse(status_code=status, content={
        "error": error, "errors": [{"field": field, "message": message}]})


@serve.deployment(name="PolicyServer")
@serve.ingress(api)
class PolicyServer:
    """HTTP ingress: validates requests, picks the A/B arm, answers from the prompt cache
    or batches misses into one `generate_prompts` call per (arm, target reward), records
    each served request for feedback, and forwards /v1/answer to the target."""

    def __init__(self, cfg: Config, target: Optional[DeploymentHandle] = None) -> None:
        from qpo_ray.common.device import configure_cpu_threads
        from qpo_ray.config.serve import last_good_root
        from qpo_ray.serving.feedback import feedback_root
        from qpo_ray.tasks import get_task

        configure_cpu_threads()
        self._cfg = cfg
        self._target = target
        self._task = get_task(cfg.task)
        self._label_words = tuple(self._task.label_words) if self._task.mode == "labels" else ()
        self._replica_id = uuid.uuid4().hex[:12]
        _GUARD.configure(cfg.serve)
        try:
            if read_token(cfg.serve) is None and cfg.serve.insecure:
                logger.warning(UNAUTHENTICATED_WARNING.format(host=cfg.serve.host,
                                                              port=cfg.serve.port))
        except TokenUnavailable as exc:
            logger.error("every request will be refused (503): %s", exc)
        self._cache = PromptCache(cfg.serve.prompt_cache_entries)
        self._policy_prompts = 0
        self._arms = PolicyArms(cfg.tracking_uri(), cfg.tracking.experiment,
                                cfg.serve.registry_stale_after_s, self._cache.retain,
                                decoding=cfg.serve.decoding,
                                mbr_temperature=cfg.serve.mbr_temperature,
                                last_good_dir=Path(last_good_root(cfg.serve)))
        self._store = (FeedbackStore(feedback_root(cfg), self._replica_id,
                                     cfg.serve.journal_max_bytes, cfg.serve.retention_days,
                                     cfg.serve.feedback_compact_parts)
                       if cfg.serve.feedback else None)
        # Requests inside generate_batch, the size of the last batch and the configured
        # wait for a batch to fill (see _generate: a lone client does not wait).
        self._in_flight = 0
        self._last_batch_size = 0
        self._batch_wait_s = cfg.serve.batch_wait_timeout_s

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve before the replica first serves and on every user_config change.
        A Serve config file's `user_config` replaces the whole dict: keys it leaves out
        fall back to the profile's `serve` section."""
        serve_cfg = self._cfg.serve
        if "policy_uri" not in user_config:
            raise ValueError("PolicyServer user_config: policy_uri is required")
        percent_b = float(user_config.get("ab_traffic_percent", serve_cfg.ab_traffic_percent))
        cache_entries = int(user_config.get("prompt_cache_entries",
                                            serve_cfg.prompt_cache_entries))
        if not 0 <= percent_b <= 100 or cache_entries < 0:
            raise ValueError("PolicyServer user_config: ab_traffic_percent must be in "
                             "[0, 100] and prompt_cache_entries >= 0")
        self.generate_batch.set_max_batch_size(
            int(user_config.get("max_batch_size", serve_cfg.max_batch_size)))
        self._batch_wait_s = float(user_config.get("batch_wait_timeout_s",
                                                   serve_cfg.batch_wait_timeout_s))
        self.generate_batch.set_batch_wait_timeout_s(self._batch_wait_s)
        self._cache.resize(cache_entries)
        await self._arms.configure(
            str(user_config["policy_uri"]),
            user_config.get("ab_policy_uri", serve_cfg.ab_policy_uri) or None, percent_b,
            float(user_config.get("registry_poll_interval_s",
                                  serve_cfg.registry_poll_interval_s)))

    # ---- batched generation -----------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[str, float, Arm]]) -> list[Any]:
        """items: (query, target_reward, arm). Returns (prompt, policy_version) per item,
        each from the arm's policy as loaded when the batch starts, or a Failed for an
        item the policy cannot serve (the others are served: serving.isolation)."""
        self._last_batch_size = len(items)
        loaded = {id(arm): arm.loaded for _q, _r, arm in items}
        prompts = await asyncio.to_thread(
            run_isolated, lambda part: self._generate_grouped(loaded, part), items,
            "the policy")
        self._policy_prompts += len(items)
        return [p if isinstance(p, Failed) else (p, loaded[id(arm)][1].version)
                for p, (_q, _r, arm) in zip(prompts, items)]

    @staticmethod
    def _generate_grouped(loaded: dict[int, tuple[Any, Any, Any]],
                          items: list[tuple[str, float, Arm]]) -> list[str]:
        """One decoding call per distinct (arm, target reward) in the batch, so every
        request gets its own arm's policy conditioned on its own reward, decoded as that
        version is (policy_source.ServedDecoding): greedy, or mbr by the table loaded
        with the policy at the version's belief temperature."""
        from qpo_ray.policy import generate_prompts
        from qpo_ray.policy.ranking import mbr_prompts

        groups: dict[tuple[int, float], list[int]] = defaultdict(list)
        for i, (_query, reward, arm) in enumerate(items):
            groups[(id(arm), reward)].append(i)
        out: list[str] = [""] * len(items)
        for (arm_id, reward), indices in groups.items():
            policy, _ref, served = loaded[arm_id]
            queries, size = [items[i][0] for i in indices], max(len(indices), 1)
            prompts = (mbr_prompts(policy, queries, reward, policy.mbr_table, batch_size=size,
                                   temperature=served.mbr_temperature)
                       if served.decoding == "mbr" else
                       generate_prompts(policy, queries, target_reward=reward,
                                        do_sample=False, batch_size=size))
            for i, p in zip(indices, prompts):
                out[i] = p
        return out

    async def _generate(self, query: str, target_reward: float,
                        client_key: Optional[str]) -> tuple[str, str, str, bool]:
        """(prompt, policy_version, arm, cached) for one request: the cache first (the
        key's version is the arm's current one), else generate_batch. Serve's batcher
        waits batch_wait_timeout_s for a batch to fill even when no other request is
        coming; when nothing else is in flight and the last batch was a single request
        (one client at a time), the wait is set to 0 (the batcher reads it as it takes
        a batch's first request), while concurrent clients still share full batches."""
        arm = self._arms.pick(client_key)
        cached = self._cache.get((query, arm.version, target_reward))
        if cached is not None:
            return cached, arm.version, arm.name, True
        self._in_flight += 1
        try:
            alone = self._in_flight == 1 and self._last_batch_size <= 1
            self.generate_batch.set_batch_wait_timeout_s(0.0 if alone else self._batch_wait_s)
            result = await self.generate_batch((query, target_reward, arm))
        finally:
            self._in_flight -= 1
        if isinstance(result, Failed):
            raise PolicyFailed(result.reason)
        prompt, version = result
        if version in self._arms.versions():  # not an arm swapped out meanwhile
            self._cache.put((query, version, target_reward), prompt)
        return prompt, version, arm.name, False

    def _record(self, route: str, body: PromptRequest, served: tuple[str, str, str, bool],
                **extra: Any) -> tuple[str, str]:
        """Journal the served request (before the response leaves) with who asked; return
        its id and receipt (what feedback on it must present)."""
        request_id = uuid.uuid4().hex
        if self._store is None:
            return request_id, ""
        prompt, version, arm, cached = served
        self._store.record({
            "request_id": request_id, "served_at_unix_s": time.time(), "route": route,
            "arm": arm, "policy_version": version, "query": normalise_query(body.query),
            "prompt": prompt, "target_reward": float(body.target_reward),
            "cached": cached, "client_id": current_client(), **extra})
        return request_id, self._store.receipt(request_id)

    # ---- HTTP routes ------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """200 while the replica can serve a policy (a liveness probe must not restart a
        replica because the registry is down); "stale" tells monitoring that a policy
        may be older than the registry's (`registry`: arm a, `ab_registry`: arm b)."""
        arms = self._arms.arms
        health = {name: self._arms.registry_health(arm) for name, arm in arms.items()}
        stale = any(h and h["stale"] for h in health.values())
        body: dict[str, Any] = {"status": "stale" if stale else "ok",
                                "policy_version": _public(arms["a"].version) if arms else "",
                                "policy_loaded_at_unix_s": arms["a"].loaded_at if arms else 0.0}
        for name, key in (("a", "registry"), ("b", "ab_registry")):
            if health.get(name) is not None:
                # Unauthenticated: freshness only, no URIs, paths or error texts.
                body[key] = {k: health[name][k] for k in
                             ("stale", "seconds_since_ok", "stale_after_s", "from_local_copy")
                             if k in health[name]}
        return body

    @api.get("/v1/version", response_model=VersionResponse)
    async def version(self) -> VersionResponse:
        a = self._arms.arms["a"]
        return VersionResponse(
            policy_version=a.version, policy_uri=a.uri, loaded_at_unix_s=a.loaded_at,
            arms=[arm.describe() for arm in self._arms.arms.values()],
            ab_traffic_percent=self._arms.percent_b, replica_id=self._replica_id,
            cache={**self._cache.stats(), "policy_prompts": self._policy_prompts})

    @api.post("/v1/prompt", response_model=PromptResponse)
    async def prompt(self, body: PromptRequest) -> PromptResponse:
        check_query_length(body.query, self._cfg.serve.max_query_chars)
        try:
            served = await self._generate(normalise_query(body.query),
                                          float(body.target_reward), body.client_key)
        except PolicyFailed as exc:
            return _unavailable("policy unavailable", str(exc))
        request_id, receipt = self._record("prompt", body, served)
        return PromptResponse(prompt=served[0], policy_version=served[1], arm=served[2],
                              cached=served[3], target_reward=body.target_reward,
                              request_id=request_id, receipt=receipt,
                              **self._decoding_of(served[1]))

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, body: AnswerRequest) -> AnswerResponse:
        check_query_length(body.query, self._cfg.serve.max_query_chars)
        check_label(body.label, self._label_words)
        if self._target is None:
            return JSONResponse(status_code=404, content={
                "error": "this deployment serves no target LLM (/v1/answer is off)"})
        query = normalise_query(body.query)
        try:
            served = await self._generate(query, float(body.target_reward), body.client_key)
        except PolicyFailed as exc:
            return _unavailable("policy unavailable", str(exc))
        prompt, version, arm, cached = served
        timeout = self._cfg.serve.target_timeout_s
        try:
            result = await asyncio.wait_for(self._ask_target(prompt, query), timeout)
            if "failed" in result:
                raise TargetFailed(result["failed"])
        except Exception as exc:  # noqa: BLE001 - the policy's part is still served
            reason = (f"no answer within {timeout:g} s (serve.target_timeout_s)"
                      if isinstance(exc, asyncio.TimeoutError) else str(exc)
                      if isinstance(exc, TargetFailed)
                      else f"{type(exc).__name__}: {exc}"[:300])
            if not isinstance(exc, (asyncio.TimeoutError, TargetFailed)):
                logger.exception("target LLM call failed")
            request_id, receipt = self._record("answer", body, served)
            return _unavailable("target LLM unavailable", reason, prompt=prompt,
                                policy_version=version, arm=arm,
                                request_id=request_id, receipt=receipt)
        request_id, receipt = self._record("answer", body, served, answer=result["answer"],
                                           target_label=result.get("label"))
        correct = None
        if body.label is not None:
            predicted = result.get("label") if self._label_words else \
                self._task.parse(result["answer"])
            correct = predicted.strip() == body.label.strip()
            if self._store is not None:
                await asyncio.to_thread(self._store.add, request_id, correct, None,
                                        body.label, "answer-gold")
        return AnswerResponse(prompt=prompt, policy_version=version, arm=arm, cached=cached,
                              target_reward=body.target_reward, request_id=request_id,
                              receipt=receipt, correct=correct, **self._decoding_of(version),
                              **result)

    def _decoding_of(self, version: str) -> dict[str, Any]:
        """The response fields naming how `version` wrote its prompt."""
        served = self._arms.decodings.get(version)
        return served.describe() if served else {"decoding": "unknown"}

    # ---- OpenAI-compatible routes (qpo_ray.serving.openai_route) ------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await openai_route.chat_completion(self, request)

    @api.get("/v1/models")
    async def models(self) -> Any:
        return openai_route.list_models(self)

    async def _ask_target(self, prompt: str, query: str) -> dict[str, Any]:
        return await self._target.answer.remote((prompt, query))

    @api.post("/v1/feedback", response_model=FeedbackResponse)
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        """The outcome of a served request, stored durably (serving.feedback): 404 for an
        id no replica served, 409 when the request already has feedback."""
        if self._store is None:
            return JSONResponse(status_code=404, content={
                "error": "feedback is off (serve.feedback: false)"})
        check_feedback(body, self._label_words)
        if (self._cfg.serve.feedback_requires_receipt
                and not self._store.receipt_ok(body.request_id, body.receipt)):
            return _refused(403, "feedback needs the request's receipt", "receipt",
                            "missing, or not the receipt this request was served with "
                            "(serve.feedback_requires_receipt)")
        try:
            record = await asyncio.to_thread(self._store.requests.lookup, body.request_id)
            if record.get("client_id") and record["client_id"] != current_client():
                return _refused(403, "not your request", "request_id",
                                "feedback must come from the client that made the request")
            row = await asyncio.to_thread(self._store.add_to, record, body.correct,
                                          body.reward, body.label, "client")
        except UnknownRequest:
            return _refused(404, "unknown request id", "request_id",
                            "no served request has this id")
        except DuplicateFeedback:
            return _refused(409, "feedback already recorded", "request_id",
                            "this request already has feedback")
        return FeedbackResponse(request_id=body.request_id, arm=row["arm"],
                                policy_version=row["policy_version"])
