"""Parquet round trip with the reward scale in the file metadata; the schema check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from qpo_ray.data.io import DatasetFileError, read_dataset, write_dataset
from qpo_ray.data.rewards import RewardScale, compute_rewards
from qpo_ray.data.schema import PAIR_COLUMNS, REWARD_SCALE_KEY


def scored_pairs() -> pd.DataFrame:
    return pd.DataFrame({
        "pair_id": ["l0-0", "l0-1", "l0-2"], "query_id": ["q1", "q2", "q1"],
        "query": ["good film", "bad film", "good film"],
        "prompt_id": ["p-a", "p-a", "p-b"], "prompt": ["Sentiment?", "Sentiment?", "Mood?"],
        "source": ["manual", "manual", "terse"], "label": ["1", "0", "1"],
        "group": [0, 0, 0], "loop": [0, 0, 0], "seed": [11, 12, 11],
        "demo_ids": [[["d1", "d2"], ["d3", "d4"]], [["d5", "d6"], ["d1", "d3"]],
                     [["d1", "d2"], ["d3", "d4"]]],
        "prediction": ["1", "1", "0"], "correct": [True, False, False],
        "demo_correct": [[True, True], [False, True], [False, False]],
        "answer_nll": [0.1, 0.9, 0.5], "answer_ppl": [math.exp(x) for x in (0.1, 0.9, 0.5)],
    })


def test_round_trip_keeps_rows_types_and_scale(tmp_path):
    df, scale = compute_rewards(scored_pairs(), penalty="nll", few_shot=True)
    path = write_dataset(df, tmp_path / "sub" / "loop0.parquet", scale)
    back, back_scale = read_dataset(path)
    assert back_scale == scale
    assert list(back.columns) == list(df.columns)
    assert back["demo_ids"].tolist() == df["demo_ids"].tolist()
    assert back["demo_correct"].tolist() == df["demo_correct"].tolist()
    assert back["reward"].tolist() == pytest.approx(df["reward"].tolist())
    assert back["correct"].tolist() == [True, False, False]
    assert str(back["loop"].dtype) == "int64"
    stored = pq.read_schema(path).metadata[REWARD_SCALE_KEY.encode()]
    assert RewardScale.from_dict(json.loads(stored)) == scale


def test_zero_shot_empty_demo_ids_keep_their_type(tmp_path):
    df = scored_pairs().assign(demo_ids=[[], [], []])
    path = write_dataset(df, tmp_path / "zs.parquet", None)
    back, scale = read_dataset(path)
    assert scale is None
    assert back["demo_ids"].tolist() == [[], [], []]
    demo_type = pq.read_schema(path).field("demo_ids").type
    assert str(demo_type) == "list<element: list<element: string>>"


def test_missing_column_on_read_names_file_and_column(tmp_path):
    path = tmp_path / "partial.parquet"
    scored_pairs().drop(columns=["prompt"]).to_parquet(path)
    with pytest.raises(DatasetFileError, match=r"partial\.parquet: missing column 'prompt'"):
        read_dataset(path)
    with pytest.raises(DatasetFileError, match=r"nope\.parquet: dataset file not found"):
        read_dataset(tmp_path / "nope.parquet")
    with pytest.raises(DatasetFileError, match=r"without column\(s\) \['loop'\]"):
        write_dataset(scored_pairs().drop(columns=["loop"]), tmp_path / "x.parquet", None)
    assert set(PAIR_COLUMNS) <= set(scored_pairs().columns)


def test_later_loop_merge_keeps_the_first_scale(tmp_path):
    step0, scale = compute_rewards(scored_pairs(), penalty="nll")
    write_dataset(step0, tmp_path / "d0.parquet", scale)
    loaded, stored = read_dataset(tmp_path / "d0.parquet")
    round1 = scored_pairs().assign(loop=1, pair_id=["l1-0", "l1-1", "l1-2"])
    scored1, used = compute_rewards(round1, penalty="nll", scale=stored, r_task=0.5)
    merged = pd.concat([loaded, scored1], ignore_index=True)
    write_dataset(merged, tmp_path / "d1.parquet", used)
    back, back_scale = read_dataset(tmp_path / "d1.parquet")
    assert back_scale == scale and len(back) == 6
    assert back.groupby("loop").size().to_dict() == {0: 3, 1: 3}


KILLED_WRITER = """
import os, signal, sys
import pyarrow.parquet as pq
from qpo_ray.data.io import read_dataset, write_dataset

path = sys.argv[1]
frame, scale = read_dataset(path)
real_write = pq.write_table

def write_then_die(table, where, **kwargs):  # the crash: written, not yet renamed
    real_write(table, where, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = write_then_die
write_dataset(frame.iloc[:1], path, scale)
"""


def test_a_write_killed_before_its_rename_leaves_the_old_dataset(tmp_path):
    """SIGKILL between writing the new file and renaming it into place: the old dataset is
    still there whole (a crash can never leave a truncated or mixed Parquet file)."""
    path = tmp_path / "dataset_1.parquet"
    frame, scale = compute_rewards(scored_pairs(), "nll")
    write_dataset(frame, path, scale)
    before = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable by Serve
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert path.read_bytes() == before
    got, got_scale = read_dataset(path)
    assert len(got) == len(frame) and got_scale == scale
    # What the crash leaves besides: one hidden, complete temporary file, never read.
    (stray,) = tmp_path.glob(".dataset_1.parquet.*.tmp")
    assert len(read_dataset(stray)[0]) == 1
    write_dataset(frame.iloc[:2], path, scale)  # and the next write goes through
    assert len(read_dataset(path)[0]) == 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
