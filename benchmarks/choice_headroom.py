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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOGISTIC_C = 0.1


def wide_matrices(run: Path) -> tuple[pd.DataFrame, list[str], list[str], np.ndarray,
                                      np.ndarray]:
    """(their Step-0 rows, the prompts (the columns), query texts, correct (N, C),
    r_query (N, C)) over mbr's
    candidates (`utility_table`: the prompts Step 0 scored on the most queries, in its
    order) and the queries every one of them was scored on."""
    from qpo_ray.policy.mbr import utility_table

    step0 = pd.read_parquet(run / "dataset_loop0.parquet")
    step0 = step0[step0["loop"] == 0]
    prompts = utility_table(step0, "r_query").prompts
    rows = step0[step0["prompt"].isin(prompts)]
    complete = rows.groupby("query_id")["prompt"].nunique() == len(prompts)
    rows = rows[rows["query_id"].isin(complete[complete].index)]

    def table(column: str) -> pd.DataFrame:
        return rows.pivot_table(index="query_id", columns="prompt", values=column,
                                aggfunc="first")[prompts]
    correct = table("correct")
    texts = rows.drop_duplicates("query_id").set_index("query_id").loc[correct.index, "query"]
    return (rows, prompts, texts.tolist(), correct.to_numpy(float),
            table("r_query").to_numpy(float))


def logistic_beliefs(x: np.ndarray, y: np.ndarray, x_out: np.ndarray, classes: int,
                     weights: np.ndarray | None = None) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=LOGISTIC_C, max_iter=3000).fit(x, y, sample_weight=weights)
    beliefs = np.zeros((len(x_out), classes))
    beliefs[:, model.classes_] = model.predict_proba(x_out)
    return beliefs


def main() -> None:
    from sklearn.decomposition import PCA
    from sklearn.model_selection import KFold

    from qpo_ray.policy.mbr import mbr_choice, utility_table
    from qpo_ray.testphase.references import summary_features
    from qpo_ray.testphase.selectors import fit_router

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (its config.yaml "
                        "and dataset_loop0.parquet)")
    args = parser.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    policy, seed = cfg["policy"], int(cfg.get("seed", 0))
    summary = policy["query_summary"]
    rows, prompts, texts, correct, r_query = wide_matrices(args.run)
    n, c = correct.shape
    best = r_query.argmax(axis=1)
    feats = summary_features(policy["backbone"], summary["layers"],
                             policy["max_query_tokens"], texts)
    by_id = rows.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    scores: dict[str, list[float]] = {}
    depths: list[str] = []  # where the router read the query, per fold

    def add(name: str, picks: np.ndarray, held: np.ndarray) -> None:
        scores.setdefault(name, []).append(float(correct[held, picks].mean()))

    for train, held in KFold(5, shuffle=True, random_state=seed).split(correct):
        add("fixed", np.full(len(held), correct[train].mean(axis=0).argmax()), held)
        pca = PCA(min(summary["dims"], len(train) - 1), whiten=True,
                  random_state=seed).fit(feats[train])
        x, x_held = pca.transform(feats[train]), pca.transform(feats[held])
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
        router = fit_router(train_rows, cfg["target"]["model"], seed=seed)
        picks = router.choose([texts[i] for i in held])
        add("router", np.array([prompts.index(by_id[p]) for p in picks]), held)
        depths.append(f"{router.depth:.2f}")
        add("oracle", correct[held].argmax(axis=1), held)

    print(f"{args.run}: {n} wide queries x {c} prompts, 5-fold CV on the collection; "
          f"summary: first {summary['layers']} layers, {summary['dims']} dims; router depth "
          f"per fold {', '.join(depths)}")
    fixed = np.mean(scores["fixed"])
    for name, values in scores.items():
        mean = 100 * np.mean(values)
        print(f"  {name:<14} {mean:5.1f}  ({100 * (np.mean(values) - fixed):+5.1f} over fixed)")


if __name__ == "__main__":
    main()
