"""Text -> token ids, the same way for every local backend (HF and vLLM), so that both
score exactly the same token sequences and their predictions agree."""

from __future__ import annotations

from typing import Any, Sequence

from qpo_ray.common.errors import ConfigError


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
            self._encode_text_prefix(p) if self._has_special_text(p) else
            list(self.tokenizer(self.wrap(p), add_special_tokens=special)["input_ids"])
            for p in prefixes
        ]

    def _has_special_text(self, prefix: str) -> bool:
        """Whether the prefix (a served query, say) holds a special-token string."""
        if not hasattr(self, "_special_texts"):
            decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            self._special_texts = tuple(t.content for t in decoder.values() if t.content)
        return any(t in prefix for t in self._special_texts)

    def _encode_text_prefix(self, prefix: str) -> list[int]:
        """A prefix holding special-token strings: its own characters are tokenized as
        text (split_special_tokens), the chat template's around it as control tokens, so
        a query cannot open a turn or end the text. Prefixes without such strings take
        the plain path (their ids are unchanged)."""
        if not self.use_chat_template:
            return list(self.tokenizer(prefix, add_special_tokens=True,
                                       split_special_tokens=True)["input_ids"])
        marker = "\x00qpo-content\x00"
        before, found, after = self.wrap(marker).partition(marker)
        if not found:
            raise ValueError("the chat template does not hold the user content verbatim")

        def plain(text: str, split: bool) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False,
                                       split_special_tokens=split)["input_ids"]) if text else []

        return plain(before, False) + plain(prefix, True) + plain(after, False)

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


def shared_prefix_runs(prefix_ids: Sequence[Sequence[int]],
                       min_shared: int) -> list[tuple[int, list[int]]]:
    """Group prefixes that start with the same tokens: (head length, row indices) runs,
    every input row in exactly one run, each run's head computed once by the engine.

    Sorted order puts prefixes with a common head next to each other (QPO's pairs share
    the chat template and the prompt, which come before the query). The runs maximise
    the tokens saved, head x (rows - 1): all of a prompt's queries make one run with
    the template + prompt as head, rather than one run of every prompt with only the
    template as head (which saves less), or runs of queries that happen to share their
    first words (smaller runs, and more heads to compute). A head shorter than
    `min_shared` tokens is not worth a separate pass; a head always leaves at least one
    token of every row to read, where the answer is scored. Rows in no run worth a head
    come last, together (head 0: read whole).
    """
    order = sorted(range(len(prefix_ids)), key=lambda i: list(prefix_ids[i]))
    # common[k]: the head rows order[k - 1] and order[k] could share
    common = [0] + [min(_common_length(prefix_ids[a], prefix_ids[b]),
                        len(prefix_ids[a]) - 1, len(prefix_ids[b]) - 1)
                    for a, b in zip(order, order[1:])]

    # Each range of sorted rows is one run under the head all its rows share, or split
    # where that head ends, whichever saves more (a tie keeps one run: fewer heads to
    # compute). Ranges are solved children first, with a stack rather than recursion:
    # nesting is as deep as the number of distinct shared lengths.
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    stack = [(0, len(order), False)] if order else []
    while stack:
        lo, hi, children_done = stack.pop()
        if hi - lo == 1:
            best[lo, hi] = (0, [(0, lo, hi)])
            continue
        head = min(common[lo + 1:hi])
        cuts = [lo] + [k for k in range(lo + 1, hi) if common[k] == head] + [hi]
        children = list(zip(cuts, cuts[1:]))
        if not children_done:
            stack.append((lo, hi, True))
            stack.extend((a, b, False) for a, b in children)
            continue
        whole = head * (hi - lo - 1) if head >= min_shared else 0
        saved = sum(best[c][0] for c in children)
        best[lo, hi] = ((saved, [p for c in children for p in best[c][1]]) if saved > whole
                        else (whole, [(head if whole else 0, lo, hi)]))

    runs, loose = [], []
    for head, lo, hi in best[0, len(order)][1] if order else []:
        if head:
            runs.append((head, order[lo:hi]))
        else:
            loose += order[lo:hi]
    return runs + ([(0, loose)] if loose else [])
