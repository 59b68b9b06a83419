"""Pairs/s of label scoring, three ways, on the same machine and the same pairs
(4-label tweet_emotion, the tiny target model):

1. the reference code's way: a Python loop, one full forward over prompt+input+label
   per pair per label, unbatched;
2. the single-process batched backend (`LocalScorer`: one pass per prefix scores every
   label, shared-prefix KV cache for multi-token labels);
3. the Ray Data pipeline (`RayDataScorer`, an actor pool of engines), wall time
   including the actors' engine start, and without it (wall minus the slowest actor's
   engine start, as each actor measures it: what a run of this size pays per pair
   once its engines are up; a larger run tends to it).

    .venv/bin/python benchmarks/eval_throughput.py --pairs 1024 --backend transformers vllm
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_pairs(task, n_pairs: int):
    import pandas as pd

    prompts = ["Classify the emotion of the tweet.",
               "Which emotion does the tweet express: anger, joy, optimism or sadness?",
               "Read the tweet and name its emotion.",
               "Emotion?"]
    queries = task.load_split("train")
    rows = []
    for i in range(n_pairs):
        q, p = queries[i // len(prompts)], prompts[i % len(prompts)]
        rows.append({"pair_id": f"p{i}", "query_id": q.id, "query": q.text, "prompt_id":
                     f"m{i % len(prompts)}", "prompt": p, "source": "manual",
                     "label": str(q.label), "group": 0, "loop": 0, "seed": 0, "demo_ids": []})
    return pd.DataFrame(rows)


def per_pair_loop(task, backend, pairs) -> list[str]:
    """One forward per pair per label over the whole text, as the reference code does."""
    import torch

    from qpo_ray.scoring import query_example

    predictions = []
    model, enc = backend.model, backend.encoder
    for row in pairs.itertuples():
        prefix = task.format(row.prompt, query_example(task, row))
        scores = []
        for cand in enc.encode_candidates(task.continuations()):
            prefix_ids = enc.encode_prefixes([prefix])[0]  # re-read per label, as reference
            n_prefix = len(prefix_ids)
            ids = torch.tensor([prefix_ids + cand])
            with torch.inference_mode():
                lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            scores.append(sum(lp[n_prefix - 1 + k, t].item() for k, t in enumerate(cand)))
        predictions.append(str(max(range(len(scores)), key=scores.__getitem__)))
    return predictions


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--backend", nargs="+", default=["transformers"],
                        choices=["transformers", "vllm"],
                        help="engine(s) inside the Ray Data actors, each run on the same pairs")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the single-process runs (1 on a busy machine)")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" /
                                                  "tweet_emotion"))
    args = parser.parse_args()

    import ray
    import torch

    from qpo_ray.backends import create_backend
    from qpo_ray.config import Config, EvaluationConfig, TargetConfig, TaskConfig
    from qpo_ray.evaluation import RayDataScorer
    from qpo_ray.scoring import LocalScorer
    from qpo_ray.tasks import get_task

    ncpu = os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    task = get_task(TaskConfig(name="tweet_emotion", data_dir=args.data_dir))
    pairs = build_pairs(task, args.pairs)
    target = TargetConfig(backend="transformers", dtype="float32", batch_size=16,
                          max_model_len_tokens=512, cpu_kvcache_space_gib=1)
    backend = create_backend(target)

    reference, t_loop = timed(lambda: per_pair_loop(task, backend, pairs))
    local, t_local = timed(lambda: LocalScorer(task, backend, []).score(pairs))

    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, ncpu // args.actors)),
                                       "HF_HUB_OFFLINE": "1"}})
    n = len(pairs)
    rows = [("per-pair loop (reference)", t_loop), ("batched backend, 1 process", t_local)]
    notes = [f"predictions agreeing with the loop: batched "
             f"{sum(a == b for a, b in zip(reference, local['prediction'])) / n:.0%}"]
    for name in args.backend:
        cfg = Config()
        cfg.target = TargetConfig(**{**target.__dict__, "backend": name})
        cfg.evaluation = EvaluationConfig(num_actors=args.actors, num_cpus_per_actor=1,
                                          batch_size_pairs=max(1, n // (2 * args.actors)))
        scorer = RayDataScorer(cfg, task, [])
        dist, t_dist = timed(lambda: scorer.score(pairs))
        slowest = scorer.last_slowest_start_seconds
        rows += [(f"Ray Data, {args.actors} {name} actors (incl. start)", t_dist),
                 (f"Ray Data, {args.actors} {name} actors (excl. start)", t_dist - slowest)]
        notes += [f"{name}: engine start slowest actor {slowest:.1f} s "
                  f"({scorer.usage.engine_start_seconds:.1f} s summed); engine time "
                  f"{scorer.usage.engine_seconds:.1f} s = "
                  f"{n / scorer.usage.engine_seconds:.2f} pairs per engine-second; "
                  f"agreeing with the loop "
                  f"{sum(a == b for a, b in zip(reference, dist['prediction'])) / n:.0%}"]
    ray.shutdown()

    print(f"\n{n} pairs x {len(task.label_words)} labels, {ncpu} CPU cores, "
          f"{args.threads} torch thread(s) in the single-process runs")
    for name, seconds in rows:
        print(f"{name:52s} {n / seconds:8.2f} pairs/s  {seconds:7.1f} s  "
              f"x{t_loop / seconds:5.1f} vs loop")
    print("\n".join(notes))

if __name__ == "__main__":
    main()
