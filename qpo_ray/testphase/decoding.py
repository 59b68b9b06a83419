"""How the test phase turns a run's policies into a prompt per query: the context every
method reads (`MethodContext`), the (loop, decoding) that `qpo` stands for (`Choice`,
chosen on the dev split by qpo_ray.testphase.evaluate), and the decodings (`policy_prompts`):
greedy at the target reward (the paper), rank (qpo_ray.policy.ranking) or mbr
(qpo_ray.policy.mbr, its belief temperature per loop from qpo_ray.testphase.calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import pandas as pd

from qpo_ray.config import Config, ConfigError
from qpo_ray.config.sections import DECODINGS
from qpo_ray.common.progress import Progress
from qpo_ray.prompts import PromptRecord, prompt_id
from qpo_ray.common.layout import RunFiles
from qpo_ray.tasks.base import Example, Splits, Task

if TYPE_CHECKING:
    from qpo_ray.policy.mbr import UtilityTable

PromptTuple = tuple[str, str, str]


@dataclass(frozen=True)
class Predicted:
    """A method's own label predictions (label indices, one per query): a reference row
    with no prompt and no target call (qpo_ray.testphase.references)."""

    labels: list[int]


@dataclass(frozen=True)
class Choice:
    """The policy the test phase uses for `qpo`: which loop's, decoded how."""

    loop: int
    decoding: str


@dataclass
class MethodContext:
    cfg: Config
    task: Task
    collection: list[PromptRecord]
    manual: PromptRecord
    # loop -> policy directory, in loop order (the last is the run's final policy).
    policy_dirs: dict[int, str]
    run: Optional[RunFiles] = None
    # Step 0's scored pairs (rewards), when the run has them.
    step0: Optional[pd.DataFrame] = None
    choice: Optional[Choice] = None
    # The task's splits (label_router_collection reads the collection's gold labels).
    splits: Optional[Splits] = None
    # loop -> mbr's belief temperature fitted on the dev split (test.mbr.calibration);
    # a loop without one decodes at test.mbr.temperature.
    mbr_temperatures: dict[int, float] = field(default_factory=dict)
    # The collection prompt most accurate on the dev split (best_single_dev), chosen by
    # qpo_ray.testphase.evaluate before the test queries are scored.
    single_on_dev: Optional[PromptRecord] = None
    # Prompts per (policy, decoding, temperature, query ids), and mbr's candidate
    # log-likelihoods per (policy, query ids): qpo, qpo_loop<t> and the dev calibration
    # share them.
    _cache: dict = field(default_factory=dict)

    def mbr_table(self) -> UtilityTable:
        """mbr decoding's candidates and utilities, from Step 0 (qpo_ray/policy/mbr.py):
        the same table the train stage saves beside each policy."""
        from qpo_ray.policy.mbr import utility_table

        if self.step0 is None:
            raise ConfigError("test.decoding: mbr needs the run's Step-0 data: evaluate a "
                              "run directory")
        if "mbr" not in self._cache:
            self._cache["mbr"] = utility_table(self.step0, self.cfg.training.best_row_column)
        return self._cache["mbr"]

    def mbr_temperature(self, loop: int) -> float:
        return self.mbr_temperatures.get(loop, self.cfg.test.mbr.temperature)

    def mbr_logprobs(self, loop: int, queries: list[Example], policy_dir: Optional[str] = None,
                     on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """(N, C) log-likelihood of mbr's candidates under a loop's policy at the target
        reward: read once per (policy, queries), by the dev calibration and the decoding."""
        from qpo_ray.policy import QPOPolicy
        from qpo_ray.policy.ranking import mbr_logprobs

        key = ("mbr-logprobs", policy_dir or loop, tuple(q.id for q in queries))
        if key not in self._cache:
            policy = QPOPolicy.load(policy_dir or self.policy_dirs[loop])
            self._cache[key] = mbr_logprobs(policy, [q.text for q in queries],
                                            self.cfg.loop.target_reward, self.mbr_table(),
                                            on_batch=on_batch)
        return self._cache[key]

    @property
    def last_loop(self) -> int:
        return max(self.policy_dirs)

    def ranked_collection(self) -> list[PromptRecord]:
        """The collection, best Step-0 R_task first (collection order without Step 0)."""
        if self.step0 is None or "r_task" not in self.step0:
            return list(self.collection)
        r_task = self.step0[self.step0["loop"] == 0].groupby("prompt_id")["r_task"].mean()
        return sorted(self.collection, key=lambda r: -float(r_task.get(r.id, -np.inf)))


# -- the policy's prompts -----------------------------------------------------------------

def policy_prompts(ctx: MethodContext, loop: int, decoding: str, queries: list[Example],
                   source: str = "qpo", policy_dir: Optional[str] = None) -> list[PromptTuple]:
    """One prompt per query from a policy: greedy at the target reward; ranked
    (qpo_ray.policy.ranking) among the best collection prompts, the greedy prompt and
    `test.rank.samples` sampled ones; or by mbr (qpo_ray.policy.mbr) among Step 0's
    prompts."""
    from qpo_ray.policy import QPOPolicy, generate_prompts
    from qpo_ray.policy.ranking import rank_candidates

    if decoding not in DECODINGS:
        raise ConfigError(f"test.decoding: unknown decoding {decoding!r} (known: "
                          f"{list(DECODINGS)} or 'dev')")
    temperature = ctx.mbr_temperature(loop) if decoding == "mbr" else None
    key = (policy_dir or loop, decoding, temperature, tuple(q.id for q in queries))
    if key not in ctx._cache:
        rank, reward = ctx.cfg.test.rank, ctx.cfg.loop.target_reward
        # Ranking's candidates include the greedy prompts (cached: qpo_greedy reuses them).
        greedy = ([] if decoding != "rank" else
                  [p[1] for p in policy_prompts(ctx, loop, "greedy", queries, source, policy_dir)])
        policy = (QPOPolicy.load(policy_dir or ctx.policy_dirs[loop])
                  if decoding != "mbr" else None)
        texts = [q.text for q in queries]
        passes = rank.samples if decoding == "rank" else 1
        whose = source if policy_dir else f"loop {loop}"
        progress = Progress(f"test: {whose} {decoding} prompts", passes * len(texts), "prompts")

        def on_batch(k: int) -> Callable[[int], None]:
            return lambda done: progress.update(k * len(texts) + done)
        if decoding == "greedy":
            chosen = generate_prompts(policy, texts, target_reward=reward, on_batch=on_batch(0))
        elif decoding == "mbr":
            logprobs = ctx.mbr_logprobs(loop, queries, policy_dir, on_batch(0))
            chosen = ctx.mbr_table().choose(logprobs, temperature)
        else:
            fixed = [r.text for r in ctx.ranked_collection()[:rank.collection_prompts]]
            sampled = [generate_prompts(policy, texts, target_reward=reward,
                                        do_sample=True, top_k=ctx.cfg.loop.top_k,
                                        top_p=ctx.cfg.loop.top_p, seed=ctx.cfg.seed + k,
                                        on_batch=on_batch(k))
                       for k in range(rank.samples)]
            candidates = [_uniform([c for c in fixed + [g] + [s[i] for s in sampled] if c.strip()],
                                   len(fixed) + 1 + len(sampled))
                          for i, g in enumerate(greedy)]
            progress.close()
            # Ranking reads every candidate at the high and at the low reward: as long
            # as the sampling above, so it gets its own progress line.
            progress = Progress(f"test: {whose} ranking {len(candidates[0])} candidates",
                                2 * len(texts), "query passes")
            scores = rank_candidates(policy, texts, candidates, reward,
                                     rank.low_reward, on_batch=progress.update)
            chosen = [row[int(np.argmax(s))] for row, s in zip(candidates, scores)]
        progress.close()
        ctx._cache[key] = [(prompt_id(c), c, source) for c in chosen]
    return ctx._cache[key]


def _uniform(row: list[str], width: int) -> list[str]:
    """`width` candidates (ranking takes as many per query): empty generations dropped,
    the first candidate repeated in their place (a repeat never changes the argmax)."""
    row = row or ["."]
    return row + [row[0]] * (width - len(row))
