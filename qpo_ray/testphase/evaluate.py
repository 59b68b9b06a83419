"""The test phase: the trained policy against the baselines, on queries it never chose on.

0. Train the policies of the methods that train one (the sft and qpo_no_mla ablations),
   before anything is scored: the target engines, once started, hold their CPUs/GPUs
   until the stage ends.
1. Choose (when `test.decoding` is "dev"): every loop's policy, with each decoding of
   `test.dev_decodings` (greedy and ranked by default), on the dev split (collection
   queries held out of Step 0 and augmentation); the most accurate (loop, decoding) is
   what `qpo` uses. The test split is never looked at here.
2. Every method of `test.methods` (qpo_ray.testphase.methods) gives a prompt per test query; the
   distinct (query, prompt) pairs go through ONE scorer pass on the target.
   `best_single_dev`: every collection prompt scored on the dev split first, the most
   accurate is its prompt. `majority` and `probe` predict labels themselves (no prompt,
   no target call; qpo_ray.testphase.references).
3. Per (shots, method): accuracy with a 95% Wilson interval, the PAIRED difference
   against each reference (manual, best_single, best_single_dev, probe, majority) on the
   same queries (bootstrap 95% CI, McNemar exact p; qpo_ray.testphase.stats), the share
   of each predicted label beside the gold shares, and for qpo the share of its prompts
   that are not collection prompts with their accuracy apart. `best_single_oracle` (best
   prompt on the test set) is an upper bound, printed apart, never a baseline.

Outputs, in ``<run>/report/`` (``report-<target>/`` when testing another target than
the run's, paper Table 8; ``report-dev/`` when comparing on the dev split,
`test.split: dev`): ``report.md``, ``results.csv``, ``predictions.parquet`` (one
row per split, shots, method and query: prompt, prediction, correct), ``selection.json``,
``examples.csv`` and ``plots/accuracy_per_loop.png``. The directory is replaced whole
(common.atomic.atomic_dir): a crash while it is written, e.g. by `qpo evaluate --add` on a
finished run, leaves the previous report as it was, never a mix or a truncated file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from qpo_ray.testphase.calibration import calibrate_mbr
from qpo_ray.config import Config, ConfigError
from qpo_ray.prompts import PromptRecord
from qpo_ray.data.pairs import make_pairs
from qpo_ray.data.rewards import pair_accuracy
from qpo_ray.testphase.decoding import (Choice, MethodContext, Predicted, PromptTuple,
                                        policy_prompts)
from qpo_ray.testphase.methods import check_methods, method_prompts, train_method_policies
from qpo_ray.common import faults
from qpo_ray.common.atomic import atomic_dir
from qpo_ray.common.layout import RunFiles, read_json, sidecar
from qpo_ray.testphase.render import examples as example_rows
from qpo_ray.testphase.render import markdown, results_table
from qpo_ray.tasks.base import Example, Splits, Task
from qpo_ray.common.console import log

ScoreFn = Callable[[pd.DataFrame], tuple[pd.DataFrame, dict]]


def compared_queries(cfg: Config, splits: Splits) -> list[Example]:
    """The queries the methods are compared on: the test split, or the dev split."""
    return splits.dev if cfg.test.split == "dev" else splits.test


def score_prompts(cfg: Config, task: Task, splits: Splits, queries: list[Example],
                  prompts: dict[str, list[PromptTuple] | Predicted], score: ScoreFn, split: str,
                  shots_list: list[int]) -> tuple[pd.DataFrame, dict]:
    """Score each row's prompts on `queries`; distinct (shots, query, prompt) pairs are
    scored once. One row per (shots, method, query) with prediction and accuracy; rows
    that predict the label themselves (`Predicted`) join with an empty prompt and no
    target call."""
    direct = {m: p for m, p in prompts.items() if isinstance(p, Predicted)}
    prompts = {m: p for m, p in prompts.items() if not isinstance(p, Predicted)}
    own = [predicted_rows(queries, method, p.labels, shots, split)
           for method, p in direct.items() for shots in shots_list]
    if not prompts:
        return (pd.concat(own, ignore_index=True) if own else pd.DataFrame(),
                {"pairs_scored": 0, "pairs_requested": 0})
    frames = []
    for shots in shots_list:
        for method, method_rows in prompts.items():
            # Test pairs never join the dataset; loop=1 only satisfies make_pairs.
            pairs = make_pairs(queries, method_rows, task, splits, num_shots=shots,
                               num_demo_sets=cfg.task.num_demo_sets, loop=1, seed=cfg.seed)
            frames.append(pairs.assign(method=method, shots=shots))
    every = pd.concat(frames, ignore_index=True)
    key = ["shots", "query_id", "prompt"]
    unique = every.drop_duplicates(key).reset_index(drop=True)
    unique["pair_id"] = [f"{split}-{i}" for i in range(len(unique))]
    scored, usage = score(unique.drop(columns=["method", "shots"]))
    scored = scored.reset_index(drop=True).assign(shots=unique["shots"].to_numpy())
    scored["accuracy"] = pair_accuracy(scored)
    keep = key + ["prediction", "correct", "accuracy"]
    out = every.drop(columns=["pair_id"]).merge(scored[keep], on=key, how="left")
    usage["pairs_scored"], usage["pairs_requested"] = len(unique), len(every)
    return pd.concat([out.assign(split=split), *own], ignore_index=True), usage


def predicted_rows(queries: list[Example], method: str, labels: list[int], shots: int,
                   split: str) -> pd.DataFrame:
    """A direct method's rows in the predictions' columns: no prompt (empty id and
    text), its label as the prediction (a label index, as the scorer writes it)."""
    if len(labels) != len(queries):
        raise ValueError(f"{method}: {len(labels)} predictions for {len(queries)} queries")
    correct = [int(y) == int(q.label) for y, q in zip(labels, queries)]
    return pd.DataFrame({
        "split": split, "shots": shots, "method": method, "query_id": [q.id for q in queries],
        "query": [q.text for q in queries], "label": [str(q.label) for q in queries],
        "prompt_id": "", "prompt": "", "source": method,
        "prediction": [str(int(y)) for y in labels], "correct": correct,
        "accuracy": [float(c) for c in correct]})


def choose_single_on_dev(ctx: MethodContext, splits: Splits, score: ScoreFn,
                         shots: int) -> tuple[PromptRecord, pd.DataFrame, dict]:
    """The collection prompt most accurate on the dev split (ties: collection order, the
    manual prompt first), its dev rows (`single:<id>`) and what it cost."""
    candidates = {f"single:{r.id}": [(r.id, r.text, r.source)] * len(splits.dev)
                  for r in ctx.collection}
    scored, usage = score_prompts(ctx.cfg, ctx.task, splits, splits.dev, candidates, score,
                                  "dev", [shots])
    accuracy = scored.groupby("method")["accuracy"].mean()
    best = max(ctx.collection, key=lambda r: accuracy[f"single:{r.id}"])
    return best, scored, {"prompt_id": best.id, "dev_queries": len(splits.dev),
                          "dev_accuracy": {k.removeprefix("single:"): float(v)
                                           for k, v in accuracy.items()},
                          **usage}


def choose_on_dev(ctx: MethodContext, splits: Splits, score: ScoreFn,
                  shots: int) -> tuple[Choice, pd.DataFrame, dict]:
    """The (loop, decoding) with the best dev accuracy; ties go to the later loop, then
    to greedy (the paper's protocol). mbr reads each loop's belief at the temperature
    fitted on the dev split first (qpo_ray.testphase.calibration; test.mbr.calibration)."""
    calibration = {}
    if "mbr" in ctx.cfg.test.dev_decodings and ctx.cfg.test.mbr.calibration == "dev":
        ctx.mbr_temperatures, usage = calibrate_mbr(ctx, splits.dev, score, shots)
        calibration = {"mbr_temperatures": {str(k): t for k, t in ctx.mbr_temperatures.items()},
                       "mbr_calibration": usage}
    candidates = {f"qpo_loop{loop}/{decoding}": policy_prompts(ctx, loop, decoding, splits.dev)
                  for loop in ctx.policy_dirs for decoding in ctx.cfg.test.dev_decodings}
    scored, usage = score_prompts(ctx.cfg, ctx.task, splits, splits.dev, candidates, score,
                                  "dev", [shots])
    accuracy = scored.groupby("method")["accuracy"].mean()

    def rank(name: str) -> tuple:
        loop, decoding = name.removeprefix("qpo_loop").split("/")
        return (accuracy[name], int(loop), decoding == "greedy")
    best = max(accuracy.index, key=rank)
    loop, decoding = best.removeprefix("qpo_loop").split("/")
    return (Choice(int(loop), decoding), scored,
            {"dev_accuracy": accuracy.to_dict(), **usage, **calibration})


def rewards_per_loop(run: Optional[RunFiles]) -> dict[str, list[float]]:
    """The rewards of the pairs each loop scored: Step 0's (the collection's prompts,
    "loop 0") and augmentation round t's (policy t's sampled prompts, "loop t")."""
    from qpo_ray.data.io import read_dataset

    if run is None or not run.step0_path().exists():
        return {}
    out = {"0 (step 0)": read_dataset(run.step0_path())[0]["reward"].tolist()}
    for t in range(1, max(run.trained_loops(), default=0) + 1):
        rows = sidecar(run.dataset_path(t + 1), ".rows.parquet")
        if rows.exists():
            out[f"{t} (policy {t})"] = read_dataset(rows)[0]["reward"].tolist()
    return out


def earlier_report(out_dir: Path, test: list[Example],
                   split: str = "test") -> tuple[pd.DataFrame, dict]:
    """The predictions and dev choice of the report in `out_dir` (what `evaluate_run`'s
    `earlier` adds methods to), checked to be on the same queries of `split`."""
    path = out_dir / "predictions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no earlier test report to add methods to; run the "
                                "whole test phase first (qpo evaluate without --add)")
    earlier = pd.read_parquet(path)
    had, wanted = set(earlier.loc[earlier["split"] == split, "query_id"]), {q.id for q in test}
    if had != wanted:
        raise ValueError(f"{path}: its {split} queries are not this config's {split} split "
                         f"({len(had)} vs {len(test)} queries, {len(had - wanted)} not in it): "
                         "add methods with the run's own profile and seed")
    selection = out_dir / "selection.json"
    return earlier, (read_json(selection) if selection.exists() else {})


def evaluate_run(cfg: Config, task: Task, splits: Splits, score: ScoreFn,
                 out_dir: Path, run: Optional[RunFiles] = None,
                 policy_dir: Optional[str] = None,
                 earlier: Optional[tuple[pd.DataFrame, dict]] = None) -> str:
    """Test the policy (a run's loops, or `policy_dir`) and the configured baselines on
    the test split (or the dev split: test.split), `score` scoring pairs on the target;
    writes the report files into `out_dir` and returns the markdown report. Given `earlier`
    (`earlier_report` of the same directory), only `test.methods` are scored and their
    rows join (or replace) that report's: a baseline added to a finished run costs its
    own pairs, not the whole test phase again."""
    from qpo_ray.data.io import read_dataset
    from qpo_ray.testphase.plots import accuracy_per_loop
    from qpo_ray.prompts import load_collection, manual_prompt

    if run is None and policy_dir is None:
        raise ValueError("evaluate_run needs a run directory or a policy directory")
    check_methods(cfg.test.methods)
    policy_dirs = ({1: str(policy_dir)} if policy_dir is not None else
                   {t: str(run.policy_dir(t)) for t in run.trained_loops()})
    collection = load_collection(cfg.prompts, task.name)
    step0 = (read_dataset(run.step0_path())[0]
             if run is not None and run.step0_path().exists() else None)
    ctx = MethodContext(cfg, task, collection, manual_prompt(collection, cfg.prompts),
                        policy_dirs, run=run, step0=step0, splits=splits)
    settings = [k for k in cfg.test.shots if k == 0 or task.supports_few_shot]
    # Training first: once `score` has started the target engines they hold their
    # CPUs/GPUs until the stage ends, and a trainer asking for them would wait forever.
    train_method_policies(ctx, list(cfg.test.methods))

    add = earlier is not None
    kept, selection = earlier if add else (None, {"decoding": cfg.test.decoding})
    frames = []
    if "loop" in selection and "chosen_decoding" in selection:  # the earlier dev choice
        ctx.choice = Choice(int(selection["loop"]), selection["chosen_decoding"])
        ctx.mbr_temperatures = {int(k): float(t)
                                for k, t in selection.get("mbr_temperatures", {}).items()}
    if cfg.test.decoding == "dev" and "qpo" in cfg.test.methods:
        ctx.choice, dev_scored, info = choose_on_dev(ctx, splits, score, settings[0])
        frames.append(dev_scored)
        selection.update(info, loop=ctx.choice.loop, chosen_decoding=ctx.choice.decoding,
                         dev_queries=len(splits.dev))
    if "best_single_dev" in cfg.test.methods and cfg.test.split == "dev":
        # Chosen on the dev split, it cannot be compared there.
        log.info("test: best_single_dev left out: test.split is dev, where it is chosen")
        cfg = cfg.with_changes({"test": {"methods": [m for m in cfg.test.methods
                                                     if m != "best_single_dev"]}})
    if "best_single_dev" in cfg.test.methods:
        if not splits.dev:
            raise ConfigError("test.methods: best_single_dev needs a dev split "
                              "(task.dev_queries > 0)")
        ctx.single_on_dev, dev_singles, selection["best_single_dev"] = choose_single_on_dev(
            ctx, splits, score, settings[0])
        frames.append(dev_singles)
    if "qpo" in cfg.test.methods:
        # What Serve needs to decode as `qpo` does (serve.mbr_temperature).
        used = ctx.choice or Choice(ctx.last_loop, cfg.test.decoding)
        selection.pop("mbr_temperature", None)
        if used.decoding == "mbr":
            selection["mbr_temperature"] = ctx.mbr_temperature(used.loop)
    split, queries = cfg.test.split, compared_queries(cfg, splits)
    prompts = method_prompts(ctx, list(cfg.test.methods), queries)
    test_scored, usage = score_prompts(cfg, task, splits, queries, prompts, score, split,
                                       settings)
    frames.append(test_scored)

    columns = ["split", "shots", "method", "query_id", "query", "label", "prompt_id", "prompt",
               "source", "prediction", "correct", "accuracy"]
    predictions = pd.concat(frames, ignore_index=True)[columns]
    if add:
        rows = ["split", "shots", "method"]
        redone = kept.set_index(rows).index.isin(predictions.set_index(rows).index)
        predictions = pd.concat([kept[~redone][columns], predictions], ignore_index=True)
    test = predictions[predictions["split"] == split]
    table = results_table(test, getattr(task, "label_words", ()),
                          collection=[r.text for r in collection])
    examples = example_rows(test, settings[0], cfg.test.num_example_prompts)
    figure = accuracy_per_loop(table, settings[0], rewards_per_loop(run))
    temperature = (f", belief temperature {selection['mbr_temperature']:.2f}"
                   if "mbr_temperature" in selection else "")
    chosen = (f"qpo = loop {ctx.choice.loop}, {ctx.choice.decoding} decoding{temperature} "
              f"(chosen on {len(splits.dev)} dev queries)" if ctx.choice else
              f"qpo = loop {max(policy_dirs)}, "
              f"{selection.get('decoding', cfg.test.decoding)} decoding")
    cost_of = (f"the methods added last ({', '.join(cfg.test.methods)})" if add
               else f"the {split} phase")
    header = [f"## QPO {split} report: {task.name}",
              f"target: {cfg.target.model} ({cfg.target.backend}); policy: "
              f"{policy_dirs[max(policy_dirs)]}", chosen,
              f"{split} queries: {len(queries)}; target cost of {cost_of}: "
              f"{usage.get('calls', 0)} calls ({usage['pairs_scored']} distinct pairs), "
              f"{usage.get('engine_seconds', 0.0):.1f} engine-s"]
    on_dev = [u for u in (selection if "calls" in selection else {},
                          selection.get("mbr_calibration", {}),
                          selection.get("best_single_dev", {})) if u.get("calls")]
    if on_dev and not add:
        header.append("target cost of the choices on dev (loop and decoding, mbr "
                      f"calibration, best_single_dev): {sum(u['calls'] for u in on_dev)} "
                      f"calls, {sum(u.get('engine_seconds', 0.0) for u in on_dev):.1f} "
                      "engine-s")
    if ctx.single_on_dev is not None:
        dev_acc = selection["best_single_dev"]["dev_accuracy"][ctx.single_on_dev.id]
        header.append(f"best_single_dev = {ctx.single_on_dev.id} ({100 * dev_acc:.1f}% on "
                      f"{len(splits.dev)} dev queries, the best of {len(collection)} "
                      "collection prompts there)")
    report = markdown(table, examples, header, split,
                      label_words=getattr(task, "label_words", ()))
    with atomic_dir(out_dir) as tmp:
        if out_dir.is_dir():  # files of the old report this one does not write stay
            shutil.copytree(out_dir, tmp, dirs_exist_ok=True)
        (tmp / "plots").mkdir(exist_ok=True)
        (tmp / "selection.json").write_text(json.dumps(selection, indent=2, default=str))
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        faults.at("write")  # QPO_FAULT_AT=<stage>:write, the crash test only
        table.to_csv(tmp / "results.csv", index=False)
        examples.to_csv(tmp / "examples.csv", index=False)
        figure.savefig(tmp / "plots" / "accuracy_per_loop.png", dpi=100, bbox_inches="tight")
        (tmp / "report.md").write_text(report)
    return report
