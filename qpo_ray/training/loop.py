"""One loop's training schedule (paper Table 9) on Ray Train: the ORL phase, then the
query summary's own phase where it trains. The train stage (qpo_ray.run.stages.train) and
the test phase's ablations (qpo_ray.testphase.methods: sft, qpo_no_mla) both train
through `train_loop`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qpo_ray.common.console import log
from qpo_ray.common.atomic import replace_dir
from qpo_ray.common.local_ray import init_ray
from qpo_ray.config import Config


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: str
    metrics: str  # the metrics.json of the schedule


def train_loop(cfg: Config, loop: int, dataset: str | Path, out_dir: str | Path,
               init_checkpoint: Optional[str] = None, label: str = "",
               candidates: Optional[list[str]] = None) -> TrainResult:
    """Train loop `loop`'s schedule (Table 9) on `dataset` into `out_dir`; `label` names
    it in the progress line (default train_<loop>). `candidates`: mbr's prompts, which
    the summary's early stopping reads the belief over (training.summary.holdout)."""
    # torch and Ray Train load when a stage trains, not when `qpo` starts.
    from qpo_ray.training.trainer import METRICS_FILE, train_policy

    init_ray(cfg.ray_address)
    label = label or f"train_{loop}"
    result = train_policy(cfg, dataset_path=str(dataset), out_dir=str(out_dir),
                          loop_index=loop, init_checkpoint=init_checkpoint)
    _print_curve(label, result.metrics)
    if cfg.training.summary.epochs:
        # The query summary's own phase (qpo_ray.policy.summary), from the policy just
        # trained; its policy is then moved into the loop's place, swapped in whole.
        summary = train_policy(cfg, dataset_path=str(dataset),
                               out_dir=str(Path(out_dir) / "summary"), loop_index=loop,
                               init_checkpoint=result.checkpoint_dir, part="summary",
                               candidates=candidates)
        _print_curve(f"{label} summary", summary.metrics)
        replace_dir(summary.checkpoint_dir, result.checkpoint_dir)
    return TrainResult(checkpoint_dir=str(result.checkpoint_dir),
                        metrics=str(Path(out_dir) / METRICS_FILE))


def _print_curve(label: str, metrics: list[dict[str, float]]) -> None:
    if metrics:
        # How well the policy reproduces its training prompts (per-token NLL), per epoch.
        curve = " -> ".join(f"{m['prompt_loss']:.2f}" for m in metrics)
        log.info(f"{label}: prompt NLL per epoch {curve}; "
                 f"{metrics[-1].get('samples_per_s', 0):.1f} samples/s")
        if "kept_epoch" in metrics[-1]:
            held = " -> ".join(f"{loss:.3f}" for loss in
                               [metrics[-1]["holdout_choice_loss_start"]]
                               + [m["holdout_choice_loss"] for m in metrics])
            log.info(f"{label}: held-out choice loss from the start, per epoch {held}; "
                     f"kept epoch {metrics[-1]['kept_epoch']}")
