"""Parquet round trip with the reward scale in the file metadata; the schema check."""

from __future__ import annotations

import json
import math

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
