"""Import of the QPO paper's published offline dataset (Tweet Emotion, Llama-2-7b, few-shot)."""

from __future__ import annotations

import json

import pytest

from qpo_ray.data.importer import import_paper_json
from qpo_ray.data.io import read_dataset, write_dataset
from qpo_ray.data.rewards import expert_threshold
from qpo_ray.data.schema import ALL_COLUMNS
from qpo_ray.data.stats import dataset_stats

PAPER_FILE = "qpo_offline/tweet_emotion_llama7b_few_shot_expert.json"


@pytest.fixture(scope="module")
def paper(shared_data):
    return import_paper_json(shared_data / PAPER_FILE)


def test_paper_file_counts_and_columns(paper):
    df, scale = paper
    assert len(df) == 8587
    assert df["prompt_id"].nunique() == 151 and df["query_id"].nunique() == 260
    assert set(ALL_COLUMNS) <= set(df.columns)
    assert not df["prompt"].str.contains("<|endoftext|>", regex=False).any()
    assert set(df["label"]) == {"0", "1", "2", "3"}
    assert {"manual", "ape", "rlprompt", "chatgpt_rewrite", "no_instruction"} <= set(df["source"])
    assert not df["source"].str.startswith("instructions/").any()
    assert (df["r_raw"] == df["r_query"] + df["r_task"]).all()
    assert (scale.min, scale.max) == (df["r_raw"].min(), df["r_raw"].max())
    assert df["reward"].between(0, 100).all()
    first = df.iloc[0]
    assert first["source"] == "ape" and first["r_query"] == 1.0 and first["r_task"] == 0.599
    assert first["prompt"].endswith("sadness, anger, and joy.")


def test_paper_dataset_round_trips_and_describes_itself(paper, tmp_path):
    df, scale = paper
    write_dataset(df, tmp_path / "paper.parquet", scale)
    back, back_scale = read_dataset(tmp_path / "paper.parquet")
    assert back_scale == scale and len(back) == 8587
    stats = dataset_stats(back)
    assert (stats["rows"], stats["queries"], stats["prompts"]) == (8587, 260, 151)
    assert stats["reward"]["min"] == 0.0 and stats["reward"]["max"] == 100.0
    assert stats["rows_per_loop"] == {0: 8587}
    assert sum(stats["rows_per_source"].values()) == 8587
    assert expert_threshold(back["reward"]) == pytest.approx(66.7)


def write(tmp_path, name, entries):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def entry(**changes):
    base = {"prompt_method": "instructions/manual", "query": "so happy today",
            "label": 1, "prompt": "Which emotion?<|endoftext|>",
            "llama7b": {"few_shot_accuracy": 0.8, "few_shot_avg_acc": 0.6}}
    return {**base, **changes}


def test_label_words_map_to_the_task_index(tmp_path):
    path = write(tmp_path, "tweet_emotion_mine.json",
                 [entry(label="joy"), entry(label="Sadness", query="sad"), entry(label=2)])
    df, _ = import_paper_json(path)
    assert df["label"].tolist() == ["1", "3", "2"]


def test_malformed_entries_name_file_and_index(tmp_path):
    bad_key = write(tmp_path, "tweet_emotion_a.json", [entry(), {"query": "x"}])
    with pytest.raises(ValueError, match=r"tweet_emotion_a\.json: entry 1: missing key"):
        import_paper_json(bad_key)
    bad_reward = write(tmp_path, "tweet_emotion_b.json",
                       [entry(), entry(), entry(llama7b={"few_shot_accuracy": "high",
                                                         "few_shot_avg_acc": 0.5})])
    with pytest.raises(ValueError, match=r"entry 2: llama7b\.few_shot_accuracy must be a number"):
        import_paper_json(bad_reward)
    bad_label = write(tmp_path, "tweet_emotion_c.json", [entry(label=7)])
    with pytest.raises(ValueError, match=r"entry 0: label 7 out of range"):
        import_paper_json(bad_label)
    with pytest.raises(ValueError, match=r"entry 0: missing key 'gpt35'"):
        import_paper_json(write(tmp_path, "x.json", [entry()]), target_key="gpt35")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"query": 1,\n')
    with pytest.raises(ValueError, match=r"broken\.json: line \d+: not valid JSON"):
        import_paper_json(broken)
