"""Serving what the test stage chose, on a real Serve instance on 127.0.0.1 with a real
MLflow registry and the transformers target: `qpo serve`'s default URI is
models:/<name>@champion, decoded as the version's champion tags say (the test phase's
decoding and belief temperature); replicas follow the alias as it moves; the OpenAI
routes answer the official `openai` client with the policy's prompt, behind the same
token, with OpenAI-shaped errors; the registered version loads with mlflow.pyfunc, and
with policy_source.load_pyfunc decoded as its tags say."""

from __future__ import annotations

import json
import time
from urllib.parse import unquote

import httpx
import pandas as pd
import pytest

from qpo_ray.config import load_config
from qpo_ray.policy.mbr import save_table, utility_table
from qpo_ray.tasks.base import Example
from tests.serving.test_serve import PROMPT_HIGH, PROMPT_LOW, PROMPT_V2, QUERIES, fit_policy

MODEL_NAME = "qpo-champion-test"
TOKEN_ENV = "QPO_SERVE_CHAMPION_TEST_TOKEN"
TOKEN = "champion-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MBR_TEMPERATURE = 2.0
# Step 0 as the test phase and the train stage read it: 4 queries x 3 prompts. Where
# PROMPT_HIGH ranks best, PROMPT_V2 is right more often (so mbr differs from greedy).
CORRECT = {PROMPT_HIGH: [0, 1, 0, 1], PROMPT_LOW: [0, 0, 1, 0], PROMPT_V2: [1, 1, 1, 1]}
RANK = {PROMPT_HIGH: [9, 9, 1, 1], PROMPT_LOW: [1, 1, 9, 9], PROMPT_V2: [5, 5, 5, 5]}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_model_dir, tiny_policy, free_port, token_file):
    return load_config("cpu-demo", [
        f"workdir={tmp_path_factory.mktemp('serve-champion')}",
        f"tracking.registered_model_name={MODEL_NAME}", *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=12",
        "target.backend=transformers", f"target.model={tiny_model_dir}",
        "target.dtype=float32", "target.max_new_tokens=4",
        f"serve.port={free_port}", f"serve.auth_token_env={TOKEN_ENV}",
        f"serve.auth_token_file={token_file}", "serve.max_query_chars=200",
        "serve.num_cpus_per_replica=0.25", "evaluation.num_cpus_per_actor=0.25",
        "serve.registry_poll_interval_s=1",
    ])


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN)
    return path


@pytest.fixture(scope="module")
def step0(cfg) -> pd.DataFrame:
    rows = [{"loop": 0, "query_id": f"s{i}", "prompt": p, cfg.training.best_row_column:
             float(RANK[p][i]), "correct": bool(CORRECT[p][i])}
            for p in CORRECT for i in range(4)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def policy(cfg, step0, tmp_path_factory):
    """One fitted policy with the mbr table the train stage saves beside it."""
    out = tmp_path_factory.mktemp("policy") / "loop1"
    fitted = fit_policy(cfg, {100.0: PROMPT_HIGH, 0.0: PROMPT_LOW}, out)
    save_table(utility_table(step0, cfg.training.best_row_column), out)
    return fitted, out


@pytest.fixture(scope="module")
def test_phase_prompts(cfg, step0, policy):
    """What the test phase writes as `qpo`'s prompt (testphase.decoding.policy_prompts,
    the function evaluate_run puts into predictions.parquet) per decoding."""
    from qpo_ray.tasks import get_task
    from qpo_ray.testphase.decoding import MethodContext, policy_prompts

    ctx = MethodContext(cfg, get_task(cfg.task), [], None, {1: str(policy[1])}, step0=step0,
                        mbr_temperatures={1: MBR_TEMPERATURE})
    queries = [Example(id=f"q{i}", text=q, label="") for i, q in enumerate(QUERIES)]
    out = {d: [p[1] for p in policy_prompts(ctx, 1, d, queries)] for d in ("greedy", "mbr")}
    assert out["greedy"] == [PROMPT_HIGH] * 2 and out["mbr"] != out["greedy"], out
    return out


@pytest.fixture(scope="module")
def tracker(cfg, policy):
    """Versions 1 (loop 1, greedy champion) and 2 (loop 2, the same files, mbr) as the
    test stage tags them; the champion is version 1 first."""
    from qpo_ray.run.tracking import Tracker

    tracker = Tracker(cfg, cfg.workdir)
    assert tracker.register_policy(1, policy[1]) == "1"
    assert tracker.register_policy(2, policy[1]) == "2"
    tracker.promote_champion(1, {"qpo.loop": "1", "qpo.decoding": "greedy",
                                 "qpo.target_reward": "100.0"})
    return tracker


@pytest.fixture(scope="module")
def server(ray_cluster, cfg, tracker):
    from ray import serve

    from qpo_ray.serving import run_serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        url = run_serve(cfg, blocking=False)  # no policy_uri: the champion
    with httpx.Client(base_url=url, timeout=120, headers=AUTH) as client:
        yield client
    serve.shutdown()


def _wait_for_version(server, version: str) -> None:
    deadline = time.time() + 60
    while server.get("/v1/version").json()["policy_version"] != version:
        assert time.time() < deadline, server.get("/v1/version").json()
        time.sleep(0.5)


def test_serves_the_greedy_champion_as_the_test_phase_decoded_it(server, test_phase_prompts):
    version = server.get("/v1/version").json()
    assert version["policy_uri"] == f"models:/{MODEL_NAME}@champion"
    assert version["policy_version"] == f"models:/{MODEL_NAME}/1"
    assert version["arms"][0]["decoding"] == "greedy"
    for query, expected in zip(QUERIES, test_phase_prompts["greedy"]):
        body = server.post("/v1/prompt", json={"query": query}).json()
        assert body["prompt"] == expected, body
        assert (body["decoding"], body["policy_version"]) == ("greedy", f"models:/{MODEL_NAME}/1")


def test_follows_the_champion_to_an_mbr_version_at_its_temperature(server, tracker,
                                                                   test_phase_prompts):
    tracker.promote_champion(2, {"qpo.loop": "2", "qpo.decoding": "mbr",
                                 "qpo.mbr_temperature": repr(MBR_TEMPERATURE),
                                 "qpo.target_reward": "100.0"})
    _wait_for_version(server, f"models:/{MODEL_NAME}/2")
    for query, expected in zip(QUERIES, test_phase_prompts["mbr"]):
        body = server.post("/v1/prompt", json={"query": query}).json()
        assert body["prompt"] == expected, body
        assert body["decoding"] == "mbr" and body["mbr_temperature"] == MBR_TEMPERATURE
    # Back to version 1 for the tests below (and the alias is followed both ways).
    tracker.client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    _wait_for_version(server, f"models:/{MODEL_NAME}/1")


def test_openai_client_gets_an_answer_whose_prompt_is_the_policys(server, test_phase_prompts):
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list().data][0] == "qpo"
    raw = client.chat.completions.with_raw_response.create(
        model="qpo", messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": QUERIES[0]}], temperature=0.2)
    completion = raw.parse()
    assert unquote(raw.headers["x-qpo-prompt"]) == test_phase_prompts["greedy"][0]
    assert raw.headers["x-qpo-policy-version"] == f"models:/{MODEL_NAME}/1"
    assert raw.headers["x-qpo-decoding"] == "greedy"
    extra = completion.model_extra["qpo"]
    assert extra["prompt"] == PROMPT_HIGH and extra["policy_version"].endswith("/1")
    # The message is the test phase's prediction: the target's best label word.
    logprobs = extra["label_logprobs"]
    assert completion.choices[0].message.content == max(logprobs, key=logprobs.get)
    assert completion.choices[0].message.role == "assistant"
    # The same query on /v1/answer: the same prompt and the same target label.
    answer = server.post("/v1/answer", json={"query": QUERIES[0]}).json()
    assert answer["label"] == completion.choices[0].message.content


def test_openai_errors_have_openai_shape_and_statuses(server):
    import openai

    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model="qpo", messages=[{"role": "user", "content": "x"}])
    assert denied.value.status_code == 401 and isinstance(denied.value.body, dict)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "x"}])
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    cases = [({"model": "qpo", "messages": []}, "messages"),
             ({"model": "qpo", "messages": [{"role": "system", "content": "hi"}]}, "messages"),
             ({"model": "qpo", "messages": [{"role": "user", "content": "x" * 201}]},
              "messages.0.content"),
             ({"model": "qpo", "messages": [{"role": "user", "content": "  "}]},
              "messages.0.content"),
             ({"model": "qpo", "messages": [{"role": "user", "content": "x"}], "stream": True},
              "stream")]
    for body, param in cases:
        response = server.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    bad = server.post("/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_registered_version_loads_and_predicts_with_mlflow_pyfunc(cfg, tracker,
                                                                  test_phase_prompts):
    import mlflow

    # models:/ URIs resolve through the process-wide registry URI: set for this test only.
    registry = mlflow.get_registry_uri()
    mlflow.set_registry_uri(cfg.tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    finally:
        mlflow.set_registry_uri(registry)
    assert model.metadata.get_input_schema().input_names() == ["query"]
    out = model.predict(pd.DataFrame({"query": QUERIES}))
    assert list(out) == test_phase_prompts["greedy"]
    mbr = model.predict(pd.DataFrame({"query": QUERIES}),
                        params={"decoding": "mbr", "mbr_temperature": MBR_TEMPERATURE})
    assert list(mbr) == test_phase_prompts["mbr"]
    # A dict of lists reaches the model as one row holding the list: refused, not
    # answered with one prompt for the list's text.
    with pytest.raises(Exception, match="query: row 0 is"):
        model.predict({"query": QUERIES})


def test_load_pyfunc_decodes_a_version_as_its_tags_say(cfg, tracker, test_phase_prompts,
                                                       monkeypatch):
    """Version 2 tagged mbr at MBR_TEMPERATURE (as the test stage tags a champion):
    load_pyfunc gives what the test phase wrote (and Serve returns) with no params, a
    param still overrides, and a bad model_config is refused at load."""
    import mlflow

    from qpo_ray.serving.policy_source import load_pyfunc

    for key, value in {"qpo.decoding": "mbr", "qpo.mbr_temperature": repr(MBR_TEMPERATURE),
                       "qpo.target_reward": "100.0"}.items():
        tracker.client.set_model_version_tag(MODEL_NAME, "2", key, value)
    queries = pd.DataFrame({"query": QUERIES})
    model = load_pyfunc(f"models:/{MODEL_NAME}/2", cfg.tracking_uri())
    assert list(model.predict(queries)) == test_phase_prompts["mbr"]
    assert list(model.predict(queries, params={"decoding": "greedy"})) == \
        test_phase_prompts["greedy"]
    champion = load_pyfunc(f"models:/{MODEL_NAME}@champion", cfg.tracking_uri())
    assert list(champion.predict(queries)) == test_phase_prompts["greedy"]  # version 1
    client = mlflow.MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL_NAME, "2"),
        tracking_uri=cfg.tracking_uri())
    assert list(mlflow.pyfunc.load_model(local).predict(queries)) == \
        test_phase_prompts["greedy"]  # MLflow alone cannot read the tags
    # What `mlflow models serve` reads (docs/serving.md).
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps(
        {"decoding": "mbr", "mbr_temperature": MBR_TEMPERATURE}))
    assert list(mlflow.pyfunc.load_model(local).predict(queries)) == test_phase_prompts["mbr"]
    monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")
    with pytest.raises(ValueError, match="model_config: decoding must be greedy or mbr"):
        mlflow.pyfunc.load_model(local, model_config={"decoding": "beam"})
    with pytest.raises(ValueError, match="not a models:/ URI"):
        load_pyfunc(local, cfg.tracking_uri())
