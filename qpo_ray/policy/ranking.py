"""Reward-conditioned ranking of candidate prompts: decodings for the test phase (and
`mbr_prompts`, the mbr decoding of qpo_ray/policy/mbr.py, for the test phase and Serve).

Greedy decoding at reward 100 (the paper's test protocol) returns the single most
likely prompt; with a small policy that is often the prompt the dataset holds most
often, whatever the query. Ranking asks the policy a sharper question about a set of
candidate prompts c for query q (the collection's best prompts plus a few the policy
samples itself):

    score(c | q) = log p(c | R = high, q) - log p(c | R = low, q)

i.e. how much more likely the policy finds c when it is told the target will answer
well than when it is told it will answer badly: the reward-conditioned model's own
estimate of which candidate earns the reward on this query (a Decision-Transformer
reading of "which action has high return here", with the prompt's prior frequency
cancelled out). Every candidate's log-likelihood includes its EOS, as in training.

The `[R | q]` prefix of a query is computed once per reward level and its KV cache is
repeated over the query's distinct candidates, so only candidate tokens are read, once
per distinct candidate.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from qpo_ray.policy.batching import encode_prompts, position_ids_from_mask, trim_padding
from qpo_ray.policy.generation import prefix_inputs
from qpo_ray.policy.mbr import UtilityTable
from qpo_ray.policy.model import QPOPolicy


def _chunk_logprobs(policy: QPOPolicy, queries: list[str], candidates: list[list[str]],
                    reward: float) -> torch.Tensor:
    """(B, C) log p(candidate + EOS | R = reward, query) for B queries, C candidates each.
    A candidate a query lists twice (the greedy prompt is often a collection prompt, and
    samples repeat it) is read once."""
    n_b, n_c = len(queries), len(candidates[0])
    flat, owner, where = [], [], []  # distinct (query, candidate) rows; each slot's row
    for b, row in enumerate(candidates):
        seen: dict[str, int] = {}
        for c in row:
            if c not in seen:
                seen[c] = len(flat)
                flat.append(c)
                owner.append(b)
            where.append(seen[c])
    p_ids, p_mask = trim_padding(*encode_prompts(policy.tokenizer, flat,
                                                 policy.config.max_prompt_tokens), "right")
    p_ids, p_mask = p_ids.to(policy.device), p_mask.to(policy.device)
    owner_t = torch.tensor(owner, device=policy.device)
    embeds, mask, _ = prefix_inputs(policy, queries, reward)
    out = policy.run_backbone(embeds, mask, position_ids_from_mask(mask), use_cache=True)
    last = out.last_hidden_state[owner_t, -1]  # predicts token 0
    cache = out.past_key_values
    cache.reorder_cache(owner_t)  # each row's [R | q] prefix, repeated per distinct candidate
    start = mask.sum(dim=1, keepdim=True)[owner_t]
    positions = start + torch.arange(p_ids.shape[1], device=policy.device).unsqueeze(0)
    full_mask = torch.cat([mask[owner_t], p_mask], dim=1)
    hidden = policy.run_backbone(policy.embed_prompt_tokens(p_ids), full_mask, positions,
                                 past_key_values=cache).last_hidden_state
    # Slot j of the prompt is predicted from slot j - 1 (slot 0 from the prefix's end).
    predictors = torch.cat([last.unsqueeze(1), hidden[:, :-1]], dim=1)
    valid = p_mask.bool()
    logprobs = policy.lm_logits(predictors[valid]).float().log_softmax(-1)
    picked = logprobs.gather(-1, p_ids[valid].unsqueeze(-1)).squeeze(-1)
    row = torch.arange(len(flat), device=policy.device).unsqueeze(1).expand_as(p_ids)[valid]
    sums = torch.zeros(len(flat), device=policy.device).index_add_(0, row, picked)
    return sums[torch.tensor(where, device=policy.device)].view(n_b, n_c)


@torch.no_grad()
def candidate_logprobs(policy: QPOPolicy, queries: Sequence[str],
                       candidates: Sequence[Sequence[str]], reward: float,
                       batch_size: int = 8,
                       on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """(N, C) log-likelihood of each query's C candidate prompts at `reward` (0-100).
    Every query must have the same number of candidates. `on_batch(done)` is called
    after each batch with the queries done so far."""
    if len(queries) != len(candidates):
        raise ValueError(f"candidate_logprobs: {len(queries)} queries, {len(candidates)} "
                         "candidate lists")
    widths = {len(c) for c in candidates}
    if len(widths) > 1 or 0 in widths:
        raise ValueError(f"candidate_logprobs: every query needs the same, non-zero number "
                         f"of candidates (got {sorted(widths)})")
    was_training = policy.training
    policy.eval()
    try:
        chunks = []
        for i in range(0, len(queries), batch_size):
            chunks.append(_chunk_logprobs(policy, list(queries[i:i + batch_size]),
                                          [list(c) for c in candidates[i:i + batch_size]],
                                          reward).cpu())
            if on_batch is not None:
                on_batch(min(i + batch_size, len(queries)))
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
    finally:
        policy.train(was_training)


def rank_candidates(policy: QPOPolicy, queries: Sequence[str],
                    candidates: Sequence[Sequence[str]], high_reward: float = 100.0,
                    low_reward: float = 0.0, batch_size: int = 8,
                    on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """(N, C) contrastive scores log p(c | high, q) - log p(c | low, q); argmax per row
    is the ranked choice. `on_batch(done)` counts 0..2N: every query at both rewards."""
    if high_reward <= low_reward:
        raise ValueError(f"rank_candidates: high_reward {high_reward} must exceed "
                         f"low_reward {low_reward}")
    after_high = None if on_batch is None else (lambda done: on_batch(len(queries) + done))
    high = candidate_logprobs(policy, queries, candidates, high_reward, batch_size, on_batch)
    low = candidate_logprobs(policy, queries, candidates, low_reward, batch_size, after_high)
    return high - low


def mbr_logprobs(policy: QPOPolicy, queries: Sequence[str], reward: float,
                 table: UtilityTable, batch_size: int = 8,
                 on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """(N, C) log-likelihood of `table`'s prompts for each query at `reward` (0-100):
    the policy's belief that mbr decodes (qpo_ray/policy/mbr.py)."""
    return candidate_logprobs(policy, queries, [table.prompts] * len(queries), reward,
                              batch_size, on_batch)


def mbr_prompts(policy: QPOPolicy, queries: Sequence[str], reward: float, table: UtilityTable,
                batch_size: int = 8, on_batch: Optional[Callable[[int], None]] = None,
                temperature: float = 1.0) -> list[str]:
    """Each query's mbr choice among `table`'s prompts, the policy's belief read at
    `reward` (0-100) and normalised at `temperature`."""
    return table.choose(mbr_logprobs(policy, queries, reward, table, batch_size, on_batch),
                        temperature)
