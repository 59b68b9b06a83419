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


def test_choice_headroom_reads_the_query_where_the_best_prompt_follows_it(tmp_path):
    # 40 wide queries x 3 prompts: "praise" is right on the 20 glowing reviews, "pan" on
    # the 20 scathing ones, "shrug" never; one prompt scored on fewer queries is left out.
    texts = ([f"A wonderful, moving film; I loved every minute of part {i}." for i in range(20)]
             + [f"A dreadful, boring mess; I hated every minute of part {i}." for i in range(20)])
    rows = []
    for q, text in enumerate(texts):
        for p in ("praise", "pan", "shrug"):
            right = (p == "praise") == (q < 20) and p != "shrug"
            rows.append({"loop": 0, "query_id": f"q{q}", "query": text, "prompt": p,
                         "prompt_id": p, "correct": float(right),
                         "r_query": float(right) + 0.01 * q, "reward": 100.0 * right})
    rows += [{"loop": 0, "query_id": "q0", "query": texts[0], "prompt": "narrow",
              "prompt_id": "narrow", "correct": 1.0, "r_query": 2.0, "reward": 100.0}]
    pd.DataFrame(rows).to_parquet(tmp_path / "dataset_loop0.parquet")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "seed": 0, "target": {"model": "smollm2-135m-instruct"},
        "policy": {"backbone": "smollm2-135m-instruct", "max_query_tokens": 40,
                   "query_summary": {"layers": 8, "dims": 16}}}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "choice_headroom.py"),
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "40 wide queries x 3 prompts" in proc.stdout
    acc = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
           if line.startswith("  ")}
    assert acc["oracle"] == 100.0
    assert 30.0 <= acc["fixed"] <= 70.0  # one of the two halves' prompts, whichever led
    assert acc["best_clf"] >= 90.0 and acc["router"] >= 90.0
