"""The test phase: the run's policies against the baselines on the test split
(qpo_ray.report: choose on dev, each method of `test.methods` from the registry in
qpo_ray.methods, one scoring pass, paired statistics). MLflow: accuracy and Wilson
interval per (shots, method) and the report directory, on the parent run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from qpo_ray.config import Config
from qpo_ray.evaluation import init_ray
from qpo_ray.methods import check_methods
from qpo_ray.prompts import load_collection, manual_prompt
from qpo_ray.report import evaluate_run
from qpo_ray.stages import Stage, StageOutputs
from qpo_ray.stages.context import RunContext


@dataclass(frozen=True)
class ReportOutputs(StageOutputs):
    report: str


def check_before_work(ctx: RunContext) -> None:
    """What this stage needs, checked before Step 0 spends anything: the methods exist,
    the collection loads and has its manual prompt, the task's splits hold a dev set of
    the asked size."""
    cfg: Config = ctx.cfg
    check_methods(cfg.test.methods)
    # Building the splits here makes a dev set larger than the collection share fail now.
    task, _ = ctx.task, ctx.splits
    collection = load_collection(cfg.prompts, task.name)
    if "manual" in cfg.test.methods:
        manual_prompt(collection, cfg.prompts)


def evaluate(ctx: RunContext, policy_dir: Optional[str] = None) -> str:
    """The test phase of `ctx.run` (or of the policy in `policy_dir`); returns the
    markdown report."""
    init_ray(ctx.cfg)  # the ablations train on Ray before anything is scored
    return evaluate_run(ctx.cfg, ctx.task, ctx.splits, ctx.score,
                        run_dir=str(ctx.run.path) if ctx.run else None, policy_dir=policy_dir)


def run(ctx: RunContext, stage: Stage) -> ReportOutputs:
    evaluate(ctx)
    return ReportOutputs(report=str(ctx.run.report_dir() / "report.md"))


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    tracker, report_dir = ctx.tracker, ctx.run.report_dir()
    results = pd.read_csv(report_dir / "results.csv")
    for row in results.itertuples():
        key = f"test/{row.shots}shot/{row.method}/"
        tracker.log_metrics(tracker.parent_run_id(), {
            key + "accuracy": row.accuracy, key + "ci_low": row.ci_low,
            key + "ci_high": row.ci_high, key + "n": row.n})
    tracker.log_artifact(None, report_dir, "report")
