"""mbr decoding's belief temperature, fitted on the dev split (test.mbr.calibration: dev).

Why: trained on the best prompt of each of its queries, the policy is surer of new
queries than it is right. On the benchmark's dev reviews (seeds 0-4, both loops) the
likelihood of each review's best Step-0 prompt peaks at a temperature of 1.7-2.6, not
1; an over-sure belief turns mbr back into a bet on one label (docs/experiments.md:
"mbr decoding").
So when the dev split chooses the decoding, every mbr candidate is scored on the dev
queries, each query's best candidate is read as the utilities were built (by
`TrainingConfig.best_row_column`), and each loop's temperature is the one under which
its policy gives those best candidates the highest likelihood (`mbr.fit_temperature`).
The dev accuracies that choose the decoding then read mbr at that temperature. One
number per loop, fitted by likelihood rather than by dev accuracy: it makes the choice
among decodings no more optimistic than it was.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd

from qpo_ray.data.pairs import make_pairs
from qpo_ray.data.rewards import compute_rewards
from qpo_ray.testphase.decoding import MethodContext
from qpo_ray.policy.mbr import fit_temperature
from qpo_ray.common.progress import Progress
from qpo_ray.tasks.base import Example

ScoreFn = Callable[[pd.DataFrame], tuple[pd.DataFrame, dict]]


def best_candidates(ctx: MethodContext, dev: list[Example], score: ScoreFn,
                    shots: int) -> tuple[pd.Series, dict]:
    """Each dev query's best mbr candidate (query id -> index into the table's prompts),
    from every candidate scored on it; queries missing a candidate's score are left
    out. Returns it with the scorer's usage."""
    cfg = ctx.cfg
    table, step0 = ctx.mbr_table(), ctx.step0[ctx.step0["loop"] == 0]
    ids = step0.drop_duplicates("prompt").set_index("prompt")["prompt_id"]
    rows = [(str(ids[p]), p, "collection") for p in table.prompts for _ in dev]
    pairs = make_pairs([q for _ in table.prompts for q in dev], rows, ctx.task, ctx.splits,
                       num_shots=shots, num_demo_sets=cfg.task.num_demo_sets, loop=1,
                       seed=cfg.seed)
    pairs["pair_id"] = [f"calibration-{i}" for i in range(len(pairs))]
    scored, usage = score(pairs)
    # R_task as Step 0 measured it: with rank_by "reward", a query's best row weighs it.
    r_task = step0.groupby("prompt_id")["r_task"].first().to_dict()
    rewards, _ = compute_rewards(scored, cfg.dataset.zero_shot_penalty, few_shot=shots > 0,
                                 r_task=r_task, answer=cfg.dataset.query_reward)
    ranked = rewards.pivot_table(index="query_id", columns="prompt",
                                 values=cfg.training.best_row_column, aggfunc="first")
    ranked = ranked.reindex(columns=table.prompts).dropna()
    if ranked.empty:
        raise ValueError("test.mbr.calibration: no dev query has every mbr candidate scored")
    best = pd.Series(ranked.to_numpy().argmax(axis=1), index=ranked.index)
    return best, {**usage, "pairs": len(pairs), "dev_queries_ranked": len(best)}


def calibrate_mbr(ctx: MethodContext, dev: list[Example], score: ScoreFn,
                  shots: int) -> tuple[dict[int, float], dict]:
    """loop -> its policy's belief temperature fitted on `dev`, and what it cost."""
    best, usage = best_candidates(ctx, dev, score, shots)
    position = {q.id: i for i, q in enumerate(dev)}
    keep = [position[q] for q in best.index]
    temperatures = {}
    for loop in ctx.policy_dirs:
        progress = Progress(f"test: loop {loop} belief on dev (mbr calibration)", len(dev),
                            "queries")
        logprobs = ctx.mbr_logprobs(loop, dev, on_batch=progress.update)
        progress.close()
        temperatures[loop] = fit_temperature(logprobs[keep], best.to_numpy())
    return temperatures, usage
