"""Where is the headroom, and does the policy find it? Every collection prompt on a
finished run's dev queries, and what each way of choosing a prompt per query gets there.

    .venv/bin/python benchmarks/dev_headroom.py --run runs/effectiveness/seed0

The test split is never read: everything here is the run's dev split (held out of the
collection set, never scored in Step 0 or augmentation), which is where choices are
made. It prints dev accuracy and the paired difference against `best_single` (bootstrap
95% CI over dev queries, McNemar exact p) for:
- best_single: the prompt with the best Step-0 R_task (the run's baseline);
- router: the Prompt-OIRL-style selection baseline, fitted on Step 0 (qpo_ray.testphase.selectors);
  label_router (label tasks): the label-aware one, its probe fitted on the Step-0
  queries' gold labels;
- qpo_loop<k> rank top<n>: the policy of loop k choosing among the n best collection
  prompts by its reward-conditioned contrast log p(c | R=high, q) - log p(c | R=low, q)
  (qpo_ray.policy.ranking; n = all is the whole collection): does the policy carry any
  query-dependent signal, and how many candidates can it handle? Also printed per loop:
  the correlation of that contrast with correctness once each prompt's mean is removed
  (0 = the policy cannot tell which prompt suits which query);
- label-aware, N labels (a diagnostic): the `label_router` baseline's chooser
  (qpo_ray.testphase.selectors.fit_label_router) with its label probe fitted on N labelled train
  examples of the demonstration pool instead of the Step-0 queries (gold labels only,
  no target calls): how much per-query choice can pay on this target, and how many
  labelled queries it takes;
- upper bounds, labelled as such and never baselines: the best prompt on these dev
  queries (chosen on them) and the per-query oracle (some prompt is right).
It also prints each prompt's dev accuracy and share of answers naming the first label:
on a two-label task with a small target, prompts that push one label make the oracle
trivial.

The dev matrix (every prompt x every dev query, scored through the run's own backend
and Ray Data pool) and the policies' contrasts are cached under --out, so a second call
only prints; delete that directory after the run's Step 0 or policies change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qpo_ray.common.atomic import atomic_file  # noqa: E402
from qpo_ray.testphase.stats import paired_difference  # noqa: E402

if TYPE_CHECKING:
    from qpo_ray.config import Config
    from qpo_ray.run.rundir import RunDir


def dev_matrix(run: "RunDir", cfg: "Config", out: Path) -> pd.DataFrame:
    """Scored pairs: every Step-0 prompt on every dev query of the run (cached)."""
    from qpo_ray.scoring.ray_data import score_pairs
    from qpo_ray.tasks import task_and_splits

    path = out / "dev_matrix.parquet"
    if path.exists():
        return pd.read_parquet(path)
    task, splits = task_and_splits(cfg.task, cfg.seed)
    prompts = pd.read_parquet(run.step0_path()).drop_duplicates("prompt_id")
    pairs = pd.DataFrame([
        {"pair_id": f"dev-{p.prompt_id}-{q.id}", "query_id": q.id, "query": q.text,
         "prompt_id": p.prompt_id, "prompt": p.prompt, "label": str(q.label),
         "demo_ids": []}
        for p in prompts.itertuples() for q in splits.dev])
    print(f"scoring {len(prompts)} prompts x {len(splits.dev)} dev queries "
          f"({len(pairs)} pairs) on the run's target", flush=True)
    scored, usage = score_pairs(cfg, task, splits, pairs, label="dev headroom")
    print(f"  {usage['engine_seconds']:.0f} engine-s", flush=True)
    with atomic_file(path) as tmp:
        scored.to_parquet(tmp)
    return scored


def policy_scores(run: "RunDir", cfg: "Config", out: Path, queries: list[str],
                  prompts: list[str]) -> dict[int, np.ndarray]:
    """loop -> (dev queries, prompts) contrast of that loop's policy (cached per loop)."""
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.ranking import rank_candidates

    scores = {}
    for loop in run.trained_loops():
        path = out / f"contrast_loop{loop}.npy"
        if not path.exists():
            print(f"loop {loop}: ranking {len(prompts)} prompts for {len(queries)} dev "
                  "queries", flush=True)
            policy = QPOPolicy.load(run.policy_dir(loop))
            grid = rank_candidates(policy, queries, [prompts] * len(queries),
                                   cfg.loop.target_reward, cfg.test.rank.low_reward)
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, grid)
        scores[loop] = np.load(path)
    return scores


def query_specific_corr(scores: np.ndarray, correct: np.ndarray) -> float:
    """Correlation of the policy's scores with correctness once each prompt's mean over
    the queries is removed from both: 0 means the policy knows which prompts are good in
    general but not which is good for which query, the one thing QPO adds over a fixed
    prompt."""
    s = scores - scores.mean(axis=0)
    c = correct - correct.mean(axis=0)
    denom = np.sqrt((s ** 2).sum() * (c ** 2).sum())
    return float((s * c).sum() / denom) if denom > 0 else 0.0


def _size(top: str, n: int) -> int:
    """How many of the n ranked prompts a `--top` value keeps."""
    return n if top == "all" else min(int(top), n)


def _top(text: str) -> str:
    """--top value: "all" or a positive number of candidates."""
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or a positive integer")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `qpo run` directory")
    p.add_argument("--out", type=Path, help="cache directory (default: <run>/headroom)")
    p.add_argument("--top", nargs="+", type=_top, default=["2", "4", "8", "all"],
                   help="candidate-set sizes for the policy's ranking (best R_task first)")
    p.add_argument("--labelled", nargs="*", type=int, default=[64, 256, 1024],
                   help="sizes of the label-aware chooser's labelled sets (drawn from the "
                        "demonstration pool: train data that is neither collection nor dev)")
    args = p.parse_args()
    from qpo_ray.common.errors import ConfigError
    from qpo_ray.run.rundir import RunDir

    # Everything that can be wrong with the input is checked before any scoring.
    try:
        run, cfg = RunDir.load(args.run)
    except (FileNotFoundError, ConfigError) as exc:
        p.error(str(exc))
    if cfg.task.dev_queries == 0:
        p.error(f"{args.run}: the run has no dev split (task.dev_queries = 0)")
    if not run.step0_path().exists():
        p.error(f"{args.run}: no Step-0 dataset ({run.step0_path().name}); finish the run first")
    out = args.out or args.run / "headroom"
    out.mkdir(parents=True, exist_ok=True)
    from qpo_ray.common.progress import send_library_logs_to
    send_library_logs_to(out)  # Ray Data's and transformers' progress go to a log file
    from qpo_ray.testphase.selectors import (fit_label_router, fit_label_router_on_step0, fit_router,
                                router_embedding_model)
    from qpo_ray.tasks import task_and_splits

    task, splits = task_and_splits(cfg.task, cfg.seed)
    scored = dev_matrix(run, cfg, out)
    correct = scored.pivot(index="query_id", columns="prompt_id", values="correct").astype(float)
    says_first = (scored.assign(first=scored["prediction"] == "0")
                  .pivot(index="query_id", columns="prompt_id", values="first").mean())
    queries = scored.drop_duplicates("query_id").set_index("query_id").loc[correct.index, "query"]
    step0 = pd.read_parquet(run.step0_path())
    step0 = step0[step0["loop"] == 0]
    r_task = step0.groupby("prompt_id")["r_task"].mean().loc[correct.columns]
    texts = step0.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    order = list(r_task.sort_values(ascending=False).index)  # best Step-0 R_task first
    grid = correct[order].to_numpy()
    rows = np.arange(len(grid))
    best_single = grid[:, 0]

    print(f"\nper prompt on {len(grid)} dev queries (best Step-0 R_task first):")
    for pid in order:
        print(f"  {100 * correct[pid].mean():5.1f}  says label 0: {100 * says_first[pid]:3.0f}%  "
              f"R_task {r_task[pid]:.3f}  {texts[pid][:70]}")

    table = [("best_single", best_single)]
    router = fit_router(step0, router_embedding_model(cfg), seed=cfg.seed)
    picks = router.choose(queries.tolist())
    table.append(("router", correct.to_numpy()[rows, [correct.columns.get_loc(c) for c in picks]]))
    if task.label_words:
        picks = fit_label_router_on_step0(step0, len(task.label_words),
                                          router_embedding_model(cfg),
                                          seed=cfg.seed).choose(queries.tolist())
        table.append(("label_router", grid[rows, [order.index(c) for c in picks]]))
    contrast = policy_scores(run, cfg, out, queries.tolist(), [texts[c] for c in order])
    for loop, scores in contrast.items():
        print(f"loop {loop}: query-specific correlation of the policy's contrast with "
              f"correctness {query_specific_corr(scores, grid):+.3f}")
        for top in args.top:
            choice = np.argmax(scores[:, :_size(top, len(order))], axis=1)
            table.append((f"qpo_loop{loop} rank top{top}", grid[rows, choice]))
    if task.label_words and args.labelled:
        pool = list(splits.demo_pool)
        np.random.default_rng(cfg.seed).shuffle(pool)
        for n in args.labelled:
            fitted = fit_label_router(step0, [e.text for e in pool[:n]],
                                      [int(e.label) for e in pool[:n]], len(task.label_words),
                                      router_embedding_model(cfg), prompt_ids=order,
                                      seed=cfg.seed)
            expected = fitted.expected_correct(queries.tolist())
            for top in args.top:
                table.append((f"label-aware, {n} labels, top{top}",
                              grid[rows, expected[:, :_size(top, len(order))].argmax(axis=1)]))
    dev_best = grid.mean(axis=0).argmax()
    table.append(("upper bound: best prompt on dev", grid[:, dev_best]))
    table.append(("upper bound: per-query oracle", grid.max(axis=1)))

    print(f"\n{'choice':<34} {'dev acc':>7}  vs best_single (paired)")
    for name, got in table:
        cell = ("" if name == "best_single"
                else paired_difference([(got, best_single)]).in_points())
        print(f"{name:<34} {100 * got.mean():7.1f}  {cell}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
