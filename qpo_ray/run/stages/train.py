"""Train loop t: pi_t = ORL(pi_{t-1}, D_{t-1}) on Ray Train (qpo_ray.training.loop), from
pi_{t-1}'s checkpoint for t > 1. MLflow: the training curves, the
checkpoint as a registered model version (alias `final` for the last loop), and the
end of loop t's run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpo_ray.common.console import log as console
from qpo_ray.common.layout import read_json
from qpo_ray.run.pipeline import Stage, StageOutputs
from qpo_ray.run.stages.context import RunContext
from qpo_ray.training.loop import train_loop


@dataclass(frozen=True)
class TrainOutputs(StageOutputs):
    checkpoint_dir: str
    metrics: str


def run(ctx: RunContext, stage: Stage) -> TrainOutputs:
    from qpo_ray.policy.mbr import save_table

    t = stage.loop
    init = str(ctx.run.policy_dir(t - 1)) if t > 1 else None
    table = _mbr_table(ctx)
    out = train_loop(ctx.cfg, t, ctx.run.dataset_path(t), ctx.run.train_dir(t), init,
                     candidates=table.prompts if table is not None else None)
    # Beside the loop's policy, before it is registered: Serve decodes as the test does.
    if table is not None:
        save_table(table, out.checkpoint_dir)
    return TrainOutputs(checkpoint_dir=out.checkpoint_dir, metrics=out.metrics)


def _mbr_table(ctx: RunContext):
    """mbr decoding's table (qpo_ray/policy/mbr.py) from the run's Step 0, or None
    (greedy serving only) where Step 0 has no prompts scored on shared queries."""
    from qpo_ray.policy.mbr import step0_table

    if not ctx.run.step0_path().exists():
        return None
    try:
        return step0_table(ctx.run.step0_path(), ctx.cfg.training.best_row_column)
    except ValueError as exc:
        console.info(f"no mbr table beside the policy: {exc}")
        return None


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    out, t, tracker = TrainOutputs.from_dict(outputs), stage.loop, ctx.tracker
    tracker.log_training_curves(t, read_json(out.metrics))
    version = tracker.register_policy(t, out.checkpoint_dir,
                                      final=t == ctx.cfg.loop.num_loops)
    tracker.client.set_tag(tracker.loop_run_id(t), "qpo.model_version", version)
    tracker.finish_loop(t)
