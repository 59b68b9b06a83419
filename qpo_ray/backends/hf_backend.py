"""A plain Hugging Face transformers model as the target LLM, batched.

Label scoring computes every shared token once. Prefixes are sorted so that those with
a common head (chat template + prompt, shared by every query the prompt is scored on)
sit together; every such head is computed once per call, all heads together in as few
passes as fit a batch, and each row then reads only its rest (the query) from its own
head's KV. Rows of different heads share a batch, cut by the length of what they read,
so that neither padding nor a prompt scored on few queries costs a pass of its own:
the same numbers as reading each prefix whole, for a fraction of the compute
(`Usage.cached_prompt_tokens` counts the saving).
When every candidate is one distinct token, the logits at the prefix's last position
score all of them; otherwise the prefix's KV cache is repeated for the candidates, so
only candidate tokens are re-read.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qpo_ray.common import device as devices
from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend
from qpo_ray.backends.text import PromptEncoder, shared_prefix_runs, single_token_ids
from qpo_ray.common.models import resolve_model


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prefix's last token in the last column, where the next
    token (the candidate's first) is predicted."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


# What one more forward pass costs, in tokens' worth of compute (fixed per-call work:
# 30 layers' kernel launches, the heads' KV gathered for the batch). Fitted on
# SmolLM2-135M, one CPU thread: a forward of B rows x L tokens takes ~0.06 s + B x L /
# 390 tokens/s, i.e. ~24 tokens; 64 also pays for the lower matmul efficiency of small
# passes (24 and 64 scored 8 prompts x 64 queries equally fast, 160 5% slower).
_FORWARD_OVERHEAD_TOKENS = 64


def length_batches(lengths: Sequence[int], max_rows: int,
                   overhead_tokens: int) -> list[tuple[int, int]]:
    """Cut rows sorted by length into batches (lo, hi) of at most `max_rows`, each
    padded to its longest row, so that the tokens read plus `overhead_tokens` per batch
    are the fewest (a dynamic programme over cut points). Fixed-size batches of a
    prompt's queries in text order read 40-49% padding on Step-0 pairs (a few long
    reviews set a whole batch's width); these read 8-9%."""
    n = len(lengths)
    cost, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(max(0, hi - max_rows), hi):
            c = cost[lo] + (hi - lo) * lengths[hi - 1] + overhead_tokens
            if c < cost[hi]:
                cost[hi], cut[hi] = c, lo
    batches, hi = [], n
    while hi:
        batches.append((cut[hi], hi))
        hi = cut[hi]
    return batches[::-1]


class HFBackend(TargetBackend):
    def __init__(self, target_config) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = target_config
        path = resolve_model(target_config.model)
        self.device = devices.get_device()
        self.dtype = devices.resolve_dtype(target_config.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model = devices.move(self.model, self.device).eval()
        self.encoder = PromptEncoder(self.tokenizer, target_config.use_chat_template)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.batch_size = max(1, target_config.batch_size)

    # -- label scoring -------------------------------------------------------------

    def score_continuations(
        self, prefixes: Sequence[str], candidates: Sequence[str]
    ) -> list[list[ContinuationScore]]:
        prefix_ids = self.encoder.encode_prefixes(prefixes)
        cand_ids = self.encoder.encode_candidates(candidates)
        out: list[list[ContinuationScore] | None] = [None] * len(prefix_ids)
        with self._timed(), torch.inference_mode():
            # Every run of prefixes sharing a head (all of a prompt's queries) has that
            # head computed once, all heads of the call in as few passes as fit a batch.
            head_of, head_row, heads = [0] * len(prefix_ids), [0] * len(prefix_ids), []
            for head, group in shared_prefix_runs(prefix_ids,
                                                  self.config.min_shared_prefix_tokens):
                if head:
                    for i in group:
                        head_of[i], head_row[i] = head, len(heads)
                    heads.append(prefix_ids[group[0]][:head])
                    self.usage.cached_prompt_tokens += head * (len(group) - 1)
            head_kv = self._head_kv(heads) if heads else []
            # Rows of different runs share a batch (each row's own head is selected from
            # the heads' KV), so a prompt scored on few queries does not cost a pass of
            # its own; rows of similar length to read share a batch, so little of it is
            # padding. Rows without a head go apart: a head-less row next to headed ones
            # would see nothing but masked keys at its padding.
            for part in ([i for i in range(len(prefix_ids)) if head_of[i]],
                         [i for i in range(len(prefix_ids)) if not head_of[i]]):
                part.sort(key=lambda i: len(prefix_ids[i]) - head_of[i])
                for lo, hi in length_batches([len(prefix_ids[i]) - head_of[i] for i in part],
                                             self.batch_size, _FORWARD_OVERHEAD_TOKENS):
                    rows = part[lo:hi]
                    scores = self._score_chunk([prefix_ids[i] for i in rows], cand_ids,
                                               [head_of[i] for i in rows],
                                               [head_row[i] for i in rows], head_kv)
                    for i, score in zip(rows, scores):
                        out[i] = score
        return self._counted_scores(out)  # type: ignore[arg-type]

    def _head_kv(self, heads: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of every head, [heads, kv heads, longest head,
        head dim]. Heads are right-padded: causal attention keeps the padding out of
        every real token's KV, and the padding's own KV is masked wherever it is read."""
        width = max(len(h) for h in heads)
        parts = []
        for start in range(0, len(heads), self.batch_size):
            chunk = heads[start:start + self.batch_size]
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for row, h in enumerate(chunk):
                ids[row, :len(h)] = torch.tensor(h, dtype=torch.long)
            cache = self.model(input_ids=devices.move(ids, self.device), use_cache=True,
                               logits_to_keep=1).past_key_values
            parts.append([(layer.keys, layer.values) for layer in cache.layers])
        return [(torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in range(len(parts[0]))]

    def _score_chunk(
        self, prefix_ids: list[list[int]], cand_ids: list[list[int]], heads: list[int],
        head_rows: list[int], head_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[list[ContinuationScore]]:
        """Score one batch of prefixes, each from its own head's KV (`heads[b]` tokens,
        row `head_rows[b]` of `head_kv`; 0 tokens: read whole), reading only the rest."""
        from transformers import DynamicCache

        width = max(heads)
        cache = None
        if width:
            # Indexing copies: the forward pass extends this cache, not the heads' KV.
            idx = devices.move(torch.tensor(head_rows), self.device)
            cache = DynamicCache(ddp_cache_data=[(k[idx, :, :width], v[idx, :, :width])
                                                 for k, v in head_kv],
                                 config=self.model.config)
        # Left-padding the rest keeps every prefix's last token in the last column; a
        # shorter head's padding and the rest's padding sit before that row's tokens,
        # masked out, and positions skip them.
        ids, rest_mask = _left_pad([p[h:] for p, h in zip(prefix_ids, heads)], self.pad_id)
        head_len = torch.tensor(heads, dtype=torch.long).unsqueeze(1)
        positions = head_len + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        head_mask = (torch.arange(width).unsqueeze(0) < head_len).long()
        mask = torch.cat([head_mask, rest_mask], 1)
        ids, mask, positions = devices.move((ids, mask, positions), self.device)
        single = single_token_ids(cand_ids)
        # Only the last position's logits are needed for the first candidate token: the
        # 49k-vocab LM head over every prefix position would dominate the cost.
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=single is None or cache is not None,
                            logits_to_keep=1)
        first_lp = torch.log_softmax(result.logits[:, -1, :].float(), dim=-1)  # [B, V]
        n_prefix = [len(p) for p in prefix_ids]
        if single is not None:
            lp = first_lp[:, single].cpu().tolist()
            return [[ContinuationScore(v, 1, n) for v in row] for row, n in zip(lp, n_prefix)]
        sums = self._score_with_cache(result.past_key_values, mask, first_lp, cand_ids)
        return [[ContinuationScore(sums[b][c], len(cand_ids[c]), n_prefix[b])
                 for c in range(len(cand_ids))] for b in range(len(prefix_ids))]

    def _score_with_cache(self, cache, prefix_mask: torch.Tensor, first_lp: torch.Tensor,
                          cand_ids: list[list[int]]) -> list[list[float]]:
        """Multi-token candidates: repeat each prefix's KV cache once per candidate and
        read the candidates' remaining tokens in one batched pass."""
        n_b, n_c = prefix_mask.shape[0], len(cand_ids)
        width = max(len(c) for c in cand_ids)
        cand = torch.full((n_c, width), self.pad_id, dtype=torch.long)
        cand_mask = torch.zeros((n_c, width), dtype=torch.long)
        for j, c in enumerate(cand_ids):
            cand[j, :len(c)] = torch.tensor(c)
            cand_mask[j, :len(c)] = 1
        cand, cand_mask = devices.move((cand, cand_mask), self.device)
        # first token of every candidate, from the prefix's last position
        total = first_lp[:, cand[:, 0]]  # [B, C]
        if width > 1:
            cache.batch_repeat_interleave(n_c)
            tokens = cand.repeat(n_b, 1)  # row b*C + j = candidate j after prefix b
            tmask = cand_mask.repeat(n_b, 1)
            full_mask = torch.cat([prefix_mask.repeat_interleave(n_c, dim=0), tmask], dim=1)
            start = prefix_mask.sum(-1).repeat_interleave(n_c).unsqueeze(1)
            positions = start + torch.arange(width, device=self.device).unsqueeze(0)
            logits = self.model(input_ids=tokens[:, :-1], attention_mask=full_mask[:, :-1],
                                position_ids=positions[:, :-1], past_key_values=cache).logits
            lp = torch.log_softmax(logits.float(), dim=-1)
            picked = lp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            rest = (picked * tmask[:, 1:]).sum(-1).view(n_b, n_c)
            total = total + rest
        return total.cpu().tolist()

    # -- generation ----------------------------------------------------------------

    def generate(self, prefixes: Sequence[str], max_new_tokens: int) -> list[Generation]:
        prefix_ids = self.encoder.encode_prefixes(prefixes)
        out: list[Generation] = []
        with self._timed(), torch.inference_mode():
            for start in range(0, len(prefix_ids), self.batch_size):
                out += self._generate_chunk(prefix_ids[start:start + self.batch_size],
                                            max_new_tokens)
        return self._counted_generations(out)

    def _generate_chunk(self, prefix_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        ids, mask = devices.move(_left_pad(prefix_ids, self.pad_id), self.device)
        result = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True,
        )
        new_tokens = result.sequences[:, ids.shape[1]:]
        # raw logits (not processed scores): the model's own distribution, as vLLM reports
        logprobs = torch.stack(result.logits, dim=1).float().log_softmax(-1)
        picked = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        eos = set(self._eos_ids())
        gens = []
        for row, (toks, lps) in enumerate(zip(new_tokens.tolist(), picked.tolist())):
            # keep up to and including the first EOS (vLLM counts it as output too)
            n = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
            text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
            gens.append(Generation(text, lps[:n], len(prefix_ids[row])))
        return gens

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def close(self) -> None:
        del self.model
