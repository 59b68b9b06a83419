"""The summaries of benchmarks/effectiveness.py, from finished runs' predictions only
(test split, zero-shot): per task and seed, per task over seeds, pooled over tasks, and
on a test set re-sampled to a shifted label prior. Nothing here chooses anything."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pandas as pd

from qpo_ray.testphase.render import well_formed
from qpo_ray.testphase.stats import across_seeds, paired_difference

REFERENCES = ("manual", "best_single", "best_single_dev", "probe", "majority")
# Per-seed lines show these; the mean over seeds shows every reference.
SEED_REFERENCES = ("manual", "best_single_dev")


def aligned(pred: pd.DataFrame, method: str, ref: str) -> tuple | None:
    """(method, ref) accuracy arrays on their common query ids, None if one is absent."""
    a = pred[pred["method"] == method].set_index("query_id")["accuracy"]
    b = pred[pred["method"] == ref].set_index("query_id")["accuracy"]
    if a.empty or b.empty:
        return None
    common = a.index.intersection(b.index).sort_values()
    return a.loc[common].to_numpy(), b.loc[common].to_numpy()


def groups(pred: pd.DataFrame, method: str, ref: str,
           keys=("task", "seed")) -> list[tuple]:
    """One aligned (method, ref) pair per (task, seed) that has both rows."""
    out = []
    for _, part in pred.groupby(list(keys)):
        pair = aligned(part, method, ref)
        if pair is not None:
            out.append(pair)
    return out


def priors(labels, label_words) -> str:
    """"negative 48% / positive 52%": the share of each label among `labels`."""
    counts, n = Counter(int(y) for y in labels), max(1, len(labels))
    return " / ".join(f"{w} {100 * counts.get(i, 0) / n:.0f}%" for i, w in enumerate(label_words))


def print_priors(task: str, seed: int, splits, label_words) -> None:
    print(f"  {task} seed {seed} label priors: collection ({len(splits.collection)}) "
          f"{priors([e.label for e in splits.collection], label_words)}; dev "
          f"({len(splits.dev)}) {priors([e.label for e in splits.dev], label_words)}; test "
          f"({len(splits.test)}) {priors([e.label for e in splits.test], label_words)}")


def summarise_task(pred: pd.DataFrame, task: str) -> dict[str, dict]:
    """Per method: accuracy per seed, paired differences per seed (vs SEED_REFERENCES)
    and over seeds (vs every reference: a bootstrap resampling queries within seeds)."""
    methods = [m for m in pred["method"].unique() if not m.startswith("single:")]
    seeds = sorted(pred["seed"].unique())
    print(f"\n== {task}: test accuracy and paired differences (95% CI, McNemar p)")
    print(f"{'method':<24} {'seed':>4} {'acc':>6}  " +
          "  ".join(f"{'vs ' + r:<30}" for r in SEED_REFERENCES))
    summary: dict[str, dict] = {}
    for method in methods:
        accs = []
        for seed in seeds:
            part = pred[pred["seed"] == seed]
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            accs.append(rows["accuracy"].mean())
            cells = []
            for ref in SEED_REFERENCES:
                pair = aligned(part, method, ref) if method != ref else None
                cells.append(paired_difference([pair]).in_points() if pair else "")
            print(f"{method:<24} {seed:>4} {100 * accs[-1]:6.1f}  " +
                  "  ".join(f"{c:<30}" for c in cells))
        mean = {ref: paired_difference(g) for ref in REFERENCES
                if method != ref and (g := groups(pred, method, ref, ("seed",)))}
        summary[method] = {"accuracy": float(np.mean(accs)), **mean}
        print(f"{method:<24} {'mean':>4} {100 * np.mean(accs):6.1f}  " + "; ".join(
            f"vs {ref} {d.in_points()}" for ref, d in mean.items()))
    return summary


def task_checks(pred: pd.DataFrame, summary: dict, task: str, label_words) -> None:
    """The effectiveness issue's per-task checks (mean over seeds, paired 95% CI)."""
    print(f"\n{task}: checks (pooled over seeds)")

    def above(ref: str) -> str:
        d = summary.get("qpo", {}).get(ref)
        return "n/a" if d is None else f"{'PASS' if d.ci_low > 0 else 'FAIL'} ({d.in_points()})"
    for ref in ("manual", "best_single_dev"):
        print(f"  qpo > {ref}, CI > 0: {above(ref)}")
        per_seed = [a.mean() - b.mean() for a, b in groups(pred, "qpo", ref, ("seed",))]
        if per_seed:
            print(f"    seeds as the unit (t-interval): {across_seeds(per_seed).in_points()}")
    for ref in ("probe", "majority", "router", "best_single"):
        d = summary.get("qpo", {}).get(ref)
        # The router is no column of the per-seed table (not in REFERENCES): paired here.
        if d is None and (g := groups(pred, "qpo", ref, ("seed",))):
            d = paired_difference(g)
        if d is not None:
            print(f"  qpo vs {ref:<16} {d.in_points()}")
    for method in sorted(m for m in pred["method"].unique() if m.startswith("qpo")):
        rows = pred[pred["method"] == method]
        print(f"  well-formed {method:<12} "
              f"{100 * rows['prompt'].map(lambda p: well_formed(p, label_words)).mean():.0f}%"
              f" ({rows['prompt'].nunique()} distinct prompts over seeds)")


def pooled(pred: pd.DataFrame, tasks: list[str]) -> None:
    """Over every task and seed (each (task, seed) one group of the bootstrap), and the
    mean over tasks of qpo - router (the issue asks qpo >= router on average)."""
    print(f"\n== pooled over {len(tasks)} task(s) x seeds: qpo vs each reference")
    for ref in (*REFERENCES, "router", "label_router"):
        g = groups(pred, "qpo", ref)
        if g:
            print(f"  qpo vs {ref:<16} {paired_difference(g).in_points()}")
    per_task = {t: np.mean([a.mean() - b.mean() for a, b in g]) for t in tasks
                if (g := groups(pred[pred["task"] == t], "qpo", "router"))}
    if per_task:
        mean = float(np.mean(list(per_task.values())))
        each = ", ".join(f"{t} {100 * d:+.1f}" for t, d in per_task.items())
        print(f"  qpo - router, mean over tasks: {100 * mean:+.1f} ({each}; "
              f"{'PASS' if mean >= 0 else 'FAIL'}: qpo >= router on average)")


def shifted_prior(shares: dict[int, float]) -> dict[int, float]:
    """The collection's label shares reversed by rank: the most frequent label gets the
    rarest one's share, and so on (ties in collection order by label index)."""
    order = sorted(shares, key=lambda y: (-shares[y], y))
    values = sorted(shares.values())
    return dict(zip(order, values))


def shifted_sample(test_labels: dict[str, int], target: dict[int, float],
                   seed: int) -> list[str]:
    """The largest seeded sample of test query ids (without replacement) whose label
    shares are `target`: n * share_k queries of each label k."""
    by_label: dict[int, list[str]] = {}
    for qid, y in sorted(test_labels.items()):
        by_label.setdefault(int(y), []).append(qid)
    wanted = {y: s for y, s in target.items() if s > 0}
    if not wanted:
        return []
    n = min(int(len(by_label.get(y, [])) / s) for y, s in wanted.items())
    rng = random.Random(seed)
    out: list[str] = []
    for y, s in sorted(wanted.items()):
        out += rng.sample(by_label.get(y, []), int(round(n * s)) if n else 0)
    return sorted(out)


def shifted_report(pred: pd.DataFrame, collection_shares: dict, label_words: dict) -> None:
    """Every (task, seed)'s test set re-sampled to the reversed collection prior
    (`shifted_prior`, seeded by 1000 + seed), and qpo against the references there."""
    print("\n== shifted label prior: each test set re-sampled (seed 1000 + seed) to its "
          "collection's label shares reversed by rank")
    kept = []
    for (task, seed), part in pred.groupby(["task", "seed"]):
        labels = part.drop_duplicates("query_id").set_index("query_id")["label"].astype(int)
        target = shifted_prior(collection_shares[(task, seed)])
        ids = shifted_sample(labels.to_dict(), target, 1000 + int(seed))
        words = label_words[task]
        print(f"  {task} seed {seed}: target prior "
              + " / ".join(f"{words[y]} {100 * s:.0f}%" for y, s in sorted(target.items()))
              + f", {len(ids)} of {len(labels)} test queries")
        kept.append(part[part["query_id"].isin(ids)])
    shifted = pd.concat(kept, ignore_index=True) if kept else pred.iloc[:0]
    for task in shifted["task"].unique():
        part = shifted[shifted["task"] == task]
        cells = []
        for ref in ("manual", "best_single_dev", "probe", "majority", "router"):
            g = groups(part, "qpo", ref)
            if g:
                cells.append(f"vs {ref} {paired_difference(g).in_points()}")
        g = groups(part, "qpo", "manual")
        verdict = ("n/a" if not g else
                   "PASS" if paired_difference(g).diff >= 0 else "FAIL")
        print(f"  {task}: qpo {100 * part[part['method'] == 'qpo']['accuracy'].mean():.1f}; "
              + "; ".join(cells) + f"  [qpo not below manual: {verdict}]")


def print_dev_choice(dev: pd.DataFrame) -> None:
    """Dev accuracy (%) per task and seed of each candidate qpo was chosen among, and of
    the prompt best_single_dev chose (the dev split only)."""
    dev = dev[dev["method"].str.startswith("qpo_loop")]
    if dev.empty:
        return
    table = 100 * dev.pivot_table(index=["task", "method"], columns="seed", values="accuracy")
    print("\ndev accuracy of the candidates qpo was chosen among (the dev split only):")
    print(table.round(1).rename(columns=lambda seed: f"seed {seed}")
          .rename_axis(columns=None).to_string())
