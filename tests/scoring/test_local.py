"""score_batch / LocalScorer on the real tweet_emotion task and the real tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpo_ray.backends import create_backend
from qpo_ray.config import TargetConfig, TaskConfig
from qpo_ray.data.schema import SCORE_COLUMNS
from qpo_ray.scoring.local import LocalScorer, query_example, score_batch
from qpo_ray.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                       dtype="float32"))


def test_zero_shot_scores_every_pair_in_order(tweet_emotion_task, tweet_pairs, backend):
    pairs = tweet_pairs.iloc[::-1].head(9)  # a shuffled index must survive
    scorer = LocalScorer(tweet_emotion_task, backend, demo_pool=[])
    out = scorer.score(pairs)
    assert list(out.index) == list(pairs.index)
    assert list(out["pair_id"]) == list(pairs["pair_id"])
    assert set(SCORE_COLUMNS) <= set(out.columns)

    task = tweet_emotion_task
    prefixes = [task.format(r.prompt, query_example(task, r)) for r in pairs.itertuples()]
    direct = backend.score_continuations(prefixes, task.continuations())
    for (_, row), scores in zip(out.iterrows(), direct):
        best = int(np.argmax([s.logprob_sum for s in scores]))
        assert row["prediction"] == str(best)
        assert row["correct"] == (best == int(row["label"]))
        assert row["answer_logprob"] == pytest.approx(scores[best].logprob_sum, abs=1e-4)
        assert row["answer_num_tokens"] == scores[best].num_tokens
        assert row["answer_nll"] == pytest.approx(-row["answer_logprob"] / row["answer_num_tokens"])
        assert row["answer_ppl"] == pytest.approx(math.exp(row["answer_nll"]))
        assert row["prompt_tokens"] == scores[0].num_prompt_tokens
        assert row["completion_tokens"] == sum(s.num_tokens for s in scores)
        assert list(row["demo_correct"]) == []
    assert scorer.usage.calls >= len(pairs)


def test_few_shot_scores_each_demo_set(tweet_emotion_task, tweet_pairs, backend):
    pool = tweet_emotion_task.load_split("train")[100:106]
    pairs = tweet_pairs.head(3).copy()
    pairs["demo_ids"] = [[[pool[0].id, pool[1].id], [pool[2].id, pool[3].id],
                          [pool[4].id, pool[5].id]]] * len(pairs)
    out = LocalScorer(tweet_emotion_task, backend, demo_pool=pool).score(pairs)
    zero = LocalScorer(tweet_emotion_task, backend, demo_pool=[]).score(tweet_pairs.head(3))
    for (_, row), (_, zrow) in zip(out.iterrows(), zero.iterrows()):
        assert len(row["demo_correct"]) == 3
        assert row["correct"] == row["demo_correct"][0]
        # three demo sets of two demos each: far more input than zero-shot
        assert row["prompt_tokens"] > 3 * zrow["prompt_tokens"]
        assert row["completion_tokens"] == 3 * zrow["completion_tokens"]


def test_unknown_demo_id_names_the_pair(tweet_emotion_task, tweet_pairs, backend):
    pairs = tweet_pairs.head(2).copy()
    pairs["demo_ids"] = [[["train-0"]], [["no-such-demo"]]]
    pool = tweet_emotion_task.load_split("train")[:1]
    with pytest.raises(ValueError, match="pair p0-1.*'no-such-demo'"):
        score_batch(tweet_emotion_task, backend, pairs, {d.id: d for d in pool}, 4)


def test_generation_task_parses_greedy_output(shared_data, backend):
    task = get_task(TaskConfig(name="gsm8k", data_dir=str(shared_data / "gsm8k")))
    queries = task.load_split("test")[:2]
    import pandas as pd

    pairs = pd.DataFrame([{"pair_id": f"g{i}", "query_id": q.id, "query": q.text,
                           "prompt": "Solve the problem.", "label": q.label, "demo_ids": []}
                          for i, q in enumerate(queries)])
    out = score_batch(task, backend, pairs, {}, max_new_tokens=5)
    gens = backend.generate([task.format("Solve the problem.", q) for q in queries], 5)
    for (_, row), gen, q in zip(out.iterrows(), gens, queries):
        assert row["prediction"] == task.parse(gen.text)
        assert row["correct"] == task.is_correct(q, task.parse(gen.text))
        assert 1 <= row["answer_num_tokens"] <= 5
        assert row["completion_tokens"] == row["answer_num_tokens"]
        assert row["answer_logprob"] == pytest.approx(sum(gen.token_logprobs), abs=1e-3)
