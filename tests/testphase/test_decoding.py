"""qpo_ray.testphase.decoding on a real (untrained, 1-layer) policy: greedy prompts
cached per (policy, decoding, queries); mbr's choices are the expected-correctness ones
at each loop's temperature; ranked_collection orders by Step-0 R_task."""

from __future__ import annotations

import numpy as np
import pytest

from qpo_ray.config import ConfigError
from qpo_ray.policy import QPOPolicy, generate_prompts
from qpo_ray.policy.mbr import mbr_choice
from qpo_ray.policy.ranking import candidate_logprobs
from qpo_ray.prompts import prompt_id
from qpo_ray.testphase.decoding import _uniform, policy_prompts


def test_greedy_prompts_are_the_policys_and_cached_per_policy_and_queries(ctx, rt_task_splits):
    _, splits = rt_task_splits
    queries = splits.test[:3]
    got = policy_prompts(ctx, 1, "greedy", queries)
    policy = QPOPolicy.load(ctx.policy_dirs[1])
    expected = generate_prompts(policy, [q.text for q in queries],
                                target_reward=ctx.cfg.loop.target_reward)
    assert [p[1] for p in got] == expected
    assert [p[0] for p in got] == [prompt_id(t) for t in expected]
    assert {p[2] for p in got} == {"qpo"}
    assert policy_prompts(ctx, 1, "greedy", queries) is got  # cached
    other = policy_prompts(ctx, 2, "greedy", queries)  # another loop's policy: not cached
    assert other is not got and len(other) == 3
    assert policy_prompts(ctx, 1, "greedy", queries[:2]) is not got


def test_unknown_decoding_is_a_config_error_naming_the_key(ctx, rt_task_splits):
    with pytest.raises(ConfigError, match="test.decoding: unknown decoding 'beam'"):
        policy_prompts(ctx, 1, "beam", rt_task_splits[1].test[:1])


def test_mbr_picks_expected_correctness_at_each_loops_temperature(ctx, rt_task_splits,
                                                                  collection):
    _, splits = rt_task_splits
    queries = splits.test[:4]
    table = ctx.mbr_table()
    assert sorted(table.prompts) == sorted(r.text for r in collection)
    policy = QPOPolicy.load(ctx.policy_dirs[2])
    logprobs = candidate_logprobs(policy, [q.text for q in queries],
                                  [table.prompts] * len(queries), ctx.cfg.loop.target_reward)
    got = [p[1] for p in policy_prompts(ctx, 2, "mbr", queries)]
    assert got == [table.prompts[i] for i in mbr_choice(logprobs, table.utility, 1.0)]
    # A very high temperature flattens the belief: every query gets the prompt with the
    # best mean utility, whatever the policy says.
    ctx.mbr_temperatures[2] = 1e6
    flat = {p[1] for p in policy_prompts(ctx, 2, "mbr", queries)}
    assert flat == {table.prompts[int(np.argmax(table.utility.mean(axis=1)))]}


def test_mbr_without_step0_is_a_config_error(ctx, rt_task_splits):
    ctx.step0 = None
    with pytest.raises(ConfigError, match="mbr needs the run's Step-0 data"):
        policy_prompts(ctx, 1, "mbr", rt_task_splits[1].test[:1])


def test_ranked_collection_is_best_r_task_first_else_collection_order(ctx, collection):
    # r_task of prompt k: its accuracy (4/6 each) + 0.01 (k + 1): the last prompt first.
    assert [r.id for r in ctx.ranked_collection()] == [r.id for r in reversed(collection)]
    ctx.step0 = None
    assert ctx.ranked_collection() == list(collection)


def test_uniform_pads_with_the_first_candidate_and_never_leaves_a_row_empty():
    assert _uniform(["a", "b"], 4) == ["a", "b", "a", "a"]
    assert _uniform([], 2) == [".", "."]
