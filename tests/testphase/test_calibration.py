"""qpo_ray.testphase.calibration with the embedded target scoring for real (transformers,
in-process): each dev query's best mbr candidate is the one its scored reward ranks
first, and each loop's temperature is the one under which its policy gives those best
candidates the highest likelihood."""

from __future__ import annotations

import numpy as np
import pytest

from qpo_ray.policy import QPOPolicy
from qpo_ray.policy.mbr import TEMPERATURES, belief
from qpo_ray.policy.ranking import candidate_logprobs
from qpo_ray.testphase.calibration import best_candidates, calibrate_mbr


@pytest.fixture(scope="module")
def score(tiny_model_dir, rt_task_splits):
    from qpo_ray.backends import create_backend
    from qpo_ray.config import TargetConfig
    from qpo_ray.scoring.local import LocalScorer

    task, splits = rt_task_splits
    backend = create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                          dtype="float32", batch_size=16))
    scorer = LocalScorer(task, backend, splits.demo_pool)
    calls, cache = [], {}

    # Each distinct (query, prompt) is scored once in this module (the target is
    # deterministic in float32): the two tests re-read the same pairs.
    def fn(pairs):
        from qpo_ray.data.schema import SCORE_COLUMNS

        calls.append(len(pairs))
        keys = list(zip(pairs["query_id"], pairs["prompt"]))
        todo = pairs[[k not in cache for k in keys]]
        if len(todo):
            for key, row in zip(zip(todo["query_id"], todo["prompt"]),
                                scorer.score(todo).to_dict("records")):
                cache[key] = row
        columns = [c for c in SCORE_COLUMNS if c in next(iter(cache.values()))]
        return (pairs.reset_index(drop=True).assign(
            **{c: [cache[k][c] for k in keys] for c in columns}), {"calls": len(calls)})
    fn.calls = calls
    yield fn
    scorer.close()


def test_best_candidates_rank_every_candidate_by_its_scored_reward(ctx, rt_task_splits, score):
    from qpo_ray.data.rewards import compute_rewards

    dev = rt_task_splits[1].dev
    table = ctx.mbr_table()
    before = len(score.calls)
    best, usage = best_candidates(ctx, dev, score, shots=0)
    assert score.calls[before:] == [len(table.prompts) * len(dev)]
    assert usage["pairs"] == len(table.prompts) * len(dev)
    assert usage["dev_queries_ranked"] == len(best) == len(dev)
    # The same pairs scored again (the scorer is deterministic in float32): the argmax
    # of each query's reward over the table's prompts.
    from qpo_ray.data.pairs import make_pairs

    step0 = ctx.step0
    ids = step0.drop_duplicates("prompt").set_index("prompt")["prompt_id"]
    pairs = make_pairs([q for _ in table.prompts for q in dev],
                       [(ids[p], p, "collection") for p in table.prompts for _ in dev],
                       ctx.task, ctx.splits, num_shots=0,
                       num_demo_sets=ctx.cfg.task.num_demo_sets, loop=1, seed=ctx.cfg.seed)
    scored, _ = score(pairs)
    r_task = step0.groupby("prompt_id")["r_task"].first().to_dict()
    rewards, _ = compute_rewards(scored, "nll", r_task=r_task, answer="gold")
    pivot = rewards.pivot_table(index="query_id", columns="prompt", values="reward")
    expected = pivot.loc[best.index, table.prompts].to_numpy().argmax(axis=1)
    assert best.to_numpy().tolist() == expected.tolist()


def test_each_loops_temperature_maximises_the_best_candidates_likelihood(ctx, rt_task_splits,
                                                                         score):
    dev = rt_task_splits[1].dev
    temperatures, usage = calibrate_mbr(ctx, dev, score, shots=0)
    assert set(temperatures) == {1, 2}
    best, _ = best_candidates(ctx, dev, score, shots=0)
    table = ctx.mbr_table()
    for loop, temperature in temperatures.items():
        assert np.isclose(TEMPERATURES, temperature).any()
        policy = QPOPolicy.load(ctx.policy_dirs[loop])
        logprobs = candidate_logprobs(policy, [q.text for q in dev],
                                      [table.prompts] * len(dev), ctx.cfg.loop.target_reward)
        rows = np.arange(len(dev))
        nll = [-np.log(belief(logprobs, t)[rows, best.to_numpy()] + 1e-12).mean()
               for t in TEMPERATURES]
        assert temperature == pytest.approx(TEMPERATURES[int(np.argmin(nll))])
        # The likelihoods were read once per (policy, queries) and kept for the decoding.
        key = ("mbr-logprobs", loop, tuple(q.id for q in dev))
        np.testing.assert_allclose(ctx._cache[key], logprobs, rtol=1e-4, atol=1e-4)
