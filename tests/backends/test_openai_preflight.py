"""Bring your own LLM: a target behind an OpenAI-compatible server on 127.0.0.1
(tests/backends/openai_server.py, the real tiny model). `base_url` with or without /v1,
a served name with `target.tokenizer`, the pre-run check's one round trip, and Step 0
scored through it."""

from __future__ import annotations

import pytest

from qpo_ray.backends import create_backend, validate_backend_config
from qpo_ray.backends.preflight import api_root, check_model
from qpo_ray.common.errors import ConfigError
from qpo_ray.config import TargetConfig, load_config
from qpo_ray.data.io import read_dataset
from qpo_ray.run.loop import _check_before_work
from qpo_ray.run.stages import step0
from qpo_ray.run.stages.context import RunContext
from qpo_ray.scoring.ray_data import make_scorer
from tests.backends.conftest import SERVED_NAME

PREFIXES = ["Review: a wonderful, moving film.\nAnswer:"]
CANDIDATES = [" positive", " negative"]


def target(server, tiny_model_dir, **overrides) -> TargetConfig:
    return TargetConfig(**{"backend": "openai", "model": SERVED_NAME,
                           "tokenizer": str(tiny_model_dir), "base_url": server.url + "/v1",
                           "request_timeout_s": 30.0, **overrides})


def test_api_root_accepts_the_sdk_convention():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert api_root(url) == "http://h:8000"
    assert api_root("https://api.example.com/openai/v1") == "https://api.example.com/openai"


def test_base_url_with_or_without_v1_scores_the_same(server, tiny_model_dir):
    scores = []
    for url in (server.url + "/v1", server.url):
        cfg = target(server, tiny_model_dir, base_url=url)
        validate_backend_config(cfg, "labels")
        remote = create_backend(cfg)
        scores.append([s.logprob_sum for s in remote.score_continuations(PREFIXES,
                                                                         CANDIDATES)[0]])
        remote.close()
    assert scores[0] == scores[1] and len(scores[0]) == 2


def test_pre_run_check_names_the_key(server, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"target.model: 'typo' is not served by .*"
                                          r"tiny-served"):
        validate_backend_config(target(server, tiny_model_dir, model="typo"), "labels")
    # A served name is no tokenizer: the check says which key to set.
    with pytest.raises(ConfigError, match=r"^target.model: 'tiny-served' .*target.tokenizer"):
        validate_backend_config(target(server, tiny_model_dir, tokenizer=None), "labels")
    with pytest.raises(ConfigError, match=r"^target.tokenizer: 'no-such/tok'"):
        validate_backend_config(target(server, tiny_model_dir, tokenizer="no-such/tok"),
                                "labels")
    with pytest.raises(ConfigError, match=r"^target.base_url: .*/v1/models answered HTTP 404"):
        validate_backend_config(target(server, tiny_model_dir, base_url=server.url + "/x"))
    server.echo_supported = False
    try:
        with pytest.raises(ConfigError, match=r"^target.base_url: .*refused echo \+ logprobs"):
            validate_backend_config(target(server, tiny_model_dir), "labels")
        validate_backend_config(target(server, tiny_model_dir), "generate")  # needs no echo
    finally:
        server.echo_supported = True


def test_hub_errors_name_the_key():
    # HF_HUB_OFFLINE=1 (tests/conftest.py): a hub id that is not cached cannot load.
    with pytest.raises(ConfigError, match=r"^policy.backbone: 'nobody/typo-model' is neither "
                                          r"a local checkpoint nor in the Hugging Face cache"):
        check_model("nobody/typo-model", "policy.backbone")


def test_step0_scores_through_the_v1_url(server, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Is this review positive or negative?\nWhat is the sentiment?\n")
    cfg = load_config("cpu-demo", [
        f"workdir={tmp_path / 'run'}", "target.backend=openai", f"target.model={SERVED_NAME}",
        f"target.tokenizer={tiny_model_dir}", f"target.base_url={server.url}/v1",
        f"prompts.source={prompts}", "dataset.queries_per_group=3", "dataset.wide.enable=false",
        "test.methods=[qpo, best_single]", f"policy.backbone={tiny_model_dir}"])
    ctx = RunContext(cfg, scorer_factory=lambda c, t, demos: make_scorer(
        c.target, c.evaluation, t, demos, distributed=False))
    _check_before_work(ctx)  # the endpoint, echo + logprobs, the tokenizer, label words
    server.requests.clear()
    out = step0.build_initial_dataset(ctx, tmp_path / "d0.parquet")
    ctx.release_engines()
    frame, scale = read_dataset(out)
    assert len(frame) == 6 and frame["query_id"].nunique() == 3 and scale is not None
    assert frame["reward"].notna().all()
    paths = [p for p, _ in server.requests]
    assert paths.count("/v1/completions") == 6 and set(paths) <= {"/v1/completions",
                                                                  "/v1/models"}
