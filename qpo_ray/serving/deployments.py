"""The two Serve deployments: `PolicyServer` (the HTTP ingress holding the policy, with
dynamic request batching) and `TargetServer` (the target LLM behind /v1/answer, on the
same backend interface evaluation uses).

The policy is swapped without downtime: a registry URI (`models:/<name>@latest`) is
polled, so a version the loop registers is picked up on its own; a new `user_config`
in a Serve config file's `deployments` section reconfigures replicas in place; a
`serve.run` with another `policy_uri` rolls the replicas (old ones serve until their
replacements are ready). A new policy is loaded in a worker thread while the old one keeps serving;
the swap is one attribute assignment, so every request sees one whole policy.

What cannot be served answers 503 with a reason and nothing else does: a failed or slow
target makes /v1/answer a 503 (carrying the policy's prompt) while /v1/prompt keeps
answering; an unreachable registry keeps the current policy serving and shows up as
"stale" on /healthz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from qpo_ray.config import Config
from qpo_ray.serving import policy_source
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
    PromptRequest,
    PromptResponse,
    VersionResponse,
    check_query_length,
    finite_or_none,
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


def _unavailable(error: str, reason: str, **extra: Any) -> JSONResponse:
    """503 for the part that cannot be served right now, saying why; the client may
    retry (the rest of the API keeps answering)."""
    return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                        content={"error": error, "reason": reason, **extra})


@serve.deployment(name="TargetServer")
class TargetServer:
    """The target LLM: formats (prompt, query) the way the task does and answers it."""

    def __init__(self, cfg: Config) -> None:
        from qpo_ray.backends import create_backend
        from qpo_ray.device import configure_cpu_threads
        from qpo_ray.tasks import get_task

        configure_cpu_threads()
        self._cfg = cfg
        self._task = get_task(cfg.task)
        self._backend = create_backend(cfg.target)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def answer(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """items: (prompt, query) pairs; one generate (and one label scoring) per batch."""
        return await asyncio.to_thread(self._answer_sync, items)

    def _answer_sync(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        from qpo_ray.tasks.base import Example

        # The gold label of a served query is unknown; format() never reads it.
        texts = [self._task.format(prompt, Example(id="request", text=query, label=""))
                 for prompt, query in items]
        generations = self._backend.generate(texts, self._cfg.target.max_new_tokens)
        results = [{"answer": g.text, "target_model": self._cfg.target.model}
                   for g in generations]
        if self._task.mode == "labels":
            words = list(self._task.label_words)
            scores = self._backend.score_continuations(texts, self._task.continuations())
            for result, row in zip(results, scores):
                logprobs = [s.logprob_sum for s in row]
                result["label"] = words[max(range(len(words)), key=logprobs.__getitem__)]
                result["label_logprobs"] = {w: finite_or_none(lp) for w, lp in zip(words, logprobs)}
        return results

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.answer.set_max_batch_size(int(user_config["max_batch_size"]))
        self.answer.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))


@serve.deployment(name="PolicyServer")
@serve.ingress(api)
class PolicyServer:
    """HTTP ingress: validates requests, batches them into one `generate_prompts` call per
    batch (grouped by target reward), and forwards /v1/answer to the target."""

    def __init__(self, cfg: Config, target: Optional[DeploymentHandle] = None) -> None:
        from qpo_ray.device import configure_cpu_threads

        configure_cpu_threads()
        self._cfg = cfg
        self._target = target
        _GUARD.serve_cfg = cfg.serve
        try:
            if read_token(cfg.serve) is None and cfg.serve.insecure:
                logger.warning(UNAUTHENTICATED_WARNING.format(host=cfg.serve.host,
                                                              port=cfg.serve.port))
        except TokenUnavailable as exc:
            logger.error("every request will be refused (503): %s", exc)
        self._policy = None
        self._ref: Optional[policy_source.PolicyRef] = None
        self._loaded_at = 0.0
        self._policy_uri: Optional[str] = None
        self._poll_interval_s = 0.0
        self._poll_task: Optional[asyncio.Task] = None
        # Registry freshness for /healthz: when the alias was last resolved, the last
        # failure since then (None once a poll succeeds again).
        self._registry_ok_at = 0.0
        self._registry_error: Optional[str] = None
        # Requests inside generate_batch, the size of the last batch and the configured
        # wait for a batch to fill (see _generate: a lone client does not wait).
        self._in_flight = 0
        self._last_batch_size = 0
        self._batch_wait_s = cfg.serve.batch_wait_timeout_s
        # Serialises loads: a reconfigure and a poll never load two policies at once.
        self._load_lock = asyncio.Lock()

    # ---- policy lifecycle -------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve before the replica first serves and on every user_config change.
        A Serve config file's `user_config` replaces the whole dict: keys it leaves out
        fall back to the profile's `serve` section."""
        serve_cfg = self._cfg.serve
        if "policy_uri" not in user_config:
            raise ValueError("PolicyServer user_config: policy_uri is required")
        self.generate_batch.set_max_batch_size(
            int(user_config.get("max_batch_size", serve_cfg.max_batch_size)))
        self._batch_wait_s = float(user_config.get("batch_wait_timeout_s",
                                                   serve_cfg.batch_wait_timeout_s))
        self.generate_batch.set_batch_wait_timeout_s(self._batch_wait_s)
        self._policy_uri = str(user_config["policy_uri"])
        self._poll_interval_s = float(user_config.get("registry_poll_interval_s",
                                                      serve_cfg.registry_poll_interval_s))
        await self._refresh()
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_registry())

    async def _refresh(self) -> None:
        """Load the policy the URI points at now, if it is not the one already served (a
        directory is read once: write a new policy to a new directory)."""
        async with self._load_lock:
            uri = self._policy_uri
            tracking_uri = self._cfg.tracking_uri()
            ref = await asyncio.to_thread(policy_source.resolve, uri, tracking_uri,
                                          self._cfg.tracking.experiment)
            if self._ref is not None and ref == self._ref:
                self._registry_ok_at, self._registry_error = time.time(), None
                return
            policy = await asyncio.to_thread(policy_source.load_policy, ref, tracking_uri)
            policy.eval()
            self._policy, self._ref, self._loaded_at = policy, ref, time.time()
            self._registry_ok_at, self._registry_error = self._loaded_at, None
            logger.info("serving policy %s", ref.version)

    async def _poll_registry(self) -> None:
        """Follow a registry alias: a failed poll (registry briefly unreachable) keeps the
        current policy and tries again at the next tick."""
        while True:
            interval = self._poll_interval_s
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval <= 0 or not policy_source.is_registry_uri(self._policy_uri or ""):
                continue
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving the policy we have
                self._registry_error = f"{type(exc).__name__}: {exc}"[:500]
                logger.exception("policy refresh from %s failed", self._policy_uri)

    def _registry_health(self) -> Optional[dict[str, Any]]:
        """How fresh the served policy is, for a registry alias (a directory or a pinned
        version cannot go stale): stale once no poll succeeded for the configured time."""
        uri = self._policy_uri or ""
        if not policy_source.is_registry_uri(uri) or self._poll_interval_s <= 0:
            return None
        limit = self._cfg.serve.registry_stale_after_s or 3 * self._poll_interval_s
        age = time.time() - self._registry_ok_at
        return {"uri": uri, "last_ok_unix_s": self._registry_ok_at,
                "seconds_since_ok": round(age, 1), "stale_after_s": limit,
                "stale": age > limit, "last_error": self._registry_error}

    # ---- batched generation -----------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[str, float]]) -> list[tuple[str, str]]:
        """items: (query, target_reward). Returns (prompt, policy_version) per item."""
        policy, ref = self._policy, self._ref
        self._last_batch_size = len(items)
        prompts = await asyncio.to_thread(self._generate_grouped, policy, items)
        return [(p, ref.version) for p in prompts]

    @staticmethod
    def _generate_grouped(policy, items: list[tuple[str, float]]) -> list[str]:
        """One `generate_prompts` call per distinct target reward in the batch (usually one),
        so every request is conditioned on its own reward."""
        from qpo_ray.policy import generate_prompts

        by_reward: dict[float, list[int]] = defaultdict(list)
        for i, (_query, reward) in enumerate(items):
            by_reward[reward].append(i)
        out: list[str] = [""] * len(items)
        for reward, indices in by_reward.items():
            prompts = generate_prompts(policy, [items[i][0] for i in indices],
                                       target_reward=reward, do_sample=False,
                                       batch_size=max(len(indices), 1))
            for i, p in zip(indices, prompts):
                out[i] = p
        return out

    # ---- HTTP routes ------------------------------------------------------------------

    async def _generate(self, query: str, target_reward: float) -> tuple[str, str]:
        """generate_batch for one request. Serve's batcher waits batch_wait_timeout_s for
        a batch to fill even when no other request is coming. When nothing else is in
        flight and the last batch was a single request (one client at a time), the wait
        is set to 0 (the batcher reads it as it takes a batch's first request): a lone
        client pays no batching delay, while concurrent clients, whose requests arrive
        in bursts after each batch, still wait for and share full batches."""
        self._in_flight += 1
        try:
            alone = self._in_flight == 1 and self._last_batch_size <= 1
            self.generate_batch.set_batch_wait_timeout_s(0.0 if alone else self._batch_wait_s)
            return await self.generate_batch((query, target_reward))
        finally:
            self._in_flight -= 1

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """200 while the replica can serve a policy (a liveness probe must not restart a
        replica because the registry is down); "stale" tells monitoring that the policy
        may be older than the registry's."""
        registry = self._registry_health()
        body: dict[str, Any] = {
            "status": "stale" if registry and registry["stale"] else "ok",
            "policy_version": self._ref.version if self._ref else "",
            "policy_loaded_at_unix_s": self._loaded_at}
        if registry is not None:
            body["registry"] = registry
        return body

    @api.get("/v1/version", response_model=VersionResponse)
    async def version(self) -> VersionResponse:
        return VersionResponse(policy_version=self._ref.version, policy_uri=self._ref.uri,
                               loaded_at_unix_s=self._loaded_at)

    @api.post("/v1/prompt", response_model=PromptResponse)
    async def prompt(self, body: PromptRequest) -> PromptResponse:
        check_query_length(body.query, self._cfg.serve.max_query_chars)
        prompt, version = await self._generate(body.query, float(body.target_reward))
        return PromptResponse(prompt=prompt, policy_version=version,
                              target_reward=body.target_reward)

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, body: AnswerRequest) -> AnswerResponse:
        check_query_length(body.query, self._cfg.serve.max_query_chars)
        if self._target is None:
            return JSONResponse(status_code=404, content={
                "error": "this deployment serves no target LLM (/v1/answer is off)"})
        prompt, version = await self._generate(body.query, float(body.target_reward))
        timeout = self._cfg.serve.target_timeout_s
        try:
            result = await asyncio.wait_for(self._ask_target(prompt, body.query), timeout)
        except asyncio.TimeoutError:
            return _unavailable("target LLM unavailable",
                                f"no answer within {timeout:g} s (serve.target_timeout_s)",
                                prompt=prompt, policy_version=version)
        except Exception as exc:  # noqa: BLE001 - the policy's part is still served
            logger.exception("target LLM call failed")
            return _unavailable("target LLM unavailable", f"{type(exc).__name__}: {exc}"[:300],
                                prompt=prompt, policy_version=version)
        return AnswerResponse(prompt=prompt, policy_version=version,
                              target_reward=body.target_reward, **result)

    async def _ask_target(self, prompt: str, query: str) -> dict[str, Any]:
        return await self._target.answer.remote((prompt, query))
