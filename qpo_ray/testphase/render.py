"""The test report's files: the results table (accuracy, Wilson interval, paired
differences against the references, the oracle bound), its markdown, and the sample of
QPO's prompts. Pure pandas; qpo_ray.testphase.evaluate decides what goes in."""

from __future__ import annotations

import re
import string

import numpy as np
import pandas as pd

from qpo_ray.testphase.stats import paired_difference, wilson_interval

# Table order: QPO and its loops, ablations, selection baselines, query-agnostic ones.
METHOD_ORDER = ("qpo", "qpo_loop", "qpo_greedy", "qpo_no_mla", "sft", "router",
                "label_router", "label_router_collection", "nearest_neighbour", "manual",
                "best_single", "best_single_dev", "probe", "majority", "best_single_oracle",
                "single:")
# Every row is paired with each of these present (results.csv); the markdown table shows
# the prompt references, the "where the gain comes from" lines the label predictors.
REFERENCES = ("manual", "best_single", "best_single_dev", "probe", "majority")
TABLE_REFERENCES = ("manual", "best_single", "best_single_dev")
# Rows whose prompts a policy wrote (their share of well-formed prompts is reported).
GENERATED = re.compile(r"^(qpo|qpo_loop\d+|qpo_greedy|sft|qpo_no_mla)$")

def well_formed(prompt: str, label_words) -> bool:
    """A prompt a person could read that names every label: >= 3 words, >= 95%
    printable ASCII, every label word present (case-insensitive)."""
    text = prompt.strip()
    if len(text.split()) < 3:
        return False
    printable = sum(ch in string.printable for ch in text) / len(text)
    lower = text.lower()
    return printable >= 0.95 and all(str(w).lower() in lower for w in label_words)


def label_shares(part: pd.DataFrame, column: str, label_words) -> dict[str, float]:
    """Share of each label (by index into `label_words`) in `part[column]`; {} when
    the frame has no such column or the task has no labels."""
    if not len(label_words) or column not in part:
        return {}
    index = pd.to_numeric(part[column], errors="coerce")
    return {str(w): float((index == i).mean()) for i, w in enumerate(label_words)}


def _prompt_origin(part: pd.DataFrame, collection) -> dict[str, float]:
    """For a policy row: the share of its prompts that are not collection prompts, and
    the accuracy of those and of the others apart (NaN where there are none)."""
    if collection is None:
        return {}
    new = ~part["prompt"].isin(set(collection))
    return {"non_collection_share": float(new.mean()),
            "non_collection_accuracy": (float(part.loc[new, "accuracy"].mean())
                                        if new.any() else np.nan),
            "collection_prompt_accuracy": (float(part.loc[~new, "accuracy"].mean())
                                           if (~new).any() else np.nan)}


def results_table(predictions: pd.DataFrame, label_words=(), collection=None) -> pd.DataFrame:
    """One row per (shots, method) of the test predictions: accuracy, Wilson 95% CI, n,
    paired differences against the references, the oracle bound from single:* rows, the
    share of each predicted label (`pred_share:<word>`) beside the gold shares
    (`gold_share:<word>`), and for policy rows, given the `collection` prompts' texts, the
    share and accuracy of prompts that are not collection prompts."""
    rows = []
    for (shots, method), part in predictions.groupby(["shots", "method"], sort=False):
        lo, hi = wilson_interval(float(part["accuracy"].sum()), len(part))
        single = part["prompt_id"].nunique() == 1
        row = {"shots": int(shots), "method": method, "accuracy": float(part["accuracy"].mean()),
               "ci_low": lo, "ci_high": hi, "n": len(part),
               "prompt_id": part["prompt_id"].iloc[0] if single else "",
               "prompt": part["prompt"].iloc[0] if single else "",
               "distinct_prompts": int(part.loc[part["prompt_id"] != "", "prompt"].nunique())}
        if GENERATED.match(method):
            row["well_formed"] = float(np.mean([well_formed(p, label_words)
                                                for p in part["prompt"]]))
            row.update(_prompt_origin(part, collection))
        row.update({f"pred_share:{w}": v
                    for w, v in label_shares(part, "prediction", label_words).items()})
        row.update({f"gold_share:{w}": v
                    for w, v in label_shares(part, "label", label_words).items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    singles = table[table["method"].str.startswith("single:")]
    for shots, part in singles.groupby("shots"):
        oracle = part.loc[part["accuracy"].idxmax()].copy()
        oracle["method"] = "best_single_oracle"
        table = pd.concat([table, oracle.to_frame().T], ignore_index=True)
    by = {(s, m): p.sort_values("query_id")["accuracy"].to_numpy()
          for (s, m), p in predictions.groupby(["shots", "method"])}
    for ref in REFERENCES:
        for column in ("diff", "diff_low", "diff_high", "p_value"):
            table[f"{column}_vs_{ref}"] = np.nan
        for i, row in table.iterrows():
            base = by.get((row["shots"], ref))
            mine = by.get((row["shots"], row["method"]))
            if base is None or mine is None or row["method"] == ref or len(base) != len(mine):
                continue
            d = paired_difference([(mine, base)], seed=0)
            table.loc[i, [f"diff_vs_{ref}", f"diff_low_vs_{ref}", f"diff_high_vs_{ref}",
                          f"p_value_vs_{ref}"]] = [d.diff, d.ci_low, d.ci_high, d.p_value]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rank = table["method"].map(lambda m: order.get(re.sub(r"\d+$", "", m), len(order)))
    return table.assign(_rank=rank).sort_values(["shots", "_rank", "method"], kind="stable") \
        .drop(columns="_rank").reset_index(drop=True)


def _paired(row, ref: str) -> str:
    diff = row.get(f"diff_vs_{ref}")
    if diff is None or pd.isna(diff):
        return ""
    return (f"{100 * diff:+.1f} [{100 * row[f'diff_low_vs_{ref}']:+.1f}, "
            f"{100 * row[f'diff_high_vs_{ref}']:+.1f}] p={row[f'p_value_vs_{ref}']:.3g}")


def markdown(table: pd.DataFrame, examples: pd.DataFrame, header: list[str],
             split: str = "test", label_words=()) -> str:
    lines = header + [""]
    present = set(table["method"])
    refs = [r for r in TABLE_REFERENCES if r in present] or list(TABLE_REFERENCES[:2])
    for shots, part in table.groupby("shots"):
        lines += [f"### {shots}-shot {split} accuracy (paired differences on the same queries: "
                  "bootstrap 95% CI, McNemar exact p)", "",
                  "| method | accuracy | 95% CI (Wilson) | n | "
                  + " | ".join(f"vs {r}" for r in refs) + " | well-formed prompts | prompt |",
                  "|---|---|---|---|" + "---|" * len(refs) + "---|---|"]
        shown = part[~part["method"].str.startswith("single:")]
        for _, row in shown.iterrows():
            name = row["method"] + (f" (upper bound, picked on {split})"
                                    if row["method"] == "best_single_oracle" else "")
            wf = row.get("well_formed")
            lines.append(f"| {name} | {100 * row['accuracy']:.1f} | [{100 * row['ci_low']:.1f}, "
                         f"{100 * row['ci_high']:.1f}] | {row['n']} | "
                         + "".join(f"{_paired(row, r)} | " for r in refs)
                         + f"{'' if wf is None or pd.isna(wf) else f'{100 * wf:.0f}%'} | "
                         f"{_prompt_cell(row)} |")
        lines += [""] + _share_lines(shown, label_words, split) + _gain_lines(shown)
    if len(examples):
        lines += [f"### QPO's prompts (sample of {split} queries)", "",
                  "| query | gold | QPO prompt | QPO correct | manual correct |", "|---|---|---|---|---|"]
        for row in examples.itertuples():
            lines.append(f"| {_cell(row.query, 120)} | {row.label} | {_cell(row.prompt, 200)} | "
                         f"{row.qpo_correct} | {row.manual_correct} |")
    return "\n".join(lines) + "\n"


def _share_lines(part: pd.DataFrame, label_words, split: str) -> list[str]:
    """Each row's share of every predicted label beside the gold shares: label steering
    (a prompt choice that pushes one label) shows at a glance."""
    words = [str(w) for w in label_words if f"pred_share:{w}" in part]
    if not words or part.empty:
        return []
    lines = [f"Predicted label shares (%), gold {split} shares first:", "",
             "| method | " + " | ".join(words) + " |", "|---|" + "---|" * len(words),
             "| gold | " + " | ".join(f"{100 * part.iloc[0][f'gold_share:{w}']:.0f}"
                                      for w in words) + " |"]
    for _, row in part.iterrows():
        lines.append(f"| {row['method']} | "
                     + " | ".join(f"{100 * row[f'pred_share:{w}']:.0f}" for w in words) + " |")
    return lines + [""]


def _gain_lines(part: pd.DataFrame) -> list[str]:
    """Where qpo's gain comes from: against the label predictors that need no prompt,
    and its prompts that are not collection prompts apart."""
    rows = part[part["method"] == "qpo"]
    if rows.empty:
        return []
    row, lines = rows.iloc[0], ["Where the gain comes from:"]
    for ref in ("probe", "majority"):
        if _paired(row, ref):
            lines.append(f"- qpo vs {ref} (no prompt, no target call): {_paired(row, ref)}")
    share = row.get("non_collection_share")
    if share is not None and not pd.isna(share):
        def pct(v) -> str:
            return "n/a" if pd.isna(v) else f"{100 * v:.1f}%"
        lines.append(f"- qpo prompts that are not collection prompts: {100 * share:.0f}% of "
                     f"queries, accuracy {pct(row['non_collection_accuracy'])} "
                     f"(collection prompts: {pct(row['collection_prompt_accuracy'])})")
    return lines + [""] if len(lines) > 1 else []


def _prompt_cell(row) -> str:
    """A fixed prompt's text beside its id; "per query" for methods that vary it; none
    for the rows that predict the label themselves."""
    if row.get("distinct_prompts") == 0:
        return "none: predicts the label itself, no target call"
    if isinstance(row.get("prompt_id"), str) and row["prompt_id"]:
        return f"{_cell(row['prompt'], 90)} ({row['prompt_id']})"
    return f"per query ({row['distinct_prompts']} distinct)"


def _cell(text: str, limit: int) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def examples(predictions: pd.DataFrame, shots: int, count: int) -> pd.DataFrame:
    zero = predictions[predictions["shots"] == shots]
    qpo = zero[zero["method"] == "qpo"].head(count)
    manual = zero[zero["method"] == "manual"].set_index("query_id")["correct"]
    return pd.DataFrame({"query": qpo["query"], "label": qpo["label"], "prompt": qpo["prompt"],
                         "qpo_correct": qpo["correct"],
                         "manual_correct": qpo["query_id"].map(manual)})
