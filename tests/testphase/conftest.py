"""Small real parts the test-phase tests share: a 1-layer policy on the embedded model
(saved, as a run saves one), the embedded Rotten Tomatoes task at tiny splits, and a
Step-0 table over a few real collection prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qpo_ray.config import Config, PolicyConfig


@pytest.fixture(scope="session")
def small_cfg(tiny_model_dir) -> Config:
    cfg = Config()
    cfg.seed = 0
    cfg.task.name, cfg.task.collection_fraction = "rotten_tomatoes", 0.01
    cfg.task.max_test_queries, cfg.task.dev_queries = 6, 4
    cfg.target.backend, cfg.target.model, cfg.target.dtype = ("transformers", str(tiny_model_dir),
                                                              "float32")
    cfg.policy = PolicyConfig(backbone=str(tiny_model_dir), backbone_num_layers=1,
                              max_query_tokens=16, max_prompt_tokens=10)
    cfg.dataset.zero_shot_penalty, cfg.dataset.query_reward = "nll", "gold"
    return cfg


@pytest.fixture(scope="session")
def rt_task_splits(small_cfg):
    from qpo_ray.tasks import task_and_splits

    return task_and_splits(small_cfg.task, small_cfg.seed)


@pytest.fixture(scope="session")
def policy_dirs(small_cfg, tmp_path_factory) -> dict[int, str]:
    """Two 'loops' of an untrained 1-layer policy: different seeds, different heads."""
    import torch

    from qpo_ray.policy import QPOPolicy

    out = {}
    for loop in (1, 2):
        torch.manual_seed(loop)
        policy = QPOPolicy.from_backbone(small_cfg.policy)
        out[loop] = str(policy.save(tmp_path_factory.mktemp(f"policy{loop}")))
    return out


@pytest.fixture(scope="session")
def collection():
    from qpo_ray.config import PromptsConfig
    from qpo_ray.prompts import load_collection

    return load_collection(PromptsConfig(), "rotten_tomatoes")[:4]


@pytest.fixture(scope="session")
def step0(collection) -> pd.DataFrame:
    """Step-0 rows: 4 prompts x 6 queries; prompt k right on queries where (q + k) % 3 != 0;
    R_task = its mean; reward = 100 * correct (rank_by reward)."""
    rows = []
    for k, record in enumerate(collection):
        for q in range(6):
            correct = (q + k) % 3 != 0
            rows.append({"loop": 0, "query_id": f"s{q}", "query": f"query {q}",
                         "prompt_id": record.id, "prompt": record.text,
                         "correct": correct, "reward": 100.0 * correct + k,
                         "label": str(q % 2)})
    frame = pd.DataFrame(rows)
    frame["r_task"] = frame.groupby("prompt_id")["correct"].transform("mean") + \
        np.array([0.01 * (k + 1) for k in range(4) for _ in range(6)])
    return frame


@pytest.fixture
def ctx(small_cfg, rt_task_splits, collection, step0, policy_dirs):
    from qpo_ray.prompts import manual_prompt
    from qpo_ray.testphase.decoding import MethodContext

    task, splits = rt_task_splits
    return MethodContext(small_cfg, task, collection, manual_prompt(collection, small_cfg.prompts),
                         dict(policy_dirs), step0=step0, splits=splits)
