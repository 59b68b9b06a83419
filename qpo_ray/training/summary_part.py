"""The query summary's own phase of training (`train_policy(part="summary")`): its
checks, its set-up on the workers, and its early stopping (`training.summary.holdout`).

Why stop early: trained on a few hundred queries, the summary's adapter learns which
prompt each of them had (TweetEval: its prompt NLL falls from 0.31 to 0.008 in five
epochs), and its belief on new queries grows surer than it is right (docs/experiments.md:
"v2 of the effectiveness profile"). A seeded share of the summary's queries is held out
of its training; before training and after every epoch the policy's belief over mbr's
candidates (the prompts it chooses among at test, qpo_ray/policy/mbr.py) is scored on
them, as cross-entropy to each held-out query's best candidate; the best state is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qpo_ray.config import Config, ConfigError, PolicyConfig, section_from_dict
from qpo_ray.policy import QPOPolicy
from qpo_ray.policy.batching import best_rows, encode_queries
from qpo_ray.policy.ranking import candidate_logprobs


def check_summary_policy(cfg: Config, init_checkpoint: str | None) -> None:
    """The summary part needs a policy with a query summary: the checkpoint's own
    config says (it, not `cfg.policy`, is what the workers load)."""
    layers = cfg.policy.query_summary.num_layers
    if init_checkpoint is not None:
        meta = Path(init_checkpoint) / "qpo_policy.json"
        if meta.exists():
            saved = section_from_dict(PolicyConfig, json.loads(meta.read_text())["policy"],
                                      "policy")
            layers = saved.query_summary.num_layers
    if not layers:
        where = f" at {init_checkpoint}" if init_checkpoint else ""
        raise ConfigError(f"training.summary.epochs: the policy{where} has no query summary "
                          "(policy.query_summary.enable: false)")


def prepare_summary(policy: QPOPolicy, queries: list[str]) -> None:
    """On a worker: the projection is fitted on the part's distinct training queries the
    first time (the same on every rank), then all but the adapter and the input/reward
    parts are frozen (`train_only_summary` raises for a policy without a summary)."""
    summary = policy.query_summary
    if summary is not None and not bool(summary.fitted):
        ids, mask = encode_queries(policy.tokenizer, list(dict.fromkeys(queries)),
                                   policy.config.max_query_tokens)
        summary.fit(ids.to(policy.device), mask.to(policy.device))
    policy.train_only_summary()


@dataclass(frozen=True)
class Holdout:
    queries: list[str]
    best: list[int]  # each query's best candidate (by training.summary.rank_by), an index
    candidates: list[str]  # mbr's candidates, in its table's order
    reward: float  # the reward the belief is read at (loop.target_reward)


def split_holdout(rows: pd.DataFrame, candidates: list[str], fraction: float, rank_by: str,
                  reward: float, seed: int) -> Holdout:
    """Hold out round(`fraction` x the part's queries), drawn by `seed` among those whose
    best row (by `rank_by`, the row the part would train on) is one of mbr's
    `candidates`. ValueError (the caller names the file) when too few are."""
    best = best_rows(rows, 1, by=rank_by)
    eligible = best[best["prompt"].isin(set(candidates))]
    want = round(fraction * len(best))
    if want < 1 or want > len(eligible) or want >= len(best):
        raise ValueError(f"training.summary.holdout: {fraction} of {len(best)} summary queries "
                         f"is {want}; needs 1 or more, fewer than all, and at most the "
                         f"{len(eligible)} whose best prompt is one of mbr's "
                         f"{len(candidates)} candidates")
    held = eligible.iloc[np.sort(np.random.default_rng(seed).permutation(len(eligible))[:want])]
    return Holdout(held["query"].tolist(), [candidates.index(p) for p in held["prompt"]],
                   list(candidates), float(reward))


@dataclass
class BestEpoch:
    """Scores the belief on the held-out queries after each epoch; keeps the best heads."""
    holdout: Holdout
    amp_dtype: torch.dtype | None = None
    losses: list[float] = field(default_factory=list)
    kept_epoch: int = 0
    _state: dict[str, torch.Tensor] | None = None

    def score(self, policy: QPOPolicy) -> float:
        with torch.autocast(policy.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logprobs = candidate_logprobs(policy, self.holdout.queries,
                                          [self.holdout.candidates] * len(self.holdout.queries),
                                          self.holdout.reward)
        logits = torch.as_tensor(logprobs, dtype=torch.float64)
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(self.holdout.best)))

    def after_epoch(self, policy: QPOPolicy, epoch: int) -> float:
        loss = self.score(policy)
        self.losses.append(loss)
        if loss <= min(self.losses):
            # Only the heads train in the summary phase (QPOPolicy.train_only_summary).
            self._state = {k: v.detach().clone() for k, v in policy.heads_state_dict().items()}
            self.kept_epoch = epoch
        return loss

    def restore(self, policy: QPOPolicy) -> None:
        if self._state is not None:
            policy.load_state_dict(self._state, strict=False)
