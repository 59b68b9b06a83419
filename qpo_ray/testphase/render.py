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
                "best_single", "best_single_oracle", "single:")
REFERENCES = ("manual", "best_single")
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


def results_table(predictions: pd.DataFrame, label_words=()) -> pd.DataFrame:
    """One row per (shots, method) of the test predictions: accuracy, Wilson 95% CI, n,
    paired differences against the references, the oracle bound from single:* rows."""
    rows = []
    for (shots, method), part in predictions.groupby(["shots", "method"], sort=False):
        lo, hi = wilson_interval(float(part["accuracy"].sum()), len(part))
        single = part["prompt_id"].nunique() == 1
        row = {"shots": int(shots), "method": method, "accuracy": float(part["accuracy"].mean()),
               "ci_low": lo, "ci_high": hi, "n": len(part),
               "prompt_id": part["prompt_id"].iloc[0] if single else "",
               "prompt": part["prompt"].iloc[0] if single else "",
               "distinct_prompts": int(part["prompt"].nunique())}
        if GENERATED.match(method):
            row["well_formed"] = float(np.mean([well_formed(p, label_words)
                                                for p in part["prompt"]]))
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
              split: str = "test") -> str:
    lines = header + [""]
    for shots, part in table.groupby("shots"):
        lines += [f"### {shots}-shot {split} accuracy (paired differences on the same queries: "
                  "bootstrap 95% CI, McNemar exact p)", "",
                  "| method | accuracy | 95% CI (Wilson) | n | vs manual | vs best_single "
                  "| well-formed prompts | prompt |", "|---|---|---|---|---|---|---|---|"]
        for _, row in part[~part["method"].str.startswith("single:")].iterrows():
            name = row["method"] + (f" (upper bound, picked on {split})"
                                    if row["method"] == "best_single_oracle" else "")
            wf = row.get("well_formed")
            lines.append(f"| {name} | {100 * row['accuracy']:.1f} | [{100 * row['ci_low']:.1f}, "
                         f"{100 * row['ci_high']:.1f}] | {row['n']} | {_paired(row, 'manual')} | "
                         f"{_paired(row, 'best_single')} | "
                         f"{'' if wf is None or pd.isna(wf) else f'{100 * wf:.0f}%'} | "
                         f"{_prompt_cell(row)} |")
        lines.append("")
    if len(examples):
        lines += [f"### QPO's prompts (sample of {split} queries)", "",
                  "| query | gold | QPO prompt | QPO correct | manual correct |", "|---|---|---|---|---|"]
        for row in examples.itertuples():
            lines.append(f"| {_cell(row.query, 120)} | {row.label} | {_cell(row.prompt, 200)} | "
                         f"{row.qpo_correct} | {row.manual_correct} |")
    return "\n".join(lines) + "\n"


def _prompt_cell(row) -> str:
    """A fixed prompt's text beside its id; "per query" for methods that vary it."""
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
