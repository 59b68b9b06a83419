"""The tiny QPO run the end-to-end tests share (tests/run/test_loop.py for the run and its
resume, tests/testphase/test_evaluate_run.py for the test phase on it): its profile and
how the `qpo` CLI is started in a subprocess. The run itself is conftest's `finished_run`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "seed": 3,
    "task": {"name": "rotten_tomatoes", "collection_fraction": 0.01, "max_test_queries": 6,
             "dev_queries": 4},
    "prompts": {"methods": ["manual", "generic"]},
    # float32 on every CI machine: `auto` would take bf16 where the CPU has it, and the
    # transformers backend's bf16 rounds near ties differently in other batches, so the
    # rows `qpo evaluate --add` redoes would not repeat the run's (tests/test_device.py
    # covers `auto`).
    "target": {"backend": "transformers", "model": "smollm2-135m-instruct", "batch_size": 16,
               "dtype": "float32"},
    "evaluation": {"num_actors": 1, "batch_size_pairs": 32},
    "dataset": {"prompts_per_group": 7, "queries_per_group": 3, "zero_shot_penalty": "nll",
                "query_reward": "gold"},
    "policy": {"backbone": "smollm2-135m-instruct", "backbone_num_layers": 1,
               "max_query_tokens": 24, "max_prompt_tokens": 10},
    "training": {"num_workers": 1, "batch_size_global": 4, "lr_first_loop": 1.0e-3,
                 "epochs_first_loop": 1, "epochs_later_loops": 1, "max_steps_per_loop": 3},
    "loop": {"num_loops": 2, "augment_queries_per_round": 5},
    "test": {"methods": ["qpo", "qpo_greedy", "manual", "best_single", "router",
                         "nearest_neighbour", "best_single_oracle"],
             "decoding": "dev", "rank": {"collection_prompts": 3, "samples": 1},
             "num_example_prompts": 2},
}


def qpo_env() -> dict[str, str]:
    # QPO_PROGRESS_EVERY_S=0: a progress line per update (the test reads them back).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0",
               TOKENIZERS_PARALLELISM="false", QPO_PROGRESS_EVERY_S="0")
    env.pop("RAY_ADDRESS", None)  # a private local cluster per run
    return env


def qpo_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qpo_ray.cli", *args]
