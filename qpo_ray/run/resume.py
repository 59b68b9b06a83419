"""`qpo run --resume DIR --set key=value`: the saved config with the overrides applied,
unless a change would contradict a stage that already finished.

Every config key belongs to the first stage whose output it changes; that stage and
every later one (each reads the one before) are invalidated by a change. A change is
refused, naming the key and the finished stages it would invalidate, when any of them
is done; otherwise the new config is saved to ``DIR/config.yaml`` and the run goes on
with it. Keys that change how a stage runs but not what it computes (where Ray is,
actor counts, memory, batch sizes of the engines) are always accepted; `tracking.*`
counts from Step 0 on (the run's MLflow runs live in the store it started with).
"""

from __future__ import annotations

from typing import Any

import yaml

from qpo_ray.common.atomic import write_text_atomic
from qpo_ray.config import Config, ConfigError, config_from_dict, merge_overrides
from qpo_ray.run.rundir import CONFIG_FILE, RunDir, stage_names

# Keys (or sections) that never change a stage's output.
EXECUTION_ONLY = (
    "workdir", "ray_address", "serve.", "evaluation.",
    "target.batch_size", "target.tensor_parallel_size", "target.gpu_memory_utilization",
    "target.cpu_kvcache_space_gib", "target.enable_prefix_caching",
    "target.kv_block_size_tokens", "target.min_shared_prefix_tokens",
    "target.request_timeout_s", "target.max_retries", "target.max_concurrent_requests",
    "target.api_key_env", "training.num_cpus_per_worker",
)
# Key (or section) -> the first stage it changes; the first match wins, so the
# specific keys come before their section.
FIRST_STAGE = (
    ("task.max_test_queries", "test"), ("prompts.manual_prompt_id", "test"),
    ("test.", "test"), ("dataset.expert_fraction", "filter"),
    ("policy.", "train_1"), ("training.", "train_1"), ("loop.num_loops", "test"),
    ("loop.", "augment_1"),
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def invalidated(key: str, old: Config, new: Config) -> list[str]:
    """The stages (of the old run's order) whose output a change of `key` makes stale."""
    if any(key == e or (e.endswith(".") and key.startswith(e)) for e in EXECUTION_ONLY):
        return []
    names = stage_names(old)
    first = next((stage for k, stage in FIRST_STAGE
                  if key == k or (k.endswith(".") and key.startswith(k))), "step0")
    if key == "loop.num_loops":
        # More loops add stages before `test`; fewer drop the last ones.
        dropped = [s for s in names if s not in stage_names(new)]
        return dropped + ["test"]
    if first not in names:  # augment_1 of a one-loop run: only the test reads loop.*
        first = "test"
    return names[names.index(first):]


def apply_resume_overrides(run: RunDir, cfg: Config,
                           overrides: list[str]) -> tuple[Config, list[str]]:
    """(the config to continue with, "key: old -> new" per change); saves it to
    config.yaml. ConfigError names the key and the finished stages it would invalidate."""
    if not overrides:
        return cfg, []
    new = config_from_dict({**merge_overrides(cfg.to_dict(), overrides), "workdir": cfg.workdir})
    before, after = _flat(cfg.to_dict()), _flat(new.to_dict())
    changes = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in after if after[k] != before[k]]
    done = set(run.stages())
    for key in (k for k in after if after[k] != before[k]):
        stale = [s for s in invalidated(key, cfg, new) if s in done]
        if stale:
            raise ConfigError(
                f"--set {key}={after[key]!r}: {run.path} already finished {stale}, which "
                f"used {key}={before[key]!r}; start a new run (another --workdir) to change "
                "it")
    if changes:
        saved = run.path / CONFIG_FILE
        data = new.to_dict()
        data["workdir"] = yaml.safe_load(saved.read_text())["workdir"]  # as it was written
        write_text_atomic(saved, yaml.safe_dump(data, sort_keys=False))
    return new, changes
