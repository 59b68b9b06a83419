"""The prompts each test-phase method gives each test query (qpo_ray.report scores them).

A method maps the test queries to one prompt per query, as (id, text, source) tuples:
query-agnostic baselines repeat one prompt, QPO and its ablations generate per query.

- ``qpo``: the run's last policy, greedy at reward 100 (paper's test protocol);
  ``qpo_loop<t>``: the policy after loop t, to show what each loop adds.
- ``manual``: the collection's manual (PromptSource-style) prompt.
- ``single:<id>``: every collection prompt on its own; ``best_single`` = the one with
  the best Step-0 R_task (chosen without looking at the test set) and
  ``best_single_oracle`` = the best on the test set (optimistic: an upper bound for
  any query-agnostic choice among these prompts).
- ``nearest_neighbour`` (paper Table 5): embed the test query with the policy, take
  the most similar training query of the dataset, use its best-reward prompt.
- ``sft`` (Table 4) and ``qpo_no_mla`` (Figure 3): policies trained on D_0 (the
  filtered Step-0 data) with `policy.mode=sft`, resp. with QPO's full loop schedule
  but no augmentation (same number of training stages, no new data).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from qpo_ray.config import Config
from qpo_ray.rundir import RunDir, read_json, write_json_atomic

PromptTuple = tuple[str, str, str]


def policy_prompts(policy_dir: str | Path, queries: list[str], cfg: Config,
                   source: str) -> list[PromptTuple]:
    """Greedy prompts at the target reward, one per query."""
    from qpo_ray.prompts import prompt_id
    from qpo_ray.policy import QPOPolicy, generate_prompts

    policy = QPOPolicy.load(str(policy_dir))
    texts = generate_prompts(policy, queries, target_reward=cfg.loop.target_reward,
                             do_sample=False)
    return [(prompt_id(t), t, source) for t in texts]


def nearest_neighbour_prompts(policy_dir: str | Path, queries: list[str],
                              dataset: pd.DataFrame) -> list[PromptTuple]:
    """Each test query gets the best-reward prompt of its nearest training query."""
    from qpo_ray.policy import QPOPolicy, embed_queries

    best = dataset.sort_values("reward", ascending=False).drop_duplicates("query")
    policy = QPOPolicy.load(str(policy_dir))
    train_emb = embed_queries(policy, best["query"].tolist())
    test_emb = embed_queries(policy, queries)
    nearest = np.argmax(test_emb @ train_emb.T, axis=1)
    rows = best.iloc[nearest]
    return list(zip(rows["prompt_id"], rows["prompt"], ["nearest_neighbour"] * len(rows)))


def best_single_by_step0(step0: pd.DataFrame) -> Optional[str]:
    """The collection prompt with the highest Step-0 R_task (its mean accuracy on the
    collection queries it was scored on)."""
    if "r_task" not in step0 or not len(step0):
        return None
    collected = step0[step0["loop"] == 0]
    return str(collected.groupby("prompt_id")["r_task"].mean().idxmax())


def _train_once(cfg: Config, dataset: Path, out_dir: Path, loops: int) -> str:
    """Train `loops` stages on one fixed dataset (cached: reused if already done)."""
    from qpo_ray.loop import init_ray
    from qpo_ray.training import train_policy

    marker = out_dir / "done.json"
    if marker.exists():
        return read_json(marker)["checkpoint_dir"]
    init_ray(cfg)
    checkpoint: Optional[str] = None
    for loop in range(1, loops + 1):
        result = train_policy(cfg, dataset_path=str(dataset), out_dir=str(out_dir / f"loop{loop}"),
                              loop_index=loop, init_checkpoint=checkpoint)
        checkpoint = str(result.checkpoint_dir)
    write_json_atomic(marker, {"checkpoint_dir": checkpoint})
    return checkpoint


def ablation_policy(cfg: Config, run: RunDir, method: str) -> str:
    """The checkpoint of the `sft` or `qpo_no_mla` ablation, trained on D_0."""
    dataset = run.dataset_path(1)
    if not dataset.exists():
        raise FileNotFoundError(f"{method} needs the run's D_0 ({dataset})")
    if method == "sft":
        sft_cfg = copy.deepcopy(cfg)
        sft_cfg.policy.mode = "sft"
        return _train_once(sft_cfg, dataset, run.path / "baselines" / "sft", loops=1)
    if method == "qpo_no_mla":
        return _train_once(cfg, dataset, run.path / "baselines" / "qpo_no_mla",
                           loops=cfg.loop.num_loops)
    raise ValueError(f"unknown ablation {method!r}")
