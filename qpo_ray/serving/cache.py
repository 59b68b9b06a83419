"""The per-replica prompt cache: the same (normalised query, policy version, target
reward) gets the same prompt without a policy call.

Serving decodes deterministically (greedy, or mbr at a fixed temperature), so a policy
maps one input to one prompt and a hit returns exactly what the policy would have
written: the replica feeds the policy the same normalised query it caches under
(`normalise_query`), so nothing that the key folds together could have produced a
different prompt. The decoding settings (serve.decoding, serve.mbr_temperature) are
fixed for a deployment's replicas, hence not in the key. A sampled decoding mode would
not have that property (a cached draw would pin one sample per query and remove the
diversity sampling is for): such a mode must bypass the cache.

The version is part of the key, and `retain` drops every entry of a version that is
no longer served, so a policy swap never serves an old prompt. Free of Ray.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from typing import Iterable, Optional

CacheKey = tuple[str, str, float]


def normalise_query(query: str) -> str:
    """NFC, whitespace runs folded to one space, ends stripped: "a  film\\n" and
    "a film" are one query (to the policy too, so the cache stays exact)."""
    return " ".join(unicodedata.normalize("NFC", query).split())


class PromptCache:
    """A bounded LRU map CacheKey -> prompt with hit/miss counts; `max_entries` 0 = off."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[CacheKey, str] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> Optional[str]:
        prompt = self._entries.get(key)
        if prompt is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return prompt

    def put(self, key: CacheKey, prompt: str) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = prompt
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._entries) > max(max_entries, 0):
            self._entries.popitem(last=False)

    def retain(self, versions: Iterable[str]) -> None:
        """Drop the entries of every version not in `versions` (the ones served now)."""
        keep = set(versions)
        for key in [k for k in self._entries if k[1] not in keep]:
            del self._entries[key]

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "max_entries": self.max_entries,
                "hits": self.hits, "misses": self.misses}
