"""Target backends on the real tiny model: HF (batched, padded) against an unpadded
reference forward pass, and vLLM CPU (in a Ray actor) against HF."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qpo_ray.backends import create_backend, validate_backend_config
from qpo_ray.config import ConfigError, TargetConfig

# prefixes of different lengths, so that batching pads
PREFIXES = [
    "Review: a wonderful, moving film.\nIs this review positive or negative?\nAnswer:",
    "Review: dull.\nAnswer:",
    "Tweet: I can't believe they cancelled my flight again!!\nAnswer:",
]
SINGLE = [" positive", " negative"]
MULTI = [" very positive", " negative", " neutral stuff"]
# candidates that share leading tokens, and one that is a prefix of another
SHARED = [" very positive", " very negative", " very", " negative"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_chat(tiny_model_dir):
    return create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                       dtype="float32", batch_size=2))


@pytest.fixture(scope="module")
def hf_plain(tiny_model_dir):
    return create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                       dtype="float32", batch_size=8, use_chat_template=False))


def reference_logprob(backend, prefix: str, candidate: str) -> tuple[float, int]:
    """Unbatched, unpadded, uncached: one forward over prefix + candidate."""
    (prefix_ids,) = backend.encoder.encode_prefixes([prefix])
    (cand_ids,) = backend.encoder.encode_candidates([candidate])
    ids = torch.tensor([prefix_ids + cand_ids])
    with torch.inference_mode():
        logits = backend.model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = range(len(prefix_ids) - 1, len(prefix_ids) + len(cand_ids) - 1)
    return sum(logits[p, t].item() for p, t in zip(positions, cand_ids)), len(cand_ids)


@pytest.mark.parametrize("candidates", [SINGLE, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("which", ["hf_chat", "hf_plain"])
def test_hf_scores_match_unpadded_reference(request, which, candidates):
    backend = request.getfixturevalue(which)
    scores = backend.score_continuations(PREFIXES, candidates)
    assert len(scores) == len(PREFIXES) and all(len(r) == len(candidates) for r in scores)
    for prefix, row in zip(PREFIXES, scores):
        for cand, score in zip(candidates, row):
            ref, n = reference_logprob(backend, prefix, cand)
            assert score.num_tokens == n
            assert score.logprob_sum == pytest.approx(ref, abs=2e-3)
            assert score.logprob_sum < 0
    multi_token = [s.num_tokens for s in scores[0]]
    assert multi_token == ([1, 1] if candidates is SINGLE else [2, 1, 2])


def test_chat_template_wraps_prefix_and_drops_leading_space(hf_chat, hf_plain):
    wrapped = hf_chat.encoder.wrap("hello")
    assert wrapped.startswith("<|im_start|>") and wrapped.endswith("<|im_start|>assistant\n")
    assert hf_plain.encoder.wrap("hello") == "hello"
    tok = hf_chat.tokenizer
    assert hf_chat.encoder.encode_candidates([" positive"]) == [tok("positive")["input_ids"]]
    assert hf_plain.encoder.encode_candidates([" positive"]) == [tok(" positive")["input_ids"]]


def test_hf_generate_is_greedy_with_token_logprobs(hf_chat):
    gens = hf_chat.generate(PREFIXES, max_new_tokens=6)
    alone = hf_chat.generate(PREFIXES[1:2], max_new_tokens=6)[0]
    assert gens[1].text == alone.text  # left padding changes nothing
    assert gens[1].token_logprobs == pytest.approx(alone.token_logprobs, abs=2e-3)
    for gen in gens:
        assert 1 <= len(gen.token_logprobs) <= 6
        assert all(lp <= 0 for lp in gen.token_logprobs)
        assert gen.num_prompt_tokens > 10


def test_hf_usage_counts_calls_tokens_and_seconds(tiny_model_dir):
    backend = create_backend(TargetConfig(backend="transformers", model=str(tiny_model_dir),
                                          dtype="float32", use_chat_template=False))
    scores = backend.score_continuations(PREFIXES, MULTI)
    usage = backend.usage
    assert usage.calls == len(PREFIXES)
    assert usage.prompt_tokens == sum(r[0].num_prompt_tokens for r in scores)
    assert usage.completion_tokens == len(PREFIXES) * 5
    assert usage.engine_seconds > 0
    gens = backend.generate(PREFIXES[:1], max_new_tokens=3)
    assert backend.usage.completion_tokens == len(PREFIXES) * 5 + len(gens[0].token_logprobs)


# -- vLLM (CPU) inside a Ray actor, against HF -------------------------------------


@pytest.mark.parametrize("candidates", [SINGLE, MULTI, SHARED],
                         ids=["single-token", "multi-token", "shared-tokens"])
def test_vllm_scores_match_hf(vllm_actor, ray_cluster, hf_chat, candidates):
    got = ray_cluster.get(vllm_actor.score_continuations.remote(PREFIXES, candidates))
    want = hf_chat.score_continuations(PREFIXES, candidates)
    for got_row, want_row in zip(got, want):
        assert [s.num_tokens for s in got_row] == [s.num_tokens for s in want_row]
        assert [s.num_prompt_tokens for s in got_row] == [s.num_prompt_tokens for s in want_row]
        assert [s.logprob_sum for s in got_row] == pytest.approx(
            [s.logprob_sum for s in want_row], abs=2e-3)


def test_vllm_generation_matches_hf(vllm_actor, ray_cluster, hf_chat):
    got = ray_cluster.get(vllm_actor.generate.remote(PREFIXES, 6))
    want = hf_chat.generate(PREFIXES, 6)
    assert [g.text for g in got] == [g.text for g in want]
    for g, w in zip(got, want):
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=2e-3)
    usage = ray_cluster.get(vllm_actor.__ray_call__.remote(lambda self: self.usage))
    assert usage.calls >= len(PREFIXES) and usage.engine_seconds > 0


def test_candidate_trie_asks_each_context_once_shortest_first():
    from qpo_ray.backends.text import candidate_trie

    assert candidate_trie([[5], [7], [9]]) == [((), [5, 7, 9])]
    assert candidate_trie([[1, 2, 3], [1, 4], [1], [6]]) == [
        ((), [1, 6]), ((1,), [2, 4]), ((1, 2), [3])]


def test_importing_scoring_stack_pulls_in_no_engine():
    code = ("import sys, qpo_ray.backends, qpo_ray.scoring.local, qpo_ray.scoring.ray_data; "
            "print(sorted(m for m in ('vllm', 'deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# -- configuration errors, before any work -----------------------------------------


@pytest.mark.parametrize("overrides, key", [
    ({"backend": "tgi"}, "target.backend"),
    ({"model": "/nonexistent/model-dir"}, "target.model"),
    ({"model": "some-org/not-cached-model"}, "target.model"),
    ({"backend": "openai", "base_url": None}, "target.base_url"),
    ({"backend": "openai", "base_url": "http://127.0.0.1:9"}, "target.base_url"),
    ({"batch_size": 0}, "target.batch_size"),
    ({"backend": "vllm", "gpu_memory_utilization": 1.5}, "target.gpu_memory_utilization"),
])
def test_bad_backend_settings_fail_naming_the_key(monkeypatch, overrides, key):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TargetConfig(**{"backend": "transformers", **overrides})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_backend_config(cfg)


def test_good_settings_pass_and_the_same_with_one_bad_key_fails(tiny_model_dir):
    """The check accepts a working target and refuses it once one key is wrong."""
    good = TargetConfig(backend="transformers", model=str(tiny_model_dir))
    assert validate_backend_config(good) is None
    assert validate_backend_config(TargetConfig(backend="vllm", model=str(tiny_model_dir))) is None
    with pytest.raises(ConfigError, match=r"target\.model"):
        validate_backend_config(TargetConfig(backend="transformers",
                                             model=str(tiny_model_dir / "missing")))


def test_config_names_exactly_the_registered_backends():
    """config validates target.backend against BACKEND_NAMES without importing the
    registry; both must list the same backends, each resolving to its adapter class."""
    from qpo_ray.backends import BACKENDS, TargetBackend, backend_class
    from qpo_ray.config.sections import BACKEND_NAMES

    assert set(BACKEND_NAMES) == set(BACKENDS)
    for name in ("transformers", "openai"):  # vllm's adapter imports vllm: not here
        assert issubclass(backend_class(name), TargetBackend)



def test_shared_prefix_runs_group_sorted_heads_and_cover_every_row():
    from qpo_ray.backends.text import shared_prefix_runs

    seqs = [[1, 2, 3, 9], [7, 7], [1, 2, 3, 4, 5], [1, 2, 8], [1, 2, 3, 4, 6]]
    runs = shared_prefix_runs(seqs, min_shared=2)
    assert sorted(i for _, rows in runs for i in rows) == list(range(len(seqs)))
    assert runs == [(2, [2, 4, 0, 3]), (0, [1])]
    # a head never swallows a whole row: at least one token is left to read
    assert shared_prefix_runs([[1, 2, 3], [1, 2, 3]], 1) == [(2, [0, 1])]
    # rows without a head worth a pass are still batched together (read whole)
    assert shared_prefix_runs(seqs, 10) == [(0, [2, 4, 0, 3, 1])]


def test_shared_prefix_runs_keep_each_prompt_under_its_own_head():
    """QPO's shape: a template every row shares, then one of two prompts, then the
    query. One run per prompt (head = template + prompt) saves more than one run under
    the template alone, and more than runs of queries that share their first words."""
    from qpo_ray.backends.text import shared_prefix_runs

    template, prompts = [1, 2, 3], [[10, 11, 12, 13], [20, 21, 22, 23]]
    queries = [[5, 6, 7], [5, 6, 8], [9, 9], [30, 31, 32, 33]]
    seqs = [template + p + q for p in prompts for q in queries]
    runs = shared_prefix_runs(seqs, min_shared=2)
    assert runs == [(7, [0, 1, 2, 3]), (7, [4, 5, 6, 7])]
    # a run of two queries sharing 9 tokens saves 9; a prompt's run of four saves 21
    assert sum(head * (len(rows) - 1) for head, rows in runs) == 42


def test_length_batches_cut_sorted_rows_where_padding_costs_more_than_a_pass():
    from qpo_ray.backends.hf_backend import length_batches

    lengths = [10, 10, 10, 10, 60, 60]
    # without a cost per pass every distinct width gets its own batch
    assert length_batches(lengths, 8, 0) == [(0, 4), (4, 6)]
    # a pass dearer than the padding it saves: one batch
    assert length_batches(lengths, 8, 500) == [(0, 6)]
    # never more than max_rows, and every row exactly once, in order
    cuts = length_batches(list(range(1, 20)), 4, 8)
    assert cuts[0][0] == 0 and cuts[-1][1] == 19
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(0 < hi - lo <= 4 for lo, hi in cuts)
    assert length_batches([], 4, 8) == []


@pytest.fixture(scope="module")
def rt_prefixes():
    """Real Rotten Tomatoes pairs, as the target sees them: 3 collection prompts x 4
    queries, and a fourth prompt on one query."""
    from qpo_ray.config import load_config
    from qpo_ray.prompts import load_collection
    from qpo_ray.tasks import get_task

    cfg = load_config(None, {"task": {"name": "rotten_tomatoes"}})
    task = get_task(cfg.task)
    queries = task.splits(0.05, seed=0).collection[:4]
    prompts = load_collection(cfg.prompts, task.name)[:4]
    # the fourth prompt on one query only: a row under no shared head, read whole
    return ([task.format(p.text, q) for q in queries for p in prompts[:3]]
            + [task.format(prompts[3].text, queries[0])])


@pytest.mark.parametrize("batch_size", [8, 2],
                         ids=["prompts-share-a-batch", "a-prompt-over-batches"])
@pytest.mark.parametrize("candidates", [SINGLE, MULTI], ids=["single-token", "multi-token"])
def test_hf_shared_prefix_scoring_equals_per_pair_scoring(tiny_model_dir, rt_prefixes,
                                                          candidates, batch_size):
    """Computing each prompt's head once (and reading each row from its head's KV)
    changes no number: same log-probs to 1e-4 as reading every pair whole, and fewer
    tokens computed; with rows of prompts whose heads differ in length in one batch, a
    prompt's queries spread over several batches, and a row under no head."""
    config = TargetConfig(backend="transformers", model=str(tiny_model_dir), dtype="float32",
                          batch_size=batch_size)
    shared = create_backend(config)
    whole = create_backend(TargetConfig(**{**config.__dict__, "min_shared_prefix_tokens": 10**6}))
    got = shared.score_continuations(rt_prefixes, candidates)
    want = whole.score_continuations(rt_prefixes, candidates)
    for g_row, w_row in zip(got, want):
        assert [s.logprob_sum for s in g_row] == pytest.approx([s.logprob_sum for s in w_row],
                                                               abs=1e-4)
        assert [s.num_prompt_tokens for s in g_row] == [s.num_prompt_tokens for s in w_row]
    assert whole.usage.cached_prompt_tokens == 0
    # every prompt's run computes its head once: template + prompt, > 20 tokens each
    assert shared.usage.cached_prompt_tokens > 20 * (len(rt_prefixes) - 4)
    assert shared.usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize("candidates", [SINGLE, MULTI], ids=["single-token", "multi-token"])
def test_vllm_prefix_cached_scoring_matches_hf_on_real_pairs(vllm_actor, ray_cluster, hf_chat,
                                                             rt_prefixes, candidates):
    before = ray_cluster.get(vllm_actor.__ray_call__.remote(lambda self: self.usage))
    got = ray_cluster.get(vllm_actor.score_continuations.remote(rt_prefixes, candidates))
    after = ray_cluster.get(vllm_actor.__ray_call__.remote(lambda self: self.usage))
    want = hf_chat.score_continuations(rt_prefixes, candidates)
    for g_row, w_row in zip(got, want):
        assert [s.logprob_sum for s in g_row] == pytest.approx([s.logprob_sum for s in w_row],
                                                               abs=2e-3)
    # the prompts' heads came from vLLM's prefix cache (its own counter)
    assert after.cached_prompt_tokens - before.cached_prompt_tokens >= 32 * len(rt_prefixes) // 2
