"""The Serve app end to end on 127.0.0.1: a real (1-layer SmolLM2, briefly fitted) policy
from the real MLflow registry, the transformers target behind /v1/answer, input
validation, and a policy update picked up while a client keeps sending requests.

One Serve instance for the whole module (startup dominates the cost).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from qpo_ray.config import TrainingConfig, load_config
from qpo_ray.policy import QPOPolicy, generate_prompts
from qpo_ray.training.trainer import TorchEngine, build_loader, run_epoch

QUERIES = ["a gripping, funny film", "dull and far too long"]
PROMPT_HIGH = "Classify the sentiment of this movie review."
PROMPT_LOW = "Say something."
PROMPT_V2 = "Is this review positive or negative?"
MODEL_NAME = "qpo-serve-test"
MAX_QUERY_CHARS = 200


def fit_policy(cfg, targets: dict[float, str], out_dir: Path, max_steps: int = 40) -> QPOPolicy:
    """A 1-layer policy fitted (with the library's own training step) until it writes
    `targets[reward]` for every query in QUERIES: a policy whose output we can predict."""
    torch.manual_seed(0)
    policy = QPOPolicy.from_backbone(cfg.policy)
    rows = {"query": [], "prompt": [], "reward": []}
    for reward, prompt in targets.items():
        rows["query"] += QUERIES
        rows["prompt"] += [prompt] * len(QUERIES)
        rows["reward"] += [reward] * len(QUERIES)
    engine = TorchEngine(policy, TrainingConfig(), lr=1e-3)
    loader, _ = build_loader(policy, rows, len(rows["query"]), rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    for _ in range(0, max_steps, 4):
        run_epoch(engine, [batch] * 4, None)
        if all(generate_prompts(policy, QUERIES, target_reward=r) == [p] * len(QUERIES)
               for r, p in targets.items()):
            break
    else:
        raise AssertionError(f"policy did not fit {targets} in {max_steps} steps")
    policy.eval()
    policy.save(out_dir)
    return policy


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_model_dir, tiny_policy, free_port):
    workdir = tmp_path_factory.mktemp("serve-run")
    return load_config("cpu-demo", [
        f"workdir={workdir}",
        f"tracking.registered_model_name={MODEL_NAME}",
        *tiny_policy,
        "policy.max_query_tokens=16", "policy.max_prompt_tokens=12",
        "target.backend=transformers", f"target.model={tiny_model_dir}",
        "target.dtype=float32", "target.max_new_tokens=4",
        f"serve.port={free_port}", f"serve.max_query_chars={MAX_QUERY_CHARS}",
        "serve.num_cpus_per_replica=0.25", "evaluation.num_cpus_per_actor=0.25",
        "serve.registry_poll_interval_s=1",
        # Every new version at once (the default, @champion, waits for the test stage).
        f"serve.policy_uri=models:/{MODEL_NAME}@latest",
    ])


@pytest.fixture(scope="module")
def policies(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    first = fit_policy(cfg, {100.0: PROMPT_HIGH, 0.0: PROMPT_LOW}, root / "v1")
    second = fit_policy(cfg, {100.0: PROMPT_V2}, root / "v2")
    return {"v1": (first, root / "v1"), "v2": (second, root / "v2")}


@pytest.fixture(scope="module")
def tracker(cfg):
    from qpo_ray.run.tracking import Tracker

    return Tracker(cfg, cfg.workdir)


@pytest.fixture(scope="module")
def server(ray_cluster, cfg, policies, tracker):
    """Serve on a free 127.0.0.1 port, following models:/<name>@latest (version 1)."""
    from ray import serve

    from qpo_ray.serving import run_serve

    assert tracker.register_policy(1, policies["v1"][1]) == "1"
    url = run_serve(cfg, blocking=False)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    serve.shutdown()


def reference(policy: QPOPolicy, query: str, reward: float) -> str:
    return generate_prompts(policy, [query], target_reward=reward)[0]


def test_binds_loopback_and_reports_the_registry_version(server, cfg):
    assert server.base_url.host == "127.0.0.1"
    assert server.get("/healthz").json()["status"] == "ok"
    version = server.get("/v1/version").json()
    assert version["policy_version"] == f"models:/{MODEL_NAME}/1"
    assert version["policy_uri"] == f"models:/{MODEL_NAME}@latest"


def test_prompt_is_the_policys_greedy_prompt(server, policies):
    policy = policies["v1"][0]
    assert reference(policy, QUERIES[0], 100.0) == PROMPT_HIGH  # the fit worked
    for query in QUERIES + ["an unseen query about a film"]:
        body = server.post("/v1/prompt", json={"query": query}).json()
        request_id = body.pop("request_id")
        assert len(request_id) == 32 and body.pop("cached") in (True, False)
        assert len(body.pop("receipt")) == 64  # what feedback on it must present
        assert body == {"prompt": reference(policy, query, 100.0), "arm": "a",
                        "policy_version": f"models:/{MODEL_NAME}/1", "target_reward": 100.0,
                        "decoding": "greedy", "mbr_temperature": None,
                        "recorded_decoding": None}


def test_concurrent_requests_keep_their_own_target_reward(server, policies):
    policy = policies["v1"][0]
    # The fitted policy answers the two rewards differently, so a request conditioned
    # on its batch neighbour's reward would show.
    assert reference(policy, QUERIES[1], 0.0) == PROMPT_LOW
    cases = [(q, r) for q in QUERIES for r in (100.0, 0.0)] * 2

    def ask(case):
        query, reward = case
        return server.post("/v1/prompt", json={"query": query, "target_reward": reward})

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(ask, cases))
    for (query, reward), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        assert response.json()["target_reward"] == reward
        assert response.json()["prompt"] == reference(policy, query, reward)


def test_answer_runs_the_prompt_through_the_target(server, cfg, policies):
    from qpo_ray.backends import create_backend
    from qpo_ray.tasks import get_task
    from qpo_ray.tasks.base import Example

    query = QUERIES[0]
    body = server.post("/v1/answer", json={"query": query}).json()
    assert body["prompt"] == reference(policies["v1"][0], query, 100.0)
    assert body["policy_version"] == f"models:/{MODEL_NAME}/1"
    assert body["target_model"] == cfg.target.model
    # The same text through the same backend in this process gives the same answer.
    task = get_task(cfg.task)
    text = task.format(body["prompt"], Example(id="q", text=query, label=""))
    backend = create_backend(cfg.target)
    try:
        assert body["answer"] == backend.generate([text], cfg.target.max_new_tokens)[0].text
        scores = backend.score_continuations([text], task.continuations())[0]
    finally:
        backend.close()
    logprobs = {w: s.logprob_sum for w, s in zip(task.label_words, scores)}
    assert body["label"] == max(logprobs, key=logprobs.get)
    assert body["label_logprobs"] == pytest.approx(logprobs, abs=1e-3)


def test_answer_with_the_gold_label_records_its_outcome(server, cfg):
    from qpo_ray.serving.feedback import feedback_root, read_feedback

    body = server.post("/v1/answer", json={"query": QUERIES[1], "label": "negative"}).json()
    assert body["correct"] is (body["label"] == "negative")
    stored = read_feedback(feedback_root(cfg)).set_index("request_id").loc[body["request_id"]]
    assert (stored["correct"], stored["gold_label"], stored["feedback_source"]) == \
        (body["correct"], "negative", "answer-gold")
    assert (stored["target_label"], stored["prompt"]) == (body["label"], body["prompt"])
    again = server.post("/v1/feedback", json={"request_id": body["request_id"],
                                              "receipt": body["receipt"], "correct": True})
    assert again.status_code == 409
    # Without a label nothing is scored or recorded as feedback.
    plain = server.post("/v1/answer", json={"query": QUERIES[1]}).json()
    assert plain["correct"] is None
    assert plain["request_id"] not in set(read_feedback(feedback_root(cfg))["request_id"])


BAD_REQUESTS = [
    # (case, path, raw body, status, field named in the answer)
    ("malformed json", "/v1/prompt", '{"query": "a film",', 400, "body"),
    ("empty body", "/v1/prompt", "", 422, "body"),
    ("body not an object", "/v1/prompt", '["a film"]', 422, "body"),
    ("query missing", "/v1/prompt", '{"target_reward": 50}', 422, "query"),
    ("query empty", "/v1/prompt", '{"query": ""}', 422, "query"),
    ("query whitespace", "/v1/prompt", '{"query": "   \\n "}', 422, "query"),
    ("query a number", "/v1/prompt", '{"query": 42}', 422, "query"),
    ("query a list", "/v1/prompt", '{"query": ["a", "b"]}', 422, "query"),
    ("query null", "/v1/prompt", '{"query": null}', 422, "query"),
    ("query too long", "/v1/prompt", json.dumps({"query": "x" * (MAX_QUERY_CHARS + 1)}),
     422, "query"),
    ("reward above 100", "/v1/prompt", '{"query": "a film", "target_reward": 100.5}', 422,
     "target_reward"),
    ("reward below 0", "/v1/prompt", '{"query": "a film", "target_reward": -1}', 422,
     "target_reward"),
    ("reward a string", "/v1/prompt", '{"query": "a film", "target_reward": "high"}', 422,
     "target_reward"),
    ("reward a numeric string", "/v1/prompt", '{"query": "a film", "target_reward": "50"}',
     422, "target_reward"),
    ("reward a boolean", "/v1/prompt", '{"query": "a film", "target_reward": true}', 422,
     "target_reward"),
    ("reward NaN", "/v1/prompt", '{"query": "a film", "target_reward": NaN}', 422,
     "target_reward"),
    ("reward Infinity", "/v1/prompt", '{"query": "a film", "target_reward": Infinity}', 422,
     "target_reward"),
    ("unknown field", "/v1/prompt", '{"query": "a film", "reward": 50}', 422, "reward"),
    ("answer: query empty", "/v1/answer", '{"query": ""}', 422, "query"),
    ("answer: query too long", "/v1/answer",
     json.dumps({"query": "y" * (MAX_QUERY_CHARS + 1)}), 422, "query"),
    ("answer: malformed json", "/v1/answer", "{query: 1}", 400, "body"),
    ("answer: label not a label word", "/v1/answer", '{"query": "a", "label": "great"}', 422,
     "label"),
    ("client_key empty", "/v1/prompt", '{"query": "a film", "client_key": ""}', 422,
     "client_key"),
]


@pytest.mark.parametrize("case,path,raw,status,field", BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_a_4xx_naming_the_field(server, case, path, raw, status, field):
    response = server.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    body = response.json()
    assert [e["field"] for e in body["errors"]] == [field]
    assert body["errors"][0]["message"]


def test_wrong_route_and_method(server):
    assert server.get("/v1/prompt").status_code == 405
    assert server.post("/v1/nothing", json={"query": "a"}).status_code == 404


def test_new_policy_picked_up_without_failed_requests(server, cfg, policies, tracker):
    """While a client keeps calling /v1/prompt: (1) the loop registers version 2, which
    the replicas' alias poll swaps in; (2) the app is redeployed on a policy directory
    (a rolling replacement with surge). No request may fail."""
    from qpo_ray.serving import run_serve

    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=120) as client:
            while not stop.is_set():
                r = client.post("/v1/prompt", json={"query": QUERIES[0]})
                results.append((r.status_code, r.json() if r.status_code == 200 else {}))

    def wait_for_version(expected: str, deadline_s: float = 600) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if results and results[-1][1].get("policy_version") == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"version {expected} never served; last: {results[-1:]}")

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        wait_for_version(f"models:/{MODEL_NAME}/1")
        assert tracker.register_policy(2, policies["v2"][1]) == "2"
        wait_for_version(f"models:/{MODEL_NAME}/2")
        run_serve(cfg, blocking=False, policy_uri=str(policies["v1"][1]))
        wait_for_version(str(policies["v1"][1].resolve()))
        count = len(results)
        while len(results) < count + 3:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=120)
    failures = [r for r in results if r[0] != 200]
    assert failures == []
    served = [body["policy_version"] for _, body in results]
    # Every version was served, first seen in this order.
    order = list(dict.fromkeys(served))
    assert order == [f"models:/{MODEL_NAME}/1", f"models:/{MODEL_NAME}/2",
                     str(policies["v1"][1].resolve())]
    expected = {f"models:/{MODEL_NAME}/1": PROMPT_HIGH, f"models:/{MODEL_NAME}/2": PROMPT_V2,
                str(policies["v1"][1].resolve()): PROMPT_HIGH}
    assert all(body["prompt"] == expected[body["policy_version"]] for _, body in results)
