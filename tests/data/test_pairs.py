"""Step 0 pairs and augmentation pairs on the real Tweet Emotion splits."""

from __future__ import annotations

import pandas as pd
import pytest

from qpo_ray.config import ConfigError, load_config
from qpo_ray.data.pairs import (
    NO_GROUP,
    WIDE_GROUP,
    build_step0_pairs,
    build_wide_pairs,
    make_pairs,
    wide_queries,
)
from qpo_ray.data.schema import PAIR_COLUMNS
from qpo_ray.prompts import load_collection
from qpo_ray.tasks import get_task


@pytest.fixture(scope="module")
def emotion(shared_data):
    cfg = load_config(None, {"task": {"name": "tweet_emotion",
                                      "data_dir": str(shared_data / "tweet_emotion")},
                             "prompts": {"source": str(shared_data / "instructeval_prompts"),
                                         "methods": ["manual", "ape"]}})
    task = get_task(cfg.task)
    splits = task.splits(cfg.task.collection_fraction, seed=cfg.seed)
    prompts = load_collection(cfg.prompts, "tweet_emotion")
    return task, splits, prompts


def step0_args(cfg) -> tuple:
    """What Step 0's pair builder takes of a config."""
    return cfg.task, cfg.dataset, cfg.seed


def config(**dataset):
    return load_config(None, {"dataset": {"prompts_per_group": 4, "queries_per_group": 6,
                                          **dataset}})


def test_step0_groups_share_their_own_random_queries(emotion):
    task, splits, prompts = emotion
    assert len(prompts) == 10
    cfg = config()
    df = build_step0_pairs(task, splits, prompts, *step0_args(cfg))
    assert list(df.columns) == list(PAIR_COLUMNS)
    assert len(df) == 10 * 6 and df["pair_id"].is_unique
    assert sorted(df["group"].unique()) == [0, 1, 2]  # groups of 4, 4 and 2 prompts
    assert df.groupby("group")["prompt_id"].nunique().tolist() == [4, 4, 2]
    assert set(df["prompt_id"]) == {p.id for p in prompts}
    collected = {e.id: e for e in splits.collection}
    for _, group in df.groupby("group"):
        queries = group.groupby("prompt_id")["query_id"].apply(frozenset)
        assert queries.nunique() == 1 and len(queries.iloc[0]) == 6
        assert queries.iloc[0] <= set(collected)
    row = df.iloc[0]
    assert row["query"] == collected[row["query_id"]].text
    assert row["label"] == str(collected[row["query_id"]].label)
    assert (df["loop"] == 0).all() and (df["demo_ids"].map(len) == 0).all()
    assert {p.source for p in prompts} == set(df["source"])


def test_step0_is_reproducible_per_seed(emotion):
    task, splits, prompts = emotion
    first = build_step0_pairs(task, splits, prompts, *step0_args(config()))
    again = build_step0_pairs(task, splits, prompts, *step0_args(config()))
    assert first.equals(again)
    other = build_step0_pairs(task, splits, prompts, *step0_args(load_config(
        None, {"seed": 1, "dataset": {"prompts_per_group": 4, "queries_per_group": 6}})))
    assert set(other["query_id"]) != set(first["query_id"])


def test_few_shot_demos_come_only_from_the_demo_pool(emotion):
    task, splits, prompts = emotion
    cfg = load_config(None, {"task": {"num_shots": 3, "num_demo_sets": 2},
                             "dataset": {"prompts_per_group": 5, "queries_per_group": 20}})
    df = build_step0_pairs(task, splits, prompts, *step0_args(cfg))
    pool = {e.id for e in splits.demo_pool}
    collected = {e.id for e in splits.collection}
    demo_ids = {d for sets in df["demo_ids"] for one in sets for d in one}
    assert demo_ids <= pool and not demo_ids & collected
    assert all(len(sets) == 2 and all(len(s) == 3 and len(set(s)) == 3 for s in sets)
               for sets in df["demo_ids"])
    # The prompts of a group see a query with the same demonstrations.
    per_query = df.groupby(["group", "query_id"])["demo_ids"].apply(
        lambda col: len({repr(v) for v in col}))
    assert (per_query == 1).all()
    assert df.groupby("query_id")["demo_ids"].first().map(repr).nunique() > 1


def test_make_pairs_zips_queries_and_prompts(emotion):
    task, splits, _ = emotion
    queries = [splits.collection[0], splits.collection[1], splits.collection[0]]
    generated = [("p-1", "Name the emotion.", "policy"), ("p-2", "Feeling?", "policy"),
                 ("p-1", "Name the emotion.", "policy")]
    shots = {"num_shots": 2, "num_demo_sets": 3}
    df = make_pairs(queries, generated, task, splits, **shots, loop=2, seed=7)
    assert list(df.columns) == list(PAIR_COLUMNS) and len(df) == 3
    assert df["query_id"].tolist() == [q.id for q in queries]
    assert df["prompt"].tolist() == [g[1] for g in generated]
    assert (df["loop"] == 2).all() and (df["group"] == NO_GROUP).all()
    assert df["pair_id"].tolist() == ["l2-0", "l2-1", "l2-2"]
    pool = {e.id for e in splits.demo_pool}
    assert all(set(d) <= pool for sets in df["demo_ids"] for d in sets)
    assert df.equals(make_pairs(queries, generated, task, splits, **shots, loop=2, seed=7))
    assert all(len(sets) == 3 and all(len(d) == 2 for d in sets) for sets in df["demo_ids"])
    with pytest.raises(ValueError, match="2 queries but 3 prompts"):
        make_pairs(queries[:2], generated, task, splits, **shots, loop=2, seed=7)


def test_few_shot_is_refused_for_tasks_without_it(emotion, tmp_path):
    _, splits, prompts = emotion
    (tmp_path / "d.csv").write_text("t,l\na,x\nb,y\nc,x\nd,y\ne,x\n")
    (tmp_path / "spec.yaml").write_text(
        "name: t\ntype: classification\nfiles: {train: d.csv}\ntext_column: t\n"
        "label_column: l\nlabel_words: {x: one, y: two}\nfew_shot: false\n")
    cfg = load_config(None, {"task": {"name": "byo", "spec_path": str(tmp_path / "spec.yaml"),
                                      "num_shots": 1}})
    task = get_task(cfg.task)
    with pytest.raises(ValueError, match="task.num_shots: task t does not support few-shot"):
        build_step0_pairs(task, task.splits(0.5, 0), prompts, *step0_args(cfg))


def test_wide_step0_adds_other_collection_queries_for_the_given_prompts(emotion):
    task, splits, prompts = emotion
    cfg = config(prompts_per_group=0, queries_per_group=7,
                 wide={"enable": True, "prompts": 2, "queries": 9})
    shared = build_step0_pairs(task, splits, prompts, *step0_args(cfg))
    wide_args = (cfg.dataset.wide, cfg.task.num_shots, cfg.seed)
    queries = wide_queries(splits, shared, *wide_args)
    assert [q.id for q in queries] == [q.id for q in wide_queries(splits, shared, *wide_args)]
    collection = {q.id for q in splits.collection}
    ids = {q.id for q in queries}
    assert len(ids) == 9 and ids <= collection and not ids & set(shared["query_id"])
    wide = build_wide_pairs(queries, prompts[:2], cfg.seed)
    assert list(wide.columns) == list(PAIR_COLUMNS)
    assert len(wide) == 18 and (wide["group"] == WIDE_GROUP).all() and (wide["loop"] == 0).all()
    per_prompt = wide.groupby("prompt_id")["query_id"].apply(frozenset)
    assert set(per_prompt.index) == {p.id for p in prompts[:2]}
    assert (per_prompt == frozenset(ids)).all()
    assert wide["pair_id"].is_unique and not set(wide["pair_id"]) & set(shared["pair_id"])
    too_many = config(prompts_per_group=0, queries_per_group=7,
                      wide={"enable": True, "prompts": 2, "queries": len(collection)})
    with pytest.raises(ConfigError, match=f"dataset.wide.queries: {len(collection)} asked"):
        wide_queries(splits, shared, too_many.dataset.wide, too_many.task.num_shots, too_many.seed)
    few_shot = load_config(None, {"task": {"num_shots": 2}, "dataset": {
        "prompts_per_group": 0, "queries_per_group": 7,
        "wide": {"enable": True, "prompts": 2, "queries": 9}}})
    with pytest.raises(ConfigError, match="wide Step 0 is zero-shot only"):
        wide_queries(splits, shared, few_shot.dataset.wide, few_shot.task.num_shots, few_shot.seed)


def test_step0_with_one_group_gives_every_prompt_the_same_queries(emotion):
    task, splits, prompts = emotion
    df = build_step0_pairs(task, splits, prompts,
                           *step0_args(config(prompts_per_group=0, queries_per_group=7)))
    assert len(df) == len(prompts) * 7 and (df["group"] == 0).all()
    per_prompt = df.groupby("prompt_id")["query_id"].apply(frozenset)
    assert per_prompt.nunique() == 1 and len(per_prompt.iloc[0]) == 7


def test_complementary_wide_prompts_cover_the_queries_the_best_ones_miss():
    """Hand-made shared table: A and B (best R_task) are right on the same queries, C on
    the ones they miss. `task` takes A, B; `complementary` takes A, then C; ties in what
    a prompt adds go to R_task, then to the collection's order."""
    from qpo_ray.run.stages.step0 import choose_wide_prompts

    right = {"A": [1, 1, 1, 0, 0], "B": [1, 1, 1, 0, 0], "C": [0, 0, 0, 1, 1],
             "D": [0, 1, 0, 1, 0], "E": [0, 1, 0, 1, 0]}
    shared = pd.DataFrame([{"query_id": f"q{i}", "prompt_id": p, "correct": bool(c),
                            "r_task": sum(cs) / 5 + (0.01 if p == "B" else 0.0)}
                           for p, cs in right.items() for i, c in enumerate(cs)])
    order = ["E", "D", "C", "A", "B"]
    assert choose_wide_prompts(shared, order, 2, "task") == ["B", "A"]
    assert choose_wide_prompts(shared, order, 2, "complementary") == ["B", "C"]
    # Nothing left to cover: R_task (A 0.6 > D = E 0.4), then the order (E before D).
    assert choose_wide_prompts(shared, order, 5, "complementary") == ["B", "C", "A", "E", "D"]
    assert choose_wide_prompts(shared, order, 9, "complementary") == ["B", "C", "A", "E", "D"]
    with pytest.raises(ConfigError, match="dataset.wide.selection"):
        choose_wide_prompts(shared, order, 2, "random")
