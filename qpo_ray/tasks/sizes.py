"""Sizes that fit the data: a profile's collection-set sizes (Step 0's shared queries,
wide Step 0's queries, the dev split) against the task's train split, adjusted once
before any work starts.

Rule (the shipped profiles' sizes are meant for datasets of thousands of rows; a
bring-your-own task of ~1,000 rows must still run with ``extends: cpu-demo``):
1. zero-shot, the demonstration pool is unused, so `task.collection_fraction` grows
   (up to MAX_FRACTION) until the collection share holds every size as asked;
2. if that is not enough (or few-shot, whose demonstrations need the rest), the sizes
   are scaled down together by the same factor;
3. below MIN_SHARED shared / MIN_DEV dev queries the numbers say nothing: refused once,
   naming every setting involved and the smallest train split that fits.
The changes are one log line; the caller makes the fitted config (tasks.fit_to_data). `augment_queries_per_round` draws with replacement and
`max_test_queries` is a cap: neither needs fitting. Applying it twice changes nothing,
so a resumed run (its saved, fitted config) gets the same splits.
"""

from __future__ import annotations

import math

from qpo_ray.common.console import log
from qpo_ray.common.errors import ConfigError

MAX_FRACTION = 0.9   # task.collection_fraction must stay < 1 (the demo pool is not empty)
MIN_SHARED = 8       # fewer shared queries cannot rank the prompts (R_task)
MIN_DEV = 20         # fewer dev queries cannot choose a loop or a decoding


def _collect(fraction: float, n_train: int) -> int:
    return max(1, int(round(fraction * n_train)))  # as Task.splits counts it


def fit_sizes(cfg, task_name: str, n_train: int) -> dict:
    """The overrides (nested, for Config.with_changes; empty when everything fits) that
    make `cfg`'s sizes fit `n_train` train rows; the changes are logged as one line."""
    tcfg, dcfg = cfg.task, cfg.dataset
    built = not dcfg.import_path  # an imported dataset brings its own Step 0
    sizes = {"task.dev_queries": tcfg.dev_queries,
             "dataset.queries_per_group": dcfg.queries_per_group if built else 0,
             "dataset.wide.queries": dcfg.wide.num_queries if built else 0}
    needed = sum(sizes.values())
    if needed == 0 or needed <= _collect(tcfg.collection_fraction, n_train) - (
            1 if sizes["dataset.queries_per_group"] == 0 else 0):
        return {}
    changes: list[str] = []
    fraction = tcfg.collection_fraction
    if tcfg.num_shots == 0:
        fraction = min(MAX_FRACTION, max(fraction, math.ceil(needed / n_train * 1000) / 1000))
        while _collect(fraction, n_train) < needed and fraction < MAX_FRACTION:
            fraction = min(MAX_FRACTION, round(fraction + 0.001, 3))
    available = _collect(fraction, n_train)
    factor = min(1.0, available / needed)
    scaled = {k: max(int(v * factor), 1 if v else 0) for k, v in sizes.items()}
    short = [(k, m) for k, m in (("dataset.queries_per_group", MIN_SHARED),
                                 ("task.dev_queries", MIN_DEV))
             if sizes[k] > 0 and scaled[k] < min(m, sizes[k])]
    if short:
        smallest = max(math.ceil(min(m, sizes[k]) / sizes[k] * needed) for k, m in short)
        rows = math.ceil(smallest / (MAX_FRACTION if tcfg.num_shots == 0
                                     else tcfg.collection_fraction))
        asked = " + ".join(f"{k}={v}" for k, v in sizes.items() if v)
        raise ConfigError(
            f"task {task_name!r}: its train split has {n_train} rows; the collection set "
            f"(task.collection_fraction={tcfg.collection_fraction}, raised to at most "
            f"{MAX_FRACTION} when zero-shot) cannot hold {asked} = {needed} queries even "
            f"scaled down (at least {MIN_SHARED} shared and {MIN_DEV} dev queries); a train "
            f"split of at least {rows} rows fits, or lower those settings")
    if fraction != tcfg.collection_fraction:
        changes.append(f"task.collection_fraction {tcfg.collection_fraction} -> {fraction} "
                       "(zero-shot: the demonstration pool is unused)")
    for key, value in sizes.items():
        if scaled[key] != value:
            changes.append(f"{key} {value} -> {scaled[key]}")
    overrides: dict = {"task": {"collection_fraction": fraction,
                                "dev_queries": scaled["task.dev_queries"]}}
    if built:
        overrides["dataset"] = {"queries_per_group": scaled["dataset.queries_per_group"]}
        if dcfg.wide.enable:
            overrides["dataset"]["wide"] = {"queries": scaled["dataset.wide.queries"]}
    if not changes:
        return {}
    log.info(f"sizes: task {task_name!r} has {n_train} train rows; "
             f"{'; '.join(changes)}")
    return overrides
