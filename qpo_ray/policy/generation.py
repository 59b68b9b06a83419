"""Prompt generation conditioned on a target reward, and query embeddings.

Generation runs the backbone once over the ``[R | q]`` prefix (every row has the same
prefix length thanks to the fixed query slot, see `batching`), keeps its KV cache, and
then feeds one generated token at a time (token embedding + prompt segment embedding,
through the same LayerNorm as in training) until every row has produced EOS or
`max_prompt_tokens` tokens; finished rows leave the batch. Sampling (top-k 2, top-p 0.9)
is what augmentation rounds use; greedy is what the test phase uses.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from qpo_ray.policy.batching import (encode_queries, pad_id, position_ids_from_mask,
                                     trim_padding)
from qpo_ray.policy.inference import speed_up_decoding
from qpo_ray.policy.model import QPOPolicy


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k (0: no cut), then outside the top-p mass
    of those, at -inf. Only the k survivors are sorted (top-k returns them best first):
    sorting all ~50k logits of every row at every step took a quarter of sampling's time."""
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    values, index = torch.topk(logits, k, dim=-1)
    if top_p < 1.0:
        probs = values.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        values = values.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def prefix_inputs(policy: QPOPolicy, queries: list[str], target_reward: float):
    """The `[R | q]` input vectors, their attention mask and the query mask."""
    q_ids, q_mask = trim_padding(*encode_queries(policy.tokenizer, queries,
                                                 policy.config.max_query_tokens), "left")
    q_ids, q_mask = q_ids.to(policy.device), q_mask.to(policy.device)
    reward = torch.full((len(queries),), float(target_reward), device=policy.device)
    embeds = policy.embed_prefix(reward, q_ids, q_mask)
    mask = torch.cat([torch.ones_like(q_mask[:, :1]), q_mask], dim=1)
    return embeds, mask, q_mask


def _generate_batch(policy: QPOPolicy, queries: list[str], target_reward: float,
                    do_sample: bool, top_k: int, top_p: float,
                    generator: torch.Generator | None) -> list[list[int]]:
    """Token ids per query, without the EOS (at most `max_prompt_tokens`).

    Rows that have produced EOS leave the batch (and the KV cache): a batch then costs
    what its rows cost one by one at each length, not its longest row times its size.
    """
    eos, filler = policy.tokenizer.eos_token_id, pad_id(policy.tokenizer)
    max_tokens = policy.config.max_prompt_tokens
    embeds, mask, _ = prefix_inputs(policy, queries, target_reward)
    out = policy.run_backbone(embeds, mask, position_ids_from_mask(mask), use_cache=True)
    next_position = mask.sum(dim=1, keepdim=True)
    ids = torch.full((len(queries), max_tokens), filler, dtype=torch.long, device=policy.device)
    live = torch.arange(len(queries), device=policy.device)  # batch row -> query index
    for step in range(max_tokens):
        logits = policy.lm_logits(out.last_hidden_state[:, -1]).float()
        if do_sample:
            probs = _filter_top_k_top_p(logits, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        ids[live, step] = token
        going = token != eos
        if step == max_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            live, token, mask, next_position = live[keep], token[keep], mask[keep], next_position[keep]
            out.past_key_values.batch_select_indices(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = policy.run_backbone(policy.embed_prompt_tokens(token[:, None]), mask, next_position,
                                  past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    rows = ids.tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@torch.no_grad()
def generate_token_ids(policy: QPOPolicy, queries: list[str], target_reward: float = 100.0,
                       do_sample: bool = False, top_k: int = 2, top_p: float = 0.9,
                       seed: int | None = None, batch_size: int = 32,
                       on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """`generate_prompts` before decoding: each prompt's token ids, EOS excluded.
    `on_batch(done)` is called after each batch with the queries done so far."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Stored-W^T matmuls on CPU (see policy.inference); a no-op on GPU and when done.
    speed_up_decoding(policy)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=policy.device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    try:
        ids: list[list[int]] = []
        for start in range(0, len(queries), batch_size):
            chunk = list(queries[start:start + batch_size])
            ids.extend(_generate_batch(policy, chunk, target_reward, do_sample, top_k, top_p,
                                       generator))
            if on_batch is not None:
                on_batch(len(ids))
        return ids
    finally:
        policy.train(was_training)


def generate_prompts(policy: QPOPolicy, queries: list[str], target_reward: float = 100.0,
                     do_sample: bool = False, top_k: int = 2, top_p: float = 0.9,
                     seed: int | None = None, batch_size: int = 32,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """One prompt per query, asking the policy for `target_reward` (0-100 scale).

    Greedy when `do_sample` is False; otherwise top-k / top-p sampling, reproducible for
    a given `seed` (and batch size). The policy's train/eval mode is restored afterwards.
    """
    ids = generate_token_ids(policy, queries, target_reward, do_sample, top_k, top_p, seed,
                             batch_size, on_batch)
    return [policy.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@torch.no_grad()
def embed_queries(policy: QPOPolicy, queries: list[str], batch_size: int = 64,
                  target_reward: float = 100.0) -> np.ndarray:
    """(N, H) float32, L2-normalised: the policy's hidden states over each query's tokens,
    mean-pooled. The query is read after the usual reward position (at `target_reward`,
    as at generation time) so the states are the ones the policy was trained on."""
    was_training = policy.training
    policy.eval()
    try:
        chunks = []
        for start in range(0, len(queries), batch_size):
            embeds, mask, q_mask = prefix_inputs(policy, list(queries[start:start + batch_size]),
                                           target_reward)
            hidden = policy.run_backbone(embeds, mask, position_ids_from_mask(mask)).last_hidden_state
            weights = q_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden[:, 1:] * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not chunks:
            return np.zeros((0, policy.backbone.config.hidden_size), dtype=np.float32)
        return torch.cat(chunks).numpy()
    finally:
        policy.train(was_training)
