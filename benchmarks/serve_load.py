"""Serve under load: closed-loop clients on 127.0.0.1 for a bounded time, a mix of valid
and bad requests, and a policy swap in the middle (the loop registering a new version,
which the replicas' registry poll picks up while serving).

Targets: 0 responses 5xx, 0 wrong answers among valid requests (a wrong answer is a
prompt other than what the policy version named in the response writes for that
query, computed in-process beforehand), and every bad request answered with its 4xx.

    .venv/bin/python benchmarks/serve_load.py                      # 60 s, 32 clients
    .venv/bin/python benchmarks/serve_load.py --duration 30 --clients 16

Bad requests (a fifth of all, by default): empty query, wrong types, unknown field,
non-JSON, an oversized body (413 before parsing) and a wrong bearer token (401).
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_latency import fitted_policy, movie_queries  # noqa: E402

TOKEN = "load-test-token"
MODEL = "qpo-serve-load"
MAX_REQUEST_BYTES = 16384
PROMPT_B = "Is this review positive or negative? Answer in one word."


def bad_requests() -> list[tuple[str, dict, bytes, int]]:
    """(name, extra headers, raw body, expected status)."""
    ok = {"Authorization": f"Bearer {TOKEN}"}
    return [
        ("empty query", ok, b'{"query": ""}', 422),
        ("query a number", ok, b'{"query": 42}', 422),
        ("reward a string", ok, b'{"query": "a film", "target_reward": "high"}', 422),
        ("unknown field", ok, b'{"query": "a film", "reward": 5}', 422),
        ("not JSON", ok, b'{"query": "a film",', 400),
        ("oversized", ok, json.dumps({"query": "x" * (MAX_REQUEST_BYTES + 1)}).encode(), 413),
        ("bad token", {"Authorization": "Bearer wrong"}, b'{"query": "a film"}', 401),
        ("no token", {}, b'{"query": "a film"}', 401),
    ]


async def load(url: str, queries: list[str], duration_s: float, clients: int,
               bad_share: float, swap_at_s: float, swap) -> dict:
    import httpx

    bad = bad_requests()
    stats = {"latencies": [], "valid": [], "bad": [], "status_5xx": 0, "errors": []}
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(seed: int, http: "httpx.AsyncClient") -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            if rng.random() < bad_share:
                name, headers, body, expected = rng.choice(bad)
                try:
                    r = await http.post("/v1/prompt", content=body,
                                        headers={**headers, "content-type": "application/json"})
                except httpx.HTTPError as exc:
                    stats["errors"].append(f"{name}: {type(exc).__name__}")
                    continue
                stats["bad"].append((name, expected, r.status_code))
                stats["status_5xx"] += r.status_code >= 500
                continue
            query = rng.choice(queries)
            start = time.perf_counter()
            try:
                r = await http.post("/v1/prompt", json={"query": query},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
            except httpx.HTTPError as exc:
                stats["errors"].append(f"valid: {type(exc).__name__}")
                continue
            stats["latencies"].append(time.perf_counter() - start)
            stats["status_5xx"] += r.status_code >= 500
            body = r.json() if r.status_code == 200 else {}
            stats["valid"].append((query, r.status_code, body.get("policy_version"),
                                   body.get("prompt")))

    async def swapper() -> None:
        await asyncio.sleep(swap_at_s)
        stats["swap_version"] = await asyncio.to_thread(swap)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(swapper(), *(client_loop(i, http) for i in range(clients)))
    stats["wall_s"] = duration_s
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    p.add_argument("--bad-share", type=float, default=0.2, help="share of bad requests")
    p.add_argument("--queries", type=int, default=24, help="distinct valid queries")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the replica")
    args = p.parse_args()

    import torch
    from ray import serve

    from qpo_ray.config import load_config
    from qpo_ray.common.local_ray import connect_ray
    from qpo_ray.policy import generate_prompts
    from qpo_ray.serving import run_serve
    from qpo_ray.run.tracking import Tracker

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    queries = movie_queries(args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy_a = fitted_policy(root / "a", queries, num_layers=1)
        policy_b = fitted_policy(root / "b", queries, num_layers=1, prompt=PROMPT_B)
        # What each version must answer, computed in-process (greedy, reward 100).
        expected = {}
        for version, policy in (("1", policy_a), ("2", policy_b)):
            policy.eval()
            expected[f"models:/{MODEL}/{version}"] = dict(zip(
                queries, generate_prompts(policy, queries, target_reward=100.0)))
        print(f"[serve_load] two policies fitted in {time.perf_counter() - t0:.0f} s", flush=True)
        (root / "token").write_text(TOKEN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = load_config("cpu-demo", [
            f"workdir={root / 'run'}", f"tracking.registered_model_name={MODEL}",
            f"serve.port={port}", f"serve.num_cpus_per_replica={args.threads}",
            f"serve.auth_token_file={root / 'token'}",
            f"serve.max_request_bytes={MAX_REQUEST_BYTES}", "serve.registry_poll_interval_s=2",
            f"serve.policy_uri=models:/{MODEL}@latest",
        ])
        (root / "run").mkdir()
        tracker = Tracker(cfg, root / "run")
        tracker.register_policy(1, root / "a")
        connect_ray(None, num_cpus=max(2, args.threads), include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads),
                                              "HF_HUB_OFFLINE": "1"}})
        try:
            url = run_serve(cfg, blocking=False, with_target=False)
            print(f"[serve_load] serving at {url} after {time.perf_counter() - t0:.0f} s; "
                  f"{args.clients} clients for {args.duration:.0f} s", flush=True)
            stats = asyncio.run(load(url, queries, args.duration, args.clients, args.bad_share,
                                     args.duration / 2,
                                     lambda: tracker.register_policy(2, root / "b")))
        finally:
            serve.shutdown()

    valid = stats["valid"]
    served = [v for v in valid if v[1] == 200]
    wrong = [v for v in served if expected.get(v[2], {}).get(v[0]) != v[3]]
    not_ok = [v for v in valid if v[1] != 200]
    bad = stats["bad"]
    bad_wrong = [b for b in bad if b[2] != b[1]]
    bad_not_4xx = [b for b in bad if not 400 <= b[2] < 500]
    lat = sorted(stats["latencies"])
    versions = {}
    for v in served:
        versions[v[2]] = versions.get(v[2], 0) + 1
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    print(f"\n/v1/prompt under load: {args.clients} closed-loop clients on 127.0.0.1 for "
          f"{args.duration:.0f} s, {args.bad_share:.0%} bad requests, policy v2 registered at "
          f"{args.duration / 2:.0f} s (picked up by the replica's registry poll)")
    print(f"valid requests served (200):   {len(served)}  ({len(served) / stats['wall_s']:.2f}/s)")
    print(f"  by policy version:           {versions}")
    print(f"  latency p50 / p99:           {1000 * statistics.median(lat) if lat else float('nan'):.0f}"
          f" / {1000 * p99:.0f} ms")
    print(f"  valid but not 200:           {len(not_ok)}")
    print(f"  wrong answers:               {len(wrong)}")
    print(f"bad requests:                  {len(bad)}; answered 4xx: "
          f"{len(bad) - len(bad_not_4xx)}; with another status than expected: {len(bad_wrong)}")
    print(f"responses 5xx:                 {stats['status_5xx']}")
    print(f"transport errors:              {len(stats['errors'])} {stats['errors'][:3]}")
    ok = (not wrong and not not_ok and not bad_not_4xx and not bad_wrong
          and stats["status_5xx"] == 0 and not stats["errors"]
          and len(versions) == 2)
    print("targets met" if ok else "TARGETS MISSED")
    if bad_wrong[:5]:
        print("  e.g.", bad_wrong[:5])
    if wrong[:3]:
        print("  e.g. wrong:", wrong[:3])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
