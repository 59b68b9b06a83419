"""benchmarks/choice_headroom.py on a run directory whose Step 0 is known: the ceiling,
the fixed prompt and a choice that reads the query come out as they must."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_run(run: Path, step0_rows: list[dict]) -> None:
    pd.DataFrame(step0_rows).to_parquet(run / "dataset_loop0.parquet")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "seed": 0, "target": {"model": "smollm2-135m-instruct"},
        "policy": {"backbone": "smollm2-135m-instruct", "max_query_tokens": 40,
                   "query_summary": {"layers": 8, "dims": 16}}}))


def headroom(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "choice_headroom.py"),
                           *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def rows_of(stdout: str) -> dict[str, float]:
    """rule -> the accuracy its row prints first (the first run's, on the dev split)."""
    return {line.split()[0]: float(line.split()[1]) for line in stdout.splitlines()
            if line.startswith("  ") and line.split()[0] not in ("rule", "run")}


def step0_rows() -> list[dict]:
    """40 wide queries x 3 prompts: "praise" is right on the 20 glowing reviews, "pan" on
    the 20 scathing ones, "shrug" never."""
    texts = ([f"A wonderful, moving film; I loved every minute of part {i}." for i in range(20)]
             + [f"A dreadful, boring mess; I hated every minute of part {i}." for i in range(20)])
    rows = []
    for q, text in enumerate(texts):
        for p in ("praise", "pan", "shrug"):
            right = (p == "praise") == (q < 20) and p != "shrug"
            rows.append({"loop": 0, "query_id": f"q{q}", "query": text, "prompt": p,
                         "prompt_id": p, "correct": float(right),
                         "r_query": float(right) + 0.01 * q, "reward": 100.0 * right})
    return rows


def test_choice_headroom_reads_the_query_where_the_best_prompt_follows_it(tmp_path):
    # Step 0 as step0_rows says; one prompt scored on fewer queries is left out.
    rows = step0_rows()
    rows += [{"loop": 0, "query_id": "q0", "query": rows[0]["query"], "prompt": "narrow",
              "prompt_id": "narrow", "correct": 1.0, "r_query": 2.0, "reward": 100.0}]
    write_run(tmp_path, rows)
    out = headroom(str(tmp_path))
    assert "40 wide queries x 3 prompts" in out
    acc = rows_of(out)
    assert acc["oracle"] == 100.0
    assert 30.0 <= acc["fixed"] <= 70.0  # one of the two halves' prompts, whichever led
    assert acc["best_clf"] >= 90.0 and acc["router"] >= 90.0


def test_dev_split_scores_rules_fitted_on_step0_with_the_dev_matrix(tmp_path):
    # Step 0 as step0_rows says; dev: 10 glowing and 10 scathing reviews not in Step 0,
    # with the rows best_single_dev scored (single:<id>) and a qpo variant right on 15.
    def review(i: int, glowing: bool) -> str:
        return (f"Truly wonderful and moving, dev film {i}; I loved it." if glowing else
                f"Truly dreadful and boring, dev film {i}; I hated it.")

    write_run(tmp_path, step0_rows())
    dev = []
    for i in range(20):
        glowing = i < 10
        for method, right in (("single:praise", glowing), ("single:pan", not glowing),
                              ("single:shrug", False), ("qpo_loop1/greedy", i < 15)):
            dev.append({"split": "dev", "method": method, "query_id": f"d{i:02d}",
                        "query": review(i, glowing), "correct": float(right)})
    (tmp_path / "report").mkdir()
    pd.DataFrame(dev).to_parquet(tmp_path / "report" / "predictions.parquet")
    (tmp_path / "report" / "selection.json").write_text(
        '{"loop": 1, "chosen_decoding": "greedy"}')
    out = headroom("--split", "dev", str(tmp_path))
    assert "dev split, 1 run(s), 20 queries" in out
    acc = rows_of(out)
    assert acc["oracle_wide"] == 100.0 and acc["qpo"] == 75.0
    assert acc["fixed"] == 50.0
    assert acc["best_clf"] >= 90.0 and acc["router"] >= 90.0
    best_clf = next(line for line in out.splitlines() if line.startswith("  best_clf "))
    assert float(best_clf.split()[3]) >= 15.0  # minus qpo's 75, on the same queries
