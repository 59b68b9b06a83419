"""`TargetServer`: the Serve deployment of the target LLM behind /v1/answer and
/v1/chat/completions, on the same backend interface the test phase scores with, so a
served answer is the test phase's prediction for the same (prompt, query)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from qpo_ray.config import Config
from qpo_ray.serving.isolation import Failed, run_isolated
from qpo_ray.serving.schemas import finite_or_none


@serve.deployment(name="TargetServer")
class TargetServer:
    """The target LLM: formats (prompt, query) the way the task does and answers it."""

    def __init__(self, cfg: Config) -> None:
        from qpo_ray.backends import create_backend
        from qpo_ray.common.device import configure_cpu_threads
        from qpo_ray.tasks import get_task

        configure_cpu_threads()
        self._cfg = cfg
        self._task = get_task(cfg.task)
        self._backend = create_backend(cfg.target)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def answer(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """items: (prompt, query) pairs; one generate (and one label scoring) per batch.
        An item that fails alone gets {"failed": reason} (serving.isolation)."""
        results = await asyncio.to_thread(run_isolated, self._answer_sync, items,
                                          "the target LLM")
        return [{"failed": r.reason} if isinstance(r, Failed) else r for r in results]

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
