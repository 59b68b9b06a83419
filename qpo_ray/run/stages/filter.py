"""The expert filter: D_0, the training set of loop 1, is the part of Step 0 whose
reward is >= expert_fraction * 100 on the stored 0-100 scale. MLflow: the accept rate
and the training set (dataset input, statistics, reward histogram) on loop 1's run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpo_ray.data.io import read_dataset, write_dataset
from qpo_ray.data.rewards import expert_filter
from qpo_ray.run.stage_logging import log_training_set
from qpo_ray.run.pipeline import Stage, StageOutputs
from qpo_ray.run.stages.context import RunContext


@dataclass(frozen=True)
class FilterOutputs(StageOutputs):
    dataset: str
    rows_in: int
    rows_kept: int
    accept_rate: float


def filter_initial(ctx: RunContext, step0_path: Path, out_path: Path) -> FilterOutputs:
    frame, scale = read_dataset(step0_path)
    kept = expert_filter(frame, ctx.cfg.dataset.expert_fraction)
    write_dataset(kept.reset_index(drop=True), out_path, scale)
    return FilterOutputs(dataset=str(out_path), rows_in=len(frame), rows_kept=len(kept),
                         accept_rate=len(kept) / max(1, len(frame)))


def run(ctx: RunContext, stage: Stage) -> FilterOutputs:
    return filter_initial(ctx, ctx.run.step0_path(), ctx.run.dataset_path(1))


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    out = FilterOutputs.from_dict(outputs)
    ctx.tracker.log_loop_metrics(1, {"filter/accept_rate": out.accept_rate,
                                     "data/rows_added": out.rows_kept})
    log_training_set(ctx.tracker, ctx.run, 1)
