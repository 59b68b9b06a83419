"""`qpo run --resume --set`: which changes invalidate which stages (qpo_ray.run.resume)."""

from __future__ import annotations
from qpo_ray.config import load_config
from qpo_ray.run.resume import invalidated


def test_resume_changes_invalidate_their_stage_and_every_later_one():
    old = load_config("cpu-demo")  # two loops
    new = load_config("cpu-demo", ["loop.num_loops=1"])
    assert invalidated("evaluation.num_actors", old, old) == []
    assert invalidated("serve.port", old, old) == []
    assert invalidated("tracking.uri", old, old)[0] == "step0"  # its MLflow runs live there
    assert invalidated("prompts.manual_prompt_id", old, old) == ["test"]
    assert invalidated("test.decoding", old, old) == ["test"]
    assert invalidated("dataset.expert_fraction", old, old)[:2] == ["filter", "train_1"]
    assert invalidated("training.lr_later_loops", old, old)[0] == "train_1"
    assert invalidated("loop.top_k", old, old)[0] == "augment_1"
    assert invalidated("target.model", old, old)[0] == "step0"
    assert invalidated("seed", old, old)[0] == "step0"
    assert invalidated("loop.num_loops", old, new) == ["augment_1", "train_2", "test"]
