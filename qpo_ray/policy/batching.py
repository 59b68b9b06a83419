"""Turning (query, prompt, reward) rows into the fixed-slot tensors the policy reads.

Layout of one training sequence (length 1 + Q + P, Q = max_query_tokens,
P = max_prompt_tokens)::

    slot:   0 | 1 ........... Q | Q+1 ............ Q+P
            R | pad pad q q q q | p p p EOS pad pad

The query is LEFT-padded inside its slot and the prompt RIGHT-padded inside its own, so
the real query tokens sit right before the prompt and every sequence's prompt starts at
the same slot (Q + 1): generation then needs no per-row prefix alignment. Padding is
masked out of attention and position ids count only real positions (see
`position_ids_from_mask`), so the backbone sees ``R q p`` as one contiguous sequence.
The model reads a batch with the columns that are padding in every row dropped
(`trim_padding`), so Q and P are the slots' widths, not what each batch pays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from qpo_ray.common.errors import ConfigError

# Rewards come min-max scaled to 0-100 (eq. 4); the model reads reward / REWARD_SCALE so
# its input and its reward-head target are O(1).
REWARD_SCALE = 100.0


@dataclass
class EncodedRows:
    """Tokenised rows, ready for a TensorDataset (all tensors share dim 0)."""

    query_ids: torch.Tensor  # (N, Q) long, left-padded
    query_mask: torch.Tensor  # (N, Q) long
    prompt_ids: torch.Tensor  # (N, P) long, right-padded, EOS-terminated
    prompt_mask: torch.Tensor  # (N, P) long
    reward: torch.Tensor  # (N,) float, 0-100 scale

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.query_ids, self.query_mask, self.prompt_ids, self.prompt_mask, self.reward)


BATCH_KEYS = ("query_ids", "query_mask", "prompt_ids", "prompt_mask", "reward")


def as_batch(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DataLoader batch over `EncodedRows.tensors()` -> the dict `compute_loss` takes."""
    return dict(zip(BATCH_KEYS, tensors))


def pad_id(tokenizer) -> int:
    """GPT-2 has no pad token; the value never matters (masked), so fall back to EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_queries(tokenizer, queries: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (and truncate to the first `max_tokens`) the queries' tokens. A query is
    text: a special-token string in it ("<|im_start|>", "<|endoftext|>") is tokenized as
    its characters, never as the control token (the same ids as before for any query
    without one)."""
    ids = tokenizer(list(queries), add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]
    out = torch.full((len(ids), max_tokens), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(ids), max_tokens), dtype=torch.long)
    for i, row in enumerate(ids):
        row = row[:max_tokens]
        if row:
            out[i, max_tokens - len(row):] = torch.tensor(row)
            mask[i, max_tokens - len(row):] = 1
    return out, mask


def _strip_eos_text(text: str, eos_texts: tuple[str, ...]) -> str:
    # The paper's JSON ends prompts with GPT-2's literal "<|endoftext|>"; the policy
    # appends its own tokenizer's EOS id, so a literal marker would be learned twice.
    text = text.rstrip()
    for marker in eos_texts:
        if marker and text.endswith(marker):
            text = text[: -len(marker)].rstrip()
    return text


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts truncated to `max_tokens - 1` tokens plus EOS (so it learns to stop)."""
    eos = tokenizer.eos_token_id
    eos_texts = (tokenizer.eos_token or "", "<|endoftext|>")
    texts = [_strip_eos_text(p, eos_texts) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = torch.full((len(ids), max_tokens), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(ids), max_tokens), dtype=torch.long)
    for i, row in enumerate(ids):
        row = row[: max_tokens - 1] + [eos]
        out[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return out, mask


def encode_rows(tokenizer, queries: list[str], prompts: list[str], rewards: list[float],
                max_query_tokens: int, max_prompt_tokens: int) -> EncodedRows:
    if not (len(queries) == len(prompts) == len(rewards)):
        raise ValueError(
            f"queries/prompts/rewards differ in length: {len(queries)}/{len(prompts)}/{len(rewards)}"
        )
    q_ids, q_mask = encode_queries(tokenizer, queries, max_query_tokens)
    p_ids, p_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    reward = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    return EncodedRows(q_ids, q_mask, p_ids, p_mask, reward)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor, side: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the slot's columns that are padding in every row of this batch (leading ones
    for the left-padded query slot, trailing ones for the right-padded prompt slot): a
    batch then costs its longest row, not the slot width. Exact, since a padded column
    is masked out of attention and position ids come from the mask."""
    used = mask.bool().any(dim=0).nonzero()
    if used.numel() == 0:
        return ids[:, :0], mask[:, :0]
    if side == "left":
        start = int(used[0])
        return ids[:, start:], mask[:, start:]
    if side == "right":
        end = int(used[-1]) + 1
        return ids[:, :end], mask[:, :end]
    raise ValueError(f"trim_padding: side must be 'left' or 'right', got {side!r}")


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real (mask == 1) positions, so pads inside the sequence leave
    no gaps; a pad's own position is arbitrary (clamped to >= 0) since nothing attends to it."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def training_rows(frame: pd.DataFrame, mode: str, source: str = "dataset",
                  keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows one ORL stage trains on, validated.

    mode "qpo": every (query, prompt, reward) row. mode "sft" (the paper's Table 4
    ablation): only the best-reward prompt of each query; the reward is then ignored by
    the model. Bad rows fail here with the row number and `source` (the file) named.
    `keep`: further numeric columns carried along (e.g. the summary part's ranking).
    """
    missing = [c for c in ("query", "prompt", "reward", *keep) if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing} (have {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{source}: the dataset has no rows")
    for column in ("query", "prompt"):
        bad = frame.index[~frame[column].map(lambda v: isinstance(v, str) and v.strip() != "")]
        if len(bad):
            raise ValueError(f"{source}: row {bad[0]}: column '{column}' must be non-empty text")
    rewards = pd.to_numeric(frame["reward"], errors="coerce")
    bad = frame.index[~rewards.map(lambda v: math.isfinite(v) if v == v else False)]
    if len(bad):
        raise ValueError(
            f"{source}: row {bad[0]}: column 'reward' must be a finite number, "
            f"got {frame['reward'].loc[bad[0]]!r}"
        )
    rows = frame[["query", "prompt"]].assign(reward=rewards.astype(float))
    for column in keep:
        if column != "reward":
            rows[column] = pd.to_numeric(frame[column], errors="raise").astype(float)
    if mode == "sft":
        best = rows.groupby("query", sort=False)["reward"].idxmax()
        rows = rows.loc[best.values]
    elif mode != "qpo":
        raise ConfigError(f"policy.mode: unknown mode {mode!r} (known: qpo, sft)")
    return rows.reset_index(drop=True)


def best_rows(rows: pd.DataFrame, top_k: int, by: str = "reward") -> pd.DataFrame:
    """Each query's `top_k` rows highest in column `by` (ties: the dataset's order)."""
    ranked = rows.assign(_order=range(len(rows))).sort_values(
        [by, "_order"], ascending=[False, True])
    best = ranked.groupby("query", sort=False).head(top_k)
    return best.sort_values("_order").drop(columns="_order").reset_index(drop=True)
