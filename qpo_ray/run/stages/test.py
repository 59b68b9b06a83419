"""The test phase: the run's policies against the baselines on the test split
(qpo_ray.testphase.evaluate: choose on dev, each method of `test.methods` from the registry in
qpo_ray.testphase.methods, one scoring pass, paired statistics). MLflow: accuracy and Wilson
interval per (shots, method) and the report directory, on the parent run; a standalone
`qpo evaluate` on a run nested under it (`log_evaluation`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from qpo_ray.common.console import log as console
from qpo_ray.config import Config
from qpo_ray.common.layout import read_json
from qpo_ray.common.local_ray import init_ray
from qpo_ray.testphase.methods import check_method_inputs
from qpo_ray.prompts import load_collection, manual_prompt_note
from qpo_ray.testphase.evaluate import compared_queries, earlier_report, evaluate_run
from qpo_ray.run.pipeline import Stage, StageOutputs
from qpo_ray.run.rundir import RunDir
from qpo_ray.run.stages.context import RunContext

if TYPE_CHECKING:  # only for the annotation: MLflow loads when a Tracker is made
    from qpo_ray.run.tracking import Tracker


@dataclass(frozen=True)
class ReportOutputs(StageOutputs):
    report: str


def check_before_work(ctx: RunContext) -> None:
    """What this stage needs, checked before Step 0 spends anything: the methods exist,
    the collection loads, every method's inputs (the manual prompt, or the announced
    default for a collection without sources; the router's model), the task's splits
    hold a dev set of the asked size."""
    cfg: Config = ctx.cfg
    # Building the splits here makes a dev set larger than the collection share fail now.
    task, _ = ctx.task, ctx.splits
    collection = load_collection(cfg.prompts, task.name)
    check_method_inputs(cfg, collection)
    if "manual" in cfg.test.methods and (note := manual_prompt_note(collection, cfg.prompts)):
        console.info(f"{note}")


def report_dir(cfg: Config, run: Optional[RunDir]) -> Path:
    """Where the test phase of `run` (or of a lone policy: cfg.workdir) writes: report/,
    report-<target>/ when testing another target than the run's (paper Table 8), with
    "-dev" appended on the dev split (test.split)."""
    base = run.path if run is not None else Path(cfg.workdir)
    suffix = "" if cfg.test.split == "test" else f"-{cfg.test.split}"
    if run is not None and (run.path / "config.yaml").exists():
        _, saved = RunDir.load(run.path)
        if saved.target.model != cfg.target.model:
            return base / ("report-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.target.model)
                           + suffix)
    return base / ("report" + suffix)


def evaluate(ctx: RunContext, policy_dir: Optional[str] = None, add: bool = False,
             out_dir: Optional[Path] = None) -> str:
    """The test phase of `ctx.run` (or of the policy in `policy_dir`; with `add`, only
    `test.methods`, added to the earlier report); returns the markdown report."""
    # No report to add to, or other test queries: refused before Ray starts.
    split = ctx.cfg.test.split
    out_dir = out_dir or report_dir(ctx.cfg, ctx.run)
    earlier = (earlier_report(out_dir,
                              compared_queries(ctx.cfg, ctx.splits), split) if add else None)
    init_ray(ctx.cfg.ray_address)  # the ablations train on Ray before anything is scored
    return evaluate_run(ctx.cfg, ctx.task, ctx.splits,
                        lambda pairs: ctx.score(pairs, label=f"{split}: scoring"),
                        out_dir, run=ctx.run.files() if ctx.run else None,
                        policy_dir=policy_dir, earlier=earlier)


def run(ctx: RunContext, stage: Stage) -> ReportOutputs:
    out_dir = report_dir(ctx.cfg, ctx.run)
    evaluate(ctx, out_dir=out_dir)
    return ReportOutputs(report=str(out_dir / "report.md"))


def log(ctx: RunContext, stage: Stage, outputs: dict[str, Any]) -> None:
    report = Path(ReportOutputs.from_dict(outputs).report).parent
    log_report(ctx.tracker, ctx.tracker.parent_run_id(), report)
    if "qpo" in ctx.cfg.test.methods and ctx.run is not None and ctx.run.trained_loops():
        loop, tags = champion_tags(ctx.cfg, read_json(report / "selection.json"),
                                   ctx.run.trained_loops()[-1], ctx.tracker.parent_run_id())
        version = ctx.tracker.promote_champion(loop, tags)
        console.info(f"champion: models:/{ctx.cfg.tracking.registered_model_name}/{version} "
                     f"(loop {loop}, {tags['qpo.decoding']} decoding) is now "
                     f"models:/{ctx.cfg.tracking.registered_model_name}@champion")


def champion_tags(cfg: Config, selection: dict[str, Any], last_loop: int,
                  run_id: str) -> tuple[int, dict[str, str]]:
    """The loop `qpo` stood for in the report (the dev choice, else the last loop at
    test.decoding) and the version tags that let Serve decode it the same way."""
    chosen = "chosen_decoding" in selection
    loop = int(selection["loop"]) if chosen else last_loop
    decoding = selection["chosen_decoding"] if chosen else selection.get("decoding",
                                                                         cfg.test.decoding)
    tags = {"qpo.loop": str(loop), "qpo.decoding": decoding,
            "qpo.target_reward": repr(float(cfg.loop.target_reward)), "qpo.run_id": run_id,
            "qpo.chosen_on": (f"dev ({selection.get('dev_queries', '?')} queries)" if chosen
                              else "config (test.decoding)")}
    if decoding == "mbr":
        tags["qpo.mbr_temperature"] = repr(float(selection.get("mbr_temperature",
                                                               cfg.test.mbr.temperature)))
    accuracy = selection.get("dev_accuracy", {}).get(f"qpo_loop{loop}/{decoding}")
    if accuracy is not None:
        tags["qpo.dev_accuracy"] = repr(float(accuracy))
    return loop, tags


def log_report(tracker: "Tracker", run_id: str, report_dir: Path) -> None:
    """A report's accuracies (per shots and method, under the split it compared on:
    test/ or dev/) and its files."""
    results = pd.read_csv(report_dir / "results.csv")
    for row in results.itertuples():
        key = f"{tracker.cfg.test.split}/{row.shots}shot/{row.method}/"
        tracker.log_metrics(run_id, {key + "accuracy": row.accuracy, key + "ci_low": row.ci_low,
                                     key + "ci_high": row.ci_high, key + "n": row.n})
    tracker.client.log_artifacts(run_id, str(report_dir), "report")


def log_evaluation(tracker: "Tracker", report_dir: Path) -> str:
    """A standalone `qpo evaluate` in MLflow: a run nested under the evaluated run's
    parent run (or a new run when the directory has none); says which."""
    name = f"evaluate-{report_dir.name}"
    run_id, parent = tracker.evaluation_run_id(name)
    try:
        log_report(tracker, run_id, report_dir)
    except BaseException:
        tracker.client.set_terminated(run_id, "FAILED")
        raise
    tracker.client.set_terminated(run_id, "FINISHED")
    where = (f"nested run {run_id} ({name}) under the run's parent run {parent}" if parent else
             f"a new run {run_id} ({name}): {tracker.run_dir} has no MLflow run to nest under")
    return f"MLflow: {where} in experiment {tracker.cfg.tracking.experiment!r} at {tracker.uri}"
