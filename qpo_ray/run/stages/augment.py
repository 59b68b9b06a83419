"""Augmentation round t (paper Algorithm 1): Q_t sampled from the collection set with
repeats, P_t = pi_t(q) sampled at the target reward, scored on the target; R_task of the
round = mean accuracy of its prompts; rewards on the STORED Step-0 scale;
D_t = D_{t-1} + filter(D_A), the training set of loop t + 1.

The expert filter applies to augmented rows too, with the same cut as Step 0 (reward >=
expert_fraction * 100): the paper reports +17.1% data from 3 x 1,000 generated pairs,
i.e. most augmented pairs were filtered out, not all kept. MLflow (loop t + 1's run):
the round's rows, its cost, R_task, accept rate and the new training set."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from qpo_ray.data.io import DatasetFileError, read_dataset, write_dataset
from qpo_ray.data.pairs import make_pairs
from qpo_ray.data.rewards import compute_rewards, pair_accuracy
from qpo_ray.run.stage_logging import flatten_numbers, log_training_set
from qpo_ray.common.progress import progress_callback
from qpo_ray.prompts import prompt_id
from qpo_ray.common.atomic import write_json_atomic
from qpo_ray.common.console import log as console
from qpo_ray.common.layout import read_json, sidecar
from qpo_ray.run.pipeline import Stage, StageOutputs, plan
from qpo_ray.run.stages.context import RunContext


@dataclass(frozen=True)
class AugmentOutputs(StageOutputs):
    dataset: str
    round: str


def augment_round(ctx: RunContext, policy_dir: str | Path, dataset_path: str | Path,
                  round_index: int, out_path: str | Path,
                  seed: Optional[int] = None) -> Path:
    """Round `round_index` with the policy in `policy_dir`, D_{t-1} in `dataset_path`;
    writes D_t to `out_path`, every scored row of the round (before the filter) to
    `<out>.rows.parquet` and R_task, cost and accept rate to `<out>.round.json`."""
    from qpo_ray.policy import QPOPolicy, generate_prompts  # torch: only when it runs

    cfg = ctx.cfg
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous, scale = read_dataset(dataset_path)
    if scale is None:
        raise DatasetFileError(f"{dataset_path}: no reward scale in its metadata; augmented "
                               "rewards must use the Step-0 scale")
    seed = cfg.seed + round_index if seed is None else seed
    queries = random.Random(seed).choices(ctx.splits.collection,
                                          k=cfg.loop.augment_queries_per_round)

    policy = QPOPolicy.load(str(policy_dir))
    progress, on_batch = progress_callback(f"augment_{round_index}: generating", len(queries),
                                           "prompts")
    texts = generate_prompts(policy, [q.text for q in queries],
                             target_reward=cfg.loop.target_reward, do_sample=True,
                             top_k=cfg.loop.top_k, top_p=cfg.loop.top_p, seed=seed,
                             on_batch=on_batch)
    progress.close()
    del policy
    prompts = [(prompt_id(t), t, "policy") for t in texts]
    pairs = make_pairs(queries, prompts, ctx.task, ctx.splits, num_shots=cfg.task.num_shots,
                       num_demo_sets=cfg.task.num_demo_sets, loop=round_index, seed=seed)
    scored, usage = ctx.score(pairs, label=f"augment_{round_index}: scoring")

    r_task = float(pair_accuracy(scored).mean())
    rows, _ = compute_rewards(scored, cfg.dataset.zero_shot_penalty,
                              few_shot=cfg.task.num_shots > 0, scale=scale, r_task=r_task,
                              answer=cfg.dataset.query_reward)
    # An empty prompt is scored and kept in the round's rows (it is what the policy
    # wrote), but never merged: the next training set refuses prompts it cannot learn.
    empty = rows["prompt"].str.strip().eq("")
    if empty.any():
        console.info(f"augment_{round_index}: {int(empty.sum())} of {len(rows)} sampled "
                     "prompts were empty; scored, but left out of the training set")
    kept = rows[(rows["reward"] >= 100.0 * cfg.dataset.expert_fraction) & ~empty]
    merged = pd.concat([previous, kept], ignore_index=True)
    write_dataset(rows, sidecar(out, ".rows.parquet"), scale)
    write_dataset(merged, out, scale)
    write_json_atomic(sidecar(out, ".round.json"), {
        "round": round_index, "seed": seed, "r_task": r_task, "usage": usage,
        "rows_generated": len(rows), "rows_added": len(kept),
        "empty_prompts": int(empty.sum()),
        "accept_rate": len(kept) / max(1, len(rows)),
        "distinct_generated_prompts": int(rows["prompt"].nunique()),
    })
    return out


def run(ctx: RunContext, stage: Stage) -> AugmentOutputs:
    t, run_dir = stage.loop, ctx.run
    # Seeded by the stage's place in the run: a resumed run draws the same queries.
    seed = ctx.cfg.seed + plan(ctx.cfg.loop.num_loops).index(stage)
    path = augment_round(ctx, run_dir.policy_dir(t), run_dir.dataset_path(t), t,
                         run_dir.dataset_path(t + 1), seed=seed)
    return AugmentOutputs(dataset=str(path), round=str(sidecar(path, ".round.json")))


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    out, t, tracker = AugmentOutputs.from_dict(outputs), stage.loop, ctx.tracker
    info = read_json(out.round)
    tracker.log_artifact(t + 1, sidecar(out.dataset, ".rows.parquet"), "augmented")
    tracker.log_loop_metrics(t + 1, flatten_numbers(info["usage"]), prefix="target/")
    tracker.log_loop_metrics(t + 1, {
        "augment/r_task": info["r_task"], "filter/accept_rate": info["accept_rate"],
        "data/rows_added": info["rows_added"],
        "augment/distinct_generated_prompts": info["distinct_generated_prompts"]})
    log_training_set(tracker, ctx.run, t + 1)
