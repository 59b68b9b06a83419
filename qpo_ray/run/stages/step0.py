"""Step 0: every (query, prompt) pair of the collection scored on the target and
rewarded, written as Parquet with its reward scale; or an existing dataset imported as
is (`dataset.import_path`). MLflow: the target's cost, on loop 1's run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from qpo_ray.config import ConfigError
from qpo_ray.data.importer import import_paper_json
from qpo_ray.data.io import read_dataset, write_dataset
from qpo_ray.data.pairs import build_step0_pairs, build_wide_pairs, wide_queries
from qpo_ray.data.rewards import RewardScale, compute_rewards
from qpo_ray.data.schema import REWARD_COLUMNS
from qpo_ray.run.stage_logging import flatten_numbers
from qpo_ray.prompts import PromptRecord, load_collection
from qpo_ray.common.atomic import write_json_atomic
from qpo_ray.common.layout import read_json, sidecar
from qpo_ray.run.pipeline import Stage, StageOutputs
from qpo_ray.run.stages.context import RunContext
from qpo_ray.tasks.base import Example


@dataclass(frozen=True)
class Step0Outputs(StageOutputs):
    dataset: str
    usage: str


def build_initial_dataset(ctx: RunContext, out_path: Optional[str | Path] = None) -> Path:
    """Write Step 0's dataset to `out_path` (default <workdir>/dataset_loop0.parquet)
    and its target cost beside it (<out>.usage.json)."""
    cfg = ctx.cfg
    out = Path(out_path) if out_path else Path(cfg.workdir) / "dataset_loop0.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    usage: dict[str, Any] = {}
    if cfg.dataset.import_path:
        source = Path(cfg.dataset.import_path)
        if not source.exists():
            raise ConfigError(f"dataset.import_path: {source} does not exist")
        if source.suffix == ".json":
            frame, scale = import_paper_json(str(source))
        else:
            frame, scale = read_dataset(source)
            if scale is None:
                raise ConfigError(f"dataset.import_path: {source} has no reward scale in its "
                                  "Parquet metadata (write it with qpo_ray.data.io.write_dataset)")
    else:
        prompts = load_collection(cfg.prompts, ctx.task.name)
        pairs = build_step0_pairs(ctx.task, ctx.splits, prompts, cfg.task, cfg.dataset,
                                  cfg.seed)
        # checked before anything is scored
        wide = wide_queries(ctx.splits, pairs, cfg.dataset.wide, cfg.task.num_shots, cfg.seed)
        scored, usage = ctx.score(pairs, label="step0: scoring")
        frame, scale = compute_rewards(scored, cfg.dataset.zero_shot_penalty,
                                       few_shot=cfg.task.num_shots > 0,
                                       answer=cfg.dataset.query_reward)
        if wide:
            frame, scale, usage = _widen(ctx, prompts, frame, wide, usage)
    write_dataset(frame, out, scale)
    write_json_atomic(sidecar(out, ".usage.json"), usage)
    return out


def _widen(ctx: RunContext, prompts: list[PromptRecord], shared: pd.DataFrame,
           queries: list[Example], usage: dict[str, Any],
           ) -> tuple[pd.DataFrame, RewardScale, dict[str, Any]]:
    """Wide Step 0: the prompts `choose_wide_prompts` picks on the shared queries,
    scored on `queries` too.
    R_task stays each prompt's accuracy on the shared queries, so it still compares
    every prompt on the same ones; the reward scale is fitted on all pairs."""
    cfg = ctx.cfg
    r_task = shared.groupby("prompt_id")["r_task"].first().to_dict()
    chosen = choose_wide_prompts(shared, [p.id for p in prompts], cfg.dataset.wide.num_prompts,
                                 cfg.dataset.wide.selection)
    by_id = {p.id: p for p in prompts}
    pairs = build_wide_pairs(queries, [by_id[i] for i in chosen], cfg.seed)
    scored, wide_usage = ctx.score(pairs, label=f"step0: {len(chosen)} prompts "
                                                f"({cfg.dataset.wide.selection}), "
                                                f"{len(queries)} more queries")
    columns = [c for c in shared.columns if c not in REWARD_COLUMNS]
    both = pd.concat([shared[columns], scored[columns]], ignore_index=True)
    frame, scale = compute_rewards(both, cfg.dataset.zero_shot_penalty, r_task=r_task,
                                   answer=cfg.dataset.query_reward)
    total = {k: usage.get(k, 0) + wide_usage.get(k, 0) for k in usage.keys() | wide_usage.keys()}
    return frame, scale, total


def choose_wide_prompts(shared: pd.DataFrame, order: list[str], k: int,
                        rule: str) -> list[str]:
    """The ids of the `k` prompts that go wide, picked on the shared queries' scored
    pairs (`dataset.wide.selection`): by R_task, or greedily by the shared queries each
    adds that no chosen prompt gets right. Ties (and the first pick): R_task, then the
    collection's `order`."""
    r_task = shared.groupby("prompt_id")["r_task"].first()
    by_task = sorted(order, key=lambda p: -r_task[p])
    if rule == "task":
        return by_task[:k]
    if rule != "complementary":
        raise ConfigError(f"dataset.wide.selection: unknown rule {rule!r} (known: task, "
                          "complementary)")
    right = shared.pivot_table(index="query_id", columns="prompt_id", values="correct",
                               aggfunc="max").fillna(0).astype(bool)
    chosen = [by_task[0]]
    while len(chosen) < min(k, len(by_task)):
        missed = ~right[chosen].any(axis=1)
        gain = right[missed].sum()
        rest = [p for p in by_task if p not in chosen]
        chosen.append(max(rest, key=lambda p: (gain[p], r_task[p], -rest.index(p))))
    return chosen


def run(ctx: RunContext, stage: Stage) -> Step0Outputs:
    path = build_initial_dataset(ctx, ctx.run.step0_path())
    return Step0Outputs(dataset=str(path), usage=str(sidecar(path, ".usage.json")))


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    out = Step0Outputs.from_dict(outputs)
    ctx.tracker.log_loop_metrics(1, flatten_numbers(read_json(out.usage)), prefix="target/")
