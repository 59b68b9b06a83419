"""Rewards (paper eq. 2-4) against hand-computed values, scale reuse, the expert filter."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qpo_ray.data.rewards import (
    RewardScale,
    compute_rewards,
    expert_filter,
    expert_threshold,
    round_accuracy,
)


def zero_shot_frame(nll: list[float]) -> pd.DataFrame:
    """Prompt A: q1 right, q2 wrong; prompt B: both right."""
    return pd.DataFrame({
        "prompt_id": ["A", "A", "B", "B"],
        "query_id": ["q1", "q2", "q1", "q2"],
        "correct": [True, False, True, True],
        "answer_nll": nll,
        "answer_ppl": [math.exp(x) for x in nll],
    })


def test_zero_shot_ppl_penalty_by_hand():
    nll = [math.log(1.5), math.log(3.0), 0.0, math.log(2.0)]  # PPL 1.5, 3, 1, 2
    df, scale = compute_rewards(zero_shot_frame(nll), penalty="ppl", few_shot=False)
    assert df["r_task"].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert df["r_query"].tolist() == pytest.approx([0.85, -0.3, 0.9, 0.8])
    assert df["r_raw"].tolist() == pytest.approx([1.35, 0.2, 1.9, 1.8])
    assert (scale.min, scale.max) == pytest.approx((0.2, 1.9))
    assert df["reward"].tolist() == pytest.approx([1.15 / 1.7 * 100, 0.0, 100.0,
                                                   1.6 / 1.7 * 100])


def test_r_task_given_per_prompt_is_kept_for_every_row_of_that_prompt():
    """Wide Step 0: R_task comes from the shared queries only, whatever other rows a
    prompt has; a prompt without one is named."""
    df, _ = compute_rewards(zero_shot_frame([0.4, 1.1, 0.0, 0.7]), penalty="nll",
                            r_task={"A": 0.25, "B": 0.75})
    assert df["r_task"].tolist() == pytest.approx([0.25, 0.25, 0.75, 0.75])
    assert df["r_raw"].tolist() == pytest.approx([0.96 + 0.25, -0.11 + 0.25, 1.75, 1.68])
    with pytest.raises(ValueError, match="no R_task given for prompts \\['B'\\]"):
        compute_rewards(zero_shot_frame([0.4, 1.1, 0.0, 0.7]), penalty="nll",
                        r_task={"A": 0.25})


def test_zero_shot_nll_penalty_by_hand():
    df, scale = compute_rewards(zero_shot_frame([0.4, 1.1, 0.0, 0.7]), penalty="nll",
                                few_shot=False)
    assert df["r_query"].tolist() == pytest.approx([0.96, -0.11, 1.0, 0.93])
    assert df["r_raw"].tolist() == pytest.approx([1.46, 0.39, 2.0, 1.93])
    assert (scale.min, scale.max) == pytest.approx((0.39, 2.0))
    assert df["reward"].iloc[0] == pytest.approx((1.46 - 0.39) / 1.61 * 100)


def test_few_shot_rewards_by_hand():
    frame = pd.DataFrame({
        "prompt_id": ["A", "A", "B", "B"],
        "demo_correct": [[True, True, False], [False, False, False],
                         [True, True, True], [True, False, True]],
    })
    df, scale = compute_rewards(frame, penalty="ppl", few_shot=True)
    assert df["r_query"].tolist() == pytest.approx([2 / 3, 0.0, 1.0, 2 / 3])
    assert df["r_task"].tolist() == pytest.approx([1 / 3, 1 / 3, 5 / 6, 5 / 6])
    assert (scale.min, scale.max) == pytest.approx((1 / 3, 11 / 6))
    assert df["reward"].tolist() == pytest.approx([100 * (2 / 3) / 1.5, 0.0, 100.0,
                                                   100 * (7 / 6) / 1.5])
    # An augmentation round's R_task: every answer of the round counts once.
    assert round_accuracy(frame, few_shot=True) == pytest.approx(7 / 12)


def test_few_shot_task_reward_is_the_mean_over_every_demo_set():
    frame = pd.DataFrame({"prompt_id": ["A", "A"],
                          "demo_correct": [[True], [False, False, False]]})
    df, _ = compute_rewards(frame, few_shot=True)
    # 1 right out of 4 answers, not the mean of the row means (0.5).
    assert df["r_task"].tolist() == pytest.approx([0.25, 0.25])


def test_later_loops_reuse_the_stored_scale_and_clip():
    _, scale = compute_rewards(zero_shot_frame([math.log(1.5), math.log(3.0), 0.0,
                                                math.log(2.0)]))
    later = pd.DataFrame({
        "prompt_id": ["g1", "g2", "g3"],
        "correct": [True, True, False],
        "answer_ppl": [1.0, 1.0, 20.0],
        "answer_nll": [0.0, 0.0, math.log(20.0)],
    })
    assert round_accuracy(later, few_shot=False) == pytest.approx(2 / 3)
    df, same = compute_rewards(later, penalty="ppl", scale=scale, r_task=0.7)
    assert same == scale
    assert df["r_task"].tolist() == [0.7, 0.7, 0.7]
    assert df["r_raw"].tolist() == pytest.approx([1.6, 1.6, -1.3])
    assert df["reward"].tolist() == pytest.approx([1.4 / 1.7 * 100, 1.4 / 1.7 * 100, 0.0])
    high, _ = compute_rewards(later, penalty="ppl", scale=scale, r_task=1.2)
    assert high["r_raw"].iloc[0] == pytest.approx(2.1)  # above the stored max ...
    assert high["reward"].iloc[0] == 100.0  # ... is read as the best reward


def test_reward_scale_round_trips_and_validates():
    scale = RewardScale(min=-0.25, max=1.75)
    assert RewardScale.from_dict(scale.to_dict()) == scale
    with pytest.raises(ValueError, match="min <= max"):
        RewardScale(min=2.0, max=1.0)
    with pytest.raises(ValueError, match="RewardScale: expected"):
        RewardScale.from_dict({"lo": 0})
    flat = RewardScale(1.0, 1.0).apply(pd.Series([1.0, 1.0]))
    assert flat.tolist() == [100.0, 100.0]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"needs column\(s\) \['answer_ppl'\]"):
        compute_rewards(pd.DataFrame({"prompt_id": ["A"], "correct": [True]}))
    with pytest.raises(ValueError, match=r"few-shot needs column\(s\) \['demo_correct'\]"):
        compute_rewards(pd.DataFrame({"prompt_id": ["A"], "correct": [True]}), few_shot=True)


def test_expert_filter_cuts_the_reward_range_not_the_row_quantile():
    df = pd.DataFrame({"reward": [0.0, 1.0, 2.0, 3.0, 100.0], "pair_id": list("abcde")})
    assert expert_threshold(df["reward"]) == pytest.approx(66.7)
    kept = expert_filter(df, fraction=0.667)
    assert kept["pair_id"].tolist() == ["e"]
    # A row quantile would have kept two rows here.
    by_rows = df[df["reward"] >= np.quantile(df["reward"], 0.667)]
    assert len(by_rows) == 2
    shifted = pd.DataFrame({"reward": [40.0, 50.0, 60.0, 70.0]})
    # min 40, max 70: threshold 40 + 0.5 * 30 = 55.
    assert expert_filter(shifted, fraction=0.5)["reward"].tolist() == [60.0, 70.0]
    with pytest.raises(ValueError, match="fraction"):
        expert_filter(df, fraction=1.0)


def test_gold_label_reward_by_hand():
    # label words (negative, positive); log-likelihoods of the two labels per pair
    frame = pd.DataFrame({
        "prompt_id": ["A", "A", "B", "B"], "query_id": ["q1", "q2", "q1", "q2"],
        "label": ["1", "0", "1", "0"], "correct": [True, True, False, True],
        "label_logprobs": [[-3.0, -1.0], [-2.0, -2.5], [-0.5, -2.0], [-0.1, -5.0]],
        "answer_nll": [1.0, 2.0, 0.5, 0.1], "answer_ppl": [1.0] * 4,
    })
    df, _ = compute_rewards(frame, penalty="nll", answer="gold")
    # gold NLL normalised over the labels: log(sum exp) - logprob[gold]
    gold_nll = [math.log(math.exp(-3) + math.exp(-1)) + 1.0,
                math.log(math.exp(-2) + math.exp(-2.5)) + 2.0,
                math.log(math.exp(-0.5) + math.exp(-2)) + 2.0,
                math.log(math.exp(-0.1) + math.exp(-5)) + 0.1]
    hits = [1, 1, 0, 1]
    assert df["r_query"].tolist() == pytest.approx([h - g / 10 for h, g in zip(hits, gold_nll)])
    # the predicted-answer variant reads answer_nll instead
    pred, _ = compute_rewards(frame, penalty="nll", answer="predicted")
    assert pred["r_query"].tolist() == pytest.approx([0.9, 0.8, -0.05, 0.99])
    with pytest.raises(ValueError, match="label_logprobs"):
        compute_rewards(frame.drop(columns=["label_logprobs"]), penalty="nll", answer="gold")


def test_gold_reward_on_real_pairs_ranks_how_likely_the_target_finds_the_gold_label(
        tiny_model_dir, one_torch_thread):
    """Real Rotten Tomatoes pairs scored by the real target: among pairs that got the
    answer right with the same prompt (same R_task), the one whose gold label the target
    finds more likely gets the higher reward; a wrong pair is below every right one."""
    from qpo_ray.backends import create_backend
    from qpo_ray.config import TargetConfig, load_config
    from qpo_ray.prompts import load_collection
    from qpo_ray.scoring.local import LocalScorer
    from qpo_ray.data.pairs import build_step0_pairs
    from qpo_ray.tasks import get_task

    cfg = load_config(None, {"task": {"name": "rotten_tomatoes"},
                             "dataset": {"prompts_per_group": 0, "queries_per_group": 12}})
    task = get_task(cfg.task)
    splits = task.splits(0.05, seed=0)
    prompts = load_collection(cfg.prompts, task.name)[:3]
    pairs = build_step0_pairs(task, splits, prompts, cfg.task, cfg.dataset, cfg.seed)
    backend = create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                          dtype="float32", batch_size=16))
    scored = LocalScorer(task, backend, splits.demo_pool).score(pairs)
    df, _ = compute_rewards(scored, penalty="nll", answer="gold")
    p_gold = df.apply(lambda r: math.exp(r["label_logprobs"][int(r["label"])]) /
                      sum(math.exp(v) for v in r["label_logprobs"]), axis=1)
    for _, part in df.assign(p_gold=p_gold).groupby("prompt_id"):
        right = part[part["correct"]].sort_values("p_gold")
        assert right["reward"].is_monotonic_increasing
        wrong = part[~part["correct"]]
        if len(right) and len(wrong):
            assert wrong["reward"].max() < right["reward"].min()
    assert df["correct"].any() and (~df["correct"]).any()


def test_wide_step0_on_the_real_target_keeps_r_task_from_the_shared_queries(
        tiny_model_dir, one_torch_thread, tmp_path):
    """Step 0 with dataset.wide: every prompt on the same shared queries, then
    the prompt that did best there on more queries; each row's R_task is its prompt's
    accuracy on the shared queries alone."""
    from qpo_ray.backends import create_backend
    from qpo_ray.config import TargetConfig, load_config
    from qpo_ray.data.io import read_dataset
    from qpo_ray.data.pairs import on_wide_queries
    from qpo_ray.scoring.local import LocalScorer
    from qpo_ray.run.stages.context import RunContext
    from qpo_ray.run.stages.step0 import build_initial_dataset

    cfg = load_config(None, {
        "task": {"name": "rotten_tomatoes", "collection_fraction": 0.01},
        "prompts": {"methods": ["manual", "generic"]},
        "dataset": {"prompts_per_group": 0, "queries_per_group": 4, "zero_shot_penalty": "nll",
                    "query_reward": "gold", "wide": {"enable": True, "prompts": 1, "queries": 5}}})
    target = TargetConfig(backend="transformers", model=str(tiny_model_dir), dtype="float32",
                          batch_size=16)
    ctx = RunContext(cfg, scorer_factory=lambda c, task, demos: LocalScorer(
        task, create_backend(target), demos))
    df, scale = read_dataset(build_initial_dataset(ctx, tmp_path / "step0.parquet"))
    # wide Step 0's rows are what the summary part trains on (on_wide_queries)
    shared, wide = df[df["group"] == 0], df[on_wide_queries(df)]
    n_prompts = shared["prompt_id"].nunique()
    assert n_prompts >= 2 and len(shared) == 4 * n_prompts and len(wide) == 5
    on_shared = shared.groupby("prompt_id")["correct"].mean()
    assert wide["prompt_id"].nunique() == 1
    best = wide["prompt_id"].iloc[0]
    assert on_shared[best] == on_shared.max()
    assert not set(wide["query_id"]) & set(shared["query_id"])
    assert df["r_task"].tolist() == pytest.approx(df["prompt_id"].map(on_shared).tolist())
    assert df["reward"].between(0, 100).all()
    assert (scale.min, scale.max) == pytest.approx((df["r_raw"].min(), df["r_raw"].max()))
    usage = json.loads((tmp_path / "step0.usage.json").read_text())
    assert usage["calls"] == len(df)
