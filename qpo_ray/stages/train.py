"""Train loop t: pi_t = ORL(pi_{t-1}, D_{t-1}) on Ray Train (qpo_ray.training), from
pi_{t-1}'s checkpoint for t > 1. `train_loop` is also how the test phase's ablations
(qpo_ray.methods: sft, qpo_no_mla) train theirs. MLflow: the training curves, the
checkpoint as a registered model version (alias `final` for the last loop), and the
end of loop t's run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qpo_ray.atomic import replace_dir
from qpo_ray.config import Config
from qpo_ray.evaluation import init_ray
from qpo_ray.rundir import read_json
from qpo_ray.stages import Stage, StageOutputs
from qpo_ray.stages.context import RunContext


@dataclass(frozen=True)
class TrainOutputs(StageOutputs):
    checkpoint_dir: str
    metrics: str


def train_loop(cfg: Config, loop: int, dataset: str | Path, out_dir: str | Path,
               init_checkpoint: Optional[str] = None, label: str = "") -> TrainOutputs:
    """Train loop `loop`'s schedule (Table 9) on `dataset` into `out_dir`; `label` names
    it in the progress line (default train_<loop>)."""
    # torch and Ray Train load when a stage trains, not when `qpo` starts.
    from qpo_ray.training import METRICS_FILE, train_policy

    init_ray(cfg)
    label = label or f"train_{loop}"
    result = train_policy(cfg, dataset_path=str(dataset), out_dir=str(out_dir),
                          loop_index=loop, init_checkpoint=init_checkpoint)
    _print_curve(label, result.metrics)
    if cfg.training.summary_epochs:
        # The query summary's own phase (qpo_ray.policy.summary), from the policy just
        # trained; its policy is then moved into the loop's place, swapped in whole.
        summary = train_policy(cfg, dataset_path=str(dataset),
                               out_dir=str(Path(out_dir) / "summary"), loop_index=loop,
                               init_checkpoint=result.checkpoint_dir, part="summary")
        _print_curve(f"{label} summary", summary.metrics)
        replace_dir(summary.checkpoint_dir, result.checkpoint_dir)
    return TrainOutputs(checkpoint_dir=str(result.checkpoint_dir),
                        metrics=str(Path(out_dir) / METRICS_FILE))


def _print_curve(label: str, metrics: list[dict[str, float]]) -> None:
    if metrics:
        # How well the policy reproduces its training prompts (per-token NLL), per epoch.
        curve = " -> ".join(f"{m['prompt_loss']:.2f}" for m in metrics)
        print(f"[qpo] {label}: prompt NLL per epoch {curve}; "
              f"{metrics[-1].get('samples_per_s', 0):.1f} samples/s", flush=True)


def run(ctx: RunContext, stage: Stage) -> TrainOutputs:
    t = stage.loop
    init = str(ctx.run.policy_dir(t - 1)) if t > 1 else None
    out = train_loop(ctx.cfg, t, ctx.run.dataset_path(t), ctx.run.train_dir(t), init)
    _save_mbr_table(ctx, out.checkpoint_dir)
    return out


def _save_mbr_table(ctx: RunContext, policy_dir: str) -> None:
    """mbr decoding's table (qpo_ray/policy/mbr.py) beside the loop's policy, before it
    is registered, so that Serve can decode as the test phase does."""
    from qpo_ray.data.io import read_dataset
    from qpo_ray.policy.mbr import save_table, utility_table

    if not ctx.run.step0_path().exists():
        return
    try:
        table = utility_table(read_dataset(ctx.run.step0_path())[0],
                              ctx.cfg.training.best_row_column)
    except ValueError as exc:  # a Step 0 with no shared queries: greedy serving only
        print(f"[qpo] no mbr table beside {policy_dir}: {exc}", flush=True)
        return
    save_table(table, policy_dir)


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    out, t, tracker = TrainOutputs.from_dict(outputs), stage.loop, ctx.tracker
    tracker.log_training_curves(t, read_json(out.metrics))
    version = tracker.register_policy(t, out.checkpoint_dir,
                                      final=t == ctx.cfg.loop.num_loops)
    tracker.client.set_tag(tracker.loop_run_id(t), "qpo.model_version", version)
    tracker.finish_loop(t)
