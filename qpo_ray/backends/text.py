"""Text -> token ids, the same way for every local backend (HF and vLLM), so that both
score exactly the same token sequences and their predictions agree."""

from __future__ import annotations

from typing import Any, Sequence

from qpo_ray.errors import ConfigError


class PromptEncoder:
    """Wraps prefixes in the chat template (when asked) and tokenizes candidates.

    A candidate is tokenized on its own and appended to the prefix's ids: the prefix
    ends at a fixed boundary (the assistant header, or "Answer:"), so the ids a model
    would read are exactly prefix ids + candidate ids, and every candidate shares the
    prefix's ids (one pass, or a shared KV cache, serves them all).
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool) -> None:
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "target.use_chat_template is true but the model's tokenizer has no chat "
                "template; set target.use_chat_template=false for base models"
            )

    def wrap(self, prefix: str) -> str:
        """The text the model reads: a user turn plus the assistant header."""
        if not self.use_chat_template:
            return prefix
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prefix}], add_generation_prompt=True, tokenize=False
        )

    def encode_prefixes(self, prefixes: Sequence[str]) -> list[list[int]]:
        # The chat template already holds its special tokens; a plain prefix gets the
        # tokenizer's own (BOS for Llama-style models, nothing for SmolLM/GPT-2).
        special = not self.use_chat_template
        return [
            list(self.tokenizer(self.wrap(p), add_special_tokens=special)["input_ids"])
            for p in prefixes
        ]

    def encode_candidates(self, candidates: Sequence[str]) -> list[list[int]]:
        out = []
        for cand in candidates:
            text = candidate_text(cand, self.use_chat_template)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"candidate continuation {cand!r} encodes to no tokens")
            out.append(ids)
        return out


def candidate_text(candidate: str, use_chat_template: bool) -> str:
    """The text scored after a prefix. Inside a chat template the candidate is the
    assistant's whole answer, which starts right after the assistant header: a leading
    space there is not what a chat model writes, so it is dropped. Every backend goes
    through here so that their predictions agree."""
    return candidate.lstrip() if use_chat_template else candidate


def single_token_ids(candidate_ids: Sequence[Sequence[int]]) -> list[int] | None:
    """The candidates' token ids when each is exactly one token and all differ (then one
    forward pass over the prefix scores them all); None otherwise."""
    if all(len(ids) == 1 for ids in candidate_ids):
        firsts = [ids[0] for ids in candidate_ids]
        if len(set(firsts)) == len(firsts):
            return firsts
    return None


def candidate_trie(candidate_ids: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """(context, next tokens) for every proper prefix of every candidate, shortest first.

    A candidate's log-likelihood is the sum of one-step log-probs along its tokens; one
    decoding step after `prefix + context` gives the log-probs of all next tokens that
    context needs, so a label set costs one step per trie node (one in all when every
    label is a distinct single token) instead of one pass per label.
    """
    nodes: dict[tuple[int, ...], list[int]] = {}
    for ids in candidate_ids:
        for k, token in enumerate(ids):
            following = nodes.setdefault(tuple(ids[:k]), [])
            if token not in following:
                following.append(token)
    return sorted(nodes.items(), key=lambda node: len(node[0]))


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def shared_prefix_runs(prefix_ids: Sequence[Sequence[int]], max_rows: int,
                       min_shared: int) -> list[tuple[int, list[int]]]:
    """Group prefixes that start with the same tokens: (head length, row indices) runs
    of at most `max_rows` rows, every input row in exactly one run.

    Sorted order puts prefixes with a common head next to each other (QPO's pairs share
    the chat template and the prompt, which come before the query), and in sorted order
    the head common to a run is the one common to its first and last rows. A head
    shorter than `min_shared` tokens is not worth a separate pass (head 0: such rows are
    batched together, read whole); a head always leaves at least one token of every row
    to read, where the answer is scored.
    """
    order = sorted(range(len(prefix_ids)), key=lambda i: list(prefix_ids[i]))
    runs: list[tuple[int, list[int]]] = []
    rows: list[int] = []
    head = 0
    for i in order:
        if rows:
            shared = min(_common_length(prefix_ids[rows[0]], prefix_ids[i]),
                         len(prefix_ids[i]) - 1, head)
            if len(rows) < max_rows and shared >= min_shared:
                rows.append(i)
                head = shared
                continue
            runs.append((head if len(rows) > 1 else 0, rows))
        rows, head = [i], len(prefix_ids[i]) - 1
    if rows:
        runs.append((head if len(rows) > 1 else 0, rows))
    # Rows with no head worth a pass are still read together, whole (head 0), up to
    # max_rows at a time: one forward per row would starve the engine's matmuls.
    merged: list[tuple[int, list[int]]] = []
    for head, rows in runs:
        if not head and merged and not merged[-1][0] and len(merged[-1][1]) < max_rows:
            merged[-1][1].extend(rows)
        else:
            merged.append((head, rows))
    return merged
