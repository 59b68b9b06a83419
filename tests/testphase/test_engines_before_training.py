"""The test phase never asks Ray Train for resources that its own target engines hold:
on a 2-CPU Ray cluster, a scoring engine of 1 CPU and a trainer of 2 CPUs cannot run at
once, and `qpo` chosen on dev followed by the sft ablation (the order of issue #39's
one-GPU deadlock) must finish, not wait forever. Real Ray, Ray Train, the embedded target
on the transformers backend, tweet_emotion rows from the shared data."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from qpo_ray.config import load_config
from qpo_ray.data.importer import import_paper_json
from qpo_ray.data.io import write_dataset
from qpo_ray.policy import QPOPolicy
from qpo_ray.run.rundir import RunDir

TIMEOUT_S = 480  # the whole evaluation takes about a minute here; a deadlock never ends


def test_ablation_after_a_dev_choice_does_not_wait_for_the_engines(ray_cluster, shared_data,
                                                                     tiny_model_dir, tmp_path):
    from qpo_ray.run.loop import evaluate

    assert ray_cluster.cluster_resources()["CPU"] == 2
    cfg = load_config(None, {
        "seed": 1, "workdir": str(tmp_path / "run"),
        "task": {"name": "tweet_emotion", "data_dir": str(shared_data / "tweet_emotion"),
                 "collection_fraction": 0.01, "max_test_queries": 3, "dev_queries": 2},
        "prompts": {"methods": ["manual", "generic"]},
        "target": {"backend": "transformers", "model": str(tiny_model_dir), "dtype": "float32"},
        # 1 + 2 CPUs > 2: the engine and the trainer cannot run at the same time.
        "evaluation": {"num_actors": 1, "num_cpus_per_actor": 1, "batch_size_pairs": 32},
        "policy": {"backbone": str(tiny_model_dir), "backbone_num_layers": 1,
                   "query_summary_layers": 0, "max_query_tokens": 24, "max_prompt_tokens": 10},
        "training": {"num_workers": 1, "num_cpus_per_worker": 2, "batch_size_global": 4,
                     "max_steps_per_loop": 2, "summary_epochs": 0},
        "loop": {"num_loops": 1},
        "test": {"methods": ["qpo", "sft"], "decoding": "dev", "dev_decodings": ["greedy"]},
    })
    run = RunDir.create(cfg)
    policy = QPOPolicy.from_backbone(cfg.policy).save(run.train_dir(1) / "policy")
    run.mark_done("train_1", {"checkpoint_dir": str(policy)})
    frame, scale = import_paper_json(
        shared_data / "qpo_offline/tweet_emotion_llama7b_few_shot_expert.json")
    write_dataset(frame.sample(n=16, random_state=0).reset_index(drop=True),
                  run.dataset_path(1), scale)  # D_0, what sft trains on

    outcome: dict = {}

    def work() -> None:
        try:
            outcome["report"] = evaluate(cfg, run_dir=str(run.path))
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"the test phase did not finish in {TIMEOUT_S} s: the trainer waits "
                    f"for CPUs the target engine holds ({ray_cluster.available_resources()})")
    if "error" in outcome:
        raise outcome["error"]
    results = pd.read_csv(run.path / "report" / "results.csv")
    assert {"qpo", "sft"} <= set(results["method"])
    assert (run.path / "baselines" / "sft" / "done.json").exists()
    # Everything the engine and the trainer reserved is free again (Ray says so lazily).
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert ray_cluster.available_resources().get("CPU") == 2
