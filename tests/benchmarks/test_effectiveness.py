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
    methods = ["qpo", "qpo_loop1", "manual", "best_single", "router", "label_router",
               "label_router_collection"]
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
