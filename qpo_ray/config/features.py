"""The optional features of a run that grew out of the effectiveness work, each a nested
section with its own switch (what each does and why: docs/experiments.md):

  dataset.wide          wide Step 0: a few prompts scored on many more queries
  policy.query_summary  the policy's probe-sized path from the query to its inputs
  training.summary      the query summary's own training phase
  test.mbr / test.rank  the settings of the mbr and rank decodings

`LEGACY_KEYS` maps the flat keys of older versions to these, so that an old run's
config.yaml (a resume) and old profiles still load, with one warning per key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qpo_ray.config.base import Section, require_all
from qpo_ray.common.console import log


@dataclass
class WideStep0Config(Section):
    # Also score `prompts` prompts (picked on the shared queries by `selection`) on
    # `queries` more collection queries; needs dataset.prompts_per_group: 0.
    enable: bool = False
    prompts: int = 8
    queries: int = 300
    # "task" = the best R_task; "complementary" = then each next the one right on the
    # most shared queries no chosen prompt gets right.
    selection: Literal["task", "complementary"] = "task"

    @property
    def num_prompts(self) -> int:
        return self.prompts if self.enable else 0

    @property
    def num_queries(self) -> int:
        return self.queries if self.enable else 0

    def validate(self) -> None:
        require_all([(not self.enable or (self.prompts > 0 and self.queries > 0),
                      "dataset.wide.prompts and dataset.wide.queries must be > 0 when "
                      "dataset.wide.enable is true")])


@dataclass
class QuerySummaryConfig(Section):
    # The query read by the backbone's first `layers` pretrained layers (frozen), reduced to
    # `dims` whitened principal components, mapped by a trained adapter into [R | q].
    enable: bool = False
    layers: int = 16
    dims: int = 16

    @property
    def num_layers(self) -> int:
        return self.layers if self.enable else 0

    def validate(self) -> None:
        require_all([
            (not self.enable or self.layers >= 1,
             f"policy.query_summary.layers must be >= 1, got {self.layers}"),
            (self.dims >= 1, f"policy.query_summary.dims must be >= 1, got {self.dims}"),
        ])


@dataclass
class SummaryTrainingConfig(Section):
    # Epochs of the adapter-only phase after each loop's training (0 = none), on each
    # query's `top_k` best rows ranked by `rank_by`; needs policy.query_summary.enable.
    epochs: int = 0
    lr: float = 1e-3
    top_k: int = 1
    rank_by: Literal["reward", "r_query"] = "reward"
    # The reward each best row is conditioned on: its own ("row") or loop.target_reward.
    reward: Literal["row", "target"] = "row"
    # "unseen": the summary phase on wide Step 0's queries only, the main phase on the rest.
    queries: Literal["all", "unseen"] = "all"
    # Share of the summary queries held out to keep the epoch whose belief over mbr's
    # candidates fits them best (0 = train on all, keep the last; training/summary_part.py).
    holdout: float = 0.0

    def validate(self) -> None:
        require_all([
            (self.epochs >= 0, f"training.summary.epochs must be >= 0, got {self.epochs}"),
            (0.0 <= self.holdout < 1.0,
             f"training.summary.holdout must be in [0, 1), got {self.holdout}"),
            (self.lr > 0, f"training.summary.lr must be > 0, got {self.lr}"),
            (self.top_k >= 1, f"training.summary.top_k must be >= 1, got {self.top_k}"),
        ])


@dataclass
class MbrConfig(Section):
    # "dev": each loop's belief temperature fitted on the dev split where it chooses;
    # "none" (or a fixed decoding): `temperature` (1 = the policy's own belief).
    calibration: Literal["dev", "none"] = "dev"
    temperature: float = 1.0

    def validate(self) -> None:
        import math

        require_all([(math.isfinite(self.temperature) and self.temperature > 0,
                      f"test.mbr.temperature must be > 0, got {self.temperature}")])


@dataclass
class RankConfig(Section):
    # Candidates: the best `collection_prompts` Step-0 prompts, the greedy prompt and
    # `samples` sampled ones; contrast log p(c | R high) - log p(c | R = `low_reward`).
    collection_prompts: int = 12
    samples: int = 4
    low_reward: float = 0.0

    def validate(self) -> None:
        require_all([(self.collection_prompts >= 0 and self.samples >= 0,
                      "test.rank.collection_prompts / test.rank.samples must be >= 0")])


# Old flat key -> its nested key. A flat size that was 0 meant "off": it also sets the
# feature's `enable` (ENABLED_BY).
LEGACY_KEYS = {
    "dataset.wide_prompts": "dataset.wide.prompts",
    "dataset.wide_queries": "dataset.wide.queries",
    "dataset.wide_selection": "dataset.wide.selection",
    "policy.query_summary_layers": "policy.query_summary.layers",
    "policy.query_summary_dims": "policy.query_summary.dims",
    "training.summary_epochs": "training.summary.epochs",
    "training.summary_lr": "training.summary.lr",
    "training.summary_top_k": "training.summary.top_k",
    "training.summary_rank_by": "training.summary.rank_by",
    "training.summary_reward": "training.summary.reward",
    "training.summary_queries": "training.summary.queries",
    "test.mbr_calibration": "test.mbr.calibration",
    "test.mbr_temperature": "test.mbr.temperature",
    "test.rank_collection_prompts": "test.rank.collection_prompts",
    "test.rank_samples": "test.rank.samples",
    "test.rank_low_reward": "test.rank.low_reward",
}
ENABLED_BY = {"dataset.wide_prompts", "dataset.wide_queries", "policy.query_summary_layers"}


def migrate_legacy(data: dict[str, Any], prefix: str = "", warn: bool = True) -> dict[str, Any]:
    """`data` (a config, or one section of it when `prefix` names it, e.g. "policy.") with
    every old flat key moved to its nested key, in place; one warning line per key."""
    for old, new in LEGACY_KEYS.items():
        if not old.startswith(prefix):
            continue
        old_parts, new_parts = old[len(prefix):].split("."), new[len(prefix):].split(".")
        parent = data
        for part in old_parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_parts[-1] not in parent:
            continue
        value = parent.pop(old_parts[-1])
        section = parent.setdefault(new_parts[-2], {})
        if not isinstance(section, dict):
            continue  # a malformed nested value: the loader names it
        section.setdefault(new_parts[-1], value)
        if old in ENABLED_BY:
            # Both sizes 0 was "off"; any size > 0 switched the feature on.
            section["enable"] = bool(section.get("enable")) or bool(value)
        if warn:
            log.warning(f"config: '{old}' is now '{new}' (the old key still loads)")
    return data
