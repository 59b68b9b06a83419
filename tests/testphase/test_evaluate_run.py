"""The test phase on the tiny run (conftest's `finished_run`): the ablations and another
target (`qpo evaluate`), methods added to a finished report (`--add`), the dev split as
the compared split, the dev choice among decodings, and mbr at its fitted temperature."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from qpo_ray.config import load_config
from qpo_ray.data.io import read_dataset
from qpo_ray.prompts import load_collection
from qpo_ray.run.stages.test import report_dir
from qpo_ray.run.rundir import RunDir

from tests.tiny_run import REPO, qpo_cli, qpo_env

def test_evaluate_trains_the_ablations_and_labels_another_target(finished_run, profile,
                                                                ray_cluster, tiny_model_dir):
    """`qpo evaluate --target ...` with the SFT and no-MLA ablations (trained on D_0),
    logged to MLflow as a run nested under the evaluated run."""
    from mlflow import MlflowClient

    from qpo_ray.run.loop import evaluate_tracked
    from qpo_ray.policy import QPOPolicy

    workdir = finished_run[0]
    other_target = str(tiny_model_dir)  # same weights, another name: a different target
    cfg = load_config(str(profile), [f"workdir={workdir}", "test.methods=[sft, qpo_no_mla]",
                                     f"target.model={other_target}"])
    report, logged = evaluate_tracked(cfg, run_dir=str(workdir))
    assert f"target: {other_target}" in report
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = json.loads((workdir / "tracking.json").read_text())["parent_run_id"]
    nested = [r for r in client.search_runs([client.get_experiment_by_name("qpo").experiment_id])
              if r.data.tags.get("qpo.evaluation")]
    assert len(nested) == 1 and nested[0].data.tags["mlflow.parentRunId"] == parent
    assert f"nested run {nested[0].info.run_id}" in logged
    assert {"test/0shot/sft/accuracy", "test/0shot/qpo_no_mla/accuracy"} <= set(
        nested[0].data.metrics)
    out_dirs = [p for p in workdir.glob("report-*") if (p / "results.csv").exists()]
    assert len(out_dirs) == 1
    results = pd.read_csv(out_dirs[0] / "results.csv")
    assert set(results["method"]) == {"sft", "qpo_no_mla"} and (results["n"] == 6).all()

    marker = workdir / "baselines" / "sft" / "done.json"
    sft_dir = json.loads(marker.read_text())
    assert QPOPolicy.load(sft_dir["checkpoint_dir"]).config.mode == "sft"
    # Cached by the settings it was trained with: the same ones reuse it, untouched...
    from qpo_ray.testphase.methods import ablation_key, ablation_policy

    written = marker.stat().st_mtime_ns
    assert ablation_policy(cfg, RunDir(workdir).files(), "sft") == sft_dir["checkpoint_dir"]
    assert marker.stat().st_mtime_ns == written
    # ...other training settings do not.
    other = load_config(str(profile), [f"workdir={workdir}", "training.lr_first_loop=0.5",
                                       "policy.mode=sft"])
    assert sft_dir["config_key"] != ablation_key(other, 1)
    # No multi-loop augmentation: the same number of training stages, all on D_0.
    no_mla = workdir / "baselines" / "qpo_no_mla"
    assert (no_mla / "loop1").is_dir() and (no_mla / "loop2").is_dir()
    # The loop's own report is untouched.
    assert set(pd.read_csv(workdir / "report" / "results.csv")["method"]) >= {"qpo", "manual"}


def test_evaluate_adds_methods_to_the_finished_report(finished_run, profile):
    """`qpo evaluate --add`: only the named methods are scored; their rows join the
    run's report (a redone method's rows are replaced, not doubled), every other row is
    kept as it was, and a config whose test split is not the report's is refused before
    anything is scored."""
    workdir = finished_run[0]
    report = workdir / "report"
    before = pd.read_parquet(report / "predictions.parquet")
    proc = subprocess.run(qpo_cli("evaluate", "--profile", str(profile), "--run-dir", str(workdir),
                               "--add", "sft", "manual"),
                          env=qpo_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target cost of the methods added last (sft, manual)" in proc.stdout
    after = pd.read_parquet(report / "predictions.parquet")

    untouched = before[before["method"] != "manual"].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        after[after["method"].isin(set(untouched["method"]))].reset_index(drop=True), untouched)
    test_ids = set(before.loc[before["split"] == "test", "query_id"])
    old_manual = before[before["method"] == "manual"].set_index("query_id")
    new_manual = after[after["method"] == "manual"].set_index("query_id")
    assert len(new_manual) == len(old_manual) == len(test_ids)
    assert (new_manual.loc[old_manual.index, "prediction"] == old_manual["prediction"]).all()
    added = after[after["method"] == "sft"]
    assert set(added["query_id"]) == test_ids and len(added) == len(test_ids)
    assert added["prompt"].str.strip().str.len().gt(0).all()
    results = pd.read_csv(report / "results.csv")
    assert {"sft", "manual", "qpo", "best_single"} <= set(results["method"])
    assert (results.loc[results["method"] == "sft", "n"] == len(test_ids)).all()

    proc = subprocess.run(qpo_cli("evaluate", "--profile", str(profile), "--run-dir", str(workdir),
                               "--set", "seed=99", "--add", "manual"),
                          env=qpo_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "test queries are not this config's test split" in proc.stderr
    assert "scoring" not in proc.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(report / "predictions.parquet"), after)


def test_split_dev_compares_the_methods_on_dev_and_leaves_the_test_report(finished_run, profile,
                                                                          ray_cluster):
    """`test.split: dev`: the methods are compared on the run's dev queries (none of them a
    test query) into report-dev/, logged under dev/ in MLflow; each loop's greedy prompts
    answer there exactly as in the run's own dev choice; the test report is untouched."""
    from mlflow.tracking import MlflowClient

    from qpo_ray.run.loop import evaluate_tracked
    from qpo_ray.tasks import task_and_splits

    workdir = finished_run[0]
    before = pd.read_parquet(workdir / "report" / "predictions.parquet")
    cfg = load_config(str(profile), [f"workdir={workdir}", "test.split=dev",
                                     "test.decoding=greedy", "test.methods=[qpo, manual, router]"])
    report, logged = evaluate_tracked(cfg, run_dir=str(workdir))

    pd.testing.assert_frame_equal(pd.read_parquet(workdir / "report" / "predictions.parquet"),
                                  before)
    dev = pd.read_parquet(workdir / "report-dev" / "predictions.parquet")
    _, splits = task_and_splits(cfg.task, cfg.seed)
    dev_ids, test_ids = {q.id for q in splits.dev}, {q.id for q in splits.test}
    assert set(dev["split"]) == {"dev"} and set(dev["query_id"]) == dev_ids
    assert not dev_ids & test_ids
    assert set(dev["method"]) == {"qpo", "qpo_loop1", "qpo_loop2", "manual", "router"}
    assert "dev queries: 4;" in report and "0-shot dev accuracy" in report
    for loop in (1, 2):
        ours = dev[dev["method"] == f"qpo_loop{loop}"].set_index("query_id").sort_index()
        chosen = before[before["method"] == f"qpo_loop{loop}/greedy"].set_index("query_id")
        chosen = chosen.sort_index()
        assert (ours["prompt"] == chosen["prompt"]).all()
        assert (ours["prediction"] == chosen["prediction"]).all()

    run_id = re.search(r"nested run (\w+) \(evaluate-report-dev\)", logged).group(1)
    metrics = set(MlflowClient(cfg.tracking_uri()).get_run(run_id).data.metrics)
    assert "dev/0shot/qpo/accuracy" in metrics
    assert not any(key.startswith("test/") for key in metrics)


def test_dev_choice_tries_only_the_listed_decodings(finished_run, profile, ray_cluster,
                                                    tmp_path):
    """`test.dev_decodings: [greedy]`: the dev split picks among the loops' greedy prompts
    only (a small run skips ranking's cost), and `qpo` is the chosen one."""
    from qpo_ray.run.loop import evaluate_tracked

    workdir = finished_run[0]
    cfg = load_config(str(profile), [f"workdir={tmp_path}", "test.methods=[qpo]",
                                     "test.dev_decodings=[greedy]"])
    evaluate_tracked(cfg, policy_dir=str(RunDir(workdir).policy_dir(2)))
    selection = json.loads((tmp_path / "report" / "selection.json").read_text())
    assert set(selection["dev_accuracy"]) == {"qpo_loop1/greedy"}
    assert selection["chosen_decoding"] == "greedy" and selection["dev_queries"] == 4


def _evaluate_a_copy(run_dir: Path, profile: Path, tmp_path: Path,
                     overrides: list[str]) -> tuple:
    """The test phase again, with `overrides`, on a copy of a finished run (the run's own
    report stays as the other tests read it)."""
    import shutil

    from qpo_ray.run.loop import evaluate_tracked

    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir, ignore=shutil.ignore_patterns("mlartifacts"))
    cfg = load_config(str(profile), [f"workdir={workdir}", *overrides])
    evaluate_tracked(cfg, run_dir=str(workdir))
    return cfg, RunDir(workdir)


def test_dev_choice_reads_mbr_at_the_belief_temperature_it_fits_on_dev(
        finished_run, profile, ray_cluster, tmp_path):
    """`test.dev_decodings: [greedy, mbr]` on a copy of the finished run: every mbr
    candidate is scored on the 4 dev queries; each loop's temperature is the one under
    which its policy best predicts each dev query's best candidate (scored here again,
    ranked by the reward as the utilities are); the dev rows of mbr are the choices at
    that temperature; selection.json records it for Serve."""
    from qpo_ray.data.pairs import make_pairs
    from qpo_ray.data.rewards import compute_rewards
    from qpo_ray.scoring.ray_data import score_pairs
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.mbr import TEMPERATURES, belief, mbr_choice, utility_table
    from qpo_ray.policy.ranking import candidate_logprobs
    from qpo_ray.tasks import task_and_splits

    cfg, run = _evaluate_a_copy(finished_run[0], profile, tmp_path,
                                ["test.methods=[qpo]", "test.dev_decodings=[greedy, mbr]"])
    selection = json.loads((report_dir(cfg, run) / "selection.json").read_text())
    step0, _ = read_dataset(run.step0_path())
    table = utility_table(step0, "reward")
    task, splits = task_and_splits(cfg.task, cfg.seed)
    assert selection["mbr_calibration"]["pairs"] == len(table.prompts) * 4
    fitted = {int(k): t for k, t in selection["mbr_temperatures"].items()}
    assert set(fitted) == {1, 2} and all(np.isclose(TEMPERATURES, t).any()
                                         for t in fitted.values())

    ids = step0.drop_duplicates("prompt").set_index("prompt")["prompt_id"]
    pairs = make_pairs([q for _ in table.prompts for q in splits.dev],
                       [(ids[p], p, "collection") for p in table.prompts for _ in splits.dev],
                       task, splits, num_shots=cfg.task.num_shots,
                       num_demo_sets=cfg.task.num_demo_sets, loop=1, seed=cfg.seed)
    scored, _ = score_pairs(cfg, task, splits, pairs)
    r_task = step0.groupby("prompt_id")["r_task"].first().to_dict()
    rewards, _ = compute_rewards(scored, "nll", r_task=r_task, answer="gold")
    by_query = rewards.pivot_table(index="query_id", columns="prompt", values="reward")
    best = by_query.loc[[q.id for q in splits.dev], table.prompts].to_numpy().argmax(axis=1)
    dev = pd.read_parquet(report_dir(cfg, run) / "predictions.parquet").query("split == 'dev'")
    for loop, temperature in fitted.items():
        policy = QPOPolicy.load(str(run.policy_dir(loop)))
        logprobs = candidate_logprobs(policy, [q.text for q in splits.dev],
                                      [table.prompts] * 4, cfg.loop.target_reward)
        nll = [-np.log(belief(logprobs, t)[np.arange(4), best] + 1e-12).sum()
               for t in TEMPERATURES]
        assert np.isclose(temperature, TEMPERATURES[int(np.argmin(nll))])
        rows = dev[dev["method"] == f"qpo_loop{loop}/mbr"].set_index("query_id")
        expected = [table.prompts[i] for i in mbr_choice(logprobs, table.utility, temperature)]
        assert rows.loc[[q.id for q in splits.dev], "prompt"].tolist() == expected
    if selection["chosen_decoding"] == "mbr":
        assert selection["mbr_temperature"] == fitted[selection["loop"]]
    else:
        assert "mbr_temperature" not in selection


def test_mbr_decoding_picks_the_step0_prompt_the_policy_expects_to_be_right(
        finished_run, profile, ray_cluster, tmp_path):
    """`test.decoding: mbr` on a copy of the finished run: every qpo prompt is one of Step
    0's candidates, and each is the expected-correctness choice recomputed here from the
    loop's policy and the run's Step-0 table, query by query; the run saved that table
    beside each loop's policy."""
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.mbr import load_table, mbr_choice, utility_table
    from qpo_ray.policy.ranking import candidate_logprobs

    cfg, run = _evaluate_a_copy(finished_run[0], profile, tmp_path,
                                ["test.decoding=mbr", "test.methods=[qpo]"])
    # A fixed mbr decoding reads the belief at test.mbr.temperature (1: as it is).
    assert json.loads((report_dir(cfg, run) / "selection.json").read_text()) == {
        "decoding": "mbr", "mbr_temperature": 1.0}
    pred = pd.read_parquet(report_dir(cfg, run) / "predictions.parquet")
    qpo = pred[pred["method"] == "qpo_loop2"].sort_values("query_id")
    step0, _ = read_dataset(run.step0_path())
    table = utility_table(step0, "reward")  # the tiny profile trains no summary part
    assert len(table.prompts) == 7 and set(qpo["prompt"]) <= set(table.prompts)
    # The train stage saved the same table beside each loop's policy (Serve reads it).
    for loop in (1, 2):
        saved = load_table(run.policy_dir(loop))
        assert saved.prompts == table.prompts and saved.num_queries == table.num_queries
        np.testing.assert_allclose(saved.utility, table.utility)
    policy = QPOPolicy.load(str(run.policy_dir(2)))
    logprobs = candidate_logprobs(policy, qpo["query"].tolist(),
                                  [table.prompts] * len(qpo), cfg.loop.target_reward)
    expected = [table.prompts[i] for i in mbr_choice(logprobs, table.utility)]
    assert qpo["prompt"].tolist() == expected
    assert (pred.loc[pred["method"] == "qpo", "prompt"].sort_values().tolist()
            == sorted(expected))


def test_reference_rows_predict_labels_without_a_prompt_and_best_single_dev_is_chosen_on_dev(
        finished_run, profile, ray_cluster, tmp_path):
    """`majority`, `probe` and `best_single_dev` on a copy of the finished run: the two
    label predictors have rows with no prompt whose predictions are scored against gold
    (majority: the collection's most frequent label); best_single_dev is the collection
    prompt with the best dev accuracy, and its test rows are that prompt's; results.csv
    and report.md carry the label shares and the qpo-vs-probe/majority lines."""
    from collections import Counter

    from qpo_ray.tasks import task_and_splits

    cfg, run = _evaluate_a_copy(finished_run[0], profile, tmp_path, [
        "test.methods=[qpo, manual, best_single_dev, majority, probe, best_single_oracle]",
        "test.dev_decodings=[greedy]"])
    out = report_dir(cfg, run)
    pred = pd.read_parquet(out / "predictions.parquet")
    task, splits = task_and_splits(cfg.task, cfg.seed)
    test = pred[pred["split"] == "test"]
    counts = Counter(int(e.label) for e in splits.collection)
    top = min(counts, key=lambda y: (-counts[y], y))
    for method in ("majority", "probe"):
        rows = test[test["method"] == method].set_index("query_id")
        assert len(rows) == len(splits.test) and set(rows["prompt"]) == {""}
        assert rows["prediction"].isin([str(i) for i in range(len(task.label_words))]).all()
        assert (rows["correct"] == (rows["prediction"] == rows["label"])).all()
    assert set(test.loc[test["method"] == "majority", "prediction"]) == {str(top)}

    selection = json.loads((out / "selection.json").read_text())
    chosen = selection["best_single_dev"]
    dev = pred[(pred["split"] == "dev") & pred["method"].str.startswith("single:")]
    dev_acc = dev.groupby("method")["accuracy"].mean()
    collection = load_collection(cfg.prompts, task.name)
    assert len(dev_acc) == len(collection) and dev["query_id"].nunique() == 4
    assert dev_acc[f"single:{chosen['prompt_id']}"] == dev_acc.max()
    first_best = next(r.id for r in collection if dev_acc[f"single:{r.id}"] == dev_acc.max())
    assert chosen["prompt_id"] == first_best
    mine = test[test["method"] == "best_single_dev"].set_index("query_id")
    same = test[test["method"] == f"single:{first_best}"].set_index("query_id")
    assert set(mine["prompt_id"]) == {first_best}
    assert mine["correct"].sort_index().tolist() == same["correct"].sort_index().tolist()

    table = pd.read_csv(out / "results.csv").set_index("method")
    for word in task.label_words:
        assert table.loc["majority", f"pred_share:{word}"] == (1.0 if word ==
                                                               task.label_words[top] else 0.0)
        assert not np.isnan(table.loc["qpo", f"gold_share:{word}"])
    assert not np.isnan(table.loc["qpo", "diff_vs_probe"])
    assert 0.0 <= table.loc["qpo", "non_collection_share"] <= 1.0
    report = (out / "report.md").read_text()
    assert "Predicted label shares" in report and "qpo vs majority" in report
    assert f"best_single_dev = {first_best}" in report and "vs best_single_dev" in report
