"""The Ray Data scoring pipeline on a real local Ray cluster with real engines: the
transformers backend and the vLLM CPU backend (both in engine actors) agree with
in-process scoring; engines start once per scorer; a killed actor loses and duplicates
nothing; bad settings fail first."""

from __future__ import annotations

import re

import pytest
import torch

from qpo_ray.backends import create_backend
from qpo_ray.config import Config, ConfigError, EvaluationConfig, TargetConfig
from qpo_ray.data.schema import SCORE_COLUMNS
from qpo_ray.scoring.ray_data import (FAULT_ENV, RayDataScorer, batch_pairs, engine_cpus,
                                 make_scorer)
from qpo_ray.scoring.local import LocalScorer

COMPARED = ["pair_id", "prediction", "correct", "answer_num_tokens", "prompt_tokens",
            "completion_tokens"]


def make_cfg(model_dir, backend: str = "transformers", **evaluation) -> Config:
    cfg = Config()
    cfg.target = TargetConfig(backend=backend, model=str(model_dir), dtype="float32",
                              max_model_len_tokens=512, cpu_kvcache_space_gib=1)
    cfg.evaluation = EvaluationConfig(**{"num_actors": 2, "batch_size_pairs": 5, **evaluation})
    return cfg


def sections(cfg: Config) -> tuple:
    """What a scorer takes of a config: the target and evaluation sections."""
    return cfg.target, cfg.evaluation


@pytest.fixture(scope="module")
def local_scores(tweet_emotion_task, tweet_pairs, tiny_model_dir):
    """The reference: the same pairs scored in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = create_backend(make_cfg(tiny_model_dir).target)
    out = LocalScorer(tweet_emotion_task, backend, demo_pool=[]).score(tweet_pairs)
    torch.set_num_threads(before)
    return out


def assert_same_scores(got, want):
    assert list(got["pair_id"]) == list(want["pair_id"])
    assert got[COMPARED].astype(str).equals(want[COMPARED].astype(str))
    assert got["answer_logprob"].tolist() == pytest.approx(want["answer_logprob"].tolist(),
                                                           abs=2e-3)


def test_pipeline_with_transformers_actors_matches_local(
        ray_cluster, tweet_emotion_task, tweet_pairs, tiny_model_dir, local_scores, capsys):
    scorer = make_scorer(*sections(make_cfg(tiny_model_dir)), tweet_emotion_task, demo_pool=[])
    assert isinstance(scorer, RayDataScorer) and scorer.num_actors == 2
    shuffled = tweet_pairs.sample(frac=1.0, random_state=0)
    out = scorer.score(shuffled)
    assert list(out.index) == list(shuffled.index)  # input order, input index
    assert out.drop(columns=list(SCORE_COLUMNS)).equals(shuffled)  # pair columns untouched
    assert all(cell == [] for cell in out["demo_correct"])
    assert_same_scores(out.sort_values("pair_id"), local_scores.sort_values("pair_id"))
    usage = scorer.usage
    assert usage.calls == len(tweet_pairs)
    assert usage.prompt_tokens == out["prompt_tokens"].sum() > 0
    assert usage.completion_tokens == out["completion_tokens"].sum()
    assert usage.engine_seconds > 0
    # The console's last line for the pass names the engines it started, and how long
    # the slowest took: the cost every pass pays again.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    starts = re.fullmatch(r"\[qpo\] scoring: (\d+)/\1 pairs, engines 2 started in "
                          r"<= (\d+) s, .*", last)
    assert starts, last
    assert abs(int(starts.group(2)) - scorer.last_slowest_start_seconds) <= 0.5


def test_pipeline_with_vllm_cpu_actor_matches_transformers(
        ray_cluster, tweet_emotion_task, tweet_pairs, tiny_model_dir, local_scores):
    cfg = make_cfg(tiny_model_dir, backend="vllm", num_actors=1, batch_size_pairs=12)
    scorer = RayDataScorer(*sections(cfg), tweet_emotion_task, demo_pool=[])
    out = scorer.score(tweet_pairs)
    assert_same_scores(out, local_scores)
    assert scorer.usage.calls == len(tweet_pairs)


def test_engines_start_once_and_serve_every_call_until_closed(
        ray_cluster, tweet_emotion_task, tweet_pairs, tiny_model_dir, local_scores, capsys):
    """A stage's calls share the scorer's engines (the test phase: dev pairs, then test
    pairs): the second call starts none and pays no engine start, and says so; close
    stops them. Two 1-CPU engines on this 2-CPU cluster would hold every CPU, where Ray
    Data hangs (ray-project/ray#44687): that both calls finish is part of the test."""
    import pandas as pd
    import ray

    from qpo_ray.backends.base import Usage

    scorer = RayDataScorer(*sections(make_cfg(tiny_model_dir)), tweet_emotion_task, demo_pool=[])
    first = scorer.score(tweet_pairs.iloc[:10])
    engines, after_first = list(scorer._engines), Usage().add(scorer.usage)
    assert len(engines) == 2 and after_first.engine_start_seconds > 0
    capsys.readouterr()
    second = scorer.score(tweet_pairs.iloc[10:])
    assert scorer._engines == engines
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"\[qpo\] scoring: (\d+)/\1 pairs, engines 2 reused, .*", last), last
    second_call = scorer.usage.minus(after_first)
    assert second_call.engine_start_seconds == 0 and second_call.calls == len(tweet_pairs) - 10
    assert_same_scores(pd.concat([first, second]), local_scores)
    scorer.close()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(engines[0].score.remote(tweet_pairs.iloc[:1], scorer._shared), timeout=60)


def test_engines_start_without_ray_logging_an_error(ray_cluster, tweet_emotion_task,
                                                    tweet_pairs, tiny_model_dir, capfd):
    """A restartable engine actor whose constructor held object-store refs made Ray log
    an error line (core_worker.cc, ray-project/ray#53727) at the start of every run;
    the refs now come with the batches."""
    scorer = RayDataScorer(*sections(make_cfg(tiny_model_dir, num_actors=1)),
                           tweet_emotion_task, demo_pool=[])
    scored = scorer.score(tweet_pairs.iloc[:4])
    scorer.close()
    assert len(scored) == 4
    err = capfd.readouterr().err
    assert "constructor arguments in the object store" not in err, err[-2000:]


def test_killed_actor_is_replaced_and_its_batch_retried(
        ray_cluster, tweet_emotion_task, tweet_pairs, tiny_model_dir, local_scores,
        tmp_path, monkeypatch):
    flag = tmp_path / "crashed"
    # pair 12 sits in the third batch of five: the actor dies after scoring others
    monkeypatch.setenv(FAULT_ENV, f"{flag}:{tweet_pairs['pair_id'][12]}")
    cfg = make_cfg(tiny_model_dir, num_actors=1)
    out = make_scorer(*sections(cfg), tweet_emotion_task, demo_pool=[]).score(tweet_pairs)
    assert flag.exists(), "the fault hook never fired"
    assert out["pair_id"].is_unique and len(out) == len(tweet_pairs)
    assert_same_scores(out, local_scores)


def test_bad_backend_settings_fail_before_any_actor_starts(
        ray_cluster, tweet_emotion_task, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir)
    cfg.target.model = "/nowhere/model"
    with pytest.raises(ConfigError, match=r"target\.model"):
        make_scorer(*sections(cfg), tweet_emotion_task, demo_pool=[])
    cfg = make_cfg(tiny_model_dir)
    cfg.target.backend, cfg.target.base_url = "openai", "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match=r"target\.base_url"):
        make_scorer(*sections(cfg), tweet_emotion_task, demo_pool=[])


def test_in_process_scorer_is_local(tweet_emotion_task, tiny_model_dir):
    scorer = make_scorer(*sections(make_cfg(tiny_model_dir)), tweet_emotion_task, demo_pool=[],
                         distributed=False)
    assert isinstance(scorer, LocalScorer)
    scorer.close()


@pytest.mark.parametrize("per_engine,engines,cluster,reserved", [
    (1, 2, 2, 0.5),   # 2 cores, 2 engines: one CPU left free for Ray Data's tasks
    (1, 1, 2, 1.0),   # a CPU is free anyway
    (1, 4, 16, 1.0),  # a GPU node: plenty free
    (2, 2, 4, 1.5),
    (1, 1, 1, 0.0),   # a 1-CPU cluster: the engine holds none
])
def test_engines_leave_ray_data_a_cpu(per_engine, engines, cluster, reserved):
    assert engine_cpus(per_engine, engines, cluster) == pytest.approx(reserved)


@pytest.mark.parametrize("num_pairs,max_pairs,actors", [
    (96, 128, 2), (319, 128, 2), (914, 128, 2), (2240, 128, 2), (3, 128, 2), (1, 128, 2),
    (7, 128, 4), (12, 12, 1), (10, 5, 2)])
def test_batches_are_equal_and_a_multiple_of_the_pool(num_pairs, max_pairs, actors):
    """Every engine of the pool gets the same share of a call: the batches never exceed
    the configured size, all but the last are equal and the last is short by less than
    a pair per batch, and (while there are pairs enough) they come in a multiple of the
    number of actors."""
    size = batch_pairs(num_pairs, max_pairs, actors)
    sizes = [min(size, num_pairs - i) for i in range(0, num_pairs, size)]
    assert sum(sizes) == num_pairs and max(sizes) <= max_pairs
    assert set(sizes[:-1]) <= {size} and size - sizes[-1] < len(sizes)
    if num_pairs >= actors:
        assert len(sizes) % actors == 0
    assert len(sizes) <= -(-num_pairs // max_pairs) + actors - 1  # no more than needed
