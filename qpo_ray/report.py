"""The test phase: the trained policy against the baselines on the test split.

Every (setting, method, query) pair goes through ONE scorer pass on the target (the
Ray Data pipeline), then accuracy, a 95% Wilson interval and the number of test
queries are tabulated per (shots, method). Outputs, in ``<run>/report/`` (or
``report-<target>/`` when testing against another target than the run's, paper
Table 8): ``report.md``, ``results.csv``, ``examples.csv`` and
``plots/accuracy_per_loop.png``. Which prompt each method uses: qpo_ray.baselines.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from qpo_ray.baselines import (PromptTuple, ablation_policy, best_single_by_step0,
                               nearest_neighbour_prompts, policy_prompts)
from qpo_ray.config import Config
from qpo_ray.rundir import RunDir

KNOWN_METHODS = ("qpo", "manual", "best_single", "nearest_neighbour", "sft", "qpo_no_mla")
# Table order: QPO and its earlier loops, ablations, then the baselines.
METHOD_ORDER = ("qpo", "qpo_loop", "qpo_no_mla", "sft", "nearest_neighbour", "manual",
                "best_single", "best_single_oracle", "single:")


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike +-1.96 se)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _report_dir(cfg: Config, run: Optional[RunDir]) -> Path:
    base = run.path if run is not None else Path(cfg.workdir)
    if run is not None and (run.path / "config.yaml").exists():
        _, saved = RunDir.load(run.path)
        if saved.target.model != cfg.target.model:
            return base / ("report-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.target.model))
    return base / "report"


def _method_prompts(cfg: Config, run: Optional[RunDir], policy_dir: str, queries: list[str],
                    collection: list, manual) -> dict[str, list[PromptTuple]]:
    """method name -> one (id, text, source) per test query."""
    from qpo_ray.data.io import read_dataset

    methods = list(dict.fromkeys(cfg.test.methods))
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"test.methods: unknown method(s) {unknown} (known: {list(KNOWN_METHODS)})")
    n = len(queries)
    out: dict[str, list[PromptTuple]] = {}
    if "qpo" in methods:
        out["qpo"] = policy_prompts(policy_dir, queries, cfg, "qpo")
        # Earlier loops' policies show what multi-loop augmentation adds.
        for loop in (run.trained_loops()[:-1] if run is not None else []):
            out[f"qpo_loop{loop}"] = policy_prompts(run.policy_dir(loop), queries, cfg, "qpo")
    if "manual" in methods:
        out["manual"] = [(manual.id, manual.text, manual.source)] * n
    if "best_single" in methods:
        for record in collection:
            out[f"single:{record.id}"] = [(record.id, record.text, record.source)] * n
    if "nearest_neighbour" in methods:
        if run is None:
            raise ValueError("nearest_neighbour needs a run directory (its training queries)")
        dataset, _ = read_dataset(run.dataset_path(max(run.trained_loops())))
        out["nearest_neighbour"] = nearest_neighbour_prompts(policy_dir, queries, dataset)
    for ablation in ("sft", "qpo_no_mla"):
        if ablation in methods:
            if run is None:
                raise ValueError(f"{ablation} needs a run directory (it trains on D_0)")
            out[ablation] = policy_prompts(ablation_policy(cfg, run, ablation), queries, cfg,
                                           ablation)
    return out


def _table(scored: pd.DataFrame, step0_best: Optional[str]) -> pd.DataFrame:
    """One row per (shots, method): accuracy, Wilson 95% CI, n; best_single rows derived
    from the single-prompt rows."""
    rows = []
    for (shots, method), part in scored.groupby(["shots", "method"], sort=False):
        acc = float(part["accuracy"].mean())
        lo, hi = wilson_interval(float(part["accuracy"].sum()), len(part))
        rows.append({"shots": int(shots), "method": method, "accuracy": acc,
                     "ci_low": lo, "ci_high": hi, "n": len(part)})
    table = pd.DataFrame(rows)
    extra = []
    for shots, part in table.groupby("shots"):
        singles = part[part["method"].str.startswith("single:")]
        if not len(singles):
            continue
        oracle = singles.loc[singles["accuracy"].idxmax()].copy()
        oracle["method"], oracle["prompt_id"] = "best_single_oracle", oracle["method"][7:]
        chosen = singles[singles["method"] == f"single:{step0_best}"]
        if len(chosen):
            row = chosen.iloc[0].copy()
            row["method"], row["prompt_id"] = "best_single", step0_best
            extra.append(row)
        extra.append(oracle)
    if extra:
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rank = table["method"].map(lambda m: order.get(re.sub(r"\d+$", "", m), len(order)))
    return table.assign(_rank=rank).sort_values(["shots", "_rank"], kind="stable").drop(
        columns="_rank").reset_index(drop=True)


def _markdown(table: pd.DataFrame, examples: pd.DataFrame, header: list[str]) -> str:
    lines = header + [""]
    for shots, part in table.groupby("shots"):
        lines += [f"### {shots}-shot", "",
                  "| method | accuracy | 95% CI (Wilson) | test queries |", "|---|---|---|---|"]
        main = part[~part["method"].str.startswith("single:")]
        for row in main.itertuples():
            note = f" ({row.prompt_id})" if isinstance(getattr(row, "prompt_id", None), str) else ""
            lines.append(f"| {row.method}{note} | {100 * row.accuracy:.1f} | "
                         f"[{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}] | {row.n} |")
        singles = part[part["method"].str.startswith("single:")]
        if len(singles):
            lines += ["", "single prompts: " + ", ".join(
                f"{m[7:]} {100 * a:.1f}" for m, a in zip(singles["method"], singles["accuracy"]))]
        lines.append("")
    if len(examples):
        lines += ["### Generated prompts (sample of test queries)", "",
                  "| query | gold | QPO prompt | QPO correct | manual correct |", "|---|---|---|---|---|"]
        for row in examples.itertuples():
            lines.append(f"| {_cell(row.query, 120)} | {row.label} | {_cell(row.prompt, 200)} | "
                         f"{row.qpo_correct} | {row.manual_correct} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def evaluate_run(cfg: Config, run_dir: Optional[str] = None,
                 policy_dir: Optional[str] = None) -> str:
    """Test the policy (a run's last one, or `policy_dir`) and the configured baselines
    on the test split; writes the report files and returns the markdown report."""
    from qpo_ray.data.io import read_dataset
    from qpo_ray.data.pairs import make_pairs
    from qpo_ray.loop import pair_accuracy, score_pairs, task_and_splits
    from qpo_ray.plots import accuracy_per_loop
    from qpo_ray.prompts import load_collection, manual_prompt

    run = RunDir(run_dir) if run_dir else None
    if run is None and policy_dir is None:
        raise ValueError("evaluate_run needs a run directory or a policy directory")
    policy_dir = str(policy_dir or run.policy_dir())
    task, splits = task_and_splits(cfg)
    test = splits.test
    collection = load_collection(cfg.prompts, task.name)
    manual = manual_prompt(collection, cfg.prompts)
    prompts = _method_prompts(cfg, run, policy_dir, [q.text for q in test], collection, manual)

    settings = [k for k in cfg.test.shots if k == 0 or task.supports_few_shot]
    frames = []
    for shots in settings:
        shot_cfg = copy.deepcopy(cfg)
        shot_cfg.task.num_shots = shots
        for method, method_prompts in prompts.items():
            # Test pairs never join the dataset; loop=1 only satisfies make_pairs.
            pairs = make_pairs(test, method_prompts, task, splits, shot_cfg, loop=1, seed=cfg.seed)
            pairs["method"], pairs["shots"] = method, shots
            frames.append(pairs)
    pairs = pd.concat(frames, ignore_index=True)
    pairs["pair_id"] = [f"test-{i}" for i in range(len(pairs))]
    meta = pairs[["method", "shots"]].copy()
    scored, usage = score_pairs(cfg, task, splits, pairs.drop(columns=["method", "shots"]))
    scored = scored.reset_index(drop=True)
    scored[["method", "shots"]] = meta.to_numpy()
    scored["accuracy"] = pair_accuracy(scored)

    step0_best = None
    if run is not None and run.step0_path().exists():
        step0_best = best_single_by_step0(read_dataset(run.step0_path())[0])
    table = _table(scored, step0_best)

    zero = scored[(scored["shots"] == settings[0]) & (scored["method"] == "qpo")]
    examples = zero.head(cfg.test.num_example_prompts)[["query", "label", "prompt", "correct"]]
    examples = examples.rename(columns={"correct": "qpo_correct"})
    manual_rows = scored[(scored["shots"] == settings[0]) & (scored["method"] == "manual")]
    examples["manual_correct"] = (manual_rows["correct"].head(len(examples)).to_list()
                                  if len(manual_rows) else None)

    out_dir = _report_dir(cfg, run)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "results.csv", index=False)
    examples.to_csv(out_dir / "examples.csv", index=False)
    accuracy_per_loop(table, settings[0]).savefig(out_dir / "plots" / "accuracy_per_loop.png",
                                                 dpi=100, bbox_inches="tight")
    header = [f"## QPO test report: {task.name}",
              f"target: {cfg.target.model} ({cfg.target.backend}); policy: {policy_dir}",
              f"test queries: {len(test)}; target cost of the test phase: "
              f"{usage.get('calls', 0)} calls, {usage.get('engine_seconds', 0.0):.1f} engine-s"]
    if step0_best is None and "best_single" in cfg.test.methods:
        header.append("best_single: no Step-0 data, only the test-set oracle is reported")
    report = _markdown(table, examples, header)
    (out_dir / "report.md").write_text(report)
    return report
