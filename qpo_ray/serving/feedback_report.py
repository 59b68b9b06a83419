"""Reading what serving recorded (qpo_ray.serving.feedback): the A/B result per policy
version (`qpo serve report`), its metrics in MLflow, and the feedback as dataset rows
for the next training loop (`qpo serve feedback-dataset`).

Feedback becomes rows of the dataset schema (qpo_ray/data/schema.py) with the served
(query, prompt) and a reward on the stored 0-100 scale: the caller's `reward` when
given, else 100 for a right answer and 0 for a wrong one (an observed outcome, not the
eq. 3 reward Step 0 computes: there is no target log-likelihood for it). The expert
filter of augmentation (`dataset.expert_fraction`) applies unless told otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from qpo_ray.config import Config
from qpo_ray.serving.feedback import feedback_root, read_feedback, read_requests
from qpo_ray.testphase.stats import PairedDifference, newcombe_difference, paired_difference, wilson_interval

SERVE_RUN_TAG = "qpo.kind"
# Feedback sources whose outcome a client supplied (serving.feedback: feedback_source).
CLIENT_SOURCES = ("client", "answer-gold")
SERVE_RUN_KIND = "serve-feedback"


@dataclass(frozen=True)
class VersionSummary:
    version: str
    arms: str          # the arms that served it ("a", "b" or "a,b" after a switch)
    requests: int
    feedback: int
    judged: int        # feedback with `correct`
    accuracy: float
    ci_low: float
    ci_high: float
    mean_reward: float  # over feedback with `reward`; nan when none


@dataclass(frozen=True)
class Comparison:
    """version b - version a: unpaired over all their feedback, and paired on the
    queries that have feedback under both."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    paired: Optional[PairedDifference]


def summarise(root: str | Path) -> tuple[list[VersionSummary], pd.DataFrame]:
    """One summary per policy version that served a request, most requests first."""
    requests, feedback = read_requests(root), read_feedback(root)
    rows = []
    for version in sorted(set(requests["policy_version"]) | set(feedback["policy_version"])):
        served = requests[requests["policy_version"] == version]
        given = feedback[feedback["policy_version"] == version]
        judged = given["correct"].dropna().astype(bool)
        rewards = given["reward"].dropna()
        low, high = wilson_interval(float(judged.sum()), len(judged))
        rows.append(VersionSummary(
            version=version, arms=",".join(sorted(set(served["arm"]) | set(given["arm"]))),
            requests=len(served), feedback=len(given), judged=len(judged),
            accuracy=float(judged.mean()) if len(judged) else float("nan"),
            ci_low=low, ci_high=high,
            mean_reward=float(rewards.mean()) if len(rewards) else float("nan")))
    rows.sort(key=lambda r: (-r.requests, r.version))
    return rows, feedback


def compare(feedback: pd.DataFrame, a: str, b: str) -> Comparison:
    judged = feedback.dropna(subset=["correct"]).astype({"correct": bool})
    in_a, in_b = judged[judged["policy_version"] == a], judged[judged["policy_version"] == b]
    diff, low, high = newcombe_difference(float(in_b["correct"].sum()), len(in_b),
                                          float(in_a["correct"].sum()), len(in_a))
    # Paired: the latest verdict per query under each version, on the shared queries.
    latest = {v: (frame.sort_values("feedback_at_unix_s").groupby("query")["correct"].last())
              for v, frame in ((a, in_a), (b, in_b))}
    shared = latest[a].index.intersection(latest[b].index)
    paired = None
    if len(shared):
        paired = paired_difference([(latest[b][shared].astype(float).to_numpy(),
                                     latest[a][shared].astype(float).to_numpy())])
    return Comparison(a=a, b=b, diff=diff, ci_low=low, ci_high=high, paired=paired)


def default_pair(rows: list[VersionSummary]) -> Optional[tuple[str, str]]:
    """The two versions with the most feedback (a = the one arm a served, if any)."""
    ranked = sorted(rows, key=lambda r: (-r.feedback, r.version))[:2]
    if len(ranked) < 2:
        return None
    ranked.sort(key=lambda r: (not r.arms.startswith("a"), r.version))
    return ranked[0].version, ranked[1].version


def _points(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def format_report(root: Path, rows: list[VersionSummary],
                  comparison: Optional[Comparison]) -> str:
    width = max([len("policy version")] + [len(r.version) for r in rows])
    lines = [f"serving feedback in {root}",
             f"{'policy version':{width}} {'arms':5} {'requests':>8} {'feedback':>8} "
             f"{'accuracy':>9} {'95% CI':>15} {'mean reward':>11}"]
    for r in rows:
        acc = "n/a" if r.judged == 0 else f"{100 * r.accuracy:.1f}%"
        ci = "n/a" if r.judged == 0 else f"[{100 * r.ci_low:.1f},{100 * r.ci_high:.1f}]"
        reward = "n/a" if math.isnan(r.mean_reward) else f"{r.mean_reward:.1f}"
        lines.append(f"{r.version:{width}} {r.arms:5} {r.requests:8d} {r.feedback:8d} "
                     f"{acc:>9} {ci:>15} {reward:>11}")
    if comparison is None:
        lines.append("no two versions with feedback to compare")
        return "\n".join(lines)
    c = comparison
    lines.append(f"\n{c.b} - {c.a}:")
    lines.append(f"  unpaired (all feedback): {_points(c.diff)} points, 95% CI "
                 f"[{_points(c.ci_low)}, {_points(c.ci_high)}] (Newcombe)")
    if c.paired is None:
        lines.append("  paired: no query has feedback under both versions")
    else:
        p = c.paired
        lines.append(f"  paired on {p.n} queries with feedback under both: {_points(p.diff)} "
                     f"points, 95% CI [{_points(p.ci_low)}, {_points(p.ci_high)}] (bootstrap), "
                     f"McNemar p={p.p_value:.3g}")
    return "\n".join(lines)


def log_to_mlflow(cfg: Config, rows: list[VersionSummary],
                  comparison: Optional[Comparison]) -> str:
    """Per-version counts and accuracy as metrics of one "serve-feedback" run in
    tracking.experiment (reused by later reports: the step is the feedback count, so
    the metric history shows the A/B test filling up). Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from qpo_ray.run.tracking import metric_key

    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(cfg.tracking.experiment))
    found = client.search_runs([experiment_id],
                               f"tags.`{SERVE_RUN_TAG}` = '{SERVE_RUN_KIND}'", max_results=1)
    run_id = (found[0].info.run_id if found else client.create_run(
        experiment_id, run_name=SERVE_RUN_KIND, tags={SERVE_RUN_TAG: SERVE_RUN_KIND}).info.run_id)
    now_ms, step = int(time.time() * 1000), sum(r.feedback for r in rows)
    values: dict[str, float] = {}
    for r in rows:
        key = f"serve.{metric_key(r.version)}"
        values.update({f"{key}.requests": r.requests, f"{key}.feedback": r.feedback,
                       f"{key}.accuracy": r.accuracy, f"{key}.accuracy_ci_low": r.ci_low,
                       f"{key}.accuracy_ci_high": r.ci_high})
    if comparison is not None:
        values.update({"serve.b_minus_a": comparison.diff,
                       "serve.b_minus_a_ci_low": comparison.ci_low,
                       "serve.b_minus_a_ci_high": comparison.ci_high})
    metrics = [Metric(k, float(v), now_ms, step) for k, v in values.items()
               if not math.isnan(float(v))]
    client.log_batch(run_id, metrics=metrics)
    return run_id


def report(cfg: Config, versions: Optional[tuple[str, str]] = None,
           to_mlflow: bool = True) -> str:
    """`qpo serve report`: the table, the comparison, and (by default) the MLflow metrics."""
    root = feedback_root(cfg)
    if not root.is_dir():
        raise FileNotFoundError(f"serve.feedback_dir: {root} does not exist (nothing served "
                                "with serve.feedback on under this workdir)")
    rows, feedback = summarise(root)
    known = {r.version for r in rows}
    for v in versions or ():
        if v not in known:
            raise ValueError(f"--compare: {v!r} served no request (known: {sorted(known)})")
    pair = versions or default_pair(rows)
    comparison = compare(feedback, *pair) if pair else None
    text = format_report(root, rows, comparison)
    if to_mlflow:
        text += f"\nlogged to MLflow run {log_to_mlflow(cfg, rows, comparison)}"
    return text


def feedback_rows(cfg: Config, feedback: pd.DataFrame, loop: int,
                  keep_all: bool = False) -> pd.DataFrame:
    """Feedback as dataset rows (schema.ALL_COLUMNS), expert-filtered unless keep_all;
    rows from client-supplied outcomes only with serve.train_on_client_feedback."""
    from qpo_ray.prompts import prompt_id
    from qpo_ray.tasks import get_task

    task = get_task(cfg.task)
    words = list(task.label_words) if task.mode == "labels" else []

    def as_label(word: Optional[str]) -> str:
        # Label tasks store the label's index as text; generation tasks the answer.
        if word is None or (isinstance(word, float) and math.isnan(word)):
            return ""
        return str(words.index(word)) if word in words else str(word)

    reward = feedback["reward"].where(feedback["reward"].notna(),
                                      100.0 * feedback["correct"].astype(float))
    nan = float("nan")
    frame = pd.DataFrame({
        "pair_id": "feedback-" + feedback["request_id"], "query_id": feedback["request_id"],
        "query": feedback["query"], "prompt_id": feedback["prompt"].map(prompt_id),
        "prompt": feedback["prompt"], "source": "served:" + feedback["policy_version"],
        "label": feedback["gold_label"].map(as_label), "group": 0, "loop": loop, "seed": 0,
        "demo_ids": [[] for _ in range(len(feedback))],
        "prediction": feedback["target_label"].map(as_label),
        "correct": feedback["correct"], "demo_correct": [[] for _ in range(len(feedback))],
        "label_logprobs": [[] for _ in range(len(feedback))], "answer_logprob": nan,
        "answer_num_tokens": 0, "answer_nll": nan, "answer_ppl": nan, "prompt_tokens": 0,
        "completion_tokens": 0, "r_query": nan, "r_task": nan, "r_raw": nan,
        "reward": reward.astype(float)})
    frame = frame[frame["reward"].notna()]
    if not cfg.serve.train_on_client_feedback:
        # Rewards, verdicts and gold labels all come from clients (a token holder can
        # post reward 100 for a crafted query): none trains a policy unless opted in.
        frame = frame[~feedback.loc[frame.index, "feedback_source"].isin(CLIENT_SOURCES)]
    if not keep_all:
        frame = frame[frame["reward"] >= 100.0 * cfg.dataset.expert_fraction]
    return frame.reset_index(drop=True)


def write_feedback_dataset(cfg: Config, out: str | Path, into: Optional[str | Path] = None,
                           keep_all: bool = False) -> tuple[Path, int]:
    """`qpo serve feedback-dataset`: the feedback rows, appended to the dataset `into`
    (D_t of a run: its reward scale is kept, so `qpo train` / `qpo augment` take the
    result as the next loop's dataset) or on their own. Returns (path, rows added)."""
    from qpo_ray.data.io import read_dataset, write_dataset

    base, scale = (read_dataset(into) if into else (None, None))
    loop = int(base["loop"].max()) + 1 if base is not None and len(base) else 1
    rows = feedback_rows(cfg, read_feedback(feedback_root(cfg)), loop, keep_all)
    merged = rows if base is None else pd.concat([base, rows], ignore_index=True)
    return write_dataset(merged, out, scale), len(rows)
