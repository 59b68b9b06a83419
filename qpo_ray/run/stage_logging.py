"""What the stages' `log` functions share when they record a finished stage in MLflow
(each stage's own records are in its module, qpo_ray/run/stages/).

Loop t's nested run holds the data collection that produced its new data (Step 0 for
loop 1, augmentation round t-1 for loop t >= 2), its training set as an MLflow dataset
input, reward statistics, the training curves, the checkpoint and the registered
model version. The test phase logs to the parent run.
"""

from __future__ import annotations

from typing import Any

from qpo_ray.data.io import read_dataset
from qpo_ray.data.stats import dataset_stats
from qpo_ray.run.rundir import RunDir
from qpo_ray.run.tracking import Tracker


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


def log_training_set(tracker: Tracker, run: RunDir, loop: int) -> None:
    """Loop `loop`'s training set: dataset input, statistics, reward histogram."""
    from qpo_ray.testphase.plots import reward_histogram  # matplotlib: only when a run logs

    path = run.dataset_path(loop)
    frame, _scale = read_dataset(path)
    tracker.log_dataset(loop, frame, path, name=path.stem)
    tracker.log_loop_metrics(loop, flatten_numbers(dataset_stats(frame)), prefix="data/")
    tracker.log_figure(loop, reward_histogram(frame, loop), f"plots/reward_hist_loop{loop}.png")
