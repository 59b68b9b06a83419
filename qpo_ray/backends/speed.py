"""What an engine can compute on this machine: the GFLOP/s of a torch matmul with one
scoring actor's threads, and a model's FLOP per computed token from its config. The
pre-run plan (`qpo check`) and benchmarks/eval_throughput.py read the engines' bound
from here."""

from __future__ import annotations

import time


def matmul_gflops(dtype: str = "float32", n: int = 2048, seconds: float = 3.0,
                  threads: int | None = None) -> float:
    """GFLOP/s of an n x n matmul in `dtype` (a config name: "auto" as the engines
    resolve it) on `threads` torch threads (default: this process's OMP_NUM_THREADS,
    as in a scoring actor). Torch's thread count is restored afterwards."""
    import torch

    from qpo_ray.common import device as devices

    before = torch.get_num_threads()
    devices.configure_cpu_threads(threads)
    try:
        kind = devices.resolve_dtype(dtype, torch.device("cpu"))
        a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
        a @ b  # the first call pays allocation and thread start
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            done += 1
        return 2 * n ** 3 * done / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


def flop_per_token(model: str) -> tuple[float, int, int, int]:
    """(FLOP per token = 2 x non-embedding parameters, those parameters, hidden size,
    layers), from the model's config: built on the meta device, nothing loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qpo_ray.common.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    # Input embeddings are a lookup, not a matmul; the (tied) LM head runs only at the
    # position(s) whose next token is scored, once per pair, so it is not per token.
    skip = {id(p) for m in (net.get_input_embeddings(), net.get_output_embeddings())
            for p in m.parameters()}
    params = sum(p.numel() for p in net.parameters() if id(p) not in skip)
    return 2.0 * params, params, config.hidden_size, config.num_hidden_layers
