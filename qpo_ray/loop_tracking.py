"""What each finished stage of a QPO run records in MLflow (called by qpo_ray.loop).

Loop t's nested run holds the data collection that produced its new data (Step 0 for
loop 1, augmentation round t-1 for loop t >= 2), its training set as an MLflow dataset
input, reward statistics, the training curves, the checkpoint and the registered
model version. The test phase logs to the parent run.
"""

from __future__ import annotations

from typing import Any

from qpo_ray.config import Config
from qpo_ray.rundir import RunDir, read_json
from qpo_ray.tracking import Tracker


def flatten_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as 'a/b' keys (dataset_stats, usage)."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _log_training_set(tracker: Tracker, run: RunDir, loop: int) -> None:
    from qpo_ray.data.io import read_dataset
    from qpo_ray.data.stats import dataset_stats
    from qpo_ray.plots import reward_histogram

    path = run.dataset_path(loop)
    frame, _scale = read_dataset(path)
    tracker.log_dataset(loop, frame, path, name=path.stem)
    tracker.log_loop_metrics(loop, flatten_numbers(dataset_stats(frame)), prefix="data/")
    tracker.log_figure(loop, reward_histogram(frame, loop), f"plots/reward_hist_loop{loop}.png")


def log_stage(tracker: Tracker, cfg: Config, run: RunDir, stage: str) -> None:
    """Record the outputs of a finished stage (read back from the run directory)."""
    out = run.outputs(stage)
    if stage == "step0":
        tracker.log_loop_metrics(1, flatten_numbers(read_json(out["usage"])), prefix="target/")
    elif stage == "filter":
        tracker.log_loop_metrics(1, {"filter/accept_rate": out["accept_rate"],
                                     "data/rows_added": out["rows_kept"]})
        _log_training_set(tracker, run, 1)
    elif stage.startswith("augment_"):
        t = int(stage.split("_")[1])
        info = read_json(out["round"])
        rows_path = run.dataset_path(t + 1).with_name(f"dataset_{t + 1}.rows.parquet")
        tracker.log_artifact(t + 1, rows_path, "augmented")
        tracker.log_loop_metrics(t + 1, flatten_numbers(info["usage"]), prefix="target/")
        tracker.log_loop_metrics(t + 1, {
            "augment/r_task": info["r_task"], "filter/accept_rate": info["accept_rate"],
            "data/rows_added": info["rows_added"],
            "augment/distinct_generated_prompts": info["distinct_generated_prompts"]})
        _log_training_set(tracker, run, t + 1)
    elif stage.startswith("train_"):
        t = int(stage.split("_")[1])
        tracker.log_training_curves(t, read_json(out["metrics"]))
        version = tracker.register_policy(t, out["checkpoint_dir"],
                                          final=t == cfg.loop.num_loops)
        tracker.client.set_tag(tracker.loop_run_id(t), "qpo.model_version", version)
        tracker.finish_loop(t)
    elif stage == "test":
        import pandas as pd

        results = pd.read_csv(run.report_dir() / "results.csv")
        for row in results.itertuples():
            key = f"test/{row.shots}shot/{row.method}/"
            tracker.log_metrics(tracker.parent_run_id(), {
                key + "accuracy": row.accuracy, key + "ci_low": row.ci_low,
                key + "ci_high": row.ci_high, key + "n": row.n})
        tracker.log_artifact(None, run.report_dir(), "report")
    else:
        raise ValueError(f"unknown stage {stage!r}")
