"""benchmarks/effectiveness.py: what it refuses, and when it re-chooses qpo on a finished seed."""

from __future__ import annotations
import json
import os
import subprocess
import sys


def test_effectiveness_benchmark_refuses_to_measure_on_another_split(tmp_path):
    """Its verdicts are test-split verdicts: `--set test.split=dev` is refused before any
    seed runs (the runs would write report-dev/, which it never reads)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "effectiveness.py"), "--workdir",
         str(tmp_path), "--set", "test.split=dev", "--set", "test.decoding=greedy"],
        capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 2
    assert "--set test.split" in proc.stderr and "qpo evaluate" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_effectiveness_benchmark_rechooses_qpo_when_its_dev_choice_is_out_of_date(tmp_path):
    """A finished seed is reused; its qpo is chosen again (`qpo evaluate --add qpo`) when
    its dev choice weighed other decodings than the profile lists, or read mbr at a
    temperature not fitted on dev where the profile fits one, and only then."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("effectiveness",
                                                  repo / "benchmarks" / "effectiveness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "seed0" / "report"
    report.mkdir(parents=True)
    methods = ["qpo", "qpo_loop1", "manual", "best_single", "best_single_dev", "router",
               "label_router", "label_router_collection", "probe", "majority"]
    pd.DataFrame({"method": methods}).to_parquet(report / "predictions.parquet")
    profile = repo / "benchmarks" / "profiles" / "effectiveness.yaml"
    fitted = {"mbr_temperatures": {"1": 2.0, "2": 2.2}}
    for weighed, extra, calibration, missing in (
            (["greedy"], fitted, "dev", ["qpo"]), (["greedy", "mbr"], fitted, "dev", []),
            (["greedy", "mbr"], {}, "dev", ["qpo"]), (["greedy", "mbr"], {}, "none", [])):
        accuracy = {f"qpo_loop{t}/{d}": 0.7 for t in (1, 2) for d in weighed}
        (report / "selection.json").write_text(json.dumps({"dev_accuracy": accuracy, **extra}))
        assert bench.missing_methods(tmp_path / "seed0", profile, [
            "seed=0", "test.dev_decodings=[greedy, mbr]",
            f"test.mbr.calibration={calibration}"]) == missing, (weighed, extra, calibration)


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, repo / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shifted_prior_reverses_the_collection_shares_and_the_sample_has_them():
    """The shifted-prior setting: the collection's label shares reversed by rank, and the
    largest seeded test sample with exactly those shares (no query twice)."""
    report = _bench("effectiveness_report")
    target = report.shifted_prior({0: 0.41, 1: 0.16, 2: 0.43})
    assert target == {2: 0.16, 0: 0.41, 1: 0.43}
    labels = {f"q{i}": (0 if i < 50 else 1 if i < 70 else 2) for i in range(100)}
    ids = report.shifted_sample(labels, {0: 0.5, 1: 0.25, 2: 0.25}, seed=3)
    got = [labels[i] for i in ids]
    # label 1 has 20 queries at share 0.25: n = 80 -> 40 / 20 / 20
    assert (got.count(0), got.count(1), got.count(2)) == (40, 20, 20)
    assert len(set(ids)) == len(ids)
    assert report.shifted_sample(labels, {0: 0.5, 1: 0.25, 2: 0.25}, seed=3) == ids
    assert report.shifted_sample(labels, {0: 0.5, 1: 0.25, 2: 0.25}, seed=4) != ids


def test_benchmark_tasks_are_built_in_names_or_spec_files(tmp_path):
    bench = _bench("effectiveness")
    data = tmp_path / "data"
    (data / "ag_news").mkdir(parents=True)
    assert bench.task_arg("ag_news", data) == ("ag_news", [
        "task.name=ag_news", f"task.data_dir={data / 'ag_news'}"])
    assert bench.task_arg("rotten_tomatoes", data) == ("rotten_tomatoes",
                                                       ["task.name=rotten_tomatoes"])
    spec = tmp_path / "reviews.yaml"
    spec.write_text("name: reviews\n")
    assert bench.task_arg(str(spec), data) == ("reviews", [
        "task.name=byo", f"task.spec_path={spec.resolve()}"])
    import pytest

    with pytest.raises(SystemExit, match="neither a built-in task"):
        bench.task_arg("imbd", data)
    with pytest.raises(SystemExit, match="no such task spec file"):
        bench.task_arg(str(tmp_path / "missing.yaml"), data)


def test_report_only_summarises_the_finished_seeds_and_names_the_others(tmp_path, capsys):
    """--report-only reads what has finished while other seeds still run; a full run
    never summarises a seed that has no report."""
    import pandas as pd
    import pytest

    bench = _bench("effectiveness")
    report = tmp_path / "ag_news" / "seed0" / "report"
    report.mkdir(parents=True)
    pd.DataFrame({"method": ["qpo"], "query_id": ["q1"]}).to_parquet(
        report / "predictions.parquet")
    rows = bench.load_predictions(tmp_path, ["ag_news", "tweet_emotion"], [0, 1],
                                  finished_only=True)
    assert rows[["task", "seed"]].drop_duplicates().values.tolist() == [["ag_news", 0]]
    assert ("left out of everything below: ag_news seed 1, tweet_emotion seed 0, "
            "tweet_emotion seed 1") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ag_news seed 1"):
        bench.load_predictions(tmp_path, ["ag_news"], [0, 1])
    with pytest.raises(SystemExit, match="no finished"):
        bench.load_predictions(tmp_path, ["tweet_emotion"], [0], finished_only=True)


def test_archive_keeps_what_report_only_reads_of_each_finished_seed(tmp_path, capsys):
    """--archive copies each summarised seed's report files (not its policies) to a
    folder that --report-only then reads as a workdir."""
    import pandas as pd

    bench = _bench("effectiveness")
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    for seed in (0, 1):
        report = runs / "ag_news" / f"seed{seed}" / "report"
        report.mkdir(parents=True)
        pd.DataFrame({"method": ["qpo"], "query_id": [f"q{seed}"]}).to_parquet(
            report / "predictions.parquet")
        (report / "selection.json").write_text('{"loop": 1}')
        (report.parent / "loop1").mkdir()  # a policy folder: not archived
    bench.archive(runs, kept, bench.load_predictions(runs, ["ag_news"], [0, 1]))
    assert "archived 2 (task, seed) report(s)" in capsys.readouterr().out
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        f"ag_news/seed{s}/report/{f}" for s in (0, 1)
        for f in ("predictions.parquet", "selection.json")]
    again = bench.load_predictions(kept, ["ag_news"], [0, 1], finished_only=True)
    assert sorted(again["query_id"]) == ["q0", "q1"]


def test_checks_print_qpo_against_the_router_per_task_and_their_mean(capsys):
    """The router is no column of the per-seed table, yet each task's checks pair qpo
    with it, and the mean over tasks names each task's difference."""
    import pandas as pd

    report = _bench("effectiveness_report")
    rows = []
    # a: qpo right on 8 of 10, router on 6; b: qpo on 5, router on 6.
    for task, right in (("a", {"qpo": 8, "router": 6}), ("b", {"qpo": 5, "router": 6})):
        for method, k in right.items():
            rows += [{"task": task, "seed": 0, "method": method, "query_id": f"q{i}",
                      "accuracy": float(i < k), "prompt": "Say positive or negative."}
                     for i in range(10)]
    pred = pd.DataFrame(rows)
    report.task_checks(pred[pred["task"] == "a"], {}, "a", ["positive", "negative"])
    assert "qpo vs router           +20.0 [" in capsys.readouterr().out
    report.pooled(pred, ["a", "b"])
    assert ("qpo - router, mean over tasks: +5.0 (a +20.0, b -10.0; PASS"
            in capsys.readouterr().out)
