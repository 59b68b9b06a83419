"""How much can a per-query choice among Step 0's wide prompts gain on a task, and which
way of learning it from the query gains most? Asked of a finished run's collection data
alone (no dev or test query): Step 0's wide queries, each scored with the same prompts.

    .venv/bin/python benchmarks/choice_headroom.py runs/effectiveness/ag_news/seed0

5-fold cross-validation over those queries; each row is the mean target accuracy of the
prompts a rule picks for the held-out queries:
- fixed: the prompt most accurate on the training folds (best_single's rule);
- best_clf: multinomial logistic regression from the query summary's features (the
  policy's layers, PCA-whitened to its dims) to each query's best prompt by r_query:
  what the policy's summary part learns, with its greedy choice;
- best_clf_mbr: the same belief, decoded by mbr (qpo_ray/policy/mbr.py) at T = 1;
- soft_clf: the same classifier trained on every prompt the target got right (a row
  each), so it learns P(correct) rather than the single best;
- router: the router baseline (qpo_ray/testphase/selectors.py: ridge from the target's
  embedding to each prompt's reward, depth and strength by its own inner CV) fitted on
  the training folds' rows of these prompts;
- oracle: each query's best prompt, the ceiling of any choice among them.
Why a benchmark of its own: a per-query method can only gain what these rows leave
between `fixed` and `oracle`, and it tells which reading of the query carries it before
a long run is spent (docs/experiments.md: "Where a per-query choice can gain").

    .venv/bin/python benchmarks/choice_headroom.py --split dev RUN [RUN ...]

asks the same of the dev split instead: each rule fitted on all of Step 0 (the router as
the test stage fits it, over every collection prompt), scored with the dev matrix the
best_single_dev step already holds (every collection prompt on every dev query, in the
run's report/predictions.parquet), beside the qpo variants the run scored on dev; pooled
over the runs, paired on the same dev queries. No target call; no test query is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOGISTIC_C = 0.1


def step0_of(run: Path) -> pd.DataFrame:
    """The run's Step-0 rows (loop 0 of dataset_loop0.parquet)."""
    step0 = pd.read_parquet(run / "dataset_loop0.parquet")
    return step0[step0["loop"] == 0]


def wide_matrices(step0: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str],
                                                np.ndarray, np.ndarray]:
    """(their Step-0 rows, the prompts' ids (the columns), query texts, correct (N, C),
    r_query (N, C)) over mbr's
    candidates (`utility_table`: the prompts Step 0 scored on the most queries, in its
    order) and the queries every one of them was scored on."""
    from qpo_ray.policy.mbr import utility_table

    prompts = utility_table(step0, "r_query").prompts
    rows = step0[step0["prompt"].isin(prompts)]
    complete = rows.groupby("query_id")["prompt"].nunique() == len(prompts)
    rows = rows[rows["query_id"].isin(complete[complete].index)]

    def table(column: str) -> pd.DataFrame:
        return rows.pivot_table(index="query_id", columns="prompt", values=column,
                                aggfunc="first")[prompts]
    correct = table("correct")
    texts = rows.drop_duplicates("query_id").set_index("query_id").loc[correct.index, "query"]
    ids = rows.drop_duplicates("prompt").set_index("prompt").loc[prompts, "prompt_id"]
    return (rows, ids.tolist(), texts.tolist(), correct.to_numpy(float),
            table("r_query").to_numpy(float))


def whitened(feats: np.ndarray, fitted_on: int, dims: int, seed: int) -> np.ndarray:
    """`feats` in the query summary's PCA-whitened space (its `dims`, at most one fewer
    than the rows it is fitted on), fitted on the first `fitted_on` rows."""
    from sklearn.decomposition import PCA

    pca = PCA(min(dims, fitted_on - 1), whiten=True, random_state=seed)
    return pca.fit(feats[:fitted_on]).transform(feats)


def logistic_beliefs(x: np.ndarray, y: np.ndarray, x_out: np.ndarray, classes: int,
                     weights: np.ndarray | None = None) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=LOGISTIC_C, max_iter=3000).fit(x, y, sample_weight=weights)
    beliefs = np.zeros((len(x_out), classes))
    beliefs[:, model.classes_] = model.predict_proba(x_out)
    return beliefs


def query_features(cfg: dict, texts: list[str]) -> np.ndarray:
    from qpo_ray.testphase.references import summary_features

    policy = cfg["policy"]
    return summary_features(policy["backbone"], policy["query_summary"]["layers"],
                            policy["max_query_tokens"], texts)


def router_model(run: Path) -> str:
    """The model whose features the run's router reads, as its test stage chose it."""
    from qpo_ray.config import config_from_dict
    from qpo_ray.testphase.selectors import router_embedding_model

    return router_embedding_model(config_from_dict(yaml.safe_load(
        (run / "config.yaml").read_text())))


def collection_cv(run: Path) -> None:
    """5-fold CV over the run's Step-0 wide queries: one line per rule."""
    from sklearn.model_selection import KFold

    from qpo_ray.policy.mbr import mbr_choice, utility_table
    from qpo_ray.testphase.selectors import fit_router

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary, seed = cfg["policy"]["query_summary"], int(cfg.get("seed", 0))
    rows, prompt_ids, texts, correct, r_query = wide_matrices(step0_of(run))
    n, c = correct.shape
    best = r_query.argmax(axis=1)
    feats = query_features(cfg, texts)
    router_at = router_model(run)
    scores: dict[str, list[float]] = {}
    depths: list[str] = []  # where the router read the query, per fold

    def add(name: str, picks: np.ndarray, held: np.ndarray) -> None:
        scores.setdefault(name, []).append(float(correct[held, picks].mean()))

    for train, held in KFold(5, shuffle=True, random_state=seed).split(correct):
        add("fixed", np.full(len(held), correct[train].mean(axis=0).argmax()), held)
        x_all = whitened(feats[np.concatenate([train, held])], len(train), summary["dims"],
                         seed)
        x, x_held = x_all[:len(train)], x_all[len(train):]
        belief = logistic_beliefs(x, best[train], x_held, c)
        add("best_clf", belief.argmax(axis=1), held)
        train_rows = rows[rows["query"].isin({texts[i] for i in train})]
        utility = utility_table(train_rows, "r_query").utility
        add("best_clf_mbr", mbr_choice(np.log(belief + 1e-12), utility), held)
        # One row per (query, prompt the target got right); the best one where none was.
        pairs = [(i, j) for i, q in enumerate(train)
                 for j in (np.flatnonzero(correct[q] > 0) if correct[q].any() else [best[q]])]
        at, labels = map(np.array, zip(*pairs))
        add("soft_clf", logistic_beliefs(x[at], labels, x_held, c).argmax(axis=1), held)
        router = fit_router(train_rows, router_at, seed=seed)
        picks = router.choose([texts[i] for i in held])
        add("router", np.array([prompt_ids.index(p) for p in picks]), held)
        depths.append(f"{router.depth:.2f}")
        add("oracle", correct[held].argmax(axis=1), held)

    print(f"{run}: {n} wide queries x {c} prompts, 5-fold CV on the collection; "
          f"summary: first {summary['layers']} layers, {summary['dims']} dims; router depth "
          f"per fold {', '.join(depths)}")
    fixed = np.mean(scores["fixed"])
    for name, values in scores.items():
        mean = 100 * np.mean(values)
        print(f"  {name:<14} {mean:5.1f}  ({100 * (np.mean(values) - fixed):+5.1f} over fixed)")


def dev_correct(run: Path) -> dict[str, np.ndarray]:
    """Per rule, 0/1 on each of the run's dev queries (in query-id order): the rules fitted
    on all of Step 0, and the qpo variants the test stage scored on dev (`qpo`: the one
    it chose there, so its figure is optimistic by the choice)."""
    from qpo_ray.policy.mbr import mbr_choice, utility_table
    from qpo_ray.testphase.selectors import fit_router

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = int(cfg.get("seed", 0))
    predictions = pd.read_parquet(run / "report" / "predictions.parquet")
    dev = predictions[predictions["split"] == "dev"]
    matrix = dev.pivot_table(index="query_id", columns="method", values="correct",
                             aggfunc="first")
    single = {m.removeprefix("single:"): matrix[m].to_numpy(float)
              for m in matrix if m.startswith("single:")}
    if not single:
        raise SystemExit(f"{run}/report/predictions.parquet: no dev rows of best_single_dev "
                         "(single:<id>); --split dev needs a run tested with a dev split and "
                         "best_single_dev in test.methods")
    texts = dev.drop_duplicates("query_id").set_index("query_id").loc[matrix.index, "query"]

    def scored(prompt_ids) -> np.ndarray:
        return np.array([single[p][i] for i, p in enumerate(prompt_ids)])

    step0 = step0_of(run)
    rows, wide_ids, wide_texts, correct, r_query = wide_matrices(step0)
    x = whitened(query_features(cfg, wide_texts + texts.tolist()), len(wide_texts),
                 cfg["policy"]["query_summary"]["dims"], seed)
    belief = logistic_beliefs(x[:len(wide_texts)], r_query.argmax(axis=1),
                              x[len(wide_texts):], len(wide_ids))
    mbr = mbr_choice(np.log(belief + 1e-12), utility_table(rows, "r_query").utility)
    router = fit_router(step0, router_model(run), seed=seed)
    out = {"fixed": scored([wide_ids[correct.mean(axis=0).argmax()]] * len(texts)),
           "best_clf": scored([wide_ids[j] for j in belief.argmax(axis=1)]),
           "best_clf_mbr": scored([wide_ids[j] for j in mbr]),
           "router": scored(router.choose(texts.tolist())),
           "oracle_wide": np.max([single[p] for p in wide_ids], axis=0)}
    selection = json.loads((run / "report" / "selection.json").read_text())
    out["qpo"] = matrix[f"qpo_loop{selection['loop']}/{selection['chosen_decoding']}"]
    out.update({m: matrix[m] for m in matrix if m.startswith("qpo_loop")})
    return {name: np.asarray(values, dtype=float) for name, values in out.items()}


def dev_check(runs: list[Path]) -> None:
    """Each rule's dev accuracy per run, then pooled with paired differences against qpo
    and the router (bootstrap 95% CI over the same dev queries)."""
    from qpo_ray.testphase.stats import paired_difference

    per_run = {run: dev_correct(run) for run in runs}
    rules = [r for r in per_run[runs[0]] if all(r in got for got in per_run.values())]
    print(f"dev split, {len(runs)} run(s), {sum(len(g['qpo']) for g in per_run.values())} "
          "queries; rules fitted on Step 0 only; qpo's variant was chosen on these queries")
    print(f"  {'rule':<18}" + "".join(f"{i:>7}" for i in range(1, len(runs) + 1))
          + f"{'pooled':>8}   minus qpo                       minus router")
    for rule in rules:
        cells = "".join(f"{100 * per_run[r][rule].mean():7.1f}" for r in runs)
        pooled = np.mean([per_run[r][rule].mean() for r in runs])
        vs = [paired_difference([(per_run[r][rule], per_run[r][base]) for r in runs])
              for base in ("qpo", "router")]
        print(f"  {rule:<18}{cells}{100 * pooled:8.1f}   "
              + "   ".join(f"{d.in_points():<29}" for d in vs))
    for i, run in enumerate(runs, 1):
        print(f"  run {i}: {run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories (their "
                        "config.yaml and dataset_loop0.parquet; for --split dev also report/)")
    parser.add_argument("--split", choices=("collection", "dev"), default="collection",
                        help="collection: 5-fold CV over Step 0's wide queries, per run; dev: "
                        "rules fitted on Step 0, scored on the dev split, pooled")
    args = parser.parse_args()
    if args.split == "dev":
        dev_check(args.runs)
    else:
        for run in args.runs:
            collection_cv(run)


if __name__ == "__main__":
    main()
